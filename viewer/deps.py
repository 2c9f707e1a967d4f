"""Request-scoped access to the archive (one :class:`Archive` per web process, opened on first use)."""

from __future__ import annotations

import threading

from flask import current_app

from archive.service import Archive

_lock = threading.Lock()


def get_archive() -> Archive:
    """The app's archive; a test may pass its own as ``TELEPACS_ARCHIVE`` in ``test_config``."""
    app = current_app
    archive = app.config.get("TELEPACS_ARCHIVE")
    if archive is None:
        with _lock:
            archive = app.config.get("TELEPACS_ARCHIVE")
            if archive is None:
                # The schema is migrated by `telepacs serve`/`init`; the spool is drained by `telepacs drain`.
                archive = Archive.open(app.config["TELEPACS_SETTINGS"], migrate=False, drain_spool=False)
                app.config["TELEPACS_ARCHIVE"] = archive
    return archive  # type: ignore[no-any-return]
