"""The teleconsultation lifecycle: who may do what to a consult, and its record. No Flask here.

States::

    requested ──accept──▶ accepted ──first message──▶ in_discussion ──sign──▶ concluded ──close──▶ closed
        │  └─decline(reason)─▶ declined                                     (amend: new signed version)
        └──(requested|accepted|in_discussion) withdraw ─▶ withdrawn

Who: a specialist or coordinator of the hub facility (or a specialist named on the consult) accepts
or declines; the requesting doctor withdraws, records the decision, closes and later the outcome; a
specialist taking part signs the conclusion; observers only read. Vietnamese rules behind it: the
consultant advises within the scope of their practising certificate and answers for that advice (so the
certificate is copied into each signed conclusion), the requesting side decides and answers for its
decision, and tells the consultant what happened (decision, outcome).

Every action appends to the audit log (``archive.audit.record``) in the caller's transaction: callers
pass a write session inside ``with session.begin():`` and the action and its audit row commit together.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from archive.audit import AuditAction, record
from archive.models import (Consult, ConsultConclusion, ConsultFollowUp, ConsultMessage, ConsultParticipant,
                            ConsultQuestion, ConsultReadMarker, ConsultStudy, Facility, Instance, ReviewEvent, Series,
                            Study, User, utcnow)

log = logging.getLogger(__name__)


class ConsultState(StrEnum):
    REQUESTED = "requested"
    ACCEPTED = "accepted"
    IN_DISCUSSION = "in_discussion"
    CONCLUDED = "concluded"
    CLOSED = "closed"
    DECLINED = "declined"
    WITHDRAWN = "withdrawn"


class Urgency(StrEnum):
    ROUTINE = "routine"
    URGENT = "urgent"
    EMERGENCY = "emergency"


class ParticipantRole(StrEnum):
    """A user's role in one consult (their account's role is ``User.role``)."""

    REQUESTER = "requester"
    SPECIALIST = "specialist"
    COORDINATOR = "coordinator"
    OBSERVER = "observer"


class FollowUpKind(StrEnum):
    DECISION = "decision"
    OUTCOME = "outcome"


class Quality(StrEnum):
    LOSSY = "lossy"
    FULL = "full"


# Account roles (viewer.auth.Role values); kept as strings so this module needs no Flask.
ROLE_REQUESTER = "requester"
ROLE_SPECIALIST = "specialist"
ROLE_COORDINATOR = "coordinator"
ROLE_OBSERVER = "observer"
ROLE_ADMIN = "admin"

OPEN_STATES = frozenset({ConsultState.REQUESTED, ConsultState.ACCEPTED, ConsultState.IN_DISCUSSION})
FINAL_STATES = frozenset({ConsultState.CLOSED, ConsultState.DECLINED, ConsultState.WITHDRAWN})
# Where a thread still takes messages: up to the close (questions about the conclusion are welcome).
MESSAGE_STATES = frozenset(OPEN_STATES | {ConsultState.CONCLUDED})
URGENCY_RANK = {Urgency.EMERGENCY: 0, Urgency.URGENT: 1, Urgency.ROUTINE: 2}

MAX_TEXT = 20_000
MAX_QUESTIONS = 20
MAX_REVIEW_BATCH = 500


class ConsultError(Exception):
    """Base of the errors below; ``str()`` is a message fit for the person who tried."""


class ConsultNotFound(ConsultError):
    pass


class NotAllowed(ConsultError):
    """The user's role does not allow this action on this consult."""


class InvalidTransition(ConsultError):
    """The action is not possible in the consult's current state."""


class InvalidInput(ConsultError):
    pass


@dataclass(frozen=True)
class DueTimes:
    """How long each urgency may wait for a conclusion (``Settings.consult_due_*_hours``)."""

    emergency: dt.timedelta = dt.timedelta(hours=1)
    urgent: dt.timedelta = dt.timedelta(hours=24)
    routine: dt.timedelta = dt.timedelta(hours=72)

    @classmethod
    def from_settings(cls, settings: Any) -> DueTimes:
        return cls(emergency=dt.timedelta(hours=settings.consult_due_emergency_hours),
                   urgent=dt.timedelta(hours=settings.consult_due_urgent_hours),
                   routine=dt.timedelta(hours=settings.consult_due_routine_hours))

    def for_urgency(self, urgency: Urgency) -> dt.timedelta:
        return {Urgency.EMERGENCY: self.emergency, Urgency.URGENT: self.urgent, Urgency.ROUTINE: self.routine}[urgency]


@dataclass
class ConsultRequest:
    """What a requesting doctor fills in."""

    patient_id: str
    patient_name: str
    clinical_summary: str
    questions: Sequence[str]
    urgency: Urgency | str
    hub_facility_code: str
    patient_informed: bool
    specialty: str = ""
    specialist_user_ids: Sequence[int] = ()
    study_uids: Sequence[str] = ()
    observers_allowed: bool = False
    deidentify_for_observers: bool = True


@dataclass
class PinnedImage:
    """The viewer state a message pins (contracts.md, ``telepacsViewer.getState()``)."""

    study_uid: str
    series_uid: str
    instance_uid: str
    frame: int = 1
    viewport: dict[str, Any] = field(default_factory=dict)
    annotations: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ConclusionDraft:
    answers: Mapping[int, str]  # question id -> answer
    findings: str
    impression: str
    recommendation: str
    transfer_recommended: bool = False
    transfer_to: str = ""
    amendment_reason: str = ""


