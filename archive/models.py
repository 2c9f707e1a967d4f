"""The catalogue's tables: patients, studies, series, instances, facilities; people and the audit log.

Dates and times are kept as DICOM strings (``YYYYMMDD``, ``HHMMSS.FFFFFF``):
they sort and range-match as text, the same on SQLite and PostgreSQL.
Person names are Unicode; ``patient_name_folded`` is the lower-case,
diacritic-free form used for fuzzy matching (``nguyen`` finds ``Nguyễn``).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text,
                        UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Facility(Base):
    """A hospital or commune station whose modalities send to us."""

    __tablename__ = "facilities"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    code: Mapped[str] = mapped_column(String(64), unique=True)  # what studies.facility and instances.facility hold
    name: Mapped[str] = mapped_column(String(256), default="")
    tier: Mapped[str] = mapped_column(String(16), default="district")  # central | provincial | district | commune

    ae_titles: Mapped[list[FacilityAETitle]] = relationship(back_populates="facility", cascade="all, delete-orphan")
    users: Mapped[list[User]] = relationship(back_populates="facility")


class FacilityAETitle(Base):
    """A DICOM AE title that belongs to a facility: what it sends is that facility's."""

    __tablename__ = "facility_ae_titles"

    ae_title: Mapped[str] = mapped_column(String(16), primary_key=True)
    facility_fk: Mapped[int] = mapped_column(ForeignKey("facilities.id", ondelete="CASCADE"), index=True)

    facility: Mapped[Facility] = relationship(back_populates="ae_titles")


