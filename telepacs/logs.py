"""One log line per event: time, level, process, logger, message."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
        force=True,
    )
    # pynetdicom logs every PDU at INFO; our handlers log what matters.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
