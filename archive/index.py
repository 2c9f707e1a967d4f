"""The catalogue's repository API: record, look up and enumerate instances.

Every write is one transaction. Counts of series and instances are kept by
increments under the study row's lock, so concurrent ingesters (threads or
processes, SQLite or PostgreSQL) keep them right.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from sqlalchemy import Engine, Select, Table, bindparam, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from archive.dataset import ParsedInstance, fold_name
from archive.db import write_engine
from archive.rawdb import RawConnections, fetch_all
from archive.models import (
    Base,
    Facility,
    Instance,
    InstanceReplacement,
    Patient,
    PatientConflict,
    Series,
    Study,
    utcnow,
)

log = logging.getLogger(__name__)


class IndexUnavailable(RuntimeError):
    """The index database could not be reached or refused the write."""


class ConcurrentInsert(RuntimeError):
    """Another ingester inserted the same SOP Instance UID first; retry the ingest."""


class _StaleCache(RuntimeError):
    """A cached study/series row is gone (e.g. after a reindex): take the full path."""


@dataclass(frozen=True)
class _KnownSeries:
    """Rows an instance of this series hangs on, remembered after a commit (fast path)."""

    series_id: int
    study_id: int
    demographics: tuple[str, str, str]  # the patient's name, birth date, sex as indexed


class _LRU(OrderedDict[str, _KnownSeries]):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def remember(self, key: str, value: _KnownSeries) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


@dataclass(frozen=True)
class Source:
    """Where an instance came from."""

    via: str  # "dicom", "stow", "import", "orthanc", "reindex"
    ae_title: str | None = None
    host: str | None = None
    facility: str | None = None

    def describe(self) -> str:
        if self.ae_title:
            return f"{self.ae_title.strip()}@{self.host or '?'}"
        return self.via


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    checksum: str
    dataset_checksum: str


@dataclass(frozen=True)
class IndexedInstance:
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    object_key: str
    size: int
    checksum: str
    dataset_checksum: str


@dataclass(frozen=True)
class InstanceLocation:
    """Where an instance's object is, and what a retrieve needs to announce it."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    object_key: str
    transfer_syntax_uid: str
    size: int
    checksum: str  # BLAKE3 of the stored object: what caches and ETags key on


