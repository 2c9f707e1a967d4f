"""Deny by default: every request needs a logged-in user, except the few public endpoints.

Installed by :func:`init_auth` from ``viewer.create_app``. Pages send an anonymous visitor to
``/login?next=...``; APIs and DICOMweb answer 401 with a JSON body. A route whose parameters name
a study, series or instance (``viewer.auth.access.check_route_objects``) is checked before its view
runs, unless the view is marked :func:`checks_objects_itself` (STOW-RS, which stores new objects).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any, Callable, TypeVar

from flask import Flask, Response, current_app, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue

from archive.config import Settings
from archive.keys import InvalidUID
from viewer.auth.access import StudyNotVisible, check_route_objects
from viewer.auth.csrf import UNSAFE_METHODS, csrf_token, csrf_valid
from viewer.auth.identity import current_identity, current_user

log = logging.getLogger(__name__)

PUBLIC_ENDPOINTS = frozenset({"auth.login", "healthz", "static", "i18n.switch_language", "openapi"})
API_PREFIXES = ("/dicomweb", "/api/")
SECRET_FILE = "secret-key"
SESSION_COOKIE = "telepacs_session"

F = TypeVar("F", bound=Callable[..., Any])


def checks_objects_itself(view: F) -> F:
    """Mark a view that checks the objects it names itself (the guard does not look them up first)."""
    view._telepacs_checks_objects = True  # type: ignore[attr-defined]
    return view


def load_secret_key(settings: Settings) -> str:
    """The configured secret key, or the one generated once into ``DATA_DIR/secret-key`` (mode 0600)."""
    if settings.secret_key:
        return settings.secret_key
    path = Path(settings.data_dir) / SECRET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_text().strip()
        if len(key) < 32:
            raise RuntimeError(f"{path} holds no usable secret key; delete it to have a new one generated") from None
        return key
    key = secrets.token_urlsafe(48)
    with os.fdopen(fd, "w") as f:  # first worker to start wins (O_EXCL); the others read it
        f.write(key + "\n")
    log.info("auth: generated a new secret key in %s", path)
    return key


def wants_json() -> bool:
    """An API caller (answer JSON) rather than a person's browser (answer a page)."""
    if request.path.startswith(API_PREFIXES) or request.path == "/dicomweb" or "Authorization" in request.headers:
        return True
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json"


def json_error(status: int, message: str, **headers: str) -> Response:
    return Response(json.dumps({"status": status, "error": message}), status=status, mimetype="application/json",
                    headers=headers)


def _unauthenticated() -> ResponseReturnValue:
    log.info("auth: anonymous %s %s from %s refused", request.method, request.path, request.remote_addr)
    if wants_json():
        return json_error(401, "sign in first: send 'Authorization: Bearer <API token>' or log in at /login",
                          **{"WWW-Authenticate": 'Bearer realm="telepacs"'})
    return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))


def _csrf_refused() -> ResponseReturnValue:
    log.warning("auth: %s %s from %s without a valid CSRF token refused", request.method, request.path,
                request.remote_addr)
    message = "the form expired or did not come from telepacs: reload the page and try again"
    if wants_json():
        return json_error(403, message)
    return render_template("auth/error.html", status=403, message=message), 403


def guard() -> ResponseReturnValue | None:
    """The app's first before_request hook."""
    identity = current_identity()
    public = request.endpoint in PUBLIC_ENDPOINTS
    if identity is None and not public:
        return _unauthenticated()
    if request.method in UNSAFE_METHODS and (identity is None or identity.via == "session") and not csrf_valid():
        return _csrf_refused()
    if public:
        return None
    view = current_app.view_functions.get(request.endpoint or "")
    if request.view_args and not getattr(view, "_telepacs_checks_objects", False):
        try:
            check_route_objects(request.view_args)
        except InvalidUID as exc:
            log.warning("%s %s from %s: %s", request.method, request.path, request.remote_addr, exc)
            if wants_json():
                return json_error(400, str(exc))
            return render_template("auth/error.html", status=400, message=str(exc)), 400
    return None


def _not_visible(exc: StudyNotVisible) -> ResponseReturnValue:
    if wants_json():
        return json_error(404, exc.description or "not in the archive")
    return render_template("auth/error.html", status=404, message=exc.description), 404


def init_auth(app: Flask) -> None:
    settings: Settings = app.config["TELEPACS_SETTINGS"]
    if not app.config.get("SECRET_KEY"):
        app.config["SECRET_KEY"] = load_secret_key(settings)
    app.config.update(
        SESSION_COOKIE_NAME=SESSION_COOKIE,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.public_url.startswith("https://"),
        PERMANENT_SESSION_LIFETIME=dt.timedelta(hours=settings.session_hours),
        SESSION_REFRESH_EACH_REQUEST=False,  # the lifetime counts from the login, not from the last click
    )
    from viewer.auth.views import bp

    app.register_blueprint(bp)
    app.before_request(guard)
    app.register_error_handler(StudyNotVisible, _not_visible)

    @app.context_processor
    def auth_context() -> dict[str, object]:
        return {"csrf_token": csrf_token, "current_user": current_user}
