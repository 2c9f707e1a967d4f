"""Event-driven waits for pynetdicom's reactor threads: fast when data flows, quiet when it does not.

pynetdicom runs two polling loops per association. The DUL thread sleeps
``_run_loop_delay`` (1 ms) whenever a turn found nothing to do; the
association reactor sleeps 1 ms every turn before looking for a DIMSE
message. Those sleeps, not the work, bound the receive rate; shorter sleeps
make idle associations burn CPU, and worse, make the pollers fight the
C-STORE handler for the GIL while it parses, hashes and commits.

Here each of those two sleeps becomes a wait on the very thing the loop is
about to look for, with a timeout:

- the DUL thread waits until its socket is readable or another thread hands
  it a primitive to send (``send_pdu`` pokes a wake-up socket), at most
  ``DUL_WAIT`` seconds;
- the association reactor waits until a DIMSE message is queued for it, at
  most ``REACTOR_WAIT`` seconds.

Both apply to associations we accepted (the node's side); see ``_accepted``.
The DUL wait also applies to associations we open only to send requests and
whose reactor :func:`guard_requestor` keeps off the DIMSE queue (the C-MOVE
sub-association to a move destination): there the race that keeps
requestors on stock timing cannot happen.

So a PDU or a response is handled the moment it exists, and an idle
association wakes only a few dozen times a second (for its timers and for
release/abort checks). Only the reactors' exact 1 ms sleeps are replaced;
every other ``time.sleep`` in pynetdicom is left alone.

``install()`` applies this by giving ``pynetdicom.dul`` and
``pynetdicom.association`` a ``time`` module whose ``sleep`` dispatches on
the calling thread, and by wrapping ``DULServiceProvider.send_pdu``.
"""

from __future__ import annotations

import select
import socket
import threading
import time as _time
from typing import Any

REACTOR_SLEEP = 0.001  # the sleep both pynetdicom loops use
DUL_WAIT = 0.02
REACTOR_WAIT = 0.005

_WAKE_ATTR = "_telepacs_wake"
_GUARDED_ATTR = "_telepacs_requests_only"
_WAITING_ATTR = "_telepacs_waiting"


def _wake_pair(dul: Any) -> tuple[socket.socket, socket.socket]:
    """The DUL's wake-up socket pair (created on first use; closed when the DUL is collected)."""
    pair = getattr(dul, _WAKE_ATTR, None)
    if pair is None:
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        pair = (reader, writer)
        setattr(dul, _WAKE_ATTR, pair)
    return pair  # type: ignore[no-any-return]


def wake_dul(dul: Any) -> None:
    """Interrupt the DUL thread's wait (a primitive was queued for it to send), if it is waiting.

    A DUL busy sending (a 512 KB instance is 32 PDUs to a 16 KB peer) is
    not poked once per PDU: that was a system call per PDU for nothing.
    """
    pair = getattr(dul, _WAKE_ATTR, None)
    if pair is not None and getattr(dul, _WAITING_ATTR, False):
        try:
            pair[1].send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already poked, or closing: the wait ends by itself


def dul_wait(dul: Any, timeout: float = DUL_WAIT) -> None:
    """Wait until the DUL's socket is readable, a primitive is queued, or ``timeout``.

    The waiting flag is raised before the queues are looked at: a primitive
    queued after that look finds the flag up and pokes the wake-up socket.
    """
    reader, _ = _wake_pair(dul)
    setattr(dul, _WAITING_ATTR, True)
    try:
        _wait(dul, reader, timeout)
    finally:
        setattr(dul, _WAITING_ATTR, False)


