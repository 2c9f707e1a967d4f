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
from dataclasses import replace
from typing import Any, Callable, Iterable

from flask import g, request
from sqlalchemy import select
from werkzeug.exceptions import NotFound

from archive import audit
from archive.audit import AuditAction
from archive.deidentify import EMPTIED, REMOVED
from archive.keys import validate_uid
from archive.matching import MatchKey
from archive.models import Instance, Series, Study, User
from archive.people import Role
from archive.scope import StudyScope
from viewer.auth.identity import current_identity, current_user
from viewer.deps import get_archive

log = logging.getLogger(__name__)
_DEIDENTIFIED_KEYWORDS = frozenset(EMPTIED) | frozenset(REMOVED)

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
_CONSULT_SCOPE_SECONDS = 5.0  # how soon a change of consult participants reaches every web process
_consult_scopes = _ExpiringLRU(4096, _CONSULT_SCOPE_SECONDS)


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
    """The studies attached to consults the user takes part in (empty until the consults module exists).

    Kept a few seconds per user: a hub specialist reads a district's study frame by frame, and each
    frame request would otherwise ask the database again.
    """
    hit, value = _consult_scopes.get(user_id)
    if hit:
        return value  # type: ignore[no-any-return]
    function = _consult_lookup()
    if function is None:
        return frozenset()
    with get_archive().index.session() as db:
        uids = frozenset(function(db, user_id))
    _consult_scopes.put(user_id, uids)
    return uids


def served_pseudonyms() -> dict[str, str]:
    """Study UID → pseudonym, for the studies the current user must be served de-identified (issue 6, 1-N).

    Only studies a user sees through a consult (``StudyScope.study_uids``) can be de-identified for
    them: an observer of another facility on a consult that asks for it (``observer_pseudonym`` of the
    consults service decides). Computed once per request, and only by the routes that serve headers
    (QIDO, metadata, retrieve, the viewer's study header, the study list): pixels are served as stored.
    """
    if "telepacs_pseudonyms" in g:
        return g.telepacs_pseudonyms  # type: ignore[no-any-return]
    pseudonyms: dict[str, str] = {}
    user = current_user()
    scope = access_scope()
    if user is not None and not scope.everything and scope.study_uids:
        service = importlib.import_module(_CONSULTS_MODULE)
        with get_archive().index.session() as db:
            for study_uid in sorted(scope.study_uids):
                pseudonym = service.observer_pseudonym(db, user.id, study_uid)
                if pseudonym is not None:
                    pseudonyms[study_uid] = pseudonym
    g.telepacs_pseudonyms = pseudonyms
    return pseudonyms


def search_scope(keys: Iterable[MatchKey]) -> StudyScope:
    """The scope a search runs in: :func:`access_scope`, less the studies served to this user de-identified
    when the search matches on an attribute de-identification removes or empties (patient name or ID,
    birth date, accession, dates, descriptions…). Otherwise an observer could confirm who a pseudonymised
    study's patient is by searching the real name and seeing the study come back.
    """
    scope = access_scope()
    identifying = any(key.value and key.keyword in _DEIDENTIFIED_KEYWORDS for key in keys)
    pseudonymised = frozenset(served_pseudonyms()) if identifying else frozenset()
    if not pseudonymised or scope.everything:
        return scope
    return replace(scope, study_uids=scope.study_uids - pseudonymised)


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


def _may_see(study_uid: str, facility: str | None, user: User | None = None) -> bool:
    user = user or current_user()
    if user is None:
        return False
    if user.role == Role.ADMIN or (facility is not None and facility == user.facility.code):
        return True  # the common cases need no consult lookup
    return access_scope().allows(study_uid, facility)


def _require(kind: str, uid: str, lookup: Callable[[Any], Any], user: User | None = None) -> str:
    validate_uid(uid)  # InvalidUID (a 400) before any lookup
    owner = _owner(kind, uid, lookup)
    what = f"{kind} {uid}"
    if owner is None:
        raise StudyNotVisible(what)
    study_uid, facility = owner
    if not _may_see(study_uid, facility, user):
        record_access_denied(kind, uid, study_uid)
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
    """Whether the study exists and the current user may not see it (STOW must not add to it); audited."""
    owner = _owner("study", study_uid, _study_query)
    if owner is not None and not _may_see(owner[0], owner[1]):
        record_access_denied("study", study_uid, owner[0])
        return True
    return False


def instance_exists_for_other(sop_instance_uid: str) -> bool:
    """Whether the instance exists in a study the current user may not see (STOW must not replace it); audited."""
    owner = _owner("instance", sop_instance_uid, _instance_query)
    if owner is not None and not _may_see(owner[0], owner[1]):
        record_access_denied("instance", sop_instance_uid, owner[0])
        return True
    return False


def _actor() -> tuple[str, int | None]:
    identity = current_identity()
    if identity is None:
        return "anonymous", None
    suffix = f" (token {identity.token_id})" if identity.token_id is not None else ""
    return identity.user.username + suffix, identity.user.id


def record_access_denied(kind: str, uid: str, study_uid: str) -> None:
    """Log and audit a refused access (the caller answers 404, or a STOW failure)."""
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


_ROUTE_CHECKS: tuple[tuple[tuple[str, ...], str, Callable[[Any], Any]], ...] = (
    (INSTANCE_PARAMS, "instance", _instance_query),
    (SERIES_PARAMS, "series", _series_query),
    (STUDY_PARAMS, "study", _study_query),
)


def check_route_objects(view_args: dict[str, Any]) -> None:
    """Apply the checks for the DICOM objects a route's parameters name (most specific first).

    An administrator sees everything: only the UIDs' syntax is checked (the view answers 404 for
    what does not exist). The identity is resolved once for all the checks of the request.
    """
    user = current_user()
    for names, kind, lookup in _ROUTE_CHECKS:
        for name in names:
            uid = view_args.get(name)
            if not isinstance(uid, str):
                continue
            if user is not None and user.role == Role.ADMIN:
                validate_uid(uid)
            else:
                _require(kind, uid, lookup, user)


def clear_caches() -> None:
    _owners.clear()
    _viewed.clear()
    _consult_scopes.clear()