@dataclass
class ReviewSample:
    """One image that was on a reader's screen (from ``telepacsViewer.onDisplay``)."""

    study_uid: str
    series_uid: str
    instance_uid: str
    frame: int
    window_center: float | None
    window_width: float | None
    quality: Quality | str
    started_at: dt.datetime
    ended_at: dt.datetime


@dataclass(frozen=True)
class InboxItem:
    consult: Consult
    unread: int
    overdue: bool


# -- helpers ---------------------------------------------------------------------------------


def _as_utc(at: dt.datetime) -> dt.datetime:
    # SQLite gives datetimes back without their zone; they were written in UTC.
    return at.replace(tzinfo=dt.timezone.utc) if at.tzinfo is None else at


def _text(value: str, what: str, *, required: bool = True, limit: int = MAX_TEXT) -> str:
    value = (value or "").strip()
    if required and not value:
        raise InvalidInput(f"{what} is required")
    if len(value) > limit:
        raise InvalidInput(f"{what} is longer than {limit} characters")
    return value


def _enum(kind: type[StrEnum], value: Any, what: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(m.value for m in kind)  # type: ignore[attr-defined]
        raise InvalidInput(f"{what} must be one of {choices}, not {value!r}") from None


def _audit(session: Session, user: User, action: AuditAction, consult: Consult, **detail: Any) -> None:
    record(session, actor=user.username, user_id=user.id, action=action, object_type="consult",
           object_id=str(consult.id), detail=detail)


def _event(session: Session, consult: Consult, user: User, code: str) -> ConsultMessage:
    """The thread's own line for a state change: unread for everyone else, so the inbox shows it."""
    msg = ConsultMessage(consult_fk=consult.id, author_fk=user.id, kind="event", body=code, created_at=utcnow())
    session.add(msg)
    session.flush()
    return msg


def _participant(consult: Consult, user: User) -> ConsultParticipant | None:
    return next((p for p in consult.participants if p.user_fk == user.id), None)


def _participant_role(consult: Consult, user: User) -> ParticipantRole | None:
    p = _participant(consult, user)
    return ParticipantRole(p.role) if p else None


def _ensure_participant(session: Session, consult: Consult, user: User, role: ParticipantRole) -> None:
    if _participant(consult, user) is None:
        consult.participants.append(ConsultParticipant(user_fk=user.id, role=role.value, added_at=utcnow()))
        session.flush()


def _set_state(session: Session, consult: Consult, user: User, new: ConsultState, **detail: Any) -> None:
    old = consult.state
    consult.state = new.value
    consult.updated_at = utcnow()
    _event(session, consult, user, new.value)
    _audit(session, user, AuditAction.CONSULT_STATE_CHANGED, consult, **{"from": old, "to": new.value}, **detail)
    log.info("consult %s: %s -> %s by %s", consult.id, old, new.value, user.username)


def _require_state(consult: Consult, allowed: Iterable[ConsultState], action: str) -> None:
    allowed = set(allowed)
    if ConsultState(consult.state) not in allowed:
        raise InvalidTransition(f"cannot {action} a consult that is {consult.state}")


# -- who may do what --------------------------------------------------------------------------


def is_hub_staff(consult: Consult, user: User) -> bool:
    """A specialist or coordinator of the facility the consult was sent to."""
    return user.facility_fk == consult.hub_facility_fk and user.role in (ROLE_SPECIALIST, ROLE_COORDINATOR)


def is_named_specialist(consult: Consult, user: User) -> bool:
    return user.role == ROLE_SPECIALIST and _participant_role(consult, user) == ParticipantRole.SPECIALIST


def is_requesting_side(consult: Consult, user: User) -> bool:
    """The requesting doctor, or a requesting doctor of the same facility added to the consult."""
    if user.disabled:
        return False
    if user.id == consult.requester_fk:
        return True
    return (user.role == ROLE_REQUESTER and user.facility_fk == consult.requester_facility_fk
            and _participant_role(consult, user) == ParticipantRole.REQUESTER)


def is_observer(consult: Consult, user: User) -> bool:
    return _participant_role(consult, user) == ParticipantRole.OBSERVER


def can_view(consult: Consult, user: User) -> bool:
    if user.disabled:
        return False
    if user.role == ROLE_ADMIN:
        return True
    if _participant(consult, user) is not None or is_hub_staff(consult, user):
        return True
    return False


def sees_deidentified(consult: Consult, user: User) -> bool:
    """Observers of another facility get the de-identified record when the consult asks for it."""
    return (consult.deidentify_for_observers and is_observer(consult, user)
            and user.facility_fk not in (consult.requester_facility_fk, consult.hub_facility_fk))


def can_accept_or_decline(consult: Consult, user: User) -> bool:
    return not user.disabled and (is_hub_staff(consult, user) or is_named_specialist(consult, user))


def can_conclude(consult: Consult, user: User) -> bool:
    return (not user.disabled and user.role == ROLE_SPECIALIST
            and (is_named_specialist(consult, user) or user.facility_fk == consult.hub_facility_fk))


def can_post(consult: Consult, user: User) -> bool:
    if user.disabled or is_observer(consult, user) or not can_view(consult, user):
        return False
    return user.role != ROLE_OBSERVER


def allowed_actions(consult: Consult, user: User) -> list[str]:
    """The actions the page offers this user now (each is checked again when it is done)."""
    state = ConsultState(consult.state)
    actions: list[str] = []
    if state == ConsultState.REQUESTED and can_accept_or_decline(consult, user):
        actions += ["accept", "decline"]
    if state in OPEN_STATES and is_requesting_side(consult, user):
        actions.append("withdraw")
    if state in MESSAGE_STATES and can_post(consult, user):
        actions.append("post")
    if state in (ConsultState.ACCEPTED, ConsultState.IN_DISCUSSION) and can_conclude(consult, user):
        actions.append("conclude")
    if state == ConsultState.CONCLUDED and can_conclude(consult, user):
        actions.append("amend")
    if state == ConsultState.CONCLUDED and is_requesting_side(consult, user):
        actions.append("decide")
        if has_decision(consult):
            actions.append("close")
    if state in (ConsultState.CONCLUDED, ConsultState.CLOSED) and is_requesting_side(consult, user) \
            and has_decision(consult):
        actions.append("outcome")
    if state not in FINAL_STATES and consult.observers_allowed and (
            is_requesting_side(consult, user) or is_hub_staff(consult, user) and user.role == ROLE_COORDINATOR):
        actions.append("add_observer")
    return actions


def has_decision(consult: Consult) -> bool:
    session = Session.object_session(consult)
    assert session is not None
    return session.execute(select(ConsultFollowUp.id).where(
        ConsultFollowUp.consult_fk == consult.id, ConsultFollowUp.kind == FollowUpKind.DECISION.value)
    ).first() is not None


# -- lookups ---------------------------------------------------------------------------------


def get_consult(session: Session, consult_id: int, user: User) -> Consult:
    """The consult if this user may see it; ``ConsultNotFound`` otherwise (no hint that it exists)."""
    consult = session.get(Consult, consult_id)
    if consult is None or not can_view(consult, user):
        raise ConsultNotFound(f"no consult {consult_id}")
    return consult


def study_uids_for_participant(session: Session, user_id: int) -> set[str]:
    """Studies a user may see because of consults: those attached to consults they take part in,
    and, for a hub's specialists and coordinators, those of consults sent to their hub."""
    user = session.get(User, user_id)
    if user is None or user.disabled:
        return set()
    as_participant = select(ConsultParticipant.consult_fk).where(ConsultParticipant.user_fk == user_id)
    consult_filter: Any = ConsultStudy.consult_fk.in_(as_participant)
    if user.role in (ROLE_SPECIALIST, ROLE_COORDINATOR):
        to_hub = select(Consult.id).where(Consult.hub_facility_fk == user.facility_fk)
        consult_filter = or_(consult_filter, ConsultStudy.consult_fk.in_(to_hub))
    return set(session.execute(select(ConsultStudy.study_uid).where(consult_filter)).scalars())


def study_uids_of_consult(consult: Consult) -> list[str]:
    return [s.study_uid for s in consult.studies]


def messages(session: Session, consult: Consult) -> list[ConsultMessage]:
    return list(session.execute(select(ConsultMessage).where(ConsultMessage.consult_fk == consult.id)
                                .order_by(ConsultMessage.id)).scalars())


def conclusions(session: Session, consult: Consult) -> list[ConsultConclusion]:
    return list(session.execute(select(ConsultConclusion).where(ConsultConclusion.consult_fk == consult.id)
                                .order_by(ConsultConclusion.version)).scalars())


def follow_ups(session: Session, consult: Consult) -> list[ConsultFollowUp]:
    return list(session.execute(select(ConsultFollowUp).where(ConsultFollowUp.consult_fk == consult.id)
                                .order_by(ConsultFollowUp.id)).scalars())


def review_events(session: Session, consult: Consult) -> list[ReviewEvent]:
    return list(session.execute(select(ReviewEvent).where(ReviewEvent.consult_fk == consult.id)
                                .order_by(ReviewEvent.user_fk, ReviewEvent.started_at)).scalars())


# -- actions ---------------------------------------------------------------------------------


def create_consult(session: Session, user: User, request: ConsultRequest, *, due: DueTimes = DueTimes(),
                   now: dt.datetime | None = None) -> Consult:
    """A requesting doctor sends a case to a hub. Attached studies must be their facility's."""
    if user.disabled or user.role != ROLE_REQUESTER:
        raise NotAllowed("only a requesting doctor can request a consult")
    urgency: Urgency = _enum(Urgency, request.urgency, "urgency")
    questions = [_text(q, "a question", required=False) for q in request.questions]
    questions = [q for q in questions if q]
    if not questions:
        raise InvalidInput("ask at least one question")
    if len(questions) > MAX_QUESTIONS:
        raise InvalidInput(f"at most {MAX_QUESTIONS} questions")
    hub = session.execute(select(Facility).where(Facility.code == request.hub_facility_code)).scalar()
    if hub is None:
        raise InvalidInput(f"no facility {request.hub_facility_code!r}")
    if hub.id == user.facility_fk:
        raise InvalidInput("a consult goes to another facility than the requesting one")
    specialists = _named_specialists(session, request.specialist_user_ids)
    now = now or utcnow()
    consult = Consult(
        patient_id=_text(request.patient_id, "patient ID", limit=64),
        patient_name=_text(request.patient_name, "patient name", limit=324),
        clinical_summary=_text(request.clinical_summary, "clinical summary"),
        patient_informed=bool(request.patient_informed), urgency=urgency.value,
        specialty=_text(request.specialty, "specialty", required=False, limit=64),
        requester_fk=user.id, requester_facility_fk=user.facility_fk, hub_facility_fk=hub.id,
        state=ConsultState.REQUESTED.value, observers_allowed=bool(request.observers_allowed),
        deidentify_for_observers=bool(request.deidentify_for_observers),
        created_at=now, updated_at=now, due_at=now + due.for_urgency(urgency),
    )
    consult.questions = [ConsultQuestion(position=i, text=q) for i, q in enumerate(questions, 1)]
    consult.participants = [ConsultParticipant(user_fk=user.id, role=ParticipantRole.REQUESTER.value, added_at=now)]
    consult.participants += [ConsultParticipant(user_fk=s.id, role=ParticipantRole.SPECIALIST.value, added_at=now)
                             for s in specialists]
    session.add(consult)
    session.flush()
    _audit(session, user, AuditAction.CONSULT_CREATED, consult, urgency=urgency.value, hub=hub.code,
           questions=len(questions), patient_informed=consult.patient_informed,
           specialists=[s.username for s in specialists])
    for uid in dict.fromkeys(request.study_uids):
        attach_study(session, consult, user, uid)
    _event(session, consult, user, ConsultState.REQUESTED.value)
    log.info("consult %s requested by %s to %s (%s)", consult.id, user.username, hub.code, urgency.value)
    return consult


def _named_specialists(session: Session, user_ids: Sequence[int]) -> list[User]:
    found: list[User] = []
    for uid in dict.fromkeys(user_ids):
        specialist = session.get(User, uid)
        if specialist is None or specialist.disabled or specialist.role != ROLE_SPECIALIST:
            raise InvalidInput(f"user {uid} is not an active specialist")
        found.append(specialist)
    return found


def attach_study(session: Session, consult: Consult, user: User, study_uid: str) -> ConsultStudy:
    """Attach a stored study of the requesting facility (only while the consult is open)."""
    if not is_requesting_side(consult, user):
        raise NotAllowed("only the requesting side attaches studies")
    _require_state(consult, OPEN_STATES, "attach a study to")
    study = session.execute(select(Study).where(Study.study_uid == study_uid)).scalar()
    if study is None:
        raise InvalidInput(f"study {study_uid} is not stored")
    facility_code = session.execute(select(Facility.code).where(Facility.id == user.facility_fk)).scalar()
    if study.facility != facility_code:
        raise NotAllowed(f"study {study_uid} does not belong to your facility")
    existing = next((s for s in consult.studies if s.study_uid == study_uid), None)
    if existing is not None:
        return existing
    link = ConsultStudy(study_uid=study_uid, num_instances=study.num_instances, attached_by_fk=user.id,
                        attached_at=utcnow())
    consult.studies.append(link)
    session.flush()
    _audit(session, user, AuditAction.CONSULT_STUDY_ATTACHED, consult, study_uid=study_uid,
           instances=study.num_instances)
    return link


def accept(session: Session, consult: Consult, user: User) -> None:
    if not can_accept_or_decline(consult, user):
        raise NotAllowed("only a specialist or coordinator of the hub accepts a consult")
    _require_state(consult, [ConsultState.REQUESTED], "accept")
    role = ParticipantRole.SPECIALIST if user.role == ROLE_SPECIALIST else ParticipantRole.COORDINATOR
    _ensure_participant(session, consult, user, role)
    _set_state(session, consult, user, ConsultState.ACCEPTED)


def decline(session: Session, consult: Consult, user: User, reason: str) -> None:
    if not can_accept_or_decline(consult, user):
        raise NotAllowed("only a specialist or coordinator of the hub declines a consult")
    _require_state(consult, [ConsultState.REQUESTED], "decline")
    consult.decline_reason = _text(reason, "the reason for declining")
    role = ParticipantRole.SPECIALIST if user.role == ROLE_SPECIALIST else ParticipantRole.COORDINATOR
    _ensure_participant(session, consult, user, role)
    _set_state(session, consult, user, ConsultState.DECLINED, reason=consult.decline_reason)


def withdraw(session: Session, consult: Consult, user: User, reason: str = "") -> None:
    if not is_requesting_side(consult, user):
        raise NotAllowed("only the requesting doctor withdraws a consult")
    _require_state(consult, OPEN_STATES, "withdraw")
    _set_state(session, consult, user, ConsultState.WITHDRAWN, reason=_text(reason, "reason", required=False))


def add_participant(session: Session, consult: Consult, user: User, other: User,
                    role_name: ParticipantRole | str) -> None:
    """A coordinator of the hub names a specialist; the requesting side or a coordinator adds observers."""
    role: ParticipantRole = _enum(ParticipantRole, role_name, "role")
    if consult.state in FINAL_STATES:
        raise InvalidTransition(f"cannot add people to a consult that is {consult.state}")
    if other.disabled:
        raise InvalidInput(f"{other.username} is disabled")
    coordinator = is_hub_staff(consult, user) and user.role == ROLE_COORDINATOR
    if role == ParticipantRole.OBSERVER:
        if not consult.observers_allowed:
            raise NotAllowed("this consult is not open to observers")
        if not (coordinator or is_requesting_side(consult, user)):
            raise NotAllowed("only the requesting side or a hub coordinator adds observers")
    elif role == ParticipantRole.SPECIALIST:
        if not coordinator:
            raise NotAllowed("only a coordinator of the hub names specialists")
        if other.role != ROLE_SPECIALIST:
            raise InvalidInput(f"{other.username} is not a specialist")
    else:
        raise NotAllowed(f"{role.value}s are not added this way")
    if _participant(consult, other) is not None:
        raise InvalidInput(f"{other.username} already takes part")
    _ensure_participant(session, consult, other, role)
    _audit(session, user, AuditAction.CONSULT_PARTICIPANT_ADDED, consult, participant=other.username,
           role=role.value)


def post_message(session: Session, consult: Consult, user: User, text: str,
                 pin: PinnedImage | None = None) -> ConsultMessage:
    """A message in the thread, optionally pinning an image of an attached study exactly as its author saw it."""
    if not can_post(consult, user):
        raise NotAllowed("you can read this consult but not write in it")
    _require_state(consult, MESSAGE_STATES, "write in")
    body = _text(text, "the message", required=pin is None)
    msg = ConsultMessage(consult_fk=consult.id, author_fk=user.id, kind="text", body=body, created_at=utcnow())
    if pin is not None:
        _check_pin(consult, pin)
        msg.pin_study_uid, msg.pin_series_uid, msg.pin_instance_uid = pin.study_uid, pin.series_uid, pin.instance_uid
        msg.pin_frame, msg.pin_viewport = pin.frame, dict(pin.viewport)
        msg.pin_annotations = [contract_annotation(a) for a in pin.annotations]
    session.add(msg)
    session.flush()
    _audit(session, user, AuditAction.MESSAGE_POSTED, consult, message_id=msg.id,
           pinned=None if pin is None else {"series": pin.series_uid, "instance": pin.instance_uid,
                                            "frame": pin.frame})
    mark_read(session, consult, user, up_to=msg.id)
    if consult.state == ConsultState.ACCEPTED.value:
        _set_state(session, consult, user, ConsultState.IN_DISCUSSION)
    return msg


ANNOTATION_POINTS = {"length": 2, "angle": 3, "ellipse": 2, "arrow": 2, "text": 1}
VIEWPORT_KEYS = {"wc", "ww", "zoom", "panx", "pany", "invert", "rotate", "flip", "quality"}


def _check_pin(consult: Consult, pin: PinnedImage) -> None:
    if pin.study_uid not in study_uids_of_consult(consult):
        raise InvalidInput("a pinned image must belong to a study attached to the consult")
    if not pin.series_uid or not pin.instance_uid:
        raise InvalidInput("a pinned image needs its series and instance")
    if not isinstance(pin.frame, int) or pin.frame < 1:
        raise InvalidInput("the pinned frame is a number from 1")
    unknown = set(pin.viewport) - VIEWPORT_KEYS
    if unknown:
        raise InvalidInput(f"unknown viewport keys: {', '.join(sorted(unknown))}")
    for ann in pin.annotations:
        validate_annotation(ann)
    session = Session.object_session(consult)
    assert session is not None
    stored = session.execute(
        select(Instance.number_of_frames).join(Series, Series.id == Instance.series_fk)
        .join(Study, Study.id == Series.study_fk)
        .where(Instance.sop_instance_uid == pin.instance_uid, Series.series_uid == pin.series_uid,
               Study.study_uid == pin.study_uid)).first()
    if stored is None:
        raise InvalidInput("the pinned instance is not stored in that series of the study")
    if pin.frame > (stored[0] or 1):
        raise InvalidInput(f"the pinned instance has {stored[0] or 1} frame(s), not {pin.frame}")


def contract_annotation(ann: dict[str, Any]) -> dict[str, Any]:
    """Only what the viewer contract defines (a viewer may add its own keys to what it hands over)."""
    kept: dict[str, Any] = {"type": ann["type"], "points": [[x, y] for x, y in ann["points"]]}
    if ann["type"] == "text":
        kept["text"] = ann["text"]
    return kept


def validate_annotation(ann: Any) -> None:
    """One annotation of the viewer contract: ``{"type": ..., "points": [[x, y], ...], "text"?: ...}``."""
    if not isinstance(ann, dict) or ann.get("type") not in ANNOTATION_POINTS:
        raise InvalidInput(f"an annotation's type must be one of {', '.join(ANNOTATION_POINTS)}")
    points = ann.get("points")
    if (not isinstance(points, list) or len(points) != ANNOTATION_POINTS[ann["type"]]
            or not all(isinstance(p, list) and len(p) == 2
                       and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in p) for p in points)):
        raise InvalidInput(f"a {ann['type']} annotation has {ANNOTATION_POINTS[ann['type']]} [x, y] points")
    if ann["type"] == "text" and not isinstance(ann.get("text"), str):
        raise InvalidInput("a text annotation needs its text")


