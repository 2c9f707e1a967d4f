"""Run one DICOM receiving process: ``python -m dicom_node [--reuse-port]``."""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
import threading

from archive.config import load_settings
from archive.service import Archive
from dicom_node.server import start_node
from telepacs.logs import setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dicom_node")
    parser.add_argument("--config", help="TOML settings file")
    parser.add_argument("--reuse-port", action="store_true", help="share the port with sibling workers")
    parser.add_argument("--no-drain", action="store_true",
                        help="leave uploading the S3 spool to a `telepacs drain` process")
    args = parser.parse_args(argv)
    settings = load_settings(args.config)
    setup_logging(settings.log_level)
    archive = Archive.open(settings, migrate=False, drain_spool=not args.no_drain)
    server = start_node(archive, reuse_port=args.reuse_port)
    gc.freeze()  # what start-up loaded (pydicom's dictionaries, SQLAlchemy, ...) is never collected: shorter GC pauses
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):  # a timed wait: the main thread wakes to run the signal handler
        pass
    logging.getLogger("dicom_node").info("DICOM worker stopping")
    server.shutdown()
    archive.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
