"""The web side of telepacs: a Flask app factory (``gunicorn "viewer:create_app()"``)."""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify
from flask.typing import ResponseReturnValue

from archive.config import load_settings


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """Build the web app; settings come from ``archive.config`` unless a test passes its own."""
    app = Flask(__name__)
    settings = load_settings()
    app.config.update(TELEPACS_SETTINGS=settings)
    if test_config:
        app.config.update(test_config)

    from viewer.auth import init_auth
    from viewer.consults.views import bp as consults
    from viewer.dicomweb import bp as dicomweb
    from viewer.i18n import init_i18n
    from viewer.ohif import bp as ohif
    from viewer.reader import bp as reader
    from viewer.ui import bp as ui
    from viewer.ui import local_timezone

    app.config.setdefault("BABEL_DEFAULT_TIMEZONE", local_timezone())  # times on pages: the hospital's clock
    init_i18n(app)
    init_auth(app)  # first before_request hook: deny by default
    app.register_blueprint(dicomweb)
    app.register_blueprint(ohif)
    app.register_blueprint(ui)
    app.register_blueprint(consults)
    app.register_blueprint(reader)

    @app.get("/openapi.json")
    def openapi() -> ResponseReturnValue:
        from viewer.openapi import openapi_document

        return jsonify(openapi_document())

    @app.get("/healthz")
    def healthz() -> ResponseReturnValue:
        return jsonify(status="ok", ae_title=app.config["TELEPACS_SETTINGS"].ae_title)

    return app