def _insert_ignore(session: Session, model: type[Base], values: dict[str, Any], conflict: list[str]) -> bool:
    """INSERT … ON CONFLICT DO NOTHING on either database; True when a row was inserted."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    table = model.__table__  # type: ignore[attr-defined]
    stmt = insert(model).values(**values).on_conflict_do_nothing(index_elements=conflict).returning(table.c.id)
    # RETURNING, not rowcount: psycopg reports -1 for ON CONFLICT DO NOTHING.
    return session.execute(stmt).first() is not None


# Core statements on the tables (not the ORM): the per-instance path runs them
# hundreds of times a second, where the ORM's bookkeeping costs more than the SQL.
_INSTANCES: Table = Instance.__table__  # type: ignore[assignment]
_SERIES: Table = Series.__table__  # type: ignore[assignment]
_STUDIES: Table = Study.__table__  # type: ignore[assignment]
_FIND_INSTANCE = (
    select(_INSTANCES.c.sop_instance_uid, _STUDIES.c.study_uid, _SERIES.c.series_uid, _INSTANCES.c.object_key,
           _INSTANCES.c.size, _INSTANCES.c.checksum, _INSTANCES.c.dataset_checksum)
    .join(_SERIES, _INSTANCES.c.series_fk == _SERIES.c.id)
    .join(_STUDIES, _SERIES.c.study_fk == _STUDIES.c.id)
    .where(_INSTANCES.c.sop_instance_uid == bindparam("sop"))
)
# instance_locations(): built once (building a statement per call was most of a cached render's time)
_LOCATIONS = (
    select(_INSTANCES.c.sop_instance_uid, _INSTANCES.c.sop_class_uid, _STUDIES.c.study_uid,
           _SERIES.c.series_uid, _INSTANCES.c.object_key, _INSTANCES.c.transfer_syntax_uid,
           _INSTANCES.c.size, _INSTANCES.c.checksum)
    .join(_SERIES, _INSTANCES.c.series_fk == _SERIES.c.id)
    .join(_STUDIES, _SERIES.c.study_fk == _STUDIES.c.id)
    .where(_STUDIES.c.study_uid == bindparam("study"))
    .order_by(_SERIES.c.series_number, _SERIES.c.id, _INSTANCES.c.slice_position,
              _INSTANCES.c.instance_number, _INSTANCES.c.id)
)
_SERIES_LOCATIONS = _LOCATIONS.where(_SERIES.c.series_uid == bindparam("series"))
_INSTANCE_LOCATION = _SERIES_LOCATIONS.where(_INSTANCES.c.sop_instance_uid == bindparam("sop"))
_STUDY_INSTANCE_LOCATION = _LOCATIONS.where(_INSTANCES.c.sop_instance_uid == bindparam("sop"))
_BUMP_STUDY = (
    update(_STUDIES).where(_STUDIES.c.id == bindparam("b_study"))
    .values(num_instances=_STUDIES.c.num_instances + 1, updated_at=bindparam("b_now"))
)
_BUMP_SERIES = (
    update(_SERIES).where(_SERIES.c.id == bindparam("b_series"))
    .values(num_instances=_SERIES.c.num_instances + 1)
)

_INSERT_INSTANCE = insert(_INSTANCES)
# The columns the fast path inserts (what _instance_values() gives, in its order).
_INSTANCE_COLUMNS = ["sop_instance_uid", "series_fk", "sop_class_uid", "instance_number", "transfer_syntax_uid",
                     "number_of_frames", "rows", "columns", "slice_position", "display", "object_key", "size",
                     "checksum", "dataset_checksum", "source_ae", "source_host", "facility", "received_via",
                     "received_at"]

_PATIENT_CHECKED = (("patient_name", "PatientName"), ("birth_date", "PatientBirthDate"), ("sex", "PatientSex"))


class _ThreadReaders:
    """One autocommit DBAPI connection per thread, outside the pool, for the per-request lookups.

    A rendered slice or a frame needs one indexed row per request. Through a pooled SQLAlchemy
    connection that costs about 0.45 ms (checkout, BEGIN, statement cache, ROLLBACK, checkin);
    the same precompiled statement on a connection the thread keeps costs 0.02–0.05 ms. Nothing is
    cached but the connection: every lookup reads the committed index, so a replaced instance is
    seen at once by every process.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: list[Any] = []
        self._compiled: dict[int, tuple[str, tuple[str, ...] | None]] = {}

    def _connection(self) -> Any:
        conn: Any = getattr(self._local, "conn", None)
        if conn is None:
            pooled = self._engine.raw_connection()  # the engine's connect events run (SQLite pragmas)
            conn = pooled.driver_connection
            pooled.detach()  # ours for the thread's life, not counted against the pool
            if self._engine.dialect.name == "postgresql":
                conn.rollback()  # end whatever the pool's checkout began, so autocommit may be set
                conn.autocommit = True  # no transaction left idle between requests
            self._local.conn = conn
            with self._lock:
                self._open.append(conn)
        return conn

    def _sql(self, stmt: Select[Any]) -> tuple[str, tuple[str, ...] | None]:
        found = self._compiled.get(id(stmt))
        if found is None:
            compiled = stmt.compile(dialect=self._engine.dialect)
            order = tuple(compiled.positiontup or ()) if compiled.positional else None
            found = self._compiled[id(stmt)] = (compiled.string, order)
        return found

    def fetch(self, stmt: Select[Any], params: dict[str, Any]) -> list[Sequence[Any]]:
        """The rows of a module-level (long-lived) statement; :class:`IndexUnavailable` on failure."""
        sql, order = self._sql(stmt)
        args: Any = [params[name] for name in order] if order is not None else params
        conn = self._connection()
        try:
            return fetch_all(conn, sql, args)
        except self._engine.dialect.loaded_dbapi.Error as exc:
            self._drop(conn)  # a broken connection is reopened by the next lookup
            raise IndexUnavailable(f"index lookup failed: {exc.__class__.__name__}: {exc}") from None

    def _drop(self, conn: Any) -> None:
        self._local.conn = None
        with self._lock:
            if conn in self._open:
                self._open.remove(conn)
        try:
            conn.close()
        except self._engine.dialect.loaded_dbapi.Error:
            pass

    def close(self) -> None:
        """Close every thread's connection (the threads open new ones if they look up again)."""
        with self._lock:
            conns, self._open = self._open, []
        self._local = threading.local()
        for conn in conns:
            try:
                conn.close()
            except self._engine.dialect.loaded_dbapi.Error:
                pass


