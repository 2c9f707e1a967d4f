"""What `telepacs serve` becomes once it has set up: a small parent that runs the processes and stops them.

``telepacs serve`` migrates the index and reads the settings with the whole
archive imported (about 100 MB of pydicom, numpy, SQLAlchemy and the S3
client), then replaces itself (``exec``) with this module, which imports the
standard library only: the parent of a running installation then holds about
10 MB instead of sitting on those 100 MB for nothing.

Run as ``python -m telepacs.supervise SPEC`` where SPEC is the JSON of a
:class:`Plan`: the children's command lines, the addresses to wait for and
the lines to print once they listen.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

from telepacs.logs import setup_logging

log = logging.getLogger("telepacs.cli")


@dataclass
class Plan:
    commands: list[list[str]]
    listening: list[tuple[str, int]] = field(default_factory=list)  # (host, port) to wait for, in order
    banner: list[str] = field(default_factory=list)  # printed once everything listens
    log_level: str = "INFO"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        raw = json.loads(text)
        return cls(commands=raw["commands"], listening=[(host, int(port)) for host, port in raw["listening"]],
                   banner=raw["banner"], log_level=raw.get("log_level", "INFO"))


def wait_listening(host: str, port: int, procs: list[subprocess.Popen[bytes]], timeout: float = 60) -> None:
    """Wait until something accepts connections on host:port (or a child died)."""
    target = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            return
        try:
            with socket.create_connection((target, port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    log.warning("nothing listens on %s:%s after %.0f s", host, port, timeout)


def run(plan: Plan) -> int:
    """Start the children, wait for them to listen, then supervise: one dies or a signal comes, all stop."""
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    procs = [subprocess.Popen(command) for command in plan.commands]
    for host, port in plan.listening:
        wait_listening(host, port, procs)
    for line in plan.banner:
        print(line, flush=True)
    status = 0
    while not stopping:
        for proc in procs:
            if proc.poll() is not None:
                log.error("child %s exited with %s; stopping telepacs", proc.args, proc.returncode)
                stopping, status = True, 1
        time.sleep(0.5)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    return status


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m telepacs.supervise PLAN_JSON (run by `telepacs serve`)", file=sys.stderr)
        return 2
    plan = Plan.from_json(args[0])
    setup_logging(plan.log_level)
    return run(plan)


if __name__ == "__main__":
    sys.exit(main())
