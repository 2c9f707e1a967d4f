"""The persistent forward queue: which instances go to which destination, and how far each got.

The queue is an outbox that asks nothing of ingest. A forwarder scans the
``instances`` table (and ``instance_replacements``, for instances replaced
under the keep-newer policy) by primary key from a cursor kept per rule, and
queues every new instance that matches the rule; the queue rows and the
advanced cursor are committed in one transaction, before anything is sent.
Workers then *claim* due rows with a lease, send them, and mark them sent,
or back off and retry; an instance the destination keeps refusing ends as
``failed`` (``retry()`` puts it back). The catalogue database is the queue,
on SQLite and PostgreSQL alike, so nothing is lost when telepacs restarts.

Primary keys are handed out before commit, so on PostgreSQL a scan can see
id 11 while id 10 is still being inserted. The cursor therefore never moves
past a gap in the ids until the gap is ``gap_grace`` seconds old (a rolled
back insert leaves a gap for ever); rows beyond a young gap are queued at
once and met again, harmlessly, by the next scan (the queue is unique per
destination, origin row and SOP Instance UID). Deleted rows (``reindex``
empties the catalogue first) let SQLite hand ids out again: a cursor beyond
the last id is brought back to it.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from sqlalchemy import Engine, Table, bindparam, delete, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from archive.config import ForwardRule
from archive.db import write_engine
from archive.models import ForwardCursor, ForwardItem, Instance, InstanceReplacement, Series, utcnow

log = logging.getLogger(__name__)


class QueueUnavailable(RuntimeError):
    """The catalogue database could not be reached for a queue operation."""


class ItemState(str, enum.Enum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


class Origin(str, enum.Enum):
    """What put an instance on the queue."""

    INSTANCE = "instance"  # newly catalogued (origin_id = instances.id)
    REPLACEMENT = "replacement"  # replaced with new content (origin_id = instance_replacements.id)


@dataclass(frozen=True)
class Backoff:
    """Retry policy: ``initial`` seconds doubling per attempt up to ``maximum``; failed after ``max_rejections``."""

    initial: float = 5.0
    maximum: float = 600.0
    max_rejections: int = 5

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th try (1 → initial, 2 → 2 × initial, …, capped)."""
        exponent = min(max(attempts - 1, 0), 32)
        return float(min(self.initial * (2 ** exponent), self.maximum))


@dataclass(frozen=True)
class ClaimedItem:
    """A queue row a worker now owns, with what it needs to send the instance.

    ``sop_class_uid``/``transfer_syntax_uid`` are None when the instance is
    no longer in the catalogue.
    """

    id: int
    destination: str
    sop_instance_uid: str
    attempts: int
    sop_class_uid: str | None
    transfer_syntax_uid: str | None


@dataclass(frozen=True)
class DestinationStatus:
    destination: str
    pending: int
    sent: int
    failed: int
    oldest_pending: dt.datetime | None
    next_attempt: dt.datetime | None
    last_error: str | None

    def as_json(self, now: dt.datetime | None = None) -> dict[str, Any]:
        now = now or utcnow()
        return {
            "destination": self.destination,
            "pending": self.pending,
            "sent": self.sent,
            "failed": self.failed,
            "oldest_pending_age_seconds": None if self.oldest_pending is None
            else round((now - self.oldest_pending).total_seconds(), 1),
            "next_retry": None if self.next_attempt is None else self.next_attempt.isoformat(),
            "last_error": self.last_error,
        }


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite gives timestamps back without their zone; they were written in UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=dt.timezone.utc)


_QUEUE: Table = ForwardItem.__table__  # type: ignore[assignment]
_ERROR_LENGTH = 500