def _conclusion_content(consult: Consult, draft: ConclusionDraft) -> list[dict[str, Any]]:
    by_id = {q.id: q for q in consult.questions}
    unknown = set(draft.answers) - set(by_id)
    if unknown:
        raise InvalidInput(f"no such question: {sorted(unknown)}")
    answers = []
    for q in consult.questions:
        answer = _text(draft.answers.get(q.id, ""), f"the answer to question {q.position}")
        answers.append({"question_id": q.id, "position": q.position, "question": q.text, "answer": answer})
    return answers


def content_hash(c: ConsultConclusion) -> str:
    """SHA-256 over what was signed: the answers, the text, the transfer advice, the signer and the time."""
    signed_at = _as_utc(c.signed_at).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    body = {"consult": c.consult_fk, "version": c.version, "amends": c.amends_fk,
            "amendment_reason": c.amendment_reason, "answers": c.answers, "findings": c.findings,
            "impression": c.impression, "recommendation": c.recommendation,
            "transfer_recommended": c.transfer_recommended, "transfer_to": c.transfer_to,
            "signed_by": c.signed_by_fk, "signed_at": signed_at, "signer_name": c.signer_name,
            "certificate_number": c.signer_certificate_number, "certificate_scope": c.signer_certificate_scope}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False,
                                     separators=(",", ":")).encode("utf-8")).hexdigest()


