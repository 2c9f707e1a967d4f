"""A real Orthanc as a DICOM peer of the node: it C-STOREs to telepacs, C-FINDs it and C-MOVEs from it into itself.

Orthanc (Debian's ``/usr/sbin/Orthanc``) runs on loopback with its own
configuration and storage (tests/peers.py); telepacs is one of its
``DicomModalities`` and Orthanc's AE is a move destination of telepacs. Orthanc
is driven through its REST API (``/modalities/{id}/store|query|move``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest

from archive.dataset import dataset_offset
from archive.index import Source
from archive.service import Archive
from helpers import TS_DIR, dicom_files, node_archive, part10_dataset_bytes, read_uids, running_node
from tests.peers import OrthancServer, free_port

ORTHANC_AE = "ORTHANCPEER"
TS_FILES = dicom_files(TS_DIR)
TS_STUDY_UID = read_uids(TS_FILES[0])[0]
TS_SERIES_UID = read_uids(TS_FILES[0])[1]


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Archive, OrthancServer]]:
    """A telepacs node holding the 9-syntax Siemens series (imported, so stored as the files are),
    and an Orthanc that knows the node as modality ``telepacs`` and is the node's move destination."""
    tmp = tmp_path_factory.mktemp("orthanc-peer")
    orthanc_dicom_port = free_port()
    arc = node_archive(tmp, move_destinations=f"{ORTHANC_AE}=127.0.0.1:{orthanc_dicom_port}")
    for path in TS_FILES:
        arc.ingest_file(path, Source("import"))
    s = arc.settings
    orthanc = OrthancServer(work_dir=tmp / "orthanc", aet=ORTHANC_AE, dicom_port=orthanc_dicom_port,
                            modalities={"telepacs": [s.ae_title, "127.0.0.1", s.dicom_port]})
    with running_node(arc), orthanc:
        yield arc, orthanc
    arc.close()


def stored_dataset(arc: Archive, sop_instance_uid: str) -> bytes:
    with arc.open_instance(sop_instance_uid) as f:
        f.seek(dataset_offset(f))
        return f.read()


def orthanc_file(orthanc: OrthancServer, orthanc_id: str) -> bytes:
    return orthanc.request("GET", f"/instances/{orthanc_id}/file")


def test_orthanc_stores_ct_series_to_telepacs(peers, ct_part10_dir):
    arc, orthanc = peers
    files = dicom_files(ct_part10_dir)
    study_ids = {_upload(orthanc, path)["ParentStudy"] for path in files}
    assert len(study_ids) == 1
    answer = orthanc.post_json("/modalities/telepacs/store",
                               {"Resources": list(study_ids), "Synchronous": True})
    assert answer["FailedInstancesCount"] == 0, answer
    assert answer["InstancesCount"] == len(files)
    for path in files:
        uid = read_uids(path)[2]
        assert stored_dataset(arc, uid) == part10_dataset_bytes(path), uid


def _upload(orthanc: OrthancServer, path: Path) -> dict:
    return json.loads(orthanc.request("POST", "/instances", path.read_bytes()))


def _lookup(orthanc: OrthancServer, uid: str) -> list[str]:
    return [hit["ID"] for hit in json.loads(orthanc.request("POST", "/tools/lookup", uid.encode()))]


def _answers(orthanc: OrthancServer, level: str, query: dict[str, str]) -> list[dict[str, str]]:
    """Orthanc's C-FIND of telepacs, answers as {keyword: value}."""
    started = orthanc.post_json("/modalities/telepacs/query", {"Level": level, "Query": query})
    answers = orthanc.get_json(f"/queries/{started['ID']}/answers?expand&simplify")
    return [{k: str(v) for k, v in answer.items()} for answer in answers]


def test_orthanc_finds_studies_and_series_on_telepacs(peers):
    arc, orthanc = peers
    studies = _answers(orthanc, "Study", {"StudyInstanceUID": TS_STUDY_UID, "PatientID": "", "PatientName": "",
                                          "StudyDate": "", "ModalitiesInStudy": "",
                                          "NumberOfStudyRelatedInstances": ""})
    assert len(studies) == 1
    study = studies[0]
    assert study["StudyInstanceUID"] == TS_STUDY_UID
    assert study["PatientID"] == "crlab"
    assert study["StudyDate"] == "20140310"
    assert study["ModalitiesInStudy"] == "MR"
    assert study["NumberOfStudyRelatedInstances"] == str(len(TS_FILES))

    by_date = _answers(orthanc, "Study", {"StudyDate": "20140101-20141231", "StudyInstanceUID": ""})
    assert [a["StudyInstanceUID"] for a in by_date] == [TS_STUDY_UID]
    assert _answers(orthanc, "Study", {"StudyDate": "19000101-19001231", "StudyInstanceUID": ""}) == []

    series = _answers(orthanc, "Series", {"StudyInstanceUID": TS_STUDY_UID, "SeriesInstanceUID": "",
                                          "Modality": "", "NumberOfSeriesRelatedInstances": ""})
    assert [(a["SeriesInstanceUID"], a["Modality"], a["NumberOfSeriesRelatedInstances"]) for a in series] == \
        [(TS_SERIES_UID, "MR", str(len(TS_FILES)))]


def test_orthanc_moves_study_from_telepacs_into_itself(peers, tmp_path):
    arc, orthanc = peers
    answer = orthanc.post_json("/modalities/telepacs/move", {
        "Level": "Study", "Resources": [{"StudyInstanceUID": TS_STUDY_UID}], "TargetAet": ORTHANC_AE,
        "Synchronous": True,
    })
    assert answer is not None
    [study_id] = _lookup(orthanc, TS_STUDY_UID)
    held = {}
    for orthanc_id in (i["ID"] for i in orthanc.get_json(f"/studies/{study_id}/instances")):
        part10 = orthanc_file(orthanc, orthanc_id)
        path = tmp_path / f"{orthanc_id}.dcm"
        path.write_bytes(part10)
        held[read_uids(path)[2]] = part10_dataset_bytes(path)
    expected = {read_uids(p)[2]: part10_dataset_bytes(p) for p in TS_FILES}
    assert set(held) == set(expected)
    for uid, dataset in expected.items():
        assert held[uid] == dataset, uid
