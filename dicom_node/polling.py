"""Adaptive polling for pynetdicom's reactor threads: fast while data flows, quiet when idle.

pynetdicom runs two polling loops per association: the DUL thread sleeps
``_run_loop_delay`` (1 ms) whenever a turn found nothing to do, and the
association reactor sleeps 1 ms every turn. With small instances that
latency, not the work, bounds the receive rate. Shorter fixed sleeps burn CPU
while associations sit idle.

This module gives both loops one sleep policy, keyed on how long ago the
association last received data (the DUL's idle timer, restarted on every
received PDU):

- data within the last ``BUSY_WINDOW`` seconds: sleep ``BUSY_SLEEP`` (50 µs);
- otherwise, up to ``QUIET_AFTER`` seconds of silence: pynetdicom's nominal 1 ms;
- after that: ``QUIET_SLEEP`` (10 ms), so idle associations cost almost nothing.

It is installed by replacing the ``time`` module seen by ``pynetdicom.dul``
and ``pynetdicom.association`` with a proxy whose ``sleep`` applies the
policy for the calling reactor thread and passes any other call through.
"""

from __future__ import annotations

import threading
import time as _time
from types import ModuleType
from typing import Any

BUSY_WINDOW = 0.2
BUSY_SLEEP = 0.00005
NOMINAL_SLEEP = 0.001
QUIET_AFTER = 5.0
QUIET_SLEEP = 0.01


def sleep_for_silence(silence: float | None, requested: float) -> float:
    """The sleep for a reactor loop given seconds since data last arrived (None: unknown)."""
    if requested > NOMINAL_SLEEP or silence is None:
        # Not a reactor poll (e.g. a deliberate wait): leave it alone.
        return requested
    if silence < BUSY_WINDOW:
        return BUSY_SLEEP
    if silence < QUIET_AFTER:
        return NOMINAL_SLEEP
    return QUIET_SLEEP


def _silence_of_current_thread() -> float | None:
    """Seconds since the current reactor thread's association last received a PDU."""
    thread = threading.current_thread()
    dul = getattr(thread, "dul", None) or thread  # Association thread, or the DUL thread itself
    timer = getattr(dul, "_idle_timer", None)
    start = getattr(timer, "_start_time", None)
    if start is None:
        return None
    return _time.time() - start


class _AdaptiveTime:
    """Stands in for the ``time`` module inside pynetdicom's reactor modules."""

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        _time.sleep(sleep_for_silence(_silence_of_current_thread(), seconds))


_installed = False


def install() -> None:
    """Apply the adaptive policy to pynetdicom (idempotent)."""
    global _installed
    if _installed:
        return
    import pynetdicom.association
    import pynetdicom.dul

    proxy = _AdaptiveTime()
    modules: tuple[ModuleType, ...] = (pynetdicom.dul, pynetdicom.association)
    for module in modules:
        module.time = proxy  # type: ignore[attr-defined]
    _installed = True