def sign_conclusion(session: Session, consult: Consult, user: User, draft: ConclusionDraft) -> ConsultConclusion:
    """The specialist's signed conclusion: version 1, or an amendment (version n+1 amending version n)."""
    if not can_conclude(consult, user):
        raise NotAllowed("only a specialist taking part in the consult signs its conclusion")
    if not user.certificate_number.strip():
        raise NotAllowed("your profile has no practising-certificate number: a conclusion cannot be signed without it")
    previous = conclusions(session, consult)
    if previous:
        _require_state(consult, [ConsultState.CONCLUDED], "amend the conclusion of")
        reason = _text(draft.amendment_reason, "the reason for the amendment")
    else:
        _require_state(consult, [ConsultState.ACCEPTED, ConsultState.IN_DISCUSSION], "conclude")
        reason = ""
    transfer_to = _text(draft.transfer_to, "where to transfer", required=draft.transfer_recommended, limit=256)
    facility = session.get(Facility, user.facility_fk)
    conclusion = ConsultConclusion(
        consult_fk=consult.id, version=len(previous) + 1, amends_fk=previous[-1].id if previous else None,
        amendment_reason=reason, answers=_conclusion_content(consult, draft),
        findings=_text(draft.findings, "findings"), impression=_text(draft.impression, "impression"),
        recommendation=_text(draft.recommendation, "recommendation"),
        transfer_recommended=bool(draft.transfer_recommended),
        transfer_to=transfer_to if draft.transfer_recommended else "",
        signed_by_fk=user.id, signed_at=utcnow(), signer_name=user.display_name or user.username,
        signer_certificate_number=user.certificate_number, signer_certificate_scope=user.certificate_scope,
        signer_facility=facility.name if facility else "",
    )
    conclusion.content_hash = content_hash(conclusion)
    session.add(conclusion)
    _ensure_participant(session, consult, user, ParticipantRole.SPECIALIST)
    session.flush()
    action = AuditAction.CONCLUSION_AMENDED if previous else AuditAction.CONCLUSION_SIGNED
    _audit(session, user, action, consult, conclusion_id=conclusion.id, version=conclusion.version,
           content_hash=conclusion.content_hash, certificate_number=conclusion.signer_certificate_number)
    if previous:
        consult.updated_at = utcnow()
        _event(session, consult, user, "amended")
    else:
        _set_state(session, consult, user, ConsultState.CONCLUDED, version=1)
    return conclusion


