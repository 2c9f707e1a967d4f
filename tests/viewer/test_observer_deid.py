"""Observers of another facility are served a consult's study de-identified (issue 6, 1-N sessions).

Over the real server (gunicorn): QIDO rows, WADO metadata and retrieved Part 10 instances carry the
consult's pseudonym instead of the patient (PS3.15 Basic Profile), the pixels stay as stored, and the
requesting doctor still sees the patient.
"""

from __future__ import annotations

from dataclasses import dataclass

import pydicom
from sqlalchemy import select

from archive.index import Source
from archive.models import User
from consult_data import request_for
from helpers import dicom_files
from viewer.consults import service as svc

PATIENT_ID = "00100020"
PATIENT_NAME = "00100010"
INSTITUTION = "00080080"


def _user(session, username: str) -> User:
    return session.execute(select(User).where(User.username == username)).scalar_one()


@dataclass
class Observed:
    """A district study in a consult with an observer of a third facility."""

    original: pydicom.Dataset
    doctor_token: str
    observer_token: str
    pseudonym: str


def _observed_study(web, ct_part10_dir, **request_options) -> Observed:
    path = dicom_files(ct_part10_dir)[0]
    web.archive.ingest_file(path, Source(via="stow", facility="DIST"))
    original = pydicom.dcmread(path)
    web.add_facility("HUB", tier="central")
    doctor_token = web.add_user("bs.lan", "Doctor-pass-123", role="requester", facility="DIST")
    observer_token = web.add_user("hv.an", "Observer-pass-123", role="observer", facility="THIRD")
    with web.archive.index.write_session() as session, session.begin():
        consult = svc.create_consult(session, _user(session, "bs.lan"),
                                     request_for(study_uids=[str(original.StudyInstanceUID)], **request_options))
        svc.add_participant(session, consult, _user(session, "bs.lan"), _user(session, "hv.an"), "observer")
        pseudonym = f"CONSULT-{consult.id}"
    return Observed(original, doctor_token, observer_token, pseudonym)


def test_observer_gets_deidentified_headers_and_original_pixels(web, ct_part10_dir):
    seen = _observed_study(web, ct_part10_dir, deidentify_for_observers=True)
    original, doctor_token, observer_token, pseudonym = (seen.original, seen.doctor_token, seen.observer_token,
                                                         seen.pseudonym)
    study = str(original.StudyInstanceUID)

    observer, doctor = web.token_session(observer_token), web.token_session(doctor_token)
    base = f"{web.dicomweb}/studies"

    found = observer.get(base, params={"includefield": "all"}, timeout=30)
    assert found.status_code == 200, found.text
    [row] = found.json()
    assert row[PATIENT_ID]["Value"] == [pseudonym]
    assert str(original.PatientName) not in found.text
    doctor_rows = doctor.get(base, params={"includefield": "all"}, timeout=30).json()
    assert doctor_rows[0][PATIENT_ID]["Value"] == [str(original.PatientID)]

    metadata = observer.get(f"{base}/{study}/metadata", timeout=30)
    assert metadata.status_code == 200
    [attributes] = metadata.json()
    assert attributes[PATIENT_ID]["Value"] == [pseudonym] and INSTITUTION not in attributes
    assert attributes["00120062"]["Value"] == ["YES"]  # PatientIdentityRemoved

    client = web.client(observer_token)
    [served] = client.retrieve_study(study)
    assert served.PatientID == pseudonym and served.PatientIdentityRemoved == "YES"
    assert served.SOPInstanceUID == original.SOPInstanceUID and served.PixelData == original.PixelData
    assert "InstitutionName" not in served

    [as_stored] = web.client(doctor_token).retrieve_study(study)
    assert as_stored.PatientID == original.PatientID and as_stored.PatientName == original.PatientName


def test_observer_study_list_shows_the_pseudonym(web, ct_part10_dir):
    seen = _observed_study(web, ct_part10_dir)
    original, pseudonym = seen.original, seen.pseudonym

    page = web.login("hv.an", "Observer-pass-123").get(web.url + "/", timeout=30)
    assert page.status_code == 200 and pseudonym in page.text
    assert str(original.PatientID) not in page.text
    assert str(original.PatientName).split("^")[0] not in page.text
    doctor_page = web.login("bs.lan", "Doctor-pass-123").get(web.url + "/", timeout=30)
    assert str(original.PatientID) in doctor_page.text and pseudonym not in doctor_page.text


def test_observer_cannot_find_a_deidentified_study_by_its_patient(web, ct_part10_dir):
    """Searching the real name, ID or study date must not bring a pseudonymised study back to an observer:
    the row would be shown under the pseudonym, but its presence would confirm who the patient is."""
    seen = _observed_study(web, ct_part10_dir)
    original, doctor_token, observer_token, pseudonym = (seen.original, seen.doctor_token, seen.observer_token,
                                                         seen.pseudonym)
    name = str(original.PatientName).split("^")[0]
    searches = [{"PatientName": name + "*"}, {"PatientID": str(original.PatientID)},
                {"StudyDate": str(original.StudyDate)}]
    observer, doctor = web.token_session(observer_token), web.token_session(doctor_token)
    for params in searches:
        found = observer.get(f"{web.dicomweb}/studies", params=params, timeout=30)
        assert found.status_code == 200 and found.json() == [], params
        assert len(doctor.get(f"{web.dicomweb}/studies", params=params, timeout=30).json()) == 1, params
    # Browsing without identifying keys (or by modality) still lists it, under the pseudonym.
    [row] = observer.get(f"{web.dicomweb}/studies", params={"ModalitiesInStudy": original.Modality}, timeout=30).json()
    assert row[PATIENT_ID]["Value"] == [pseudonym]
    # The study list: the same.
    browser = web.login("hv.an", "Observer-pass-123")
    by_name = browser.get(web.url + "/", params={"name": name}, timeout=30)
    assert by_name.status_code == 200 and pseudonym not in by_name.text
    assert pseudonym in browser.get(web.url + "/", timeout=30).text
    by_id = browser.get(web.url + "/", params={"patient_id": str(original.PatientID)}, timeout=30)
    assert by_id.status_code == 200 and pseudonym not in by_id.text


def test_observer_viewer_header_shows_the_pseudonym(web, ct_part10_dir):
    seen = _observed_study(web, ct_part10_dir)
    original, observer_token, pseudonym = seen.original, seen.observer_token, seen.pseudonym
    study = str(original.StudyInstanceUID)

    observer = web.token_session(observer_token)
    header = observer.get(f"{web.url}/api/viewer/studies/{study}", timeout=30)
    assert header.status_code == 200
    assert header.json()["patient"] == {"name": pseudonym, "id": pseudonym, "sex": header.json()["patient"]["sex"],
                                        "birth_date": ""}
    page = web.login("hv.an", "Observer-pass-123").get(f"{web.url}/viewer/{study}", timeout=30)
    assert page.status_code == 200 and pseudonym in page.text and 'id="deid-note"' in page.text
    assert str(original.PatientID) not in page.text
    assert 'id="deid-note"' not in web.login("bs.lan", "Doctor-pass-123").get(f"{web.url}/viewer/{study}").text
    admin_header = web.http.get(f"{web.url}/api/viewer/studies/{study}", timeout=30).json()
    assert admin_header["patient"]["id"] == str(original.PatientID)
