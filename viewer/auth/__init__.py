"""Users, roles, login, sessions, CSRF and access decisions for the web app.

The contract other packages rely on:

* :func:`current_user` — the :class:`archive.models.User` making the request (session or API token), or None;
* :func:`login_required`, :func:`roles_required` — view decorators (the guard already refuses anonymous
  requests everywhere except the public endpoints; these say so where it matters and check roles);
* :class:`Role` — requester, specialist, coordinator, observer, admin;
* :func:`access_scope` — the :class:`archive.scope.StudyScope` of the current user (pass it to
  ``archive.query.find(..., scope=...)``); :func:`require_study_access`, :func:`require_series_access`,
  :func:`require_instance_access` — 404 (:class:`StudyNotVisible`) for what the user may not see;
* :func:`note_study_viewed` — the STUDY_VIEWED audit entry (once per user and study every few minutes);
* :func:`csrf_token` — for forms (``csrf_token`` field) and scripts (``X-CSRF-Token`` header).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

from flask import abort

from archive.people import Role
from archive.scope import StudyScope
from viewer.auth.access import (StudyNotVisible, access_scope, forget_study, note_study_viewed, require_instance_access,
                                require_series_access, require_study_access, search_scope, served_pseudonyms)
from viewer.auth.csrf import csrf_token
from viewer.auth.guard import checks_objects_itself, init_auth, wants_json
from viewer.auth.identity import current_identity, current_user

F = TypeVar("F", bound=Callable[..., Any])


def login_required(view: F) -> F:
    """Refuse an anonymous request (401) — the guard already does; this states it at the view."""
    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if current_user() is None:
            abort(401)
        return view(*args, **kwargs)
    return wrapped  # type: ignore[return-value]


def roles_required(*roles: str | Role) -> Callable[[F], F]:
    """Only users with one of ``roles`` (administrators always) may call the view; others get 403."""
    allowed = {Role(role).value for role in roles} | {Role.ADMIN.value}

    def decorate(view: F) -> F:
        @functools.wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            user = current_user()
            if user is None:
                abort(401)
            if user.role not in allowed:
                abort(403)
            return view(*args, **kwargs)
        return wrapped  # type: ignore[return-value]
    return decorate


__all__ = [
    "Role", "StudyNotVisible", "StudyScope", "access_scope", "search_scope", "served_pseudonyms", "checks_objects_itself",
    "csrf_token",
    "current_identity", "current_user", "forget_study", "init_auth", "login_required", "note_study_viewed",
    "require_instance_access", "require_series_access", "require_study_access", "roles_required", "wants_json",
]
