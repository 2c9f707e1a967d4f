"""telepacs.memory: glibc malloc settings for the web workers."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO

# Eight threads allocating pixel-sized and small blocks at once, then glibc's own count of its arenas.
_THREADS = """
import ctypes, ctypes.util, sys, threading
if sys.argv[1] == "tuned":
    from telepacs.memory import tune_malloc
    assert tune_malloc()
def work():
    for _ in range(150):
        blocks = [bytearray(600_000) for _ in range(3)] + [bytearray(100) for _ in range(50)]
        del blocks
threads = [threading.Thread(target=work) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
ctypes.CDLL(ctypes.util.find_library("c")).malloc_stats()
"""


def _arenas(mode: str) -> int:
    # In a child process: the settings stay with the process that applies them.
    out = subprocess.run([sys.executable, "-c", _THREADS, mode], cwd=REPO, capture_output=True, text=True, check=True)
    return sum(line.startswith("Arena ") for line in out.stderr.splitlines())


def test_tuned_process_keeps_two_malloc_arenas_under_eight_threads():
    assert _arenas("tuned") <= 2
    assert _arenas("plain") > 2  # the glibc default this guards against
