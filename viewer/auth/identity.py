"""Who is asking: the logged-in user of the session cookie, or the user of an API token.

A request authenticates with **one** of:

* the session cookie set by ``/login`` (browsers; unsafe methods then need the CSRF token);
* ``Authorization: Bearer <token>`` (DICOMweb clients, scripts);
* ``Authorization: Basic`` with the username and an API token as the password (for DICOMweb
  clients that only know Basic, e.g. Orthanc's DICOMweb plugin or 3D Slicer). Passwords are never
  accepted here: only tokens, so Basic cannot be used to guess passwords past the lockout.

A present but invalid ``Authorization`` header is an anonymous request (401), never a fallback to
the cookie. A session is valid while its user is enabled, their password has not changed since
the login, and ``session_hours`` have not passed since the login.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from flask import current_app, g, request, session
from sqlalchemy import update

from archive import people
from archive.models import ApiToken, User, utcnow
from viewer.deps import get_archive

log = logging.getLogger(__name__)

SESSION_USER = "uid"
SESSION_STAMP = "stamp"  # the user's password_changed_at when they logged in (microseconds since the epoch)
SESSION_LOGIN_AT = "login_at"  # seconds since the epoch
_CACHE_SECONDS = 5.0  # how stale a user row may be (disabling a user takes effect within this, in every process)
_TOKEN_TOUCH = dt.timedelta(minutes=10)  # last_used_at is updated at most this often


@dataclass(frozen=True)
class Identity:
    user: User
    via: str  # "session" | "token"
    token_id: int | None = None


class _TTLCache:
    """A small thread-safe cache of user rows, so a DICOMweb request costs no query for its identity."""

    def __init__(self, seconds: float, size: int = 1024) -> None:
        self.seconds, self.size = seconds, size
        self._items: dict[Any, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            item = self._items.get(key)
            if item is None or item[0] < time.monotonic():
                self._items.pop(key, None)
                return None
            return item[1]

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            if len(self._items) >= self.size:
                self._items.clear()
            self._items[key] = (time.monotonic() + self.seconds, value)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_users = _TTLCache(_CACHE_SECONDS)


def forget_cached_users() -> None:
    """After a change to a user in this process (logout, password change): read the rows again."""
    _users.clear()


def stamp_of(user: User) -> int:
    changed = user.password_changed_at
    if changed.tzinfo is None:
        changed = changed.replace(tzinfo=dt.timezone.utc)
    return int(changed.timestamp() * 1_000_000)


def current_identity() -> Identity | None:
    if "telepacs_identity" not in g:
        g.telepacs_identity = _identify()
    identity: Identity | None = g.telepacs_identity
    return identity


def current_user() -> User | None:
    """The user making this request (session cookie or API token), or None."""
    identity = current_identity()
    return identity.user if identity is not None else None


def _identify() -> Identity | None:
    header = request.headers.get("Authorization", "")
    if header:
        return _from_header(header)
    return _from_session()


def _from_header(header: str) -> Identity | None:
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    username: str | None = None
    if scheme.lower() == "bearer":
        secret = value
    elif scheme.lower() == "basic":
        try:
            username, _, secret = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            log.warning("auth: malformed Basic credentials from %s", request.remote_addr)
            return None
    else:
        log.warning("auth: unsupported Authorization scheme %r from %s", scheme[:20], request.remote_addr)
        return None
    key = ("token", people.token_digest(secret))
    found = _users.get(key)
    if found is None:
        with get_archive().index.session() as db:
            found = people.user_for_token(db, secret)
        if found is None:
            log.warning("auth: unknown, revoked or disabled API token from %s", request.remote_addr)
            return None
        _touch_token(found[1])
        _users.put(key, found)
    user, token = found
    if username is not None and username.strip().lower() != user.username:
        log.warning("auth: Basic username %r does not own the token it sent (from %s)", username, request.remote_addr)
        return None
    return Identity(user, "token", token.id)


def _touch_token(token: ApiToken) -> None:
    last = token.last_used_at
    if last is not None and last.tzinfo is None:
        last = last.replace(tzinfo=dt.timezone.utc)
    now = utcnow()
    if last is not None and now - last < _TOKEN_TOUCH:
        return
    with get_archive().index.write_session() as db, db.begin():
        db.execute(update(ApiToken).where(ApiToken.id == token.id).values(last_used_at=now))


def _from_session() -> Identity | None:
    user_id = session.get(SESSION_USER)
    if not isinstance(user_id, int):
        return None
    key = ("user", user_id)
    user = _users.get(key)
    if user is None:
        with get_archive().index.session() as db:
            user = people.user_by_id(db, user_id)
        if user is None:
            session.clear()
            return None
        _users.put(key, user)
    login_at = session.get(SESSION_LOGIN_AT)
    hours = float(current_app.config["TELEPACS_SETTINGS"].session_hours)
    if user.disabled or session.get(SESSION_STAMP) != stamp_of(user) or not isinstance(login_at, (int, float)) \
            or time.time() - login_at > hours * 3600:
        log.info("auth: session of %s ended (disabled, password changed or expired)", user.username)
        session.clear()
        return None
    return Identity(user, "session")


def start_session(user: User) -> None:
    """Log ``user`` in on this browser: a fresh session (nothing kept from before the login)."""
    session.clear()
    session.permanent = True
    session[SESSION_USER] = user.id
    session[SESSION_STAMP] = stamp_of(user)
    session[SESSION_LOGIN_AT] = int(time.time())
    # A new CSRF token comes with the new session (csrf.csrf_token creates it on the next page).
    g.telepacs_identity = Identity(user, "session")


def end_session() -> None:
    session.clear()
    g.telepacs_identity = None
    forget_cached_users()