def verify_conclusion(c: ConsultConclusion) -> bool:
    return content_hash(c) == c.content_hash


def record_follow_up(session: Session, consult: Consult, user: User, kind_name: FollowUpKind | str, text: str,
                     follows_advice: bool | None = None) -> ConsultFollowUp:
    """The requesting side's decision after the conclusion, or (later) the patient's outcome."""
    kind: FollowUpKind = _enum(FollowUpKind, kind_name, "kind")
    if not is_requesting_side(consult, user):
        raise NotAllowed("only the requesting side records the decision and the outcome")
    if kind == FollowUpKind.DECISION:
        _require_state(consult, [ConsultState.CONCLUDED], "record a decision on")
        if follows_advice is None:
            raise InvalidInput("say whether the decision follows the consultant's advice")
    else:
        _require_state(consult, [ConsultState.CONCLUDED, ConsultState.CLOSED], "record the outcome of")
        if not has_decision(consult):
            raise InvalidTransition("record the decision before the outcome")
        follows_advice = None
    item = ConsultFollowUp(consult_fk=consult.id, kind=kind.value, follows_advice=follows_advice,
                           text=_text(text, f"the {kind.value}"), recorded_by_fk=user.id, recorded_at=utcnow())
    session.add(item)
    session.flush()
    action = AuditAction.DECISION_RECORDED if kind == FollowUpKind.DECISION else AuditAction.OUTCOME_RECORDED
    _audit(session, user, action, consult, follow_up_id=item.id, follows_advice=follows_advice)
    consult.updated_at = utcnow()
    _event(session, consult, user, kind.value)
    return item