class User(Base):
    """A person who logs in. ``role``: requester | specialist | coordinator | observer | admin."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str] = mapped_column(String(256), default="")
    email: Mapped[str] = mapped_column(String(256), default="")
    password_hash: Mapped[str] = mapped_column(String(256))  # argon2id (argon2-cffi's PasswordHasher)
    role: Mapped[str] = mapped_column(String(16))
    facility_fk: Mapped[int] = mapped_column(ForeignKey("facilities.id"), index=True)
    specialty: Mapped[str] = mapped_column(String(64), default="")  # e.g. radiology, cardiology (specialists)
    certificate_number: Mapped[str] = mapped_column(String(64), default="")  # practising certificate (specialists)
    certificate_scope: Mapped[str] = mapped_column(String(256), default="")
    language: Mapped[str] = mapped_column(String(8), default="")  # preferred UI language, '' = from the browser
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    password_changed_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    facility: Mapped[Facility] = relationship(back_populates="users")


class ApiToken(Base):
    """A bearer token for DICOMweb clients, acting as its user. Only its SHA-256 is kept."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_fk: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class AuditEntry(Base):
    """One line of the append-only audit log (``archive.audit``).

    ``entry_hash`` = SHA-256 over ``prev_hash`` and the canonical JSON of this row's
    other fields, so editing or deleting any row breaks the chain from there on.
    """

    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_object", "object_type", "object_id"),
        UniqueConstraint("prev_hash", name="uq_audit_log_prev_hash"),  # one successor per entry: no fork
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    user_fk: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True, index=True)
    actor: Mapped[str] = mapped_column(String(128))  # username, or e.g. "dicom:MODALITY1@10.0.0.5", "cli"
    action: Mapped[str] = mapped_column(String(64))  # an AuditAction value
    object_type: Mapped[str] = mapped_column(String(32), default="")  # study | series | instance | consult | user ...
    object_id: Mapped[str] = mapped_column(String(128), default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    entry_hash: Mapped[str] = mapped_column(String(64), unique=True)


class Patient(Base):
    __tablename__ = "patients"
    __table_args__ = (
        UniqueConstraint("patient_id", "issuer", name="uq_patients_id_issuer"),
        # PostgreSQL: prefix LIKE ('nguyen%') under a non-C collation needs pattern ops (migration 0002).
        Index("ix_patients_name_folded_pattern", "patient_name_folded",
              postgresql_ops={"patient_name_folded": "varchar_pattern_ops"}).ddl_if(dialect="postgresql"),
        Index("ix_patients_name_pattern", "patient_name",
              postgresql_ops={"patient_name": "varchar_pattern_ops"}).ddl_if(dialect="postgresql"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), index=True)
    issuer: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    patient_name_folded: Mapped[str] = mapped_column(String(324), default="", index=True)
    birth_date: Mapped[str] = mapped_column(String(8), default="")
    sex: Mapped[str] = mapped_column(String(16), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class PatientConflict(Base):
    """Demographics that disagreed with what we already had for the same PatientID."""

    __tablename__ = "patient_conflicts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_fk: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"), index=True)
    attribute: Mapped[str] = mapped_column(String(64))
    known_value: Mapped[str] = mapped_column(String(324))
    received_value: Mapped[str] = mapped_column(String(324))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    source_ae: Mapped[str | None] = mapped_column(String(16), nullable=True)
    detected_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Study(Base):
    __tablename__ = "studies"
    __table_args__ = (
        Index("ix_studies_date_time", "study_date", "study_time"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_fk: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    study_date: Mapped[str] = mapped_column(String(8), default="")
    study_time: Mapped[str] = mapped_column(String(16), default="")
    accession_number: Mapped[str] = mapped_column(String(64), default="", index=True)
    study_description: Mapped[str] = mapped_column(String(256), default="")
    referring_physician_name: Mapped[str] = mapped_column(String(324), default="")
    study_id: Mapped[str] = mapped_column(String(16), default="")
    modalities_in_study: Mapped[str] = mapped_column(String(128), default="")
    num_series: Mapped[int] = mapped_column(Integer, default=0)
    num_instances: Mapped[int] = mapped_column(Integer, default=0)
    facility: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    source_ae: Mapped[str | None] = mapped_column(String(16), nullable=True)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"
    __table_args__ = (
        # ModalitiesInStudy: does this study have a series of that modality? (archive.matching)
        Index("ix_series_study_modality", "study_fk", "modality"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="", index=True)
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    series_description: Mapped[str] = mapped_column(String(256), default="")
    body_part_examined: Mapped[str] = mapped_column(String(64), default="")
    num_instances: Mapped[int] = mapped_column(Integer, default=0)
    # What the viewer needs to lay out the series without reading its files:
    # geometry and display defaults of the first instance received.
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"
    __table_args__ = (
        # The series' display order: by position along the slice normal, then number.
        Index("ix_instances_series_order", "series_fk", "slice_position", "instance_number"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id"))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    number_of_frames: Mapped[int] = mapped_column(Integer, default=1)
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    columns: Mapped[int | None] = mapped_column(Integer, nullable=True)
    slice_position: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Per-instance display metadata (position, spacing, window...) for the viewer.
    display: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    object_key: Mapped[str] = mapped_column(String(200))
    size: Mapped[int] = mapped_column(BigInteger)
    checksum: Mapped[str] = mapped_column(String(64))  # BLAKE3 of the stored object (what `verify` checks)
    dataset_checksum: Mapped[str] = mapped_column(String(64))  # BLAKE3 of the dataset alone: the duplicate test
    source_ae: Mapped[str | None] = mapped_column(String(16), nullable=True)
    source_host: Mapped[str | None] = mapped_column(String(64), nullable=True)
    facility: Mapped[str | None] = mapped_column(String(64), nullable=True)
    received_via: Mapped[str] = mapped_column(String(16), default="dicom")
    received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")


class InstanceReplacement(Base):
    """An instance that arrived again with different bytes, and what was done."""

    __tablename__ = "instance_replacements"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    old_checksum: Mapped[str] = mapped_column(String(64))  # dataset checksums
    new_checksum: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(16))
    source_ae: Mapped[str | None] = mapped_column(String(16), nullable=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ForwardCursor(Base):
    """How far a forward rule has scanned the instances and instance_replacements tables (by primary key)."""

    __tablename__ = "forward_cursors"

    rule: Mapped[str] = mapped_column(String(200), primary_key=True)
    destination: Mapped[str] = mapped_column(String(16))
    last_instance_id: Mapped[int] = mapped_column(BigInteger, default=0)
    last_replacement_id: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ForwardItem(Base):
    """One instance to send to one destination: the persistent forward queue.

    ``origin`` says what put it there: a newly catalogued instance
    (``instance``, ``origin_id`` = instances.id) or a replacement of one
    (``replacement``, ``origin_id`` = instance_replacements.id). A worker owns
    a row while ``claimed_by`` is set and ``claimed_until`` lies ahead.
    """

    __tablename__ = "forward_queue"
    __table_args__ = (
        UniqueConstraint("destination", "origin", "origin_id", "sop_instance_uid", name="uq_forward_queue_origin"),
        Index("ix_forward_queue_due", "state", "next_attempt_at"),
        Index("ix_forward_queue_destination_state", "destination", "state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    destination: Mapped[str] = mapped_column(String(16))
    rule: Mapped[str] = mapped_column(String(200))
    origin: Mapped[str] = mapped_column(String(16))
    origin_id: Mapped[int] = mapped_column(BigInteger)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending | sent | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # every try, whatever the outcome
    rejections: Mapped[int] = mapped_column(Integer, default=0)  # tries the destination answered with a failure
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    claimed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    claimed_until: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(String(512), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)



# -- teleconsultation (viewer.consults.service owns the rules; these are the records) --------------


class Consult(Base):
    """A request from a facility to a hub for a remote opinion on a patient's images.

    ``state`` and ``urgency`` hold ``viewer.consults.service`` ``ConsultState`` / ``Urgency`` values.
    """

    __tablename__ = "consults"
    __table_args__ = (
        Index("ix_consults_hub_state", "hub_facility_fk", "state"),
        Index("ix_consults_state_due", "state", "due_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    clinical_summary: Mapped[str] = mapped_column(Text, default="")
    patient_informed: Mapped[bool] = mapped_column(Boolean, default=False)  # of the remote consultation
    urgency: Mapped[str] = mapped_column(String(16))  # routine | urgent | emergency
    specialty: Mapped[str] = mapped_column(String(64), default="")
    requester_fk: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    requester_facility_fk: Mapped[int] = mapped_column(ForeignKey("facilities.id"), index=True)
    hub_facility_fk: Mapped[int] = mapped_column(ForeignKey("facilities.id"))
    state: Mapped[str] = mapped_column(String(16))
    decline_reason: Mapped[str] = mapped_column(Text, default="")
    observers_allowed: Mapped[bool] = mapped_column(Boolean, default=False)
    deidentify_for_observers: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    due_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))

    requester: Mapped[User] = relationship(foreign_keys=[requester_fk])
    requester_facility: Mapped[Facility] = relationship(foreign_keys=[requester_facility_fk])
    hub_facility: Mapped[Facility] = relationship(foreign_keys=[hub_facility_fk])
    questions: Mapped[list[ConsultQuestion]] = relationship(
        back_populates="consult", order_by="ConsultQuestion.position", cascade="all, delete-orphan")
    participants: Mapped[list[ConsultParticipant]] = relationship(
        back_populates="consult", order_by="ConsultParticipant.id", cascade="all, delete-orphan")
    studies: Mapped[list[ConsultStudy]] = relationship(  # never deleted (a trigger refuses it)
        back_populates="consult", order_by="ConsultStudy.id", cascade="save-update, merge")


class ConsultQuestion(Base):
    """One question the requesting doctor asks; the conclusion answers each one."""

    __tablename__ = "consult_questions"
    __table_args__ = (UniqueConstraint("consult_fk", "position", name="uq_consult_questions_position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    consult_fk: Mapped[int] = mapped_column(ForeignKey("consults.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)  # 1-based order as asked
    text: Mapped[str] = mapped_column(Text)

    consult: Mapped[Consult] = relationship(back_populates="questions")


class ConsultParticipant(Base):
    """A user taking part in a consult, with their role in it (requester | specialist | coordinator | observer)."""

    __tablename__ = "consult_participants"
    __table_args__ = (UniqueConstraint("consult_fk", "user_fk", name="uq_consult_participants_user"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    consult_fk: Mapped[int] = mapped_column(ForeignKey("consults.id", ondelete="CASCADE"))
    user_fk: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    added_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    consult: Mapped[Consult] = relationship(back_populates="participants")
    user: Mapped[User] = relationship()


class ConsultStudy(Base):
    """A study attached to a consult. Kept as long as the record (10 years): `telepacs verify` reports it if missing."""

    __tablename__ = "consult_studies"
    __table_args__ = (UniqueConstraint("consult_fk", "study_uid", name="uq_consult_studies_study"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    consult_fk: Mapped[int] = mapped_column(ForeignKey("consults.id", ondelete="RESTRICT"))
    # The UID, not a key into studies: the attachment outlives a reindex and proves what went missing.
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    num_instances: Mapped[int] = mapped_column(Integer, default=0)  # what was stored when it was attached
    attached_by_fk: Mapped[int] = mapped_column(ForeignKey("users.id"))
    attached_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    consult: Mapped[Consult] = relationship(back_populates="studies")


class ConsultMessage(Base):
    """One message in a consult's thread; ``pin_state`` is the viewer's ``getState()`` JSON when an image is pinned.

    ``kind`` is ``text`` for what people write and ``event`` for the thread's own
    record of state changes (``body`` then holds the event code, e.g. ``accepted``).
    """

    __tablename__ = "consult_messages"
    __table_args__ = (Index("ix_consult_messages_consult", "consult_fk", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    consult_fk: Mapped[int] = mapped_column(ForeignKey("consults.id", ondelete="CASCADE"))
    author_fk: Mapped[int] = mapped_column(ForeignKey("users.id"))
    kind: Mapped[str] = mapped_column(String(16), default="text")
    body: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    pin_study_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    pin_series_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    pin_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    pin_frame: Mapped[int | None] = mapped_column(Integer, nullable=True)  # 1-based, as in the viewer URL
    pin_viewport: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # wc, ww, zoom, pan, ...
    pin_annotations: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)

    author: Mapped[User] = relationship()


class ConsultConclusion(Base):
    """A signed conclusion. Immutable: an amendment is version n+1 pointing at version n."""

    __tablename__ = "consult_conclusions"
    __table_args__ = (UniqueConstraint("consult_fk", "version", name="uq_consult_conclusions_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    consult_fk: Mapped[int] = mapped_column(ForeignKey("consults.id", ondelete="RESTRICT"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    amends_fk: Mapped[int | None] = mapped_column(ForeignKey("consult_conclusions.id"), nullable=True)
    amendment_reason: Mapped[str] = mapped_column(Text, default="")
    answers: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)  # [{question_id, position, answer}]
    findings: Mapped[str] = mapped_column(Text, default="")
    impression: Mapped[str] = mapped_column(Text, default="")
    recommendation: Mapped[str] = mapped_column(Text, default="")
    transfer_recommended: Mapped[bool] = mapped_column(Boolean, default=False)
    transfer_to: Mapped[str] = mapped_column(String(256), default="")
    signed_by_fk: Mapped[int] = mapped_column(ForeignKey("users.id"))
    signed_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    # Copied from the signer's profile at signing: the record must not change when the profile does.
    signer_name: Mapped[str] = mapped_column(String(256))
    signer_certificate_number: Mapped[str] = mapped_column(String(64))
    signer_certificate_scope: Mapped[str] = mapped_column(String(256))
    signer_facility: Mapped[str] = mapped_column(String(256), default="")
    content_hash: Mapped[str] = mapped_column(String(64))  # SHA-256 of the canonical JSON of what was signed


class ConsultFollowUp(Base):
    """What the requesting side decided after the conclusion (``decision``), and later what happened (``outcome``)."""

    __tablename__ = "consult_followups"
    __table_args__ = (Index("ix_consult_followups_consult", "consult_fk", "kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    consult_fk: Mapped[int] = mapped_column(ForeignKey("consults.id", ondelete="RESTRICT"))
    kind: Mapped[str] = mapped_column(String(16))  # decision | outcome
    follows_advice: Mapped[bool | None] = mapped_column(Boolean, nullable=True)  # decisions only
    text: Mapped[str] = mapped_column(Text)
    recorded_by_fk: Mapped[int] = mapped_column(ForeignKey("users.id"))
    recorded_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    recorded_by: Mapped[User] = relationship()


class ReviewEvent(Base):
    """Evidence of review: one image that stayed on a reader's screen, at which window and quality, for how long."""

    __tablename__ = "review_events"
    __table_args__ = (Index("ix_review_events_consult_user", "consult_fk", "user_fk", "started_at"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    consult_fk: Mapped[int] = mapped_column(ForeignKey("consults.id", ondelete="RESTRICT"))
    user_fk: Mapped[int] = mapped_column(ForeignKey("users.id"))
    study_uid: Mapped[str] = mapped_column(String(64))
    series_uid: Mapped[str] = mapped_column(String(64))
    instance_uid: Mapped[str] = mapped_column(String(64))
    frame: Mapped[int] = mapped_column(Integer, default=1)
    window_center: Mapped[float | None] = mapped_column(Float, nullable=True)
    window_width: Mapped[float | None] = mapped_column(Float, nullable=True)
    quality: Mapped[str] = mapped_column(String(8))  # lossy | full
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    duration_ms: Mapped[int] = mapped_column(Integer)
    recorded_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ConsultReadMarker(Base):
    """How far a user has read a consult's thread (the inbox's unread counts)."""

    __tablename__ = "consult_read_markers"

    consult_fk: Mapped[int] = mapped_column(ForeignKey("consults.id", ondelete="CASCADE"), primary_key=True)
    user_fk: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)
    last_message_id: Mapped[int] = mapped_column(Integer, default=0)
    read_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


__all__ = [
    "Base",
    "Facility",
    "FacilityAETitle",
    "User",
    "ApiToken",
    "AuditEntry",
    "Patient",
    "PatientConflict",
    "Study",
    "Series",
    "Instance",
    "InstanceReplacement",
    "ForwardCursor",
    "ForwardItem",
    "Consult",
    "ConsultQuestion",
    "ConsultParticipant",
    "ConsultStudy",
    "ConsultMessage",
    "ConsultConclusion",
    "ConsultFollowUp",
    "ReviewEvent",
    "ConsultReadMarker",
]
