"""A consult's full record as plain data (for the PDF minutes and the pages). No Flask here."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from archive.models import (Consult, ConsultConclusion, ConsultFollowUp, ConsultMessage, Facility, ReviewEvent,
                            User)
from viewer.consults import service as svc


@dataclass(frozen=True)
class PersonLine:
    name: str
    username: str
    role: str  # role in the consult
    facility: str
    certificate_number: str = ""
    certificate_scope: str = ""


@dataclass(frozen=True)
class ReviewLine:
    reader: str
    series_uid: str
    instance_uid: str
    frame: int
    window: str
    quality: str
    started_at: dt.datetime
    duration_ms: int


@dataclass
class ConsultRecord:
    consult: Consult
    requesting_facility: Facility
    hub_facility: Facility
    participants: list[PersonLine]
    patient_name: str
    patient_id: str
    deidentified: bool
    questions: list[tuple[int, str]]  # (position, text)
    conclusions: list[ConsultConclusion]
    follow_ups: list[tuple[ConsultFollowUp, str]]  # (item, who recorded it)
    messages: list[tuple[ConsultMessage, str]]  # (message, author's name)
    reviews: list[ReviewLine]
    study_uids: list[str]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def latest(self) -> ConsultConclusion | None:
        return self.conclusions[-1] if self.conclusions else None


def _name(user: User) -> str:
    return user.display_name or user.username


def collect_record(session: Session, consult: Consult, *, deidentify: bool = False) -> ConsultRecord:
    """Everything the minutes show. ``deidentify``: patient identity replaced (observers of other facilities)."""
    users: dict[int, User] = {}

    def user(uid: int) -> User:
        if uid not in users:
            found = session.get(User, uid)
            assert found is not None
            users[uid] = found
        return users[uid]

    facilities = {f.id: f for f in session.execute(select(Facility)).scalars()}
    participants = []
    for p in consult.participants:
        u = user(p.user_fk)
        participants.append(PersonLine(
            name=_name(u), username=u.username, role=p.role, facility=facilities[u.facility_fk].name,
            certificate_number=u.certificate_number if p.role == svc.ParticipantRole.SPECIALIST else "",
            certificate_scope=u.certificate_scope if p.role == svc.ParticipantRole.SPECIALIST else ""))
    reviews = [ReviewLine(reader=_name(user(e.user_fk)), series_uid=e.series_uid, instance_uid=e.instance_uid,
                          frame=e.frame, window=_window_text(e), quality=e.quality,
                          started_at=svc._as_utc(e.started_at), duration_ms=e.duration_ms)
               for e in svc.review_events(session, consult)]
    return ConsultRecord(
        consult=consult, requesting_facility=facilities[consult.requester_facility_fk],
        hub_facility=facilities[consult.hub_facility_fk], participants=participants,
        patient_name="(de-identified)" if deidentify else consult.patient_name,
        patient_id=f"CONSULT-{consult.id}" if deidentify else consult.patient_id, deidentified=deidentify,
        questions=[(q.position, q.text) for q in consult.questions],
        conclusions=svc.conclusions(session, consult),
        follow_ups=[(f, _name(user(f.recorded_by_fk))) for f in svc.follow_ups(session, consult)],
        messages=[(m, _name(user(m.author_fk))) for m in svc.messages(session, consult)],
        reviews=reviews, study_uids=svc.study_uids_of_consult(consult),
    )


def _window_text(e: ReviewEvent) -> str:
    if e.window_center is None or e.window_width is None:
        return ""
    return f"{e.window_center:g}/{e.window_width:g}"