def close(session: Session, consult: Consult, user: User) -> None:
    if not is_requesting_side(consult, user):
        raise NotAllowed("only the requesting doctor closes a consult")
    _require_state(consult, [ConsultState.CONCLUDED], "close")
    if not has_decision(consult):
        raise InvalidTransition("record what was decided before closing the consult")
    _set_state(session, consult, user, ConsultState.CLOSED)


def record_review(session: Session, consult: Consult, user: User, samples: Sequence[ReviewSample]) -> int:
    """Evidence of review from the viewer: which images this reader had on screen, how long, how."""
    if not can_view(consult, user):
        raise ConsultNotFound(f"no consult {consult.id}")
    if len(samples) > MAX_REVIEW_BATCH:
        raise InvalidInput(f"at most {MAX_REVIEW_BATCH} review samples per request")
    attached = set(study_uids_of_consult(consult))
    rows = []
    for s in samples:
        if s.study_uid not in attached:
            raise InvalidInput(f"study {s.study_uid} is not attached to this consult")
        quality = _enum(Quality, s.quality, "quality")
        started, ended = _as_utc(s.started_at), _as_utc(s.ended_at)
        if ended < started:
            raise InvalidInput("a review sample ends before it starts")
        if s.frame < 1:
            raise InvalidInput("frame numbers start at 1")
        rows.append(ReviewEvent(
            consult_fk=consult.id, user_fk=user.id, study_uid=s.study_uid, series_uid=s.series_uid,
            instance_uid=s.instance_uid, frame=s.frame, window_center=s.window_center,
            window_width=s.window_width, quality=quality.value, started_at=started, ended_at=ended,
            duration_ms=int((ended - started).total_seconds() * 1000), recorded_at=utcnow()))
    session.add_all(rows)
    session.flush()
    if rows:
        _audit(session, user, AuditAction.REVIEW_RECORDED, consult, samples=len(rows),
               instances=sorted({r.instance_uid for r in rows}),
               lossy=sum(1 for r in rows if r.quality == Quality.LOSSY.value))
    return len(rows)


