"""archive.ingest on SQLite and a real PostgreSQL: guarantees, duplicates, bad input, recovery."""

from __future__ import annotations

import io
import shutil
import threading
import zipfile
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from archive.config import DuplicatePolicy
from archive.db import make_engine, upgrade_schema
from archive.index import CatalogIndex, IndexUnavailable, Source
from archive.models import Instance, Patient, Series, Study
from archive.service import Archive, IngestError, IngestFailure, IngestOutcome, iter_dicom_paths
from helpers import CT_RAW_DIR, MR_STUDY_DIR, TS_DIR, dicom_files, make_settings, part10_dataset_bytes, write_instance
from storage import LocalObjectStore, StorageError
from tests.peers import PostgresServer

SRC = Source("import")


def ingest_path(archive: Archive, path: Path, source: Source = SRC):
    with open(path, "rb") as f:
        return archive.ingest_stream(f, source, name=path.name)


def objects(archive: Archive) -> list[str]:
    return sorted(archive.store.list_keys())


def instance_rows(archive: Archive) -> int:
    return archive.index.counts()["instances"]


def test_every_transfer_syntax_round_trips_byte_for_byte(archive):
    for path in dicom_files(TS_DIR):
        result = ingest_path(archive, path)
        assert result.outcome is IngestOutcome.STORED
        stored = archive.store.get_bytes(result.key)
        assert stored == path.read_bytes()  # a Part 10 file is kept exactly as it came
        with archive.open_instance(result.sop_instance_uid) as f:
            assert f.read() == stored
    assert instance_rows(archive) == 9


def test_raw_dataset_is_wrapped_with_dataset_bytes_unchanged(archive, tmp_path):
    for path in dicom_files(CT_RAW_DIR):
        result = ingest_path(archive, path)
        obj = tmp_path / "o.dcm"
        obj.write_bytes(archive.store.get_bytes(result.key))
        assert part10_dataset_bytes(obj) == path.read_bytes()
    counts = archive.index.counts()
    assert counts == {"patients": 1, "studies": 1, "series": 1, "instances": 10}


def test_study_counts_modalities_and_series_order(archive):
    files = dicom_files(MR_STUDY_DIR)
    for path in files:
        ingest_path(archive, path)
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    summary = archive.index.study_summary(study_uid)
    assert summary is not None
    assert summary["num_series"] == 2
    assert summary["num_instances"] == 144
    assert summary["modalities_in_study"] == "MR"
    t1 = MR_STUDY_DIR / "3D_Ax_T1_MP_RAGE_R22"
    series_uid = pydicom.dcmread(dicom_files(t1)[0], stop_before_pixels=True).SeriesInstanceUID
    ordered = archive.index.series_instances_ordered(series_uid)
    assert len(ordered) == 130
    positions = [o["slice_position"] for o in ordered]
    assert positions == sorted(positions)  # display order by position along the normal
    assert "PixelSpacing" in ordered[0]["display"]
    with archive.index.session() as s:
        series = s.scalar(select(Series).where(Series.series_uid == series_uid))
        assert series.summary["Rows"] == 256 and series.summary["Modality"] == "MR"


def test_vietnamese_name_is_stored_as_unicode_with_folded_form(archive, tmp_path):
    ingest_path(archive, write_instance(tmp_path / "a.dcm", PatientName="Nguyễn^Văn A"))
    with archive.index.session() as s:
        patient = s.scalar(select(Patient))
        assert patient.patient_name == "Nguyễn^Văn A"
        assert patient.patient_name_folded == "nguyen^van a"


def test_same_instance_again_is_a_duplicate(archive):
    path = TS_DIR / "1.dcm"
    first = ingest_path(archive, path)
    again = ingest_path(archive, path)
    assert again.outcome is IngestOutcome.DUPLICATE
    assert again.checksum == first.checksum
    assert instance_rows(archive) == 1
    assert len(objects(archive)) == 1


