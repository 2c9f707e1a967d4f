"""Access decisions: which studies the current user may see, and the checks single-object routes make.

A user sees a study when its ``studies.facility`` is their facility's code, when it is attached
to a consult they take part in (``viewer.consults.service.study_uids_for_participant``, when that
module exists), or when they are an administrator. What they may not see does not exist for them:
404, with the same message as a study that is really missing, and an ACCESS_DENIED audit entry.

Single-object checks are cheap: the study → facility (and series → study, instance → study)
mappings never change once a study exists, so positive lookups are cached in-process for a while;
an unknown UID is never cached (it may arrive a moment later).
"""

from __future__ import annotations

import functools
import importlib
import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Callable

from flask import g, request
from sqlalchemy import select
from werkzeug.exceptions import NotFound

from archive import audit
from archive.audit import AuditAction
from archive.keys import validate_uid
from archive.models import Instance, Series, Study
from archive.people import Role
from archive.scope import StudyScope
from viewer.auth.identity import current_identity, current_user
from viewer.deps import get_archive

log = logging.getLogger(__name__)

_CONSULTS_MODULE = "viewer.consults.service"
_CACHE_SIZE = 50_000
_CACHE_SECONDS = 300.0
_VIEW_RECORD_SECONDS = 600.0  # one STUDY_VIEWED per user and study per this many seconds (per process)


class StudyNotVisible(NotFound):
    """A study (series, instance) the user may not see, answered exactly like a missing one."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} is not in the archive")
        self.what = what


class _ExpiringLRU:
    def __init__(self, size: int, seconds: float) -> None:
        self.size, self.seconds = size, seconds
        self._items: OrderedDict[Any, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> tuple[bool, Any]:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return False, None
            if item[0] < time.monotonic():
                del self._items[key]
                return False, None
            self._items.move_to_end(key)
            return True, item[1]

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._items[key] = (time.monotonic() + self.seconds, value)
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def forget(self, key: Any) -> None:
        with self._lock:
            self._items.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_owners = _ExpiringLRU(_CACHE_SIZE, _CACHE_SECONDS)  # ("study", uid) -> (study uid, facility) ...
_viewed = _ExpiringLRU(10_000, _VIEW_RECORD_SECONDS)


def forget_study(study_uid: str) -> None:
    """Invalidate what is cached about a study (called after an ingest into it)."""
    _owners.forget(("study", study_uid))


def _owner(kind: str, uid: str, lookup: Callable[[Any], Any]) -> tuple[str, str | None] | None:
    """(study UID, facility) of a study, series or instance; None when it is not in the archive."""
    hit, value = _owners.get((kind, uid))
    if hit:
        return value  # type: ignore[no-any-return]
    with get_archive().index.session() as db:
        row = db.execute(lookup(uid)).first()
    if row is None:
        return None
    value = (row[0], row[1])
    _owners.put((kind, uid), value)
    return value


def _study_query(uid: str) -> Any:
    return select(Study.study_uid, Study.facility).where(Study.study_uid == uid)


def _series_query(uid: str) -> Any:
    return select(Study.study_uid, Study.facility).join(Series, Series.study_fk == Study.id) \
        .where(Series.series_uid == uid)


def _instance_query(uid: str) -> Any:
    return select(Study.study_uid, Study.facility).join(Series, Series.study_fk == Study.id) \
        .join(Instance, Instance.series_fk == Series.id).where(Instance.sop_instance_uid == uid)


@functools.cache
def _consult_lookup() -> Callable[[Any, int], Any] | None:
    try:
        service = importlib.import_module(_CONSULTS_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name in (_CONSULTS_MODULE, _CONSULTS_MODULE.rpartition(".")[0]):
            return None  # no consults in this build: no study is visible through one
        raise
    return getattr(service, "study_uids_for_participant", None)


def consult_study_uids(user_id: int) -> frozenset[str]:
    """The studies attached to consults the user takes part in (empty until the consults module exists)."""
    function = _consult_lookup()
    if function is None:
        return frozenset()
    with get_archive().index.session() as db:
        return frozenset(function(db, user_id))


def access_scope() -> StudyScope:
    """What studies the current user may see (nothing for an anonymous request). Computed once per request."""
    if "telepacs_scope" in g:
        return g.telepacs_scope  # type: ignore[no-any-return]
    user = current_user()
    if user is None:
        scope = StudyScope()
    elif user.role == Role.ADMIN:
        scope = StudyScope.all()
    else:
        scope = StudyScope(facilities=frozenset({user.facility.code}), study_uids=consult_study_uids(user.id))
    g.telepacs_scope = scope
    return scope


def _may_see(study_uid: str, facility: str | None) -> bool:
    user = current_user()
    if user is None:
        return False
    if user.role == Role.ADMIN or (facility is not None and facility == user.facility.code):
        return True  # the common cases need no consult lookup
    return access_scope().allows(study_uid, facility)


def _require(kind: str, uid: str, lookup: Callable[[Any], Any]) -> str:
    validate_uid(uid)  # InvalidUID (a 400) before any lookup
    owner = _owner(kind, uid, lookup)
    what = f"{kind} {uid}"
    if owner is None:
        raise StudyNotVisible(what)
    study_uid, facility = owner
    if not _may_see(study_uid, facility):
        _record_denied(kind, uid, study_uid)
        raise StudyNotVisible(what)
    return study_uid


def require_study_access(study_uid: str) -> None:
    """Return if the current user may see the study; else :class:`StudyNotVisible` (a 404)."""
    _require("study", study_uid, _study_query)


def require_series_access(series_uid: str) -> str:
    """The series' study UID if the current user may see it; else :class:`StudyNotVisible` (a 404)."""
    return _require("series", series_uid, _series_query)