def record_export(session: Session, consult: Consult, user: User, what: str = "pdf") -> None:
    _audit(session, user, AuditAction.CONSULT_EXPORTED, consult, format=what)


# -- inbox ----------------------------------------------------------------------------------


def mark_read(session: Session, consult: Consult, user: User, up_to: int | None = None) -> None:
    if up_to is None:
        up_to = session.execute(select(func.max(ConsultMessage.id))
                                .where(ConsultMessage.consult_fk == consult.id)).scalar() or 0
    marker = session.get(ConsultReadMarker, (consult.id, user.id))
    if marker is None:
        session.add(ConsultReadMarker(consult_fk=consult.id, user_fk=user.id, last_message_id=up_to,
                                      read_at=utcnow()))
    elif up_to > marker.last_message_id:
        marker.last_message_id, marker.read_at = up_to, utcnow()
    session.flush()


def _needing_user(user: User) -> Any:
    """Consults that need this user: theirs (any role), and for hub staff new requests to their hub
    (specialists: of their specialty, or of none named)."""
    mine = Consult.id.in_(select(ConsultParticipant.consult_fk).where(ConsultParticipant.user_fk == user.id))
    if user.role == ROLE_COORDINATOR:
        return or_(mine, Consult.hub_facility_fk == user.facility_fk)
    if user.role == ROLE_SPECIALIST:
        new_for_me = and_(Consult.hub_facility_fk == user.facility_fk, Consult.state == ConsultState.REQUESTED.value,
                          or_(Consult.specialty == "", func.lower(Consult.specialty) == user.specialty.lower()))
        return or_(mine, new_for_me)
    return mine


def inbox(session: Session, user: User, *, now: dt.datetime | None = None,
          include_finished: bool = False) -> list[InboxItem]:
    """Consults needing the user with their unread counts: emergency first, then urgent, then by due time.

    Finished consults (closed, declined, withdrawn) stay while they have something unread.
    """
    now = now or utcnow()
    marker = (select(ConsultReadMarker.last_message_id)
              .where(ConsultReadMarker.consult_fk == Consult.id, ConsultReadMarker.user_fk == user.id)
              .correlate(Consult).scalar_subquery())
    unread = (select(func.count(ConsultMessage.id))
              .where(ConsultMessage.consult_fk == Consult.id, ConsultMessage.author_fk != user.id,
                     ConsultMessage.id > func.coalesce(marker, 0))
              .correlate(Consult).scalar_subquery())
    rows = session.execute(select(Consult, unread.label("unread")).where(_needing_user(user))).all()
    items = []
    for consult, count in rows:
        finished = consult.state in FINAL_STATES
        if finished and not include_finished and not count:
            continue
        items.append(InboxItem(consult, int(count or 0), is_overdue(consult, now)))
    items.sort(key=lambda i: (i.consult.state in FINAL_STATES, URGENCY_RANK[Urgency(i.consult.urgency)],
                              _as_utc(i.consult.due_at), i.consult.id))
    return items


def is_overdue(consult: Consult, now: dt.datetime) -> bool:
    return consult.state in OPEN_STATES and _as_utc(consult.due_at) < now


def overdue(session: Session, user: User, *, now: dt.datetime | None = None) -> list[Consult]:
    """For a hub coordinator: consults sent to the hub still without a conclusion after their due time."""
    if user.role not in (ROLE_COORDINATOR, ROLE_ADMIN):
        raise NotAllowed("only coordinators watch overdue consults")
    now = now or utcnow()
    query = select(Consult).where(Consult.state.in_([s.value for s in OPEN_STATES]), Consult.due_at < now)
    if user.role == ROLE_COORDINATOR:
        query = query.where(Consult.hub_facility_fk == user.facility_fk)
    found = list(session.execute(query).scalars())
    found.sort(key=lambda c: (URGENCY_RANK[Urgency(c.urgency)], _as_utc(c.due_at)))
    return found


