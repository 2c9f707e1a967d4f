"""The consult lifecycle (viewer.consults.service) on SQLite and PostgreSQL: every transition, allowed and forbidden."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from archive import audit
from archive.models import AuditEntry, ConsultConclusion, ConsultMessage, Study
from consult_data import DIST_STUDY, DIST_STUDY_2, THIRD_STUDY, World, build_world, draft_for, request_for
from viewer.consults import service as svc
from viewer.consults.service import ConsultState, FollowUpKind, PinnedImage

S = ConsultState


@pytest.fixture
def db(archive) -> Iterator[tuple[Session, World]]:
    with archive.index.write_session() as session:
        world = build_world(session)
        session.commit()
        yield session, world


def _new(session: Session, w: World, **overrides: object) -> svc.Consult:
    consult = svc.create_consult(session, w.doctor, request_for(**overrides))
    session.commit()
    return consult


def _pin(frame: int = 3) -> PinnedImage:
    return PinnedImage(study_uid=DIST_STUDY, series_uid="1.2.3.4", instance_uid="1.2.3.4.5", frame=frame,
                       viewport={"wc": 40, "ww": 80, "zoom": 1.5, "panx": 0, "pany": -10},
                       annotations=[{"type": "length", "points": [[10, 20], [110, 20]]}])


def bring_to(session: Session, w: World, state: ConsultState) -> svc.Consult:
    """A consult that went the normal way (or the side way) to ``state``, committed."""
    c = _walk_to(session, w, state)
    session.commit()
    return c


def _walk_to(session: Session, w: World, state: ConsultState) -> svc.Consult:
    c = _new(session, w)
    if state == S.REQUESTED:
        return c
    if state == S.DECLINED:
        svc.decline(session, c, w.radiologist, "Ngoài chuyên môn / out of scope")
        return c
    if state == S.WITHDRAWN:
        svc.withdraw(session, c, w.doctor, "bệnh nhân đã chuyển viện")
        return c
    svc.accept(session, c, w.radiologist)
    if state == S.ACCEPTED:
        return c
    svc.post_message(session, c, w.radiologist, "Xin thêm phim cửa sổ xương.")
    if state == S.IN_DISCUSSION:
        return c
    svc.sign_conclusion(session, c, w.radiologist, draft_for(c))
    if state == S.CONCLUDED:
        return c
    svc.record_follow_up(session, c, w.doctor, FollowUpKind.DECISION, "Chuyển viện theo tư vấn.", True)
    svc.close(session, c, w.doctor)
    assert c.state == S.CLOSED
    return c


# -- creating -----------------------------------------------------------------------------


def test_requester_creates_a_consult_with_questions_studies_and_due_time(db):
    session, w = db
    before = svc.utcnow()
    c = _new(session, w, urgency="urgent")
    assert c.state == S.REQUESTED and c.urgency == "urgent"
    assert [q.position for q in c.questions] == [1, 2] and c.questions[0].text.startswith("Có máu tụ")
    assert [s.study_uid for s in c.studies] == [DIST_STUDY] and c.studies[0].num_instances == 3
    assert c.patient_informed is True and c.requester_facility_fk == w.dist.id and c.hub_facility_fk == w.hub.id
    assert before <= svc._as_utc(c.created_at) <= svc.utcnow()
    assert svc._as_utc(c.due_at) - svc._as_utc(c.created_at) == dt.timedelta(hours=24)
    actions = session.execute(select(AuditEntry.action).where(AuditEntry.object_id == str(c.id))).scalars().all()
    assert actions == ["consult_created", "consult_study_attached"]
    assert audit.verify(session).ok


@pytest.mark.parametrize("urgency,hours", [("emergency", 1), ("urgent", 24), ("routine", 72)])
def test_due_time_follows_urgency_and_settings(db, urgency, hours):
    session, w = db
    now = dt.datetime(2026, 11, 23, 2, 0, tzinfo=dt.timezone.utc)
    c = svc.create_consult(session, w.doctor, request_for(urgency=urgency), now=now)
    assert svc._as_utc(c.due_at) == now + dt.timedelta(hours=hours)
    custom = svc.DueTimes(emergency=dt.timedelta(minutes=30))
    c2 = svc.create_consult(session, w.doctor, request_for(urgency="emergency"), due=custom, now=now)
    assert svc._as_utc(c2.due_at) == now + dt.timedelta(minutes=30)


def test_due_times_from_settings(tmp_path):
    from archive.config import load_settings

    settings = load_settings(env={"TELEPACS_CONSULT_DUE_EMERGENCY_HOURS": "0.5"}, data_dir=str(tmp_path))
    due = svc.DueTimes.from_settings(settings)
    assert due.emergency == dt.timedelta(minutes=30) and due.urgent == dt.timedelta(hours=24)
    assert due.routine == dt.timedelta(hours=72)


@pytest.mark.parametrize("who", ["radiologist", "coordinator", "observer", "admin"])
def test_only_requesting_doctors_create(db, who):
    session, w = db
    with pytest.raises(svc.NotAllowed):
        svc.create_consult(session, getattr(w, who), request_for())


@pytest.mark.parametrize("overrides,error,words", [
    ({"questions": ["", "  "]}, svc.InvalidInput, "question"),
    ({"urgency": "asap"}, svc.InvalidInput, "urgency must be one of routine, urgent, emergency"),
    ({"hub_facility_code": "NOPE"}, svc.InvalidInput, "no facility"),
    ({"hub_facility_code": "DIST"}, svc.InvalidInput, "another facility"),
    ({"clinical_summary": " "}, svc.InvalidInput, "clinical summary is required"),
    ({"study_uids": ["1.2.3.999"]}, svc.InvalidInput, "not stored"),
    ({"study_uids": [THIRD_STUDY]}, svc.NotAllowed, "does not belong to your facility"),
])
def test_bad_requests_are_refused_with_a_reason(db, overrides, error, words):
    session, w = db
    with pytest.raises(error, match=words):
        svc.create_consult(session, w.doctor, request_for(**overrides))


def test_named_specialist_must_be_a_specialist(db):
    session, w = db
    with pytest.raises(svc.InvalidInput, match="not an active specialist"):
        svc.create_consult(session, w.doctor, request_for(specialist_user_ids=[w.coordinator.id]))
    c = svc.create_consult(session, w.doctor, request_for(specialist_user_ids=[w.far_specialist.id]))
    assert svc.is_named_specialist(c, w.far_specialist)


# -- accept / decline / withdraw ------------------------------------------------------------


@pytest.mark.parametrize("who", ["radiologist", "cardiologist", "coordinator"])
def test_hub_staff_accept(db, who):
    session, w = db
    c = _new(session, w)
    svc.accept(session, c, getattr(w, who))
    assert c.state == S.ACCEPTED
    assert svc._participant_role(c, getattr(w, who)) in (svc.ParticipantRole.SPECIALIST,
                                                         svc.ParticipantRole.COORDINATOR)


def test_named_specialist_of_another_facility_accepts(db):
    session, w = db
    c = _new(session, w, specialist_user_ids=[w.far_specialist.id])
    svc.accept(session, c, w.far_specialist)
    assert c.state == S.ACCEPTED


@pytest.mark.parametrize("who", ["doctor", "doctor2", "far_specialist", "observer", "stranger", "admin"])
def test_others_cannot_accept_or_decline(db, who):
    session, w = db
    c = _new(session, w)
    with pytest.raises(svc.NotAllowed):
        svc.accept(session, c, getattr(w, who))
    with pytest.raises(svc.NotAllowed):
        svc.decline(session, c, getattr(w, who), "no")
    assert c.state == S.REQUESTED


def test_decline_needs_a_reason_and_records_it(db):
    session, w = db
    c = _new(session, w)
    with pytest.raises(svc.InvalidInput, match="reason"):
        svc.decline(session, c, w.coordinator, "  ")
    svc.decline(session, c, w.coordinator, "Không có bác sĩ thần kinh trực / no neuro on call")
    session.commit()
    assert c.state == S.DECLINED and "thần kinh" in c.decline_reason
    entry = session.execute(select(AuditEntry).where(AuditEntry.action == "consult_state_changed")).scalar_one()
    assert entry.detail["to"] == "declined" and "thần kinh" in entry.detail["reason"]


def test_disabled_specialist_cannot_act(db):
    session, w = db
    c = _new(session, w)
    w.radiologist.disabled = True
    with pytest.raises(svc.NotAllowed):
        svc.accept(session, c, w.radiologist)


@pytest.mark.parametrize("state", [S.REQUESTED, S.ACCEPTED, S.IN_DISCUSSION])
def test_requester_withdraws_an_open_consult(db, state):
    session, w = db
    c = bring_to(session, w, state)
    with pytest.raises(svc.NotAllowed):
        svc.withdraw(session, c, w.radiologist)
    with pytest.raises(svc.NotAllowed):
        svc.withdraw(session, c, w.doctor2)  # same facility, but not on this consult
    svc.withdraw(session, c, w.doctor, "đã ổn định")
    assert c.state == S.WITHDRAWN


# -- the transition table ---------------------------------------------------------------------

ACTIONS: dict[str, Callable[[Session, World, svc.Consult], object]] = {
    "accept": lambda s, w, c: svc.accept(s, c, w.radiologist),
    "decline": lambda s, w, c: svc.decline(s, c, w.radiologist, "lý do"),
    "withdraw": lambda s, w, c: svc.withdraw(s, c, w.doctor),
    "post": lambda s, w, c: svc.post_message(s, c, w.doctor, "thêm thông tin"),
    "conclude": lambda s, w, c: svc.sign_conclusion(s, c, w.radiologist, draft_for(c, amendment_reason="sửa")),
    "decide": lambda s, w, c: svc.record_follow_up(s, c, w.doctor, "decision", "theo tư vấn", True),
    "close": lambda s, w, c: svc.close(s, c, w.doctor),
}
# What each action may start from (conclude from concluded is an amendment).
ALLOWED_FROM = {
    "accept": {S.REQUESTED}, "decline": {S.REQUESTED},
    "withdraw": {S.REQUESTED, S.ACCEPTED, S.IN_DISCUSSION},
    "post": {S.REQUESTED, S.ACCEPTED, S.IN_DISCUSSION, S.CONCLUDED},
    "conclude": {S.ACCEPTED, S.IN_DISCUSSION, S.CONCLUDED},
    "decide": {S.CONCLUDED}, "close": set(),  # close needs a decision first: its own test
}


@pytest.mark.parametrize("state", list(S))
@pytest.mark.parametrize("action", list(ACTIONS))
def test_transition_table(db, state, action):
    session, w = db
    c = bring_to(session, w, state)
    if state == S.REQUESTED and action == "conclude":
        pytest.skip("covered below: an unaccepted consult cannot be concluded")
    if state in ALLOWED_FROM[action]:
        ACTIONS[action](session, w, c)
        session.commit()
    else:
        with pytest.raises(svc.InvalidTransition):
            ACTIONS[action](session, w, c)
        session.rollback()
        assert session.get(svc.Consult, c.id).state == state.value


def test_requested_consult_cannot_be_concluded(db):
    session, w = db
    c = _new(session, w)
    with pytest.raises(svc.InvalidTransition, match="cannot conclude a consult that is requested"):
        svc.sign_conclusion(session, c, w.radiologist, draft_for(c))


def test_allowed_actions_match_roles(db):
    session, w = db
    c = _new(session, w)
    assert svc.allowed_actions(c, w.radiologist) == ["accept", "decline", "post"]
    assert svc.allowed_actions(c, w.doctor) == ["withdraw", "post", "add_observer"]
    assert svc.allowed_actions(c, w.stranger) == []
    svc.accept(session, c, w.radiologist)
    assert "conclude" in svc.allowed_actions(c, w.radiologist)
    assert "conclude" not in svc.allowed_actions(c, w.coordinator)
    svc.add_participant(session, c, w.doctor, w.observer, "observer")
    assert svc.allowed_actions(c, w.observer) == []


# -- messages -----------------------------------------------------------------------------


def test_first_message_after_accepting_starts_the_discussion(db):
    session, w = db
    c = bring_to(session, w, S.ACCEPTED)
    msg = svc.post_message(session, c, w.doctor, "Bệnh nhân nôn 2 lần.", pin=_pin())
    session.commit()
    assert c.state == S.IN_DISCUSSION
    assert msg.pin_frame == 3 and msg.pin_viewport["ww"] == 80
    assert msg.pin_annotations == [{"type": "length", "points": [[10, 20], [110, 20]]}]
    extra = svc.post_message(session, c, w.doctor, "", pin=PinnedImage(
        study_uid=DIST_STUDY, series_uid="1.2.3.4", instance_uid="1.2.3.4.5",
        annotations=[{"type": "text", "points": [[5, 6]], "text": "đây", "sop": "1.2.3.4.5", "frame": 1}]))
    assert extra.pin_annotations == [{"type": "text", "points": [[5, 6]], "text": "đây"}]  # the contract's keys
    posted = session.execute(select(AuditEntry).where(AuditEntry.action == "message_posted")
                             .order_by(AuditEntry.id)).scalars().first()
    assert posted.detail["pinned"] == {"series": "1.2.3.4", "instance": "1.2.3.4.5", "frame": 3}


@pytest.mark.parametrize("pin,words", [
    (PinnedImage(study_uid=THIRD_STUDY, series_uid="1.2", instance_uid="1.2.3"), "attached"),
    (PinnedImage(study_uid=DIST_STUDY, series_uid="1.2", instance_uid="1.2.3", frame=0), "frame"),
    (PinnedImage(study_uid=DIST_STUDY, series_uid="1.2", instance_uid="1.2.3", viewport={"evil": 1}), "viewport"),
    (PinnedImage(study_uid=DIST_STUDY, series_uid="1.2", instance_uid="1.2.3",
                 annotations=[{"type": "length", "points": [[1, 2]]}]), "2 \\[x, y\\] points"),
    (PinnedImage(study_uid=DIST_STUDY, series_uid="1.2", instance_uid="1.2.3",
                 annotations=[{"type": "freehand", "points": []}]), "type must be one of"),
    (PinnedImage(study_uid=DIST_STUDY, series_uid="1.2", instance_uid="1.2.3",
                 annotations=[{"type": "text", "points": [[1, 2]]}]), "needs its text"),
])
def test_bad_pins_are_refused(db, pin, words):
    session, w = db
    c = bring_to(session, w, S.ACCEPTED)
    with pytest.raises(svc.InvalidInput, match=words):
        svc.post_message(session, c, w.radiologist, "xem", pin=pin)


@pytest.mark.parametrize("who", ["observer", "stranger", "far_specialist"])
def test_observers_and_outsiders_cannot_write(db, who):
    session, w = db
    c = bring_to(session, w, S.ACCEPTED)
    svc.add_participant(session, c, w.doctor, w.observer, "observer")
    with pytest.raises(svc.NotAllowed):
        svc.post_message(session, c, getattr(w, who), "xin chào")


def test_empty_message_without_pin_is_refused(db):
    session, w = db
    c = bring_to(session, w, S.ACCEPTED)
    elsewhere = PinnedImage(study_uid=DIST_STUDY, series_uid="1.2.3.4", instance_uid="9.9.9")
    with pytest.raises(svc.InvalidInput, match="not stored in that series"):
        svc.post_message(session, c, w.radiologist, "xem", pin=elsewhere)
    with pytest.raises(svc.InvalidInput, match="has 5 frame"):
        svc.post_message(session, c, w.radiologist, "xem", pin=_pin(frame=6))
    with pytest.raises(svc.InvalidInput, match="message is required"):
        svc.post_message(session, c, w.doctor, "   ")
    assert svc.post_message(session, c, w.radiologist, "", pin=_pin()).body == ""


# -- observers --------------------------------------------------------------------------------


def test_observers_only_when_the_consult_allows_and_by_the_right_people(db):
    session, w = db
    closed_door = _new(session, w, observers_allowed=False)
    with pytest.raises(svc.NotAllowed, match="not open to observers"):
        svc.add_participant(session, closed_door, w.doctor, w.observer, "observer")
    c = _new(session, w)
    with pytest.raises(svc.NotAllowed):
        svc.add_participant(session, c, w.radiologist, w.observer, "observer")
    svc.add_participant(session, c, w.coordinator, w.observer, "observer")
    assert svc.can_view(c, w.observer) and not svc.can_post(c, w.observer)
    assert svc.sees_deidentified(c, w.observer)
    assert not svc.sees_deidentified(c, w.radiologist) and not svc.sees_deidentified(c, w.doctor)
    with pytest.raises(svc.InvalidInput, match="already"):
        svc.add_participant(session, c, w.doctor, w.observer, "observer")


def test_only_a_hub_coordinator_names_specialists(db):
    session, w = db
    c = _new(session, w)
    with pytest.raises(svc.NotAllowed):
        svc.add_participant(session, c, w.doctor, w.far_specialist, "specialist")
    with pytest.raises(svc.InvalidInput, match="not a specialist"):
        svc.add_participant(session, c, w.coordinator, w.observer, "specialist")
    svc.add_participant(session, c, w.coordinator, w.far_specialist, "specialist")
    svc.accept(session, c, w.far_specialist)
    assert c.state == S.ACCEPTED


# -- conclusions ------------------------------------------------------------------------------


def test_conclusion_is_signed_with_the_certificate_and_its_hash(db):
    session, w = db
    c = bring_to(session, w, S.IN_DISCUSSION)
    conclusion = svc.sign_conclusion(session, c, w.radiologist, draft_for(c))
    session.commit()
    assert c.state == S.CONCLUDED and conclusion.version == 1 and conclusion.amends_fk is None
    assert conclusion.signer_certificate_number == "0012345/BYT-CCHN"
    assert conclusion.signer_certificate_scope == "Chẩn đoán hình ảnh"
    assert conclusion.signer_name == "TS.BS. Trần Văn Hùng" and conclusion.signer_facility == "Bệnh viện Bạch Mai"
    assert [a["position"] for a in conclusion.answers] == [1, 2]
    assert svc.verify_conclusion(conclusion)
    w.radiologist.certificate_number = "changed later"  # the record keeps what was true at signing
    session.commit()
    assert session.get(ConsultConclusion, conclusion.id).signer_certificate_number == "0012345/BYT-CCHN"


@pytest.mark.parametrize("who", ["doctor", "coordinator", "far_specialist", "observer", "admin"])
def test_only_a_specialist_of_the_consult_concludes(db, who):
    session, w = db
    c = bring_to(session, w, S.IN_DISCUSSION)
    with pytest.raises(svc.NotAllowed):
        svc.sign_conclusion(session, c, getattr(w, who), draft_for(c))


def test_no_certificate_no_signature(db):
    session, w = db
    c = bring_to(session, w, S.IN_DISCUSSION)
    w.cardiologist.certificate_number = ""
    with pytest.raises(svc.NotAllowed, match="practising-certificate"):
        svc.sign_conclusion(session, c, w.cardiologist, draft_for(c))


def test_every_question_needs_an_answer(db):
    session, w = db
    c = bring_to(session, w, S.IN_DISCUSSION)
    first = c.questions[0].id
    with pytest.raises(svc.InvalidInput, match="answer to question 2"):
        svc.sign_conclusion(session, c, w.radiologist, draft_for(c, answers={first: "có"}))
    with pytest.raises(svc.InvalidInput, match="no such question"):
        svc.sign_conclusion(session, c, w.radiologist, draft_for(c, answers={first: "a", 999999: "b"}))
    with pytest.raises(svc.InvalidInput, match="where to transfer"):
        svc.sign_conclusion(session, c, w.radiologist, draft_for(c, transfer_to=""))


def test_amendment_is_a_new_version_and_both_stay(db):
    session, w = db
    c = bring_to(session, w, S.CONCLUDED)
    with pytest.raises(svc.InvalidInput, match="reason for the amendment"):
        svc.sign_conclusion(session, c, w.radiologist, draft_for(c))
    v2 = svc.sign_conclusion(session, c, w.radiologist,
                             draft_for(c, impression="Máu tụ ngoài màng cứng, kèm vỡ xương thái dương.",
                                       amendment_reason="Bổ sung vỡ xương / fracture added"))
    session.commit()
    versions = svc.conclusions(session, c)
    assert [v.version for v in versions] == [1, 2] and v2.amends_fk == versions[0].id
    assert versions[0].impression.startswith("Máu tụ ngoài màng cứng cấp tính")
    assert c.state == S.CONCLUDED
    actions = session.execute(select(AuditEntry.action).order_by(AuditEntry.id)).scalars().all()
    assert actions.count("conclusion_signed") == 1 and actions.count("conclusion_amended") == 1


def test_signed_conclusion_cannot_be_changed_or_deleted_in_the_database(db, archive):
    session, w = db
    c = bring_to(session, w, S.CONCLUDED)
    conclusion_id = svc.conclusions(session, c)[0].id
    session.commit()
    for statement in ("UPDATE consult_conclusions SET impression = 'x' WHERE id = :id",
                      "DELETE FROM consult_conclusions WHERE id = :id"):
        with pytest.raises(DBAPIError, match="immutable"):
            with archive.index.engine.begin() as conn:
                conn.execute(text(statement), {"id": conclusion_id})
    with pytest.raises(DBAPIError, match="cannot be detached"):
        with archive.index.engine.begin() as conn:
            conn.execute(text("DELETE FROM consult_studies WHERE consult_fk = :id"), {"id": c.id})


# -- decision, outcome, close -----------------------------------------------------------------


def test_close_needs_the_decision_and_outcome_comes_after(db):
    session, w = db
    c = bring_to(session, w, S.CONCLUDED)
    with pytest.raises(svc.InvalidTransition, match="decided before closing"):
        svc.close(session, c, w.doctor)
    with pytest.raises(svc.InvalidTransition, match="decision before the outcome"):
        svc.record_follow_up(session, c, w.doctor, "outcome", "ổn")
    with pytest.raises(svc.InvalidInput, match="follows the consultant"):
        svc.record_follow_up(session, c, w.doctor, "decision", "chuyển viện")
    with pytest.raises(svc.NotAllowed):
        svc.record_follow_up(session, c, w.radiologist, "decision", "chuyển viện", True)
    svc.record_follow_up(session, c, w.doctor, "decision", "Chuyển viện Bạch Mai lúc 03:10.", True)
    assert "close" in svc.allowed_actions(c, w.doctor)
    with pytest.raises(svc.NotAllowed):
        svc.close(session, c, w.radiologist)
    svc.close(session, c, w.doctor)
    assert c.state == S.CLOSED
    svc.record_follow_up(session, c, w.doctor, "outcome", "Đã mổ, hồi phục tốt. / Operated, recovering.")
    session.commit()
    kinds = [(f.kind, f.follows_advice) for f in svc.follow_ups(session, c)]
    assert kinds == [("decision", True), ("outcome", None)]
    # The specialist sees what happened: the follow-ups are unread events in their inbox.
    item = next(i for i in svc.inbox(session, w.radiologist, include_finished=True) if i.consult.id == c.id)
    assert item.unread >= 3  # decision, closed, outcome


# -- inbox, overdue, access -------------------------------------------------------------------


def test_inbox_lists_emergencies_first_with_unread_counts(db):
    session, w = db
    now = svc.utcnow()
    routine = svc.create_consult(session, w.doctor, request_for(urgency="routine"), now=now)
    urgent = svc.create_consult(session, w.doctor, request_for(urgency="urgent"), now=now)
    emergency = svc.create_consult(session, w.doctor, request_for(urgency="emergency"), now=now)
    cardio = svc.create_consult(session, w.doctor, request_for(urgency="emergency", specialty="cardiology"), now=now)
    session.commit()
    ids = [i.consult.id for i in svc.inbox(session, w.radiologist)]
    assert ids == [emergency.id, urgent.id, routine.id]  # not cardiology's request
    assert [i.consult.id for i in svc.inbox(session, w.cardiologist)] == [cardio.id]
    assert [i.consult.id for i in svc.inbox(session, w.coordinator)] == [emergency.id, cardio.id, urgent.id,
                                                                         routine.id]
    assert svc.inbox(session, w.stranger) == [] and svc.inbox(session, w.far_specialist) == []
    first = svc.inbox(session, w.radiologist)[0]
    assert first.unread == 1 and not first.overdue  # the "requested" event
    svc.accept(session, emergency, w.radiologist)
    svc.post_message(session, emergency, w.radiologist, "Đã nhận, đang đọc phim.")
    session.commit()
    doctor_view = {i.consult.id: i.unread for i in svc.inbox(session, w.doctor)}
    assert doctor_view[emergency.id] == 3  # accepted, in discussion, the message
    svc.mark_read(session, emergency, w.doctor)
    assert {i.consult.id: i.unread for i in svc.inbox(session, w.doctor)}[emergency.id] == 0
    later = now + dt.timedelta(hours=2)
    assert [i.overdue for i in svc.inbox(session, w.radiologist, now=later)][0] is True


def test_overdue_for_coordinators(db):
    session, w = db
    now = dt.datetime.now(dt.timezone.utc)
    emergency = svc.create_consult(session, w.doctor, request_for(urgency="emergency"), now=now)
    urgent = svc.create_consult(session, w.doctor, request_for(urgency="urgent"), now=now)
    svc.create_consult(session, w.doctor, request_for(urgency="routine"), now=now)
    session.commit()
    assert svc.overdue(session, w.coordinator, now=now + dt.timedelta(minutes=30)) == []
    assert svc.overdue(session, w.coordinator, now=now + dt.timedelta(hours=2)) == [emergency]
    assert svc.overdue(session, w.coordinator, now=now + dt.timedelta(hours=25)) == [emergency, urgent]
    svc.accept(session, emergency, w.radiologist)
    svc.sign_conclusion(session, emergency, w.radiologist, draft_for(emergency))
    assert svc.overdue(session, w.coordinator, now=now + dt.timedelta(hours=25)) == [urgent]
    with pytest.raises(svc.NotAllowed):
        svc.overdue(session, w.radiologist)


def test_study_uids_for_participant(db):
    session, w = db
    c = _new(session, w)
    svc.attach_study(session, c, w.doctor, DIST_STUDY_2)
    session.commit()
    assert svc.study_uids_for_participant(session, w.doctor.id) == {DIST_STUDY, DIST_STUDY_2}
    assert svc.study_uids_for_participant(session, w.radiologist.id) == {DIST_STUDY, DIST_STUDY_2}
    assert svc.study_uids_for_participant(session, w.observer.id) == set()
    assert svc.study_uids_for_participant(session, w.stranger.id) == set()
    assert svc.study_uids_for_participant(session, w.far_specialist.id) == set()
    svc.add_participant(session, c, w.doctor, w.observer, "observer")
    session.commit()
    assert svc.study_uids_for_participant(session, w.observer.id) == {DIST_STUDY, DIST_STUDY_2}
    with pytest.raises(svc.ConsultNotFound):
        svc.get_consult(session, c.id, w.stranger)
    assert svc.get_consult(session, c.id, w.observer) is c


def test_review_evidence(db):
    session, w = db
    c = bring_to(session, w, S.ACCEPTED)
    t0 = dt.datetime(2026, 11, 23, 2, 30, tzinfo=dt.timezone.utc)
    samples = [svc.ReviewSample(DIST_STUDY, "1.2.3.4", f"1.2.3.4.{i}", 1, 40.0, 80.0,
                                "lossy" if i == 1 else "full", t0 + dt.timedelta(seconds=i),
                                t0 + dt.timedelta(seconds=i, milliseconds=700)) for i in range(1, 4)]
    assert svc.record_review(session, c, w.radiologist, samples) == 3
    session.commit()
    events = svc.review_events(session, c)
    assert [(e.instance_uid, e.quality, e.duration_ms) for e in events] == [
        ("1.2.3.4.1", "lossy", 700), ("1.2.3.4.2", "full", 700), ("1.2.3.4.3", "full", 700)]
    entry = session.execute(select(AuditEntry).where(AuditEntry.action == "review_recorded")).scalar_one()
    assert entry.detail["samples"] == 3 and entry.detail["lossy"] == 1
    bad = svc.ReviewSample(THIRD_STUDY, "1.2", "1.2.3", 1, None, None, "full", t0, t0)
    with pytest.raises(svc.InvalidInput, match="not attached"):
        svc.record_review(session, c, w.radiologist, [bad])
    backwards = svc.ReviewSample(DIST_STUDY, "1.2", "1.2.3", 1, None, None, "full", t0, t0 - dt.timedelta(1))
    with pytest.raises(svc.InvalidInput, match="ends before"):
        svc.record_review(session, c, w.radiologist, [backwards])
    with pytest.raises(svc.InvalidInput, match="quality"):
        svc.record_review(session, c, w.radiologist, [svc.ReviewSample(DIST_STUDY, "1", "1", 1, None, None,
                                                                       "medium", t0, t0)])
    with pytest.raises(svc.ConsultNotFound):
        svc.record_review(session, c, w.stranger, samples)


def test_missing_attached_studies_are_reported(db):
    session, w = db
    c = _new(session, w)
    svc.attach_study(session, c, w.doctor, DIST_STUDY_2)
    session.commit()
    assert svc.missing_attached_studies(session) == []
    session.execute(update(Study).where(Study.study_uid == DIST_STUDY).values(num_instances=1))
    session.execute(Study.__table__.delete().where(Study.study_uid == DIST_STUDY_2))
    session.commit()
    assert svc.missing_attached_studies(session) == [(c.id, DIST_STUDY, 3, 1), (c.id, DIST_STUDY_2, 3, 0)]


def test_full_flow_leaves_a_verifiable_audit_chain(db):
    session, w = db
    c = bring_to(session, w, S.CLOSED)
    session.commit()
    actions = session.execute(select(AuditEntry.action).where(AuditEntry.object_id == str(c.id))
                              .order_by(AuditEntry.id)).scalars().all()
    assert actions == ["consult_created", "consult_study_attached", "consult_state_changed", "message_posted",
                       "consult_state_changed", "conclusion_signed", "consult_state_changed",
                       "decision_recorded", "consult_state_changed"]
    assert audit.verify(session).ok
    events = session.execute(select(ConsultMessage.body).where(ConsultMessage.kind == "event")
                             .order_by(ConsultMessage.id)).scalars().all()
    assert events == ["requested", "accepted", "in_discussion", "concluded", "decision", "closed"]
    assert session.execute(select(func.count()).select_from(ConsultConclusion)).scalar() == 1


def test_observer_pseudonym_for_dicomweb(db):
    session, w = db
    c = _new(session, w)
    assert svc.observer_pseudonym(session, w.observer.id, DIST_STUDY) is None  # no access at all: not our call
    svc.add_participant(session, c, w.doctor, w.observer, "observer")
    session.commit()
    assert svc.observer_pseudonym(session, w.observer.id, DIST_STUDY) == f"CONSULT-{c.id}"
    assert svc.observer_pseudonym(session, w.doctor.id, DIST_STUDY) is None
    assert svc.observer_pseudonym(session, w.radiologist.id, DIST_STUDY) is None
    assert svc.observer_pseudonym(session, w.admin.id, DIST_STUDY) is None
    assert svc.observer_pseudonym(session, w.observer.id, THIRD_STUDY) is None  # the observer's own facility
    open_door = _new(session, w, deidentify_for_observers=False)
    svc.add_participant(session, open_door, w.doctor, w.observer, "observer")
    session.commit()
    assert svc.observer_pseudonym(session, w.observer.id, DIST_STUDY) is None  # another consult shows it as is