@pytest.mark.parametrize(
    "policy, outcome, kept_name",
    [
        (DuplicatePolicy.KEEP_NEWER, IngestOutcome.REPLACED, "Second"),
        (DuplicatePolicy.KEEP_EXISTING, IngestOutcome.KEPT_EXISTING, "First"),
    ],
)
def test_same_uid_different_bytes_follows_policy(tmp_path, db_url, policy, outcome, kept_name):
    arc = Archive.open(make_settings(tmp_path, db_url=db_url, duplicate_policy=policy.value))
    try:
        uids = dict(SOPInstanceUID=generate_uid(), StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid())
        ingest_path(arc, write_instance(tmp_path / "a.dcm", SeriesDescription="First", **uids))
        result = ingest_path(arc, write_instance(tmp_path / "b.dcm", SeriesDescription="Second", **uids))
        assert result.outcome is outcome
        stored = pydicom.dcmread(io.BytesIO(arc.store.get_bytes(result.key)))
        assert stored.SeriesDescription == kept_name
        assert instance_rows(arc) == 1
        assert arc.verify().ok
    finally:
        arc.close()


def test_same_uid_different_bytes_rejected_by_policy(tmp_path, db_url):
    arc = Archive.open(make_settings(tmp_path, db_url=db_url, duplicate_policy="reject"))
    try:
        uids = dict(SOPInstanceUID=generate_uid(), StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid())
        ingest_path(arc, write_instance(tmp_path / "a.dcm", SeriesDescription="First", **uids))
        with pytest.raises(IngestError) as err:
            ingest_path(arc, write_instance(tmp_path / "b.dcm", SeriesDescription="Second", **uids))
        assert err.value.failure is IngestFailure.DUPLICATE_REJECTED
    finally:
        arc.close()


def test_demographic_conflict_is_recorded_not_overwritten(archive, tmp_path):
    ingest_path(archive, write_instance(tmp_path / "a.dcm", PatientName="Nguyễn^Văn A", PatientBirthDate="19800101"))
    ingest_path(archive, write_instance(tmp_path / "b.dcm", PatientName="Nguyen^Van B", PatientBirthDate="19800102"))
    conflicts = archive.index.patient_conflicts()
    assert {(c["attribute"], c["known"], c["received"]) for c in conflicts} == {
        ("PatientName", "Nguyễn^Văn A", "Nguyen^Van B"),
        ("PatientBirthDate", "19800101", "19800102"),
    }
    with archive.index.session() as s:
        patient = s.scalar(select(Patient))
        assert patient.patient_name == "Nguyễn^Văn A"


BAD_INPUTS = {
    "no SOP Instance UID": dict(SOPInstanceUID=None),
    "no Study Instance UID": dict(StudyInstanceUID=None),
    "no Series Instance UID": dict(SeriesInstanceUID=None),
    "path traversal UID": dict(SOPInstanceUID="../../etc/passwd"),
    "65-character UID": dict(StudyInstanceUID="1." + "2" * 63),
    "UID with letters": dict(SeriesInstanceUID="1.2.840.abc"),
}


