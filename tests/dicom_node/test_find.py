"""C-FIND SCP with dcmtk's findscu (Patient Root and Study Root), over the test data."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pydicom
import pytest

from archive.matching import Level, MatchKey, UnsupportedKey
from archive.query import find
from archive.service import Archive
from helpers import FMRI_DIR, MR_STUDY_DIR, TS_DIR, dicom_files, node_archive, read_uids, running_node, write_instance
from tests.peers import DCMTK_BIN, StorescpServer, free_port, run_storescu

FINDSCU = "/usr/bin/findscu"  # dcmtk's (the venv's PATH has pynetdicom's own findscu)
MR_STUDY_UID = read_uids(dicom_files(MR_STUDY_DIR)[0])[0]
FMRI_STUDY_UID = read_uids(dicom_files(FMRI_DIR)[0])[0]


def test_find_on_each_engine(archive, tmp_path):
    """archive.query.find at every level on SQLite and PostgreSQL (streamed with yield_per, counts per patient)."""
    from archive.index import Source

    source = Source("import")
    for n, (patient, date) in enumerate([("VN002", "20240101"), ("VN002", "20240301"), ("XX9", "20230101")]):
        path = write_instance(tmp_path / f"i{n}.dcm", PatientID=patient, StudyDate=date,
                              PatientName="Trần^Thị B" if patient == "VN002" else "Smith^J")
        archive.ingest_file(path, source)
    patients = list(find(archive.index, "PATIENT", [MatchKey("PatientName", "TRAN*", fuzzy=True),
                                                     MatchKey("NumberOfPatientRelatedStudies", "")]))
    assert patients == [{"PatientName": "Trần^Thị B", "NumberOfPatientRelatedStudies": 2}]
    studies = list(find(archive.index, Level.STUDY, [MatchKey("StudyDate", "20240101-"), MatchKey("PatientID", ""),
                                                     MatchKey("NumberOfStudyRelatedInstances", "")]))
    assert [(s["PatientID"], s["NumberOfStudyRelatedInstances"]) for s in studies] == [("VN002", 1), ("VN002", 1)]
    images = list(find(archive.index, "IMAGE", [MatchKey("PatientID", "XX9"), MatchKey("SOPClassUID", ""),
                                                MatchKey("StudyDate", ""), MatchKey("InstanceNumber", "")]))
    assert images == [{"PatientID": "XX9", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.7", "StudyDate": "20230101",
                       "InstanceNumber": ""}]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Archive, dict[str, str]]]:
    """A node loaded with the GE MR study, the Siemens 9, the fMRI 150 and two studies of Nguyễn Văn A."""
    tmp = tmp_path_factory.mktemp("find")
    extra = tmp / "generated"
    extra.mkdir()
    first = write_instance(extra / "vn1.dcm", PatientID="VN001", StudyDate="20240115", StudyTime="101500",
                           AccessionNumber="ACC-VN-1", StudyDescription="Chụp X quang")
    write_instance(extra / "vn2.dcm", PatientID="VN001", StudyDate="20240220", AccessionNumber="ACC-VN-2")
    arc = node_archive(tmp)
    with running_node(arc):
        s = arc.settings
        for folder in (MR_STUDY_DIR, TS_DIR, FMRI_DIR, extra):
            run = run_storescu(dicom_files(folder), "127.0.0.1", s.dicom_port, s.ae_title)
            assert run.returncode == 0, run.stdout + run.stderr
        yield arc, {"vn_study": read_uids(first)[0]}
    arc.close()


def findscu(arc: Archive, out: Path, keys: list[str], *, model: str = "-S",
            extra: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess[str], list[pydicom.Dataset]]:
    """Run findscu with ``-k`` keys; the responses it extracted (``-X``), in order."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rsp*.dcm"):
        old.unlink()
    args = [FINDSCU, "-v", model, "-aet", "FINDER", "-aec", arc.settings.ae_title, "-X", "-od", str(out), *extra]
    for key in keys:
        args += ["-k", key]
    args += ["127.0.0.1", str(arc.settings.dicom_port)]
    run = subprocess.run(args, capture_output=True, text=True, timeout=60, env={**os.environ, "TCP_NODELAY": "1"})
    return run, [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def echo_works(arc: Archive) -> bool:
    run = subprocess.run([str(DCMTK_BIN / "echoscu"), "-aec", arc.settings.ae_title, "127.0.0.1",
                          str(arc.settings.dicom_port)], capture_output=True, text=True, timeout=30)
    return run.returncode == 0


STUDY_KEYS = ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientName", "PatientID", "StudyDate",
              "ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"]