class CatalogIndex:
    """Patients, studies, series and instances in a SQL database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._write_engine = write_engine(engine)
        self._write_sessions = sessionmaker(self._write_engine, expire_on_commit=False)
        self._known_series = _LRU(4096)
        self._readers = _ThreadReaders(engine)
        self._raw = RawConnections(engine)
        self._dbapi_error: type[Exception] = engine.dialect.loaded_dbapi.Error
        self._dbapi_integrity_error: type[Exception] = engine.dialect.loaded_dbapi.IntegrityError

    def close(self) -> None:
        """Close the lookup connections and the engine's pool."""
        self._readers.close()
        self._raw.close()
        self.engine.dispose()

    def session(self) -> Session:
        """A session for reading."""
        return self._sessions()

    def write_session(self) -> Session:
        """A session for writing (on SQLite its transactions begin IMMEDIATE)."""
        return self._write_sessions()

    def ping(self) -> None:
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"index database unreachable: {exc.__class__.__name__}: {exc}") from None

    # -- lookups ---------------------------------------------------------

    def find_instance(self, sop_instance_uid: str) -> IndexedInstance | None:
        """The indexed instance with this SOP Instance UID (committed state), or None."""
        try:
            rows = self._raw.fetch(_FIND_INSTANCE, {"sop": sop_instance_uid})
        except (SQLAlchemyError, self._dbapi_error) as exc:
            raise IndexUnavailable(f"index lookup failed: {exc.__class__.__name__}: {exc}") from None
        return IndexedInstance(*rows[0]) if rows else None

    def object_keys(self, sop_instance_uids: Sequence[str]) -> dict[str, str]:
        """SOP Instance UID -> object key of those of ``sop_instance_uids`` that are indexed (one query)."""
        if not sop_instance_uids:
            return {}
        stmt = select(_INSTANCES.c.sop_instance_uid, _INSTANCES.c.object_key).where(
            _INSTANCES.c.sop_instance_uid.in_(bindparam("sops", expanding=True)))
        try:
            with self.engine.connect() as conn:
                return {uid: key for uid, key in conn.execute(stmt, {"sops": list(sop_instance_uids)})}
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"index lookup failed: {exc.__class__.__name__}: {exc}") from None

    def instance_locations(self, study_uid: str, series_uid: str | None = None,
                           sop_instance_uid: str | None = None) -> list[InstanceLocation]:
        """The instances of a study (or of one series, or one instance), in series and display order."""
        params = {"study": study_uid, "series": series_uid, "sop": sop_instance_uid}
        if sop_instance_uid is not None:
            # One row, asked for on every rendered slice or frame: the thread's own connection.
            stmt = _INSTANCE_LOCATION if series_uid is not None else _STUDY_INSTANCE_LOCATION
            return [InstanceLocation(*row) for row in self._readers.fetch(stmt, params)]
        stmt = _SERIES_LOCATIONS if series_uid is not None else _LOCATIONS
        try:
            with self.engine.connect() as conn:
                return [InstanceLocation(*row) for row in conn.execute(stmt, params)]
        except SQLAlchemyError as exc:
            raise IndexUnavailable(f"index lookup failed: {exc.__class__.__name__}: {exc}") from None

    def iter_instances(self, batch: int = 2000) -> Iterator[IndexedInstance]:
        """Every indexed instance, in id order, fetched in batches (constant memory)."""
        last_id = 0
        while True:
            stmt = (
                select(Instance.id, Instance.sop_instance_uid, Study.study_uid, Series.series_uid,
                       Instance.object_key, Instance.size, Instance.checksum, Instance.dataset_checksum)
                .join(Series, Instance.series_fk == Series.id)
                .join(Study, Series.study_fk == Study.id)
                .where(Instance.id > last_id)
                .order_by(Instance.id)
                .limit(batch)
            )
            with self.session() as s:
                rows = s.execute(stmt).all()
            if not rows:
                return
            for row in rows:
                yield IndexedInstance(*row[1:])
            last_id = rows[-1][0]

    def counts(self) -> dict[str, int]:
        with self.session() as s:
            return {
                "patients": s.scalar(select(func.count()).select_from(Patient)) or 0,
                "studies": s.scalar(select(func.count()).select_from(Study)) or 0,
                "series": s.scalar(select(func.count()).select_from(Series)) or 0,
                "instances": s.scalar(select(func.count()).select_from(Instance)) or 0,
            }

    def study_summary(self, study_uid: str) -> dict[str, Any] | None:
        with self.session() as s:
            study = s.scalar(select(Study).where(Study.study_uid == study_uid))
            if study is None:
                return None
            return {
                "study_uid": study.study_uid,
                "patient_id": study.patient.patient_id,
                "patient_name": study.patient.patient_name,
                "modalities_in_study": study.modalities_in_study,
                "num_series": study.num_series,
                "num_instances": study.num_instances,
                "facility": study.facility,
            }

    def series_instances_ordered(self, series_uid: str) -> list[dict[str, Any]]:
        """The series' instances in display order (slice position, then instance number), from the index alone."""
        stmt = (
            select(Instance.sop_instance_uid, Instance.instance_number, Instance.slice_position,
                   Instance.number_of_frames, Instance.display)
            .join(Series, Instance.series_fk == Series.id)
            .where(Series.series_uid == series_uid)
            .order_by(Instance.slice_position.is_(None), Instance.slice_position, Instance.instance_number,
                      Instance.sop_instance_uid)
        )
        with self.session() as s:
            return [
                {"sop_instance_uid": r[0], "instance_number": r[1], "slice_position": r[2],
                 "number_of_frames": r[3], "display": r[4]}
                for r in s.execute(stmt)
            ]

    # -- writes ----------------------------------------------------------

    def sync_facilities(self, facilities: dict[str, str]) -> None:
        """Make sure every facility code named in the configuration has a row."""
        with self.write_session() as s, s.begin():
            for code in sorted(set(facilities.values())):
                _insert_ignore(s, Facility, {"code": code, "name": code}, ["code"])

    def record_instance(
        self,
        parsed: ParsedInstance,
        stored: StoredObject,
        source: Source,
        *,
        replaces: IndexedInstance | None = None,
    ) -> None:
        """Catalogue an instance whose object is already durable, in one transaction.

        Most instances belong to a series seen a moment ago: for those, one
        INSERT and two counter UPDATEs suffice (the fast path). Anything else
        (a new series, a replacement, changed demographics) takes the full path.
        """
        try:
            known = self._known_series.get(parsed.series_uid) if replaces is None else None
            if known is not None:
                try:
                    self._record_known(known, parsed, stored, source)
                    return
                except _StaleCache:
                    self._known_series.clear()
            with self.write_session() as s, s.begin():
                known = self._record(s, parsed, stored, source, replaces)
            self._known_series.remember(parsed.series_uid, known)
        except IntegrityError as exc:
            self._raise_integrity(parsed, exc.orig)
        except self._dbapi_integrity_error as exc:  # the fast path runs on DBAPI connections
            self._raise_integrity(parsed, exc)
        except DBAPIError as exc:
            raise IndexUnavailable(f"index write failed: {exc.__class__.__name__}: {exc.orig}") from None
        except (SQLAlchemyError, self._dbapi_error) as exc:
            raise IndexUnavailable(f"index write failed: {exc.__class__.__name__}: {exc}") from None

    @staticmethod
    def _raise_integrity(parsed: ParsedInstance, orig: BaseException | None) -> None:
        if "sop_instance_uid" in str(orig) or "instances" in str(orig):
            raise ConcurrentInsert(parsed.sop_instance_uid) from None
        raise IndexUnavailable(f"index refused instance {parsed.sop_instance_uid}: {orig}") from None

    def _record_known(self, known: _KnownSeries, p: ParsedInstance, stored: StoredObject, source: Source) -> None:
        """The fast path: two counter UPDATEs and one INSERT in one transaction, on a DBAPI connection."""
        received = (p.patient_name, p.patient_birth_date, p.patient_sex)
        if any(new and new != old for new, old in zip(received, known.demographics)):
            raise _StaleCache("demographics differ: the full path records the conflict")
        now = utcnow()
        raw = self._raw
        bump_study, bump_series = raw.statement(_BUMP_STUDY), raw.statement(_BUMP_SERIES)
        insert_instance = raw.statement(_INSERT_INSTANCE, _INSTANCE_COLUMNS)
        with raw.transaction() as cur:
            # Lock order as on the full path (study, then series), so PostgreSQL never deadlocks.
            cur.execute(bump_study.sql, bump_study.parameters({"b_study": known.study_id, "b_now": now}))
            if cur.rowcount != 1:
                raise _StaleCache(p.study_uid)
            cur.execute(bump_series.sql, bump_series.parameters({"b_series": known.series_id}))
            if cur.rowcount != 1:
                raise _StaleCache(p.series_uid)
            cur.execute(insert_instance.sql,
                        insert_instance.parameters(_instance_values(p, stored, source, known.series_id, now)))

    def _record(
        self, s: Session, p: ParsedInstance, stored: StoredObject, source: Source, replaces: IndexedInstance | None
    ) -> _KnownSeries:
        now = utcnow()
        patient = self._patient(s, p, source, now)
        _insert_ignore(
            s,
            Study,
            {
                "study_uid": p.study_uid, "patient_fk": patient.id, "study_date": p.study_date,
                "study_time": p.study_time, "accession_number": p.accession_number,
                "study_description": p.study_description, "referring_physician_name": p.referring_physician_name,
                "study_id": p.study_id, "modalities_in_study": "", "num_series": 0, "num_instances": 0,
                "facility": source.facility, "source_ae": source.ae_title, "received_at": now, "updated_at": now,
            },
            ["study_uid"],
        )
        # The study row lock serialises ingesters of the same study (counts stay exact).
        study = s.scalars(select(Study).where(Study.study_uid == p.study_uid).with_for_update()).one()
        if study.patient_fk != patient.id:
            log.warning("study %s already belongs to patient %s; instance %s names patient %s (kept on the study's)",
                        p.study_uid, study.patient_fk, p.sop_instance_uid, patient.patient_id)

        series_inserted = _insert_ignore(
            s,
            Series,
            {
                "series_uid": p.series_uid, "study_fk": study.id, "modality": p.modality,
                "series_number": p.series_number, "series_description": p.series_description,
                "body_part_examined": p.body_part_examined, "num_instances": 0,
                "summary": _series_summary(p), "received_at": now,
            },
            ["series_uid"],
        )
        series = s.scalars(select(Series).where(Series.series_uid == p.series_uid)).one()
        if series_inserted:
            study.num_series += 1
            modalities = set(filter(None, study.modalities_in_study.split("\\")))
            if p.modality:
                modalities.add(p.modality)
            study.modalities_in_study = "\\".join(sorted(modalities))

        values = _instance_values(p, stored, source, series.id, now)
        if replaces is None:
            s.add(Instance(**values))
            s.flush()
            series.num_instances += 1
            study.num_instances += 1
        else:
            old = s.scalars(select(Instance).where(Instance.sop_instance_uid == p.sop_instance_uid)
                            .with_for_update()).one()
            if old.series_fk != series.id:
                s.execute(update(Series).where(Series.id == old.series_fk)
                          .values(num_instances=Series.num_instances - 1))
                old_study_fk = s.scalar(select(Series.study_fk).where(Series.id == old.series_fk))
                s.execute(update(Study).where(Study.id == old_study_fk)
                          .values(num_instances=Study.num_instances - 1))
                series.num_instances += 1
                study.num_instances += 1
            for name, value in values.items():
                setattr(old, name, value)
            s.add(InstanceReplacement(sop_instance_uid=p.sop_instance_uid, old_checksum=replaces.dataset_checksum,
                                      new_checksum=stored.dataset_checksum, action="replaced", source_ae=source.ae_title))
        study.updated_at = now
        s.flush()
        return _KnownSeries(series.id, study.id, (patient.patient_name, patient.birth_date, patient.sex))

    def _patient(self, s: Session, p: ParsedInstance, source: Source, now: dt.datetime) -> Patient:
        received = {"patient_name": p.patient_name, "birth_date": p.patient_birth_date, "sex": p.patient_sex}
        _insert_ignore(
            s,
            Patient,
            {"patient_id": p.patient_id, "issuer": p.issuer_of_patient_id, **received,
             "patient_name_folded": fold_name(p.patient_name), "created_at": now, "updated_at": now},
            ["patient_id", "issuer"],
        )
        patient = s.scalars(
            select(Patient).where(Patient.patient_id == p.patient_id, Patient.issuer == p.issuer_of_patient_id)
            .with_for_update()
        ).one()
        for attr, keyword in _PATIENT_CHECKED:
            known, new = getattr(patient, attr), received[attr]
            if not new or known == new:
                continue
            if not known:
                setattr(patient, attr, new)
                if attr == "patient_name":
                    patient.patient_name_folded = fold_name(new)
                patient.updated_at = now
                continue
            # Same PatientID, different demographics: keep what we had, record the disagreement.
            s.add(PatientConflict(patient_fk=patient.id, attribute=keyword, known_value=known, received_value=new,
                                  sop_instance_uid=p.sop_instance_uid, source_ae=source.ae_title))
            log.warning("patient %r: %s %r from %s differs from known %r (instance %s); recorded, not overwritten",
                        p.patient_id, keyword, new, source.describe(), known, p.sop_instance_uid)
        return patient

    def record_kept_existing(self, sop_instance_uid: str, old_sha: str, new_sha: str, source: Source) -> None:
        with self.write_session() as s, s.begin():
            s.add(InstanceReplacement(sop_instance_uid=sop_instance_uid, old_checksum=old_sha, new_checksum=new_sha,
                                      action="kept-existing", source_ae=source.ae_title))

    def patient_conflicts(self) -> list[dict[str, Any]]:
        with self.session() as s:
            rows = s.execute(select(Patient.patient_id, PatientConflict.attribute, PatientConflict.known_value,
                                    PatientConflict.received_value, PatientConflict.sop_instance_uid)
                             .join(Patient, PatientConflict.patient_fk == Patient.id)
                             .order_by(PatientConflict.id)).all()
        return [dict(zip(("patient_id", "attribute", "known", "received", "sop_instance_uid"), r)) for r in rows]

    def clear(self) -> None:
        """Delete every catalogue row (before a reindex from storage)."""
        with self.write_session() as s, s.begin():
            for model in (InstanceReplacement, Instance, Series, Study, PatientConflict, Patient):
                s.execute(delete(model))
        self._known_series.clear()


