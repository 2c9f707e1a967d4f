"""The append-only, hash-chained audit log: who did what to which object, and when.

Each row's ``entry_hash`` is the SHA-256 of the previous row's hash and the canonical
JSON of this row (time, user, actor, action, object, detail). Changing, inserting or
deleting any row breaks the chain from that row on, which :func:`verify` reports
(``telepacs audit verify``). ``prev_hash`` is unique, so two writers can never both
extend the same row: the chain cannot fork.

Writers append inside their own transaction, so an action and its audit row commit
together or not at all. On PostgreSQL a transaction-scoped advisory lock serialises
appenders; on SQLite the write session's ``BEGIN IMMEDIATE`` already does.

References
----------
PS3.15 Annex A.5 (Audit Trail Message Format Profile) names the kinds of events kept here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from archive.models import AuditEntry, utcnow

GENESIS_HASH = "0" * 64
# Any constant: the key of the PostgreSQL advisory lock that serialises appenders.
_PG_LOCK_KEY = 0x7E1E_9AC5


class AuditAction(StrEnum):
    LOGIN = "login"
    LOGIN_FAILED = "login_failed"
    LOGOUT = "logout"
    ACCOUNT_LOCKED = "account_locked"
    PASSWORD_CHANGED = "password_changed"
    USER_CREATED = "user_created"
    USER_UPDATED = "user_updated"
    USER_DISABLED = "user_disabled"
    TOKEN_CREATED = "token_created"
    TOKEN_REVOKED = "token_revoked"
    ACCESS_DENIED = "access_denied"
    STUDY_VIEWED = "study_viewed"
    IMAGE_VIEWED = "image_viewed"
    STUDY_EXPORTED = "study_exported"
    STUDY_STORED = "study_stored"
    CONSULT_CREATED = "consult_created"
    CONSULT_STATE_CHANGED = "consult_state_changed"
    CONSULT_STUDY_ATTACHED = "consult_study_attached"
    CONSULT_PARTICIPANT_ADDED = "consult_participant_added"
    MESSAGE_POSTED = "message_posted"
    CONCLUSION_SIGNED = "conclusion_signed"
    CONCLUSION_AMENDED = "conclusion_amended"
    DECISION_RECORDED = "decision_recorded"
    OUTCOME_RECORDED = "outcome_recorded"
    CONSULT_EXPORTED = "consult_exported"
    REVIEW_RECORDED = "review_recorded"
    FACILITY_CREATED = "facility_created"
    FACILITY_UPDATED = "facility_updated"


def _canonical_time(at: dt.datetime) -> str:
    # SQLite hands datetimes back without a zone: they were written in UTC.
    if at.tzinfo is None:
        at = at.replace(tzinfo=dt.timezone.utc)
    return at.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def entry_digest(prev_hash: str, *, at: dt.datetime, user_id: int | None, actor: str, action: str,
                 object_type: str, object_id: str, detail: dict[str, Any]) -> str:
    """The hash that chains one entry to the one before it."""
    body = json.dumps(
        {"at": _canonical_time(at), "user": user_id, "actor": actor, "action": action,
         "object_type": object_type, "object_id": object_id, "detail": detail},
        sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str,
    )
    return hashlib.sha256((prev_hash + "\n" + body).encode("utf-8")).hexdigest()


def record(session: Session, *, actor: str, action: str | AuditAction, object_type: str = "",
           object_id: str = "", detail: dict[str, Any] | None = None, user_id: int | None = None) -> AuditEntry:
    """Append one entry in the caller's transaction (a write session: see ``CatalogIndex.write_session``)."""
    action = AuditAction(action).value if isinstance(action, AuditAction) else str(action)
    # Round-trip through JSON now so the hash covers exactly what the database will give back.
    clean_detail: dict[str, Any] = json.loads(json.dumps(detail or {}, ensure_ascii=False, default=str))
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
    last = session.execute(select(AuditEntry.entry_hash).order_by(AuditEntry.id.desc()).limit(1)).scalar()
    prev_hash = last or GENESIS_HASH
    at = utcnow()
    entry = AuditEntry(
        at=at, user_fk=user_id, actor=actor, action=action, object_type=object_type,
        object_id=object_id, detail=clean_detail, prev_hash=prev_hash,
        entry_hash=entry_digest(prev_hash, at=at, user_id=user_id, actor=actor, action=action,
                                object_type=object_type, object_id=object_id, detail=clean_detail),
    )
    session.add(entry)
    session.flush()
    return entry


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    entries: int  # how many entries were checked
    first_bad_id: int | None = None
    reason: str = ""


def verify(session: Session, *, batch: int = 1000) -> VerifyResult:
    """Walk the whole chain in order; report the first entry whose hash or link does not hold."""
    expected_prev = GENESIS_HASH
    checked = 0
    rows = session.execute(select(AuditEntry).order_by(AuditEntry.id).execution_options(yield_per=batch)).scalars()
    for entry in rows:
        if entry.prev_hash != expected_prev:
            return VerifyResult(False, checked, entry.id,
                                "link broken: an entry before it was removed, inserted or changed")
        digest = entry_digest(entry.prev_hash, at=entry.at, user_id=entry.user_fk, actor=entry.actor,
                              action=entry.action, object_type=entry.object_type, object_id=entry.object_id,
                              detail=entry.detail or {})
        if digest != entry.entry_hash:
            return VerifyResult(False, checked, entry.id, "content changed after it was written")
        expected_prev = entry.entry_hash
        checked += 1
    return VerifyResult(True, checked)
