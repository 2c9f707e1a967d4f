"""DICOMweb over a real gunicorn, with dicomweb-client (PyPI) as the client where it can be."""

from __future__ import annotations

import io
import json
import uuid

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from helpers import MR_STUDY_DIR, TS_DIR, dicom_files, part10_dataset_bytes, write_instance


def _client(web) -> DICOMwebClient:
    return web.client()


def _stow(web, files, study: str | None = None, extra_parts=(), http: requests.Session | None = None
          ) -> requests.Response:
    """POST raw Part 10 files (and any extra (content type, bytes) parts) as multipart/related (as the admin,
    or through ``http``)."""
    boundary = "b" + uuid.uuid4().hex
    body = io.BytesIO()
    parts = [("application/dicom", path.read_bytes()) for path in files] + list(extra_parts)
    for content_type, data in parts:
        body.write(f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    url = web.dicomweb + "/studies" + (f"/{study}" if study else "")
    return (http or web.http).post(url, data=body.getvalue(), timeout=60, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json"})


def _uids(path):
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def test_stow_then_retrieve_byte_for_byte(web, tmp_path):
    files = dicom_files(TS_DIR)  # the same image in nine transfer syntaxes
    response = _stow(web, files)
    assert response.status_code == 200, response.text
    body = response.json()
    referenced = body["00081199"]["Value"]
    assert {item["00081155"]["Value"][0] for item in referenced} == {_uids(p)[2] for p in files}
    assert "00081198" not in body
    client = _client(web)
    for path in files:
        study, series, sop = _uids(path)
        # Ask for the stored syntax explicitly: the response must be exactly what was stored.
        syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        url = f"{web.dicomweb}/studies/{study}/series/{series}/instances/{sop}"
        got = web.http.get(url, timeout=30, headers={
            "Accept": f'multipart/related; type="application/dicom"; transfer-syntax={syntax}'})
        assert got.status_code == 200, got.text
        retrieved = client.retrieve_instance(study, series, sop, media_types=(("application/dicom", "*"),))
        out = tmp_path / "r.dcm"
        retrieved.save_as(out, enforce_file_format=True)
        assert part10_dataset_bytes(out) == part10_dataset_bytes(path) or retrieved == pydicom.dcmread(path)
        assert path.read_bytes() in got.content  # the stored file, byte for byte, inside its part


def test_search_at_every_level_with_dicomweb_client(web):
    files = dicom_files(MR_STUDY_DIR)
    series_files = {}
    for path in files:
        series_files.setdefault(_uids(path)[1], []).append(path)
    chosen = [paths[i] for paths in series_files.values() for i in range(3)]  # 3 instances of each series
    assert _stow(web, chosen).status_code == 200
    study = _uids(chosen[0])[0]
    client = _client(web)

    studies = client.search_for_studies(search_filters={"PatientID": "dicom"})
    assert len(studies) == 1
    found = pydicom.Dataset.from_json(studies[0])
    assert found.StudyInstanceUID == study
    assert found.NumberOfStudyRelatedSeries == 2 and found.NumberOfStudyRelatedInstances == 6
    assert set(found.ModalitiesInStudy if isinstance(found.ModalitiesInStudy, list) else [found.ModalitiesInStudy]) \
        == {"MR"}
    assert found.RetrieveURL.endswith(f"/dicomweb/studies/{study}")

    series = client.search_for_series(study)
    assert {pydicom.Dataset.from_json(s).SeriesInstanceUID for s in series} == set(series_files)
    assert all(pydicom.Dataset.from_json(s).NumberOfSeriesRelatedInstances == 3 for s in series)
    assert len(client.search_for_series(search_filters={"Modality": "MR"})) == 2

    one_series = next(iter(series_files))
    instances = client.search_for_instances(study, one_series)
    assert len(instances) == 3
    first = pydicom.Dataset.from_json(instances[0])
    assert first.Rows == 256 and first.Columns == 256 and first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
    assert len(client.search_for_instances(study)) == 6
    assert len(client.search_for_instances(search_filters={"SeriesInstanceUID": one_series})) == 3

    # paging
    page1 = client.search_for_instances(study, limit=4)
    page2 = client.search_for_instances(study, limit=4, offset=4)
    assert len(page1) == 4 and len(page2) == 2
    uids = {pydicom.Dataset.from_json(i).SOPInstanceUID for i in page1 + page2}
    assert len(uids) == 6

    # includefield
    with_description = client.search_for_studies(fields=["StudyDescription", "00200010"])
    assert "00081030" in with_description[0] and "00200010" in with_description[0]


def test_vietnamese_names_fuzzy_and_exact(web, tmp_path):
    path = write_instance(tmp_path / "vn.dcm", PatientName="Nguyễn^Văn A", PatientID="VN-1")
    other = write_instance(tmp_path / "en.dcm", PatientName="Smith^John", PatientID="EN-1")
    assert _stow(web, [path, other]).status_code == 200
    client = _client(web)
    fuzzy = client.search_for_studies(search_filters={"PatientName": "nguyen*"}, fuzzymatching=True)
    assert [s["00100010"]["Value"][0]["Alphabetic"] for s in fuzzy] == ["Nguyễn^Văn A"]
    exact = client.search_for_studies(search_filters={"PatientName": "Nguyễn*"})
    assert len(exact) == 1
    assert client.search_for_studies(search_filters={"PatientName": "nguyen*"}) == []


def test_retrieve_series_and_metadata(web):
    files = dicom_files(MR_STUDY_DIR)[:5]
    assert _stow(web, files).status_code == 200
    study, series, _ = _uids(files[0])
    client = _client(web)
    instances = client.retrieve_series(study, series, media_types=(("application/dicom", "*"),))
    sent = {_uids(p)[2] for p in files if _uids(p)[1] == series}
    assert {str(ds.SOPInstanceUID) for ds in instances} == sent
    metadata = client.retrieve_series_metadata(study, series)
    assert {pydicom.Dataset.from_json(m).SOPInstanceUID for m in metadata} == sent
    # pixel data is referenced, never inline
    assert all(set(m["7FE00010"]) == {"vr", "BulkDataURI"} for m in metadata)
    study_metadata = client.retrieve_study_metadata(study)
    assert len(study_metadata) == len(files)


def test_stow_failures_are_listed_per_part(web, tmp_path):
    good = write_instance(tmp_path / "good.dcm")
    response = _stow(web, [good], extra_parts=[("application/dicom", b"this is not DICOM at all" * 20)])
    assert response.status_code == 202, response.text
    body = response.json()
    assert len(body["00081199"]["Value"]) == 1
    failed = body["00081198"]["Value"]
    assert len(failed) == 1 and failed[0]["00081197"]["Value"] == [0xC000]

    only_bad = _stow(web, [], extra_parts=[("application/dicom", b"garbage" * 100)])
    assert only_bad.status_code == 409
    assert web.archive.index.counts()["instances"] == 1
    assert list(web.archive.settings.incoming_dir.iterdir()) == []


def test_stow_to_a_study_refuses_instances_of_another(web, tmp_path):
    path = write_instance(tmp_path / "a.dcm")
    other_study = pydicom.uid.generate_uid()
    response = _stow(web, [path], study=other_study)
    assert response.status_code == 409
    assert web.archive.index.counts()["instances"] == 0


def test_stow_cut_short_keeps_complete_parts(web, tmp_path):
    first = write_instance(tmp_path / "1.dcm")
    second = write_instance(tmp_path / "2.dcm")
    boundary = "cut" + uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + first.read_bytes() + b"\r\n"
            + f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + second.read_bytes()[:300])
    response = web.http.post(web.dicomweb + "/studies", data=body, timeout=30, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    assert response.status_code == 202
    assert "cut short" in response.headers["Warning"]
    assert web.archive.index.counts()["instances"] == 1
    assert list(web.archive.settings.incoming_dir.iterdir()) == []


@pytest.mark.parametrize("path, status, words", [
    ("/studies?PatientNam=X", 400, "neither a DICOM keyword"),
    ("/studies?limit=-1", 400, "negative"),
    ("/studies?limit=abc", 400, "whole number"),
    ("/studies?fuzzymatching=maybe", 400, "true or false"),
    ("/studies?StudyDate=2024-01-01", 400, "StudyDate"),
    ("/studies?SOPInstanceUID=1.2.3", 400, "IMAGE-level"),
    ("/studies/1.2.abc/series", 400, "not a valid DICOM UID"),
    ("/studies/1.2.3.4", 404, "not in the archive"),
    ("/studies/1.2.3.4/series/1.2.3.5/metadata", 404, "not in the archive"),
])
def test_bad_requests_get_json_errors(web, path, status, words):
    response = web.http.get(web.dicomweb + path, timeout=10)
    assert response.status_code == status
    assert words in response.json()["error"]


def test_unsupported_accept_and_syntax(web, tmp_path):
    path = write_instance(tmp_path / "a.dcm")
    assert _stow(web, [path]).status_code == 200
    study, series, sop = _uids(path)
    url = f"{web.dicomweb}/studies/{study}/series/{series}/instances/{sop}"
    assert web.http.get(url, headers={"Accept": "image/png"}, timeout=10).status_code == 406
    jpeg = web.http.get(url, timeout=10, headers={
        "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'})
    assert jpeg.status_code == 406 and "transfer-syntax=*" in jpeg.json()["error"]
    assert web.http.post(web.dicomweb + "/studies", data=b"x", headers={"Content-Type": "text/plain"},
                         timeout=10).status_code == 415


def test_search_results_are_dicom_json(web, tmp_path):
    path = write_instance(tmp_path / "a.dcm", StudyDate="20240115", AccessionNumber="ACC1")
    assert _stow(web, [path]).status_code == 200
    response = web.http.get(web.dicomweb + "/studies?StudyDate=20240101-20240131", timeout=10)
    assert response.headers["Content-Type"].startswith("application/dicom+json")
    (study,) = json.loads(response.content)
    assert study["00080020"] == {"vr": "DA", "Value": ["20240115"]}
    assert study["00080050"] == {"vr": "SH", "Value": ["ACC1"]}
    assert study["00201208"] == {"vr": "IS", "Value": [1]}
    assert study["00080090"] == {"vr": "PN"}  # asked for by default, empty
    assert web.http.get(web.dicomweb + "/studies?StudyDate=-20231231", timeout=10).json() == []
