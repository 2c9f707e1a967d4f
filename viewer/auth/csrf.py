"""CSRF protection for requests authenticated by the session cookie.

The token lives in the (signed) session; forms send it as ``csrf_token``, scripts as the
``X-CSRF-Token`` header (its value is in ``<meta name="csrf-token">`` of base.html). Requests
authenticated by an API token need none: a browser never adds that header on its own.
"""

from __future__ import annotations

import hmac
import secrets

from flask import request, session

SESSION_KEY = "csrf"
FORM_FIELD = "csrf_token"
HEADER = "X-CSRF-Token"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def csrf_token() -> str:
    """This session's CSRF token (created on first use)."""
    token = session.get(SESSION_KEY)
    if not isinstance(token, str) or not token:
        token = secrets.token_urlsafe(32)
        session[SESSION_KEY] = token
    return token


def csrf_valid() -> bool:
    """Whether this request carries the session's CSRF token (header, or form field of a form post)."""
    expected = session.get(SESSION_KEY)
    sent = request.headers.get(HEADER)
    if sent is None and request.mimetype in _FORM_TYPES:
        sent = request.form.get(FORM_FIELD)
    return bool(isinstance(expected, str) and expected and sent
                and hmac.compare_digest(sent.encode("utf-8"), expected.encode("utf-8")))