def test_study_by_patient_name_prefix_folds_case_and_diacritics(loaded, tmp_path):
    arc, uids = loaded
    run, rsps = findscu(arc, tmp_path, [*STUDY_KEYS, "SpecificCharacterSet=ISO_IR 192", "PatientName=nguyen*",
                                        "StudyDescription"])
    assert run.returncode == 0, run.stderr
    assert len(rsps) == 2
    assert {str(r.PatientName) for r in rsps} == {"Nguyễn^Văn A"}
    assert all(r.SpecificCharacterSet == "ISO_IR 192" for r in rsps)
    first = next(r for r in rsps if r.StudyInstanceUID == uids["vn_study"])
    assert first.StudyDescription == "Chụp X quang"
    assert first.QueryRetrieveLevel == "STUDY"
    assert first.RetrieveAETitle == arc.settings.ae_title


def test_non_ascii_response_without_query_charset_is_utf8(loaded, tmp_path):
    arc, _ = loaded
    run, rsps = findscu(arc, tmp_path, [*STUDY_KEYS, "PatientName=NGUYEN^VAN*"])
    assert run.returncode == 0, run.stderr
    assert len(rsps) == 2
    assert all(r.SpecificCharacterSet == "ISO_IR 192" and str(r.PatientName) == "Nguyễn^Văn A" for r in rsps)


def test_latin1_query_gets_utf8_when_a_name_does_not_fit(loaded, tmp_path):
    arc, _ = loaded
    run, rsps = findscu(arc, tmp_path, [*STUDY_KEYS, "SpecificCharacterSet=ISO_IR 100", "PatientName=nguyen*"])
    assert run.returncode == 0, run.stderr
    assert len(rsps) == 2 and all(str(r.PatientName) == "Nguyễn^Văn A" for r in rsps)
    assert {r.SpecificCharacterSet for r in rsps} == {"ISO_IR 192"}
    run, rsps = findscu(arc, tmp_path, [*STUDY_KEYS, "SpecificCharacterSet=ISO_IR 100", "PatientID=DEV"])
    assert [r.SpecificCharacterSet for r in rsps] == ["ISO_IR 100"]


def test_study_by_patient_id_with_counts(loaded, tmp_path):
    arc, _ = loaded
    run, rsps = findscu(arc, tmp_path, [*STUDY_KEYS, "PatientID=DEV"])
    assert run.returncode == 0, run.stderr
    assert [r.StudyInstanceUID for r in rsps] == [FMRI_STUDY_UID]
    assert rsps[0].NumberOfStudyRelatedSeries == 1
    assert rsps[0].NumberOfStudyRelatedInstances == 150
    assert rsps[0].ModalitiesInStudy == "MR"


@pytest.mark.parametrize("dates, expected", [
    ("20200101-20201231", {"20200929"}),
    ("20180918", {"20180918"}),
    ("20200101-", {"20200929", "20240115", "20240220"}),
    ("-20190101", {"20140310", "20180918"}),
])
def test_study_by_date_range(loaded, tmp_path, dates, expected):
    arc, _ = loaded
    run, rsps = findscu(arc, tmp_path, [*STUDY_KEYS, f"StudyDate={dates}"])
    assert run.returncode == 0, run.stderr
    assert {r.StudyDate for r in rsps} == expected
    assert len(rsps) == len(expected)