def _instance_values(p: ParsedInstance, stored: StoredObject, source: Source, series_id: int,
                     now: dt.datetime) -> dict[str, Any]:
    return {
        "sop_instance_uid": p.sop_instance_uid, "series_fk": series_id, "sop_class_uid": p.sop_class_uid,
        "instance_number": p.instance_number, "transfer_syntax_uid": p.transfer_syntax_uid,
        "number_of_frames": p.number_of_frames, "rows": p.rows, "columns": p.columns,
        "slice_position": p.slice_position, "display": p.display, "object_key": stored.key,
        "size": stored.size, "checksum": stored.checksum, "dataset_checksum": stored.dataset_checksum,
        "source_ae": source.ae_title, "source_host": source.host, "facility": source.facility,
        "received_via": source.via, "received_at": now,
    }


def _series_summary(p: ParsedInstance) -> dict[str, Any]:
    """Geometry and display defaults shared by a series, taken from its first instance."""
    keep = ("ImageOrientationPatient", "PixelSpacing", "ImagerPixelSpacing", "SliceThickness", "WindowCenter",
            "WindowWidth", "RescaleSlope", "RescaleIntercept", "PhotometricInterpretation", "BitsStored",
            "PixelRepresentation", "SamplesPerPixel")
    summary: dict[str, Any] = {k: v for k, v in p.display.items() if k in keep}
    summary.update({"Modality": p.modality, "Rows": p.rows, "Columns": p.columns, "SOPClassUID": p.sop_class_uid})
    return summary
