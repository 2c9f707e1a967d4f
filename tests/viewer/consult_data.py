"""A small world for the consult tests: a hub, two district hospitals, a fourth facility, their people, studies."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from archive.models import Facility, Instance, Patient, Series, Study, User
from viewer.consults import service as svc

DIST_STUDY = "1.2.826.0.1.3680043.8.498.100.1"
DIST_STUDY_2 = "1.2.826.0.1.3680043.8.498.100.2"
THIRD_STUDY = "1.2.826.0.1.3680043.8.498.300.1"
PIN_SERIES = "1.2.3.4"
PIN_INSTANCE = "1.2.3.4.5"


@dataclass
class World:
    hub: Facility
    dist: Facility
    third: Facility
    fourth: Facility
    doctor: User  # requesting doctor at the district hospital
    doctor2: User  # another requesting doctor there, not on the consult
    radiologist: User  # specialist at the hub (radiology)
    cardiologist: User  # specialist at the hub (cardiology)
    coordinator: User  # coordinator at the hub
    far_specialist: User  # specialist at the third facility
    observer: User  # trainee at the third facility
    stranger: User  # requesting doctor at the fourth facility
    admin: User


def _user(session: Session, username: str, role: str, facility: Facility, **extra: str) -> User:
    user = User(username=username, display_name=extra.pop("display_name", username), password_hash="x",
                role=role, facility_fk=facility.id, **extra)
    session.add(user)
    return user


def _study(session: Session, uid: str, facility: str, patient: Patient, n: int = 3) -> None:
    session.add(Study(study_uid=uid, patient_fk=patient.id, facility=facility, num_instances=n, num_series=1))


def _series_with_instance(session: Session, study_uid: str, series_uid: str, sop_uid: str, frames: int) -> None:
    study = session.query(Study).filter_by(study_uid=study_uid).one()
    series = Series(series_uid=series_uid, study_fk=study.id, modality="CT", num_instances=1)
    session.add(series)
    session.flush()
    session.add(Instance(sop_instance_uid=sop_uid, series_fk=series.id, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                         transfer_syntax_uid="1.2.840.10008.1.2.1", number_of_frames=frames,
                         object_key=f"{study_uid}/{series_uid}/{sop_uid}.dcm", size=1, checksum="0" * 64,
                         dataset_checksum="0" * 64))


def build_world(session: Session, *, with_studies: bool = True) -> World:
    hub = Facility(code="HUB", name="Bệnh viện Bạch Mai", tier="central")
    dist = Facility(code="DIST", name="Trung tâm Y tế huyện Mường Tè", tier="district")
    third = Facility(code="THIRD", name="Bệnh viện đa khoa tỉnh Lai Châu", tier="provincial")
    fourth = Facility(code="FOURTH", name="Trạm y tế xã Pa Ủ", tier="commune")
    session.add_all([hub, dist, third, fourth])
    session.flush()
    w = World(
        hub=hub, dist=dist, third=third, fourth=fourth,
        doctor=_user(session, "bs.lan", "requester", dist, display_name="BS. Nguyễn Thị Lan"),
        doctor2=_user(session, "bs.minh", "requester", dist),
        radiologist=_user(session, "ts.hung", "specialist", hub, display_name="TS.BS. Trần Văn Hùng",
                          specialty="radiology", certificate_number="0012345/BYT-CCHN",
                          certificate_scope="Chẩn đoán hình ảnh"),
        cardiologist=_user(session, "bs.tim", "specialist", hub, specialty="cardiology",
                           certificate_number="0099999/BYT-CCHN", certificate_scope="Nội tim mạch"),
        coordinator=_user(session, "dieuphoi", "coordinator", hub),
        far_specialist=_user(session, "bs.xa", "specialist", third, specialty="radiology",
                             certificate_number="0055555/LC-CCHN", certificate_scope="Chẩn đoán hình ảnh"),
        observer=_user(session, "hv.an", "observer", third),
        stranger=_user(session, "bs.la", "requester", fourth),
        admin=_user(session, "admin", "admin", hub),
    )
    if with_studies:
        patient = Patient(patient_id="MT-0001", patient_name="Lò Văn Páo", patient_name_folded="lo van pao")
        session.add(patient)
        session.flush()
        _study(session, DIST_STUDY, "DIST", patient)
        _study(session, DIST_STUDY_2, "DIST", patient)
        _study(session, THIRD_STUDY, "THIRD", patient)
        session.flush()
        _series_with_instance(session, DIST_STUDY, PIN_SERIES, PIN_INSTANCE, frames=5)
    session.flush()
    return w


def request_for(**overrides: object) -> svc.ConsultRequest:
    values: dict[str, object] = dict(
        patient_id="MT-0001", patient_name="Lò Văn Páo",
        clinical_summary="Nam 45 tuổi, ngã xe máy, đau đầu, GCS 13. / Male, 45, motorbike fall, GCS 13.",
        questions=["Có máu tụ nội sọ không? / Intracranial haematoma?", "Có cần chuyển tuyến? / Transfer?"],
        urgency="emergency", hub_facility_code="HUB", patient_informed=True, specialty="radiology",
        study_uids=[DIST_STUDY], observers_allowed=True, deidentify_for_observers=True,
    )
    values.update(overrides)
    return svc.ConsultRequest(**values)  # type: ignore[arg-type]


def draft_for(consult: svc.Consult, **overrides: object) -> svc.ConclusionDraft:
    values: dict[str, object] = dict(
        answers={q.id: f"Trả lời câu {q.position}: máu tụ ngoài màng cứng thái dương phải." for q in consult.questions},
        findings="Máu tụ ngoài màng cứng thái dương phải dày 12 mm, đè đẩy đường giữa 4 mm.",
        impression="Máu tụ ngoài màng cứng cấp tính. / Acute epidural haematoma.",
        recommendation="Chuyển ngay lên tuyến trên để phẫu thuật. / Transfer for surgery now.",
        transfer_recommended=True, transfer_to="Bệnh viện Bạch Mai — Khoa Phẫu thuật Thần kinh",
    )
    values.update(overrides)
    return svc.ConclusionDraft(**values)  # type: ignore[arg-type]