def test_study_by_modalities_in_study(loaded, tmp_path):
    arc, uids = loaded
    run, rsps = findscu(arc, tmp_path, [*STUDY_KEYS, "ModalitiesInStudy=OT"])
    assert run.returncode == 0, run.stderr
    assert len(rsps) == 2 and uids["vn_study"] in {r.StudyInstanceUID for r in rsps}
    run, rsps = findscu(arc, tmp_path, [*STUDY_KEYS, "ModalitiesInStudy=MR"])
    assert len(rsps) == 3 and {r.ModalitiesInStudy for r in rsps} == {"MR"}


def test_series_level_within_a_study(loaded, tmp_path):
    arc, _ = loaded
    run, rsps = findscu(arc, tmp_path, ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={MR_STUDY_UID}",
                                        "SeriesInstanceUID", "Modality", "SeriesNumber",
                                        "NumberOfSeriesRelatedInstances"])
    assert run.returncode == 0, run.stderr
    assert sorted(int(r.NumberOfSeriesRelatedInstances) for r in rsps) == [14, 130]
    assert all(r.Modality == "MR" and r.StudyInstanceUID == MR_STUDY_UID for r in rsps)


def test_image_level(loaded, tmp_path):
    arc, _ = loaded
    files = dicom_files(MR_STUDY_DIR)
    by_series: dict[str, set[str]] = {}
    for path in files:
        _, series_uid, sop_uid = read_uids(path)
        by_series.setdefault(series_uid, set()).add(sop_uid)
    series_uid, sops = min(by_series.items(), key=lambda item: len(item[1]))
    run, rsps = findscu(arc, tmp_path, ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={MR_STUDY_UID}",
                                        f"SeriesInstanceUID={series_uid}", "SOPInstanceUID", "SOPClassUID",
                                        "InstanceNumber"])
    assert run.returncode == 0, run.stderr
    assert {r.SOPInstanceUID for r in rsps} == sops
    assert all(r.QueryRetrieveLevel == "IMAGE" and r.SOPClassUID for r in rsps)


def test_patient_root_patient_level(loaded, tmp_path):
    arc, _ = loaded
    run, rsps = findscu(arc, tmp_path, ["QueryRetrieveLevel=PATIENT", "PatientName", "PatientID=VN001",
                                        "NumberOfPatientRelatedStudies"], model="-P")
    assert run.returncode == 0, run.stderr
    assert len(rsps) == 1
    assert rsps[0].NumberOfPatientRelatedStudies == 2
    assert str(rsps[0].PatientName) == "Nguyễn^Văn A"
    run, rsps = findscu(arc, tmp_path, ["QueryRetrieveLevel=PATIENT", "PatientID", "NumberOfPatientRelatedStudies"],
                        model="-P")
    assert {r.PatientID: int(r.NumberOfPatientRelatedStudies) for r in rsps} == {
        "dicom": 1, "crlab": 1, "DEV": 1, "VN001": 2}


def test_patient_root_study_level_within_a_patient(loaded, tmp_path):
    arc, _ = loaded
    run, rsps = findscu(arc, tmp_path, ["QueryRetrieveLevel=STUDY", "PatientID=VN001", "StudyInstanceUID",
                                        "AccessionNumber"], model="-P")
    assert run.returncode == 0, run.stderr
    assert {r.AccessionNumber for r in rsps} == {"ACC-VN-1", "ACC-VN-2"}


