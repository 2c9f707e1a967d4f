"""gunicorn settings for telepacs' web app (``gunicorn -c python:viewer.gunicorn_conf 'viewer:create_app()'``).

The command line still chooses the bind address, workers and threads; this module adds what a command
line cannot: each worker fixes its malloc settings (:mod:`telepacs.memory`), logs like the rest of
telepacs (time, level, process, logger; the configured level) and warms itself up (:mod:`viewer.warmup`)
before it accepts its first connection.
"""

from __future__ import annotations

from typing import Any


def post_fork(server: Any, worker: Any) -> None:
    from telepacs.memory import tune_malloc

    tune_malloc()


def post_worker_init(worker: Any) -> None:
    from flask import Flask

    from telepacs.logs import setup_logging
    from viewer.warmup import warm_worker

    app = worker.wsgi
    if isinstance(app, Flask):
        setup_logging(app.config["TELEPACS_SETTINGS"].log_level)
        warm_worker(app)