class ForwardQueue:
    """Repository of the forward queue and its scan cursors, on the catalogue's engine."""

    def __init__(self, engine: Engine, *, gap_grace: float = 60.0, scan_limit: int = 1000) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._write_sessions = sessionmaker(write_engine(engine), expire_on_commit=False)
        self.gap_grace = gap_grace
        self.scan_limit = scan_limit
        self._gaps: dict[tuple[str, int], float] = {}  # (table, first missing id) -> first seen (monotonic)

    @property
    def _postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def _write(self) -> Session:
        return self._write_sessions()

    # -- cursors and scanning -----------------------------------------------

    def ensure_cursors(self, rules: Sequence[ForwardRule]) -> list[str]:
        """Give each rule a cursor, starting at what is catalogued now; drop cursors of rules gone from the config.

        A new rule forwards what arrives from now on, not the archive's past.
        Returns the keys of the rules that got a new cursor.
        """
        wanted = {rule.key: rule for rule in rules}
        created: list[str] = []
        try:
            with self._write() as s, s.begin():
                existing = set(s.scalars(select(ForwardCursor.rule)))
                stale = existing - set(wanted)
                if stale:
                    s.execute(delete(ForwardCursor).where(ForwardCursor.rule.in_(stale)))
                    log.info("forward rules no longer configured, their cursors dropped: %s", ", ".join(sorted(stale)))
                missing = [key for key in wanted if key not in existing]
                if missing:
                    last_instance = s.scalar(select(func.max(Instance.id))) or 0
                    last_replacement = s.scalar(select(func.max(InstanceReplacement.id))) or 0
                    for key in missing:
                        s.add(ForwardCursor(rule=key, destination=wanted[key].destination,
                                            last_instance_id=last_instance, last_replacement_id=last_replacement,
                                            updated_at=utcnow()))
                        created.append(key)
                        log.info("forward rule %s starts after instance %d", key, last_instance)
        except SQLAlchemyError as exc:
            raise QueueUnavailable(f"forward cursors: {exc.__class__.__name__}: {exc}") from None
        return created

    def scan(self, rules: Sequence[ForwardRule]) -> int:
        """Queue the instances catalogued (or replaced) since each rule's cursor; returns how many rows were queued."""
        queued = 0
        try:
            behind = self._rules_behind(rules)
        except SQLAlchemyError as exc:
            raise QueueUnavailable(f"forward scan: {exc.__class__.__name__}: {exc}") from None
        for rule in behind:
            try:
                queued += self._scan_rule(rule)
            except SQLAlchemyError as exc:
                raise QueueUnavailable(f"forward scan for {rule.key}: {exc.__class__.__name__}: {exc}") from None
        return queued

    def _rules_behind(self, rules: Sequence[ForwardRule]) -> list[ForwardRule]:
        """The rules whose cursor lags the tables, found with reads only (no write lock when idle)."""
        with self._sessions() as s:
            last_instance = s.scalar(select(func.max(Instance.id))) or 0
            last_replacement = s.scalar(select(func.max(InstanceReplacement.id))) or 0
            cursors = {c.rule: (c.last_instance_id, c.last_replacement_id) for c in s.scalars(select(ForwardCursor))}
        behind = []
        for rule in rules:
            at_instance, at_replacement = cursors.get(rule.key, (-1, -1))
            if (at_instance, at_replacement) != (last_instance, last_replacement):
                behind.append(rule)
        return behind

    def _scan_rule(self, rule: ForwardRule) -> int:
        with self._write() as s, s.begin():
            query = select(ForwardCursor).where(ForwardCursor.rule == rule.key)
            cursor = s.scalars(query.with_for_update() if self._postgres else query).first()
            if cursor is None:
                raise QueueUnavailable(f"forward rule {rule.key} has no cursor (ensure_cursors was not called)")
            now = utcnow()
            rows: list[dict[str, Any]] = []
            self._clamp(s, cursor)

            new = s.execute(
                select(Instance.id, Instance.sop_instance_uid, Instance.source_ae, Series.modality)
                .join(Series, Instance.series_fk == Series.id)
                .where(Instance.id > cursor.last_instance_id)
                .order_by(Instance.id).limit(self.scan_limit)
            ).all()
            for row_id, sop, source_ae, modality in new:
                if rule.matches(source_ae, modality):
                    rows.append(self._item(rule, Origin.INSTANCE, row_id, sop, now))
            last_instance = self._advance("instances", cursor.last_instance_id, [r[0] for r in new])

            replaced = s.execute(
                select(InstanceReplacement.id, InstanceReplacement.sop_instance_uid, InstanceReplacement.source_ae,
                       InstanceReplacement.action, Series.modality)
                .outerjoin(Instance, Instance.sop_instance_uid == InstanceReplacement.sop_instance_uid)
                .outerjoin(Series, Instance.series_fk == Series.id)
                .where(InstanceReplacement.id > cursor.last_replacement_id)
                .order_by(InstanceReplacement.id).limit(self.scan_limit)
            ).all()
            for row_id, sop, source_ae, action, modality in replaced:
                if action == "replaced" and modality is not None and rule.matches(source_ae, modality):
                    rows.append(self._item(rule, Origin.REPLACEMENT, row_id, sop, now))
            last_replacement = self._advance("instance_replacements", cursor.last_replacement_id,
                                             [r[0] for r in replaced])

            queued = self._insert_items(s, rows)
            if (last_instance, last_replacement) != (cursor.last_instance_id, cursor.last_replacement_id):
                cursor.last_instance_id, cursor.last_replacement_id = last_instance, last_replacement
                cursor.updated_at = now
        if queued:
            log.info("forward rule %s: queued %d instance(s) for %s", rule.key, queued, rule.destination)
        return queued

    @staticmethod
    def _clamp(s: Session, cursor: ForwardCursor) -> None:
        """After rows were deleted (``reindex`` empties the catalogue first), SQLite hands their ids out again:
        a cursor beyond the last id would skip the next instances. Bring it back to the last id."""
        last_instance = s.scalar(select(func.max(Instance.id))) or 0
        last_replacement = s.scalar(select(func.max(InstanceReplacement.id))) or 0
        if cursor.last_instance_id > last_instance or cursor.last_replacement_id > last_replacement:
            log.warning("forward rule %s: the catalogue ends before its cursor (rows deleted, e.g. by reindex); "
                        "cursor moved back from %d/%d to %d/%d", cursor.rule, cursor.last_instance_id,
                        cursor.last_replacement_id, min(cursor.last_instance_id, last_instance),
                        min(cursor.last_replacement_id, last_replacement))
            cursor.last_instance_id = min(cursor.last_instance_id, last_instance)
            cursor.last_replacement_id = min(cursor.last_replacement_id, last_replacement)

    @staticmethod
    def _item(rule: ForwardRule, origin: Origin, origin_id: int, sop: str, now: dt.datetime) -> dict[str, Any]:
        return {
            "destination": rule.destination, "rule": rule.key, "origin": origin.value, "origin_id": origin_id,
            "sop_instance_uid": sop, "state": ItemState.PENDING.value, "attempts": 0, "rejections": 0,
            "next_attempt_at": now, "created_at": now, "updated_at": now,
        }

    def _insert_items(self, s: Session, rows: list[dict[str, Any]]) -> int:
        """INSERT … ON CONFLICT DO NOTHING; how many rows were new."""
        if not rows:
            return 0
        dialect_insert = postgresql.insert if self._postgres else sqlite.insert
        stmt = (dialect_insert(ForwardItem).on_conflict_do_nothing(
            index_elements=["destination", "origin", "origin_id", "sop_instance_uid"]).returning(_QUEUE.c.id))
        inserted = 0
        for row in rows:
            inserted += s.execute(stmt, row).first() is not None
        return inserted

    def _advance(self, table: str, cursor: int, ids: Iterable[int]) -> int:
        """The new cursor: the last id reached without crossing a gap younger than ``gap_grace``."""
        now = time.monotonic()
        expected = cursor + 1
        last = cursor
        for row_id in ids:
            if row_id > expected:
                first_seen = self._gaps.setdefault((table, expected), now)
                if now - first_seen < self.gap_grace:
                    return last
                log.info("forward scan: ids %d-%d of %s never appeared; moving on", expected, row_id - 1, table)
                del self._gaps[(table, expected)]
            last, expected = row_id, row_id + 1
        return last

    # -- claiming and marking -------------------------------------------------

    def claim(self, owner: str, limit: int, lease: float, *, exclude: Iterable[str] = ()) -> list[ClaimedItem]:
        """Take up to ``limit`` due pending rows (oldest first) for ``lease`` seconds; each claim counts an attempt.

        Rows claimed by another worker whose lease has not run out are left
        alone (on PostgreSQL, rows locked by a concurrent claim are skipped).
        """
        now = utcnow()
        excluded = list(exclude)
        query = (select(ForwardItem.id)
                 .where(ForwardItem.state == ItemState.PENDING.value, ForwardItem.next_attempt_at <= now,
                        or_(ForwardItem.claimed_until.is_(None), ForwardItem.claimed_until < now))
                 .order_by(ForwardItem.id).limit(limit))
        if excluded:
            query = query.where(ForwardItem.destination.not_in(excluded))
        try:
            with self._sessions() as s:  # a read first: no write lock when nothing is due
                if s.scalar(query.limit(1)) is None:
                    return []
            with self._write() as s, s.begin():
                ids = list(s.scalars(query.with_for_update(skip_locked=True) if self._postgres else query))
                if not ids:
                    return []
                s.execute(update(ForwardItem).where(ForwardItem.id.in_(ids))
                          .values(claimed_by=owner, claimed_until=now + dt.timedelta(seconds=lease),
                                  attempts=ForwardItem.attempts + 1, updated_at=now))
                rows = s.execute(
                    select(ForwardItem.id, ForwardItem.destination, ForwardItem.sop_instance_uid,
                           ForwardItem.attempts, Instance.sop_class_uid, Instance.transfer_syntax_uid)
                    .outerjoin(Instance, Instance.sop_instance_uid == ForwardItem.sop_instance_uid)
                    .where(ForwardItem.id.in_(ids)).order_by(ForwardItem.id)
                ).all()
        except SQLAlchemyError as exc:
            raise QueueUnavailable(f"forward claim: {exc.__class__.__name__}: {exc}") from None
        return [ClaimedItem(*row) for row in rows]

    def extend_lease(self, item_ids: Sequence[int], owner: str, lease: float) -> None:
        """Keep rows this worker still holds for another ``lease`` seconds (a long batch)."""
        if not item_ids:
            return
        now = utcnow()
        try:
            with self._write() as s, s.begin():
                s.execute(update(ForwardItem)
                          .where(ForwardItem.id.in_(list(item_ids)), ForwardItem.claimed_by == owner)
                          .values(claimed_until=now + dt.timedelta(seconds=lease), updated_at=now))
        except SQLAlchemyError as exc:
            raise QueueUnavailable(f"forward lease: {exc.__class__.__name__}: {exc}") from None

    def release(self, item_ids: Sequence[int], owner: str) -> None:
        """Give back rows this worker claimed but did not try (it is stopping): due at once, attempt not counted."""
        if not item_ids:
            return
        try:
            with self._write() as s, s.begin():
                s.execute(update(ForwardItem)
                          .where(ForwardItem.id.in_(list(item_ids)), ForwardItem.claimed_by == owner)
                          .values(claimed_by=None, claimed_until=None, attempts=ForwardItem.attempts - 1,
                                  updated_at=utcnow()))
        except SQLAlchemyError as exc:
            raise QueueUnavailable(f"forward release: {exc.__class__.__name__}: {exc}") from None

    def mark_sent(self, sent: Sequence[tuple[int, int]]) -> None:
        """Mark rows sent, with the status each got: ``[(id, status), …]``, in one transaction."""
        if not sent:
            return
        now = utcnow()
        stmt = (update(_QUEUE).where(_QUEUE.c.id == bindparam("b_id"))
                .values(state=ItemState.SENT.value, last_status=bindparam("b_status"), last_error=None, sent_at=now,
                        updated_at=now, claimed_by=None, claimed_until=None))
        try:
            with self._write() as s, s.begin():
                s.connection().execute(stmt, [{"b_id": item_id, "b_status": status} for item_id, status in sent])
        except SQLAlchemyError as exc:
            raise QueueUnavailable(f"forward mark sent: {exc.__class__.__name__}: {exc}") from None

    def mark_unsent(self, item_ids: Sequence[int], error: str, backoff: Backoff, *,
                    status: int | None = None, rejected: bool = False) -> list[int]:
        """Put claimed rows back with ``error``, due again after the back-off for their attempts.

        ``rejected`` counts a refusal by the destination (a failure status, a
        refused presentation context, an unreadable instance): after
        ``backoff.max_rejections`` of them a row becomes ``failed``. A
        destination that cannot be reached is not a refusal: its rows wait
        (pending) for as long as it takes. Returns the ids that became failed.
        """
        if not item_ids:
            return []
        now = utcnow()
        failed: list[int] = []
        try:
            with self._write() as s, s.begin():
                rows = s.execute(select(ForwardItem.id, ForwardItem.attempts, ForwardItem.rejections)
                                 .where(ForwardItem.id.in_(list(item_ids)))).all()
                for item_id, attempts, rejections in rows:
                    rejections += 1 if rejected else 0
                    gives_up = rejected and rejections >= backoff.max_rejections
                    if gives_up:
                        failed.append(item_id)
                    s.execute(update(ForwardItem).where(ForwardItem.id == item_id).values(
                        state=(ItemState.FAILED if gives_up else ItemState.PENDING).value,
                        rejections=rejections, last_status=status, last_error=error[:_ERROR_LENGTH],
                        next_attempt_at=now + dt.timedelta(seconds=backoff.delay(attempts)),
                        updated_at=now, claimed_by=None, claimed_until=None))
        except SQLAlchemyError as exc:
            raise QueueUnavailable(f"forward mark unsent: {exc.__class__.__name__}: {exc}") from None
        return failed

    def retry(self, destination: str | None = None) -> int:
        """Failed rows (of one destination, or all) back to pending, due now; returns how many."""
        now = utcnow()
        stmt = (update(ForwardItem).where(ForwardItem.state == ItemState.FAILED.value)
                .values(state=ItemState.PENDING.value, attempts=0, rejections=0, next_attempt_at=now,
                        updated_at=now, claimed_by=None, claimed_until=None))
        if destination is not None:
            stmt = stmt.where(ForwardItem.destination == destination)
        try:
            with self._write() as s, s.begin():
                return int(s.execute(stmt).rowcount or 0)  # type: ignore[attr-defined]
        except SQLAlchemyError as exc:
            raise QueueUnavailable(f"forward retry: {exc.__class__.__name__}: {exc}") from None

    # -- reporting ----------------------------------------------------------

    def status(self) -> list[DestinationStatus]:
        """Per destination: rows by state, the oldest pending row, the next retry, the latest error."""
        try:
            with self._sessions() as s:
                counts: dict[str, dict[str, int]] = {}
                for destination, state, count in s.execute(
                        select(ForwardItem.destination, ForwardItem.state, func.count())
                        .group_by(ForwardItem.destination, ForwardItem.state)):
                    counts.setdefault(destination, {})[state] = count
                pending = {d: (oldest, due) for d, oldest, due in s.execute(
                    select(ForwardItem.destination, func.min(ForwardItem.created_at),
                           func.min(ForwardItem.next_attempt_at))
                    .where(ForwardItem.state == ItemState.PENDING.value).group_by(ForwardItem.destination))}
                errors = {d: s.scalar(
                    select(ForwardItem.last_error)
                    .where(ForwardItem.destination == d, ForwardItem.state != ItemState.SENT.value,
                           ForwardItem.last_error.is_not(None))
                    .order_by(ForwardItem.updated_at.desc(), ForwardItem.id.desc()).limit(1)) for d in counts}
        except SQLAlchemyError as exc:
            raise QueueUnavailable(f"forward status: {exc.__class__.__name__}: {exc}") from None
        result = []
        for destination in sorted(counts):
            oldest, due = pending.get(destination, (None, None))
            by_state = counts[destination]
            result.append(DestinationStatus(
                destination, by_state.get(ItemState.PENDING.value, 0), by_state.get(ItemState.SENT.value, 0),
                by_state.get(ItemState.FAILED.value, 0), _aware(oldest), _aware(due), errors[destination]))
        return result

    def items(self, destination: str | None = None, state: ItemState | None = None) -> list[dict[str, Any]]:
        """The queue rows (for tests and support), oldest first."""
        query = select(ForwardItem).order_by(ForwardItem.id)
        if destination is not None:
            query = query.where(ForwardItem.destination == destination)
        if state is not None:
            query = query.where(ForwardItem.state == state.value)
        with self._sessions() as s:
            return [
                {"id": i.id, "destination": i.destination, "rule": i.rule, "origin": i.origin,
                 "origin_id": i.origin_id, "sop_instance_uid": i.sop_instance_uid, "state": i.state,
                 "attempts": i.attempts, "rejections": i.rejections, "next_attempt_at": _aware(i.next_attempt_at),
                 "claimed_by": i.claimed_by, "claimed_until": _aware(i.claimed_until), "last_status": i.last_status,
                 "last_error": i.last_error}
                for i in s.scalars(query)
            ]


__all__ = ["Backoff", "ClaimedItem", "DestinationStatus", "ForwardQueue", "ItemState", "Origin", "QueueUnavailable"]
