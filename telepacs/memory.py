"""glibc malloc settings for long-lived multi-threaded processes (the web workers).

glibc gives every thread that meets a busy arena a new one (up to 8 per core); a gunicorn worker's
threads, each handling half-megabyte pixel buffers, then spread their memory over many arenas that
fragment and are never given back. Two arenas cut the web workers' peak RSS from 739 to 677 MB in
``scripts/bench_viewer.py`` (two workers, a 300-slice CT), at no measurable cost in speed.

A fixed mmap threshold (``mmap_threshold``: big blocks mmapped and returned on free) saved a little
more (668 MB) but made every rendered slice 2.5–3 ms slower (a page fault per page of each new pixel
buffer): it is off by default.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
M_ARENA_MAX = -8


def tune_malloc(arenas: int = 2, mmap_threshold: int | None = None) -> bool:
    """Apply the settings to this process (call it before the threads start); False where libc is not glibc.

    ``mmap_threshold`` None keeps glibc's own, adaptive threshold.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = mallopt(M_ARENA_MAX, arenas) == 1
    if mmap_threshold is not None:
        applied = mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 and applied
    if not applied:
        log.warning("malloc settings not applied (arenas %d, mmap threshold %d)", arenas, mmap_threshold)
    return applied