@pytest.mark.parametrize("values", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_dataset_is_refused_and_leaves_nothing(archive, tmp_path, values, caplog):
    path = write_instance(tmp_path / "bad.dcm", **values)
    with pytest.raises(IngestError) as err:
        ingest_path(archive, path)
    assert err.value.failure is IngestFailure.INVALID_DATASET
    assert objects(archive) == []
    assert instance_rows(archive) == 0
    assert list(archive.settings.incoming_dir.iterdir()) == []
    assert "refused instance" in caplog.text


def test_truncated_dataset_is_refused(archive, tmp_path):
    data = (TS_DIR / "1.dcm").read_bytes()
    with pytest.raises(IngestError) as err:
        archive.ingest_stream(io.BytesIO(data[:-5000]), SRC, name="cut.dcm")
    assert err.value.failure is IngestFailure.INVALID_DATASET
    assert objects(archive) == [] and instance_rows(archive) == 0


def test_not_dicom_is_refused(archive):
    with pytest.raises(IngestError, match="not DICOM"):
        archive.ingest_stream(io.BytesIO(b"PK\x03\x04 certainly not dicom" * 20), SRC, name="x.bin")
    assert objects(archive) == []


class FullDiskStore(LocalObjectStore):
    def put_file(self, key: str, path: Path, *, move: bool = False) -> None:
        raise StorageError(f"disk full writing {key} under {self.root}")


def test_storage_full_fails_cleanly(tmp_path, db_url, caplog):
    settings = make_settings(tmp_path, db_url=db_url)
    engine = make_engine(db_url)
    upgrade_schema(engine)
    arc = Archive(settings, FullDiskStore(tmp_path / "objects"), CatalogIndex(engine))
    with pytest.raises(IngestError) as err:
        ingest_path(arc, TS_DIR / "1.dcm")
    assert err.value.failure is IngestFailure.STORAGE_UNAVAILABLE
    assert instance_rows(arc) == 0
    assert "disk full" in caplog.text


class BrokenIndex(CatalogIndex):
    def record_instance(self, *args, **kwargs) -> None:
        raise IndexUnavailable("index write failed: database is gone")


def test_index_failure_after_store_removes_the_object(tmp_path, caplog):
    settings = make_settings(tmp_path)
    engine = make_engine(settings.db_url)
    upgrade_schema(engine)
    arc = Archive(settings, LocalObjectStore(tmp_path / "objects"), BrokenIndex(engine))
    with pytest.raises(IngestError) as err:
        ingest_path(arc, TS_DIR / "1.dcm")
    assert err.value.failure is IngestFailure.INDEX_UNAVAILABLE
    assert objects(arc) == []


def test_postgres_down_fails_cleanly_and_leaves_no_object(tmp_path):
    server = PostgresServer(fast=True)
    server.start()
    try:
        url = server.create_database("gone")
        arc = Archive.open(make_settings(tmp_path, db_url=url))
        ingest_path(arc, TS_DIR / "1.dcm")
        server.stop()
        with pytest.raises(IngestError) as err:
            ingest_path(arc, TS_DIR / "2.dcm")
        assert err.value.failure is IngestFailure.INDEX_UNAVAILABLE
        assert len(objects(arc)) == 1  # only the one stored before the outage
        arc.store.close()
    finally:
        server.stop()


def test_concurrent_ingest_keeps_counts_right(archive):
    files = dicom_files(MR_STUDY_DIR / "3D_Ax_T1_MP_RAGE_R22")[:40]
    errors: list[BaseException] = []

    def worker(chunk: list[Path]) -> None:
        try:
            for p in chunk:
                ingest_path(archive, p)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(files[i::4] + files[:5],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with archive.index.session() as s:
        study = s.scalar(select(Study))
        assert study.num_instances == 40
        assert study.num_series == 1
        assert s.scalar(select(Series)).num_instances == 40
        assert len(s.scalars(select(Instance)).all()) == 40


def test_reindex_rebuilds_the_index_from_storage_alone(archive):
    for path in dicom_files(TS_DIR) + dicom_files(CT_RAW_DIR):
        ingest_path(archive, path)
    before = archive.index.counts()
    archive.index.clear()
    assert archive.index.counts()["instances"] == 0
    counts = archive.reindex()
    assert counts == {"indexed": 19, "skipped": 0}
    assert archive.index.counts() == before
    assert archive.verify().ok


def test_verify_reports_missing_corrupt_and_orphaned(archive, tmp_path):
    results = [ingest_path(archive, p) for p in dicom_files(TS_DIR)[:3]]
    archive.store.delete(results[0].key)
    archive.store.put_bytes(results[1].key, b"tampered")
    archive.store.put_bytes("1.2/1.2.3/1.2.3.4.dcm", b"orphan")
    report = archive.verify()
    assert report.missing == [results[0].key]
    assert report.corrupt == [results[1].key]
    assert report.orphaned == ["1.2/1.2.3/1.2.3.4.dcm"]
    assert not report.ok


def test_import_walks_folders_and_zips(sqlite_archive, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(TS_DIR, folder)
    zpath = tmp_path / "ct.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in dicom_files(CT_RAW_DIR):
            zf.write(p, f"ct/{p.name}")
    names = [name for name, _ in iter_dicom_paths([folder, zpath])]
    assert len(names) == 20  # 9 + README + 10 from the zip
    outcomes = []
    for name, opener in iter_dicom_paths([folder, zpath]):
        try:
            with opener() as f:
                outcomes.append(sqlite_archive.ingest_stream(f, SRC, name=name).outcome)
        except IngestError as exc:
            assert "UPSTREAM_README.md" in exc.message
    assert outcomes.count(IngestOutcome.STORED) == 19