def _wait(dul: Any, reader: socket.socket, timeout: float) -> None:
    if dul.to_provider_queue.qsize() or dul.event_queue.qsize():
        return
    assoc_socket = getattr(dul, "socket", None)
    sock = getattr(assoc_socket, "socket", None)
    watched: list[Any] = [reader]
    if sock is not None and sock.fileno() >= 0:
        pending = getattr(sock, "pending", None)  # TLS may hold decrypted bytes select() cannot see
        if pending is not None and pending():
            return
        watched.append(sock)
    try:
        ready, _, _ = select.select(watched, [], [], timeout)
    except (OSError, ValueError):
        return  # socket closed under us: let the loop notice
    if reader in ready:
        try:
            while reader.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass


def reactor_wait(assoc: Any, timeout: float = REACTOR_WAIT) -> None:
    """Wait until a DIMSE message is queued for the association reactor, or ``timeout``."""
    dimse = getattr(assoc, "dimse", None)
    queue = getattr(dimse, "msg_queue", None)
    if queue is None:
        _time.sleep(REACTOR_SLEEP)
        return
    with queue.not_empty:
        if not queue._qsize():
            queue.not_empty.wait(timeout)
        if queue._qsize():
            # put() notifies one waiter: if that was us, pass it on, since a
            # thread blocked in queue.get() (a requestor awaiting its response)
            # may be waiting for this very message.
            queue.not_empty.notify()


def guard_requestor(assoc: Any) -> None:
    """Keep the reactor of an association we opened to send requests (C-STORE…) off its DIMSE queue.

    A requestor pauses its reactor around each request it sends, but the
    pause can be observed as taken just before the reactor looks at the
    queue; a response arriving then is taken by the reactor as an
    "unexpected message" and the sender fails its sub-operation (0xB000 on
    a C-MOVE). Such an association never receives requests, so its reactor
    has nothing to take: its non-blocking looks at the queue return nothing,
    and the sender's blocking wait gets every response. Marks the
    association for the event-driven DUL wait.
    """
    dimse = assoc.dimse
    original = dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        if not block and threading.current_thread() is assoc:
            return None, None
        return original(block)

    dimse.get_msg = get_msg
    setattr(assoc, _GUARDED_ATTR, True)


class _ReactorTime:
    """Stands in for the ``time`` module inside pynetdicom's reactor modules."""

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        if seconds == REACTOR_SLEEP:
            thread = threading.current_thread()
            assoc = getattr(thread, "assoc", None)
            if _is_dul(thread) and (_accepted(assoc) or getattr(assoc, _GUARDED_ATTR, False)):
                dul_wait(thread)
                return
            if _is_association(thread) and _accepted(thread):
                reactor_wait(thread)
                return
        _time.sleep(seconds)


def _accepted(assoc: Any) -> bool:
    """Only associations we accepted get the fast waits.

    A requestor pauses its reactor around each operation it sends, and
    pynetdicom's pause has a window in which a fast enough response is taken
    by the reactor instead of the waiting sender ("unexpected message", then
    a DIMSE timeout). Stock timing keeps that window closed; so requestors
    (our outgoing associations) keep stock timing.
    """
    return bool(getattr(assoc, "is_acceptor", False))


def _is_dul(thread: threading.Thread) -> bool:
    from pynetdicom.dul import DULServiceProvider

    return isinstance(thread, DULServiceProvider)


def _is_association(thread: threading.Thread) -> bool:
    from pynetdicom.association import Association

    return isinstance(thread, Association)


_installed = False


def install() -> None:
    """Apply the event-driven waits to pynetdicom (idempotent, process-wide)."""
    global _installed
    if _installed:
        return
    import pynetdicom.association
    import pynetdicom.dul

    proxy = _ReactorTime()
    pynetdicom.dul.time = proxy  # type: ignore[assignment]
    pynetdicom.association.time = proxy  # type: ignore[assignment]

    original_send_pdu = pynetdicom.dul.DULServiceProvider.send_pdu

    def send_pdu(self: Any, primitive: Any) -> None:
        original_send_pdu(self, primitive)
        wake_dul(self)

    pynetdicom.dul.DULServiceProvider.send_pdu = send_pdu  # type: ignore[method-assign]
    _installed = True