def missing_attached_studies(session: Session) -> list[tuple[int, str, int, int]]:
    """Attached studies whose instances are no longer all in the catalogue:
    (consult id, study UID, instances when attached, instances now). ``telepacs verify`` reports them."""
    rows = session.execute(
        select(ConsultStudy.consult_fk, ConsultStudy.study_uid, ConsultStudy.num_instances,
               func.coalesce(Study.num_instances, 0))
        .outerjoin(Study, Study.study_uid == ConsultStudy.study_uid)
        .order_by(ConsultStudy.consult_fk, ConsultStudy.id)).all()
    return [(c, uid, then, now) for c, uid, then, now in rows if now < then or now == 0]


# -- what the pages need --------------------------------------------------------------------


@dataclass(frozen=True)
class StudyChoice:
    study_uid: str
    patient_id: str
    patient_name: str
    study_date: str
    description: str
    modalities: str
    instances: int


def facility_studies(session: Session, user: User, *, limit: int = 200) -> list[StudyChoice]:
    """The newest studies of the user's facility, to attach to a consult."""
    from archive.models import Patient

    code = session.execute(select(Facility.code).where(Facility.id == user.facility_fk)).scalar()
    rows = session.execute(
        select(Study, Patient).join(Patient, Patient.id == Study.patient_fk).where(Study.facility == code)
        .order_by(Study.received_at.desc()).limit(limit)).all()
    return [StudyChoice(s.study_uid, p.patient_id, p.patient_name, s.study_date, s.study_description,
                        s.modalities_in_study, s.num_instances) for s, p in rows]


def hub_facilities(session: Session, user: User) -> list[Facility]:
    """Facilities a consult can be sent to: every other facility, higher tiers first."""
    rank = {"central": 0, "provincial": 1, "district": 2, "commune": 3}
    found = [f for f in session.execute(select(Facility)).scalars() if f.id != user.facility_fk]
    return sorted(found, key=lambda f: (rank.get(f.tier, 9), f.name))


def specialists_of(session: Session, facility_ids: Iterable[int]) -> list[User]:
    return list(session.execute(select(User).where(User.facility_fk.in_(list(facility_ids)),
                                                   User.role == ROLE_SPECIALIST, User.disabled.is_(False))
                                .order_by(User.display_name)).scalars())


def observer_candidates(session: Session, consult: Consult) -> list[User]:
    taking_part = {p.user_fk for p in consult.participants}
    return [u for u in session.execute(select(User).where(User.disabled.is_(False), User.role.in_(
        [ROLE_OBSERVER, ROLE_SPECIALIST, ROLE_REQUESTER])).order_by(User.display_name)).scalars()
            if u.id not in taking_part]


def users_by_id(session: Session, ids: Iterable[int]) -> dict[int, User]:
    wanted = list(set(ids))
    return {u.id: u for u in session.execute(select(User).where(User.id.in_(wanted))).scalars()} if wanted else {}


def facility_names(session: Session) -> dict[int, str]:
    return {f.id: f.name or f.code for f in session.execute(select(Facility)).scalars()}


def observer_pseudonym(session: Session, user_id: int, study_uid: str) -> str | None:
    """The pseudonym under which this user must be served the study de-identified, or None (served as stored).

    A user sees a study de-identified only when every consult that gives them access to it makes them an
    observer of another facility on a consult that asks for de-identification. Their own facility's
    studies, and those of consults where they have any other role, are served as stored. For DICOMweb
    and the viewer: ``archive.deidentify.deidentify_json(obj, pseudonym)`` / ``deidentify_dataset``.
    """
    user = session.get(User, user_id)
    if user is None or user.role == ROLE_ADMIN:
        return None
    study_facility = session.execute(select(Study.facility).where(Study.study_uid == study_uid)).scalar()
    own_code = session.execute(select(Facility.code).where(Facility.id == user.facility_fk)).scalar()
    if study_facility is not None and study_facility == own_code:
        return None
    consults = list(session.execute(
        select(Consult).join(ConsultStudy, ConsultStudy.consult_fk == Consult.id)
        .where(ConsultStudy.study_uid == study_uid).order_by(Consult.id)).scalars())
    through = [c for c in consults if _participant(c, user) is not None or is_hub_staff(c, user)]
    if not through or any(not sees_deidentified(c, user) for c in through):
        return None
    return f"CONSULT-{through[0].id}"


def deidentify_json_for(session: Session, user_id: int, study_uid: str,
                        objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """DICOM JSON (QIDO rows, WADO metadata) of ``study_uid`` as this user must be served it."""
    from archive.deidentify import deidentify_json

    pseudonym = observer_pseudonym(session, user_id, study_uid)
    return objects if pseudonym is None else [deidentify_json(o, pseudonym) for o in objects]


def deidentify_part10_for(session: Session, user_id: int, study_uid: str, data: bytes) -> bytes:
    """A stored Part 10 instance of ``study_uid`` as this user must be served it (pixel data untouched)."""
    from archive.deidentify import deidentified_part10

    pseudonym = observer_pseudonym(session, user_id, study_uid)
    return data if pseudonym is None else deidentified_part10(data, pseudonym)