def require_instance_access(sop_instance_uid: str) -> str:
    """The instance's study UID if the current user may see it; else :class:`StudyNotVisible` (a 404)."""
    return _require("instance", sop_instance_uid, _instance_query)


def study_exists_for_other(study_uid: str) -> bool:
    """Whether the study exists and the current user may not see it (STOW must not add to it)."""
    owner = _owner("study", study_uid, _study_query)
    return owner is not None and not _may_see(owner[0], owner[1])


def instance_exists_for_other(sop_instance_uid: str) -> bool:
    owner = _owner("instance", sop_instance_uid, _instance_query)
    return owner is not None and not _may_see(owner[0], owner[1])


def _actor() -> tuple[str, int | None]:
    identity = current_identity()
    if identity is None:
        return "anonymous", None
    suffix = f" (token {identity.token_id})" if identity.token_id is not None else ""
    return identity.user.username + suffix, identity.user.id


def _record_denied(kind: str, uid: str, study_uid: str) -> None:
    actor, user_id = _actor()
    log.warning("access denied: %s asked for %s %s (study %s) via %s %s from %s", actor, kind, uid, study_uid,
                request.method, request.path, request.remote_addr)
    with get_archive().index.write_session() as db, db.begin():
        audit.record(db, actor=actor, user_id=user_id, action=AuditAction.ACCESS_DENIED, object_type=kind,
                     object_id=uid, detail={"study": study_uid, "method": request.method, "path": request.path,
                                            "remote": request.remote_addr or ""})


def note_study_viewed(study_uid: str, via: str) -> None:
    """Record STUDY_VIEWED for the current user, at most once per study every few minutes (per process).

    Call after :func:`require_study_access` from the viewer page and WADO retrieves, not from frame requests.
    """
    actor, user_id = _actor()
    key = (user_id, study_uid)
    hit, _ = _viewed.get(key)
    if hit:
        return
    _viewed.put(key, True)
    with get_archive().index.write_session() as db, db.begin():
        audit.record(db, actor=actor, user_id=user_id, action=AuditAction.STUDY_VIEWED, object_type="study",
                     object_id=study_uid, detail={"via": via, "remote": request.remote_addr or ""})


# Route parameters that name a DICOM object: any route with one is checked before its view runs
# (viewer.auth.guard), so a new route that forgets its own check is still covered.
STUDY_PARAMS = ("study", "study_uid")
SERIES_PARAMS = ("series", "series_uid")
INSTANCE_PARAMS = ("instance", "sop", "sop_uid", "sop_instance_uid", "instance_uid")


def check_route_objects(view_args: dict[str, Any]) -> None:
    """Apply the checks for the DICOM objects a route's parameters name (most specific first)."""
    for name in INSTANCE_PARAMS:
        if isinstance(view_args.get(name), str):
            require_instance_access(view_args[name])
    for name in SERIES_PARAMS:
        if isinstance(view_args.get(name), str):
            require_series_access(view_args[name])
    for name in STUDY_PARAMS:
        if isinstance(view_args.get(name), str):
            require_study_access(view_args[name])


def clear_caches() -> None:
    _owners.clear()
    _viewed.clear()