def test_return_keys_asked_empty_come_back(loaded, tmp_path):
    arc, _ = loaded
    run, rsps = findscu(arc, tmp_path, ["QueryRetrieveLevel=STUDY", "PatientID=crlab", "StudyDescription",
                                        "InstitutionName", "PatientBirthDate", "PatientSex", "Modality"])
    assert run.returncode == 0, run.stderr
    assert len(rsps) == 1
    r = rsps[0]
    assert r.PatientBirthDate == "19800707" and r.PatientSex == "M"
    assert "InstitutionName" in r and r.InstitutionName == ""  # not matchable: returned empty
    assert "Modality" in r and r.Modality == ""  # a SERIES key in a STUDY query: returned empty
    assert "StudyDescription" in r


FAILURES = {
    "no level": (["PatientID", "StudyInstanceUID"], "-S"),
    "unknown level": (["QueryRetrieveLevel=FRAME", "StudyInstanceUID"], "-S"),
    "PATIENT in Study Root": (["QueryRetrieveLevel=PATIENT", "PatientID"], "-S"),
    "value on an unsupported key": (["QueryRetrieveLevel=STUDY", "InstitutionName=X*"], "-S"),
    "malformed date": (["QueryRetrieveLevel=STUDY", "StudyDate=2024-01-01"], "-S"),
    "key below the level with a value": (["QueryRetrieveLevel=STUDY", "Modality=MR"], "-S"),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_bad_identifier_gets_a900_and_node_keeps_serving(loaded, tmp_path, case, caplog):
    arc, _ = loaded
    keys, model = FAILURES[case]
    caplog.set_level("WARNING", logger="dicom_node.handlers")
    run, rsps = findscu(arc, tmp_path, keys, model=model, extra=("-d",))  # -d: the DIMSE status in hex
    assert rsps == []
    output = run.stdout + run.stderr
    assert "DIMSE Status                  : 0xa900" in output, output
    assert any("C-FIND from FINDER" in r.getMessage() and "refused" in r.getMessage() for r in caplog.records)
    assert echo_works(arc)


def test_cancel_from_findscu_is_answered(loaded, tmp_path):
    """findscu cancels after 2 responses; whether the SCP sees it before its last match is a race."""
    arc, _ = loaded
    total = 144 + 9 + 150 + 2
    run, rsps = findscu(arc, tmp_path, ["QueryRetrieveLevel=IMAGE", "SOPInstanceUID"], extra=("-d", "--cancel", "2"))
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    if len(rsps) < total:
        assert "DIMSE Status                  : 0xfe00" in output, output
    assert echo_works(arc)


def test_undecodable_identifier_gets_c000(loaded, caplog):
    """An identifier whose Rows (US) has 3 bytes, sent as is: 0xC000 Unable to process, and a log line."""
    from io import BytesIO

    from pynetdicom import AE
    from pynetdicom.dimse_primitives import C_FIND
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    arc, _ = loaded
    caplog.set_level("WARNING", logger="dicom_node.handlers")
    ae = AE(ae_title="BADFINDER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind, ["1.2.840.10008.1.2"])  # Implicit VR LE
    assoc = ae.associate("127.0.0.1", arc.settings.dicom_port, ae_title=arc.settings.ae_title)
    assert assoc.is_established
    try:
        req = C_FIND()
        req.MessageID = 7
        req.AffectedSOPClassUID = StudyRootQueryRetrieveInformationModelFind
        req.Priority = 2
        # (0008,0052) QueryRetrieveLevel "STUDY ", then (0028,0010) Rows with 3 bytes.
        req.Identifier = BytesIO(b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY \x28\x00\x10\x00\x03\x00\x00\x00abc")
        # Pause our reactor first, as pynetdicom's own send_c_* do: otherwise it may take
        # the response off the queue before get_msg() does.
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.0001)
        try:
            assoc.dimse.send_msg(req, assoc.accepted_contexts[0].context_id)
            _, rsp = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        assert rsp is not None and rsp.Status == 0xC000
    finally:
        assoc.release()
    assert any("BADFINDER" in r.getMessage() and "cannot be decoded" in r.getMessage() for r in caplog.records)
    assert echo_works(arc)


class CancellingEvent:
    """Just enough of a pynetdicom C-FIND event for handle_find, cancelled after ``after`` polls."""

    def __init__(self, identifier: pydicom.Dataset, after: int) -> None:
        from types import SimpleNamespace

        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

        self.identifier = identifier
        self.request = SimpleNamespace(AffectedSOPClassUID=StudyRootQueryRetrieveInformationModelFind)
        self.assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title="CANCELLER", address="127.0.0.1"))
        self.after = after
        self.polls = 0

    @property
    def is_cancelled(self) -> bool:
        self.polls += 1
        return self.polls > self.after


def test_cancel_is_checked_before_each_pending_response(loaded):
    from dicom_node.handlers import handle_find

    arc, _ = loaded
    identifier = pydicom.Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.SOPInstanceUID = ""
    responses = list(handle_find(CancellingEvent(identifier, after=3), arc))  # type: ignore[arg-type]
    assert [status for status, _ in responses] == [0xFF00, 0xFF00, 0xFF00, 0xFE00]
    assert responses[-1][1] is None
    assert all(ds.SOPInstanceUID for _, ds in responses[:3])


def test_find_streams_and_checks_keys_before_reading(loaded):
    arc, _ = loaded
    with pytest.raises(UnsupportedKey):
        find(arc.index, "STUDY", [MatchKey("Modality", "MR")])
    rows = find(arc.index, Level.SERIES, [MatchKey("StudyInstanceUID", MR_STUDY_UID),
                                          MatchKey("NumberOfSeriesRelatedInstances", ""),
                                          MatchKey("PatientID", ""), MatchKey("SOPInstanceUID", "")])
    first = next(rows)
    assert set(first) == {"StudyInstanceUID", "NumberOfSeriesRelatedInstances", "PatientID"}
    assert first["PatientID"] == "dicom"
    assert sorted([first["NumberOfSeriesRelatedInstances"], *(r["NumberOfSeriesRelatedInstances"] for r in rows)]) \
        == [14, 130]



def test_index_failure_gets_a700_and_a_log_line(tmp_path, caplog):
    """The index database goes away under a running node: C-FIND 0xA700, C-MOVE 0xA701; echo still works."""
    dest_port = free_port()
    arc = node_archive(tmp_path, move_destinations={"MOVEDEST": f"127.0.0.1:{dest_port}"})
    with running_node(arc), StorescpServer(out_dir=tmp_path / "dest", aet="MOVEDEST", port=dest_port):
        s = arc.settings
        assert run_storescu(dicom_files(TS_DIR)[:2], "127.0.0.1", s.dicom_port, s.ae_title).returncode == 0
        db_file = Path(s.db_url.removeprefix("sqlite:///"))
        arc.index.engine.dispose()
        for suffix in ("", "-wal", "-shm"):
            part = Path(f"{db_file}{suffix}")
            if part.exists():
                part.rename(tmp_path / f"moved{suffix}")
        caplog.set_level("ERROR", logger="dicom_node.handlers")
        run, rsps = findscu(arc, tmp_path / "find", STUDY_KEYS, extra=("-d",))
        output = run.stdout + run.stderr
        assert rsps == []
        assert "DIMSE Status                  : 0xa700" in output, output
        assert any("C-FIND from FINDER" in r.getMessage() and "0xA700" in r.getMessage() for r in caplog.records)
        move = subprocess.run([str(DCMTK_BIN / "movescu"), "-v", "-d", "-S", "-aet", "FINDER", "-aem", "MOVEDEST",
                               "-aec", s.ae_title, "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2.3",
                               "127.0.0.1", str(s.dicom_port)],
                              capture_output=True, text=True, timeout=60, env={**os.environ, "TCP_NODELAY": "1"})
        assert "0xa701" in (move.stdout + move.stderr).lower(), move.stdout + move.stderr
        assert echo_works(arc)
    arc.close()
