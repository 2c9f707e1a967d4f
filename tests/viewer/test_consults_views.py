"""The consult pages and JSON API over HTTP, against gunicorn, with real logins (viewer.auth) and CSRF."""

from __future__ import annotations

import hashlib
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests
from sqlalchemy import update

from archive.index import Source
from archive.models import Facility, User
from helpers import dicom_files

PASSWORD = "mật khẩu đủ dài 2026"


@dataclass
class Site:
    web: object
    study_uid: str
    series_uid: str
    instance_uid: str
    ct_file: Path
    sessions: dict[str, requests.Session]


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "no csrf_token field in the form"
    return found.group(1)


@pytest.fixture
def site(web, ct_part10_dir) -> Site:
    people = {"bs.lan": ("requester", "DIST"), "ts.hung": ("specialist", "HUB"), "dieuphoi": ("coordinator", "HUB"),
              "hv.an": ("observer", "THIRD"), "bs.la": ("requester", "FOURTH")}
    for username, (role, facility) in people.items():
        web.add_user(username, PASSWORD, role=role, facility=facility)
    with web.archive.index.write_session() as s, s.begin():
        s.execute(update(User).where(User.username == "ts.hung").values(
            display_name="TS.BS. Trần Văn Hùng", specialty="radiology", certificate_number="0012345/BYT-CCHN",
            certificate_scope="Chẩn đoán hình ảnh"))
        s.execute(update(User).where(User.username == "bs.lan").values(display_name="BS. Nguyễn Thị Lan"))
        s.execute(update(Facility).where(Facility.code == "HUB").values(name="Bệnh viện Bạch Mai", tier="central"))
        s.execute(update(Facility).where(Facility.code == "DIST").values(name="TTYT huyện Mường Tè"))
    files = dicom_files(ct_part10_dir)[:3]
    for f in files:
        web.archive.ingest_file(f, Source(via="stow", facility="DIST"))
    ds = pydicom.dcmread(files[1], stop_before_pixels=True)
    sessions = {name: web.login(name, PASSWORD) for name in people}
    return Site(web, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), files[1], sessions)


def _create(site: Site, **extra: str) -> int:
    doctor = site.sessions["bs.lan"]
    form = doctor.get(site.web.url + "/consults/new", timeout=10)
    assert form.status_code == 200 and site.study_uid in form.text
    data = {"csrf_token": _csrf(form.text), "patient_name": "Lò Văn Páo", "patient_id": "MT-0001",
            "clinical_summary": "Ngã xe máy, GCS 13.", "question": ["Có máu tụ nội sọ không?", "Có cần chuyển tuyến?"],
            "urgency": "emergency", "hub": "HUB", "patient_informed": "1", "specialty": "radiology",
            "study": site.study_uid, "observers_allowed": "1", "deidentify": "1"} | extra
    answer = doctor.post(site.web.url + "/consults", data=data, allow_redirects=False, timeout=10)
    assert answer.status_code == 303, answer.text[:500]
    return int(answer.headers["Location"].rsplit("/", 1)[-1])


def _post(session: requests.Session, url: str, page_url: str, **data: str) -> requests.Response:
    page = session.get(page_url, timeout=10)
    return session.post(url, data={"csrf_token": _csrf(page.text), **data}, allow_redirects=False, timeout=30)


def test_consult_round_trip_over_http(site, tmp_path):
    url = site.web.url
    cid = _create(site)
    page_url = f"{url}/consults/{cid}"
    hung = site.sessions["ts.hung"]
    inbox = hung.get(url + "/consults", timeout=10)
    assert inbox.status_code == 200 and f'data-consult="{cid}"' in inbox.text and 'class="c-count"' in inbox.text
    assert _post(hung, f"{page_url}/accept", page_url).status_code == 303
    pin = {"study": site.study_uid, "series": site.series_uid, "instance": site.instance_uid, "frame": 1,
           "wc": 40, "ww": 80, "zoom": 1.5, "panx": 0, "pany": 0, "quality": "full",
           "annotations": [{"type": "length", "points": [[100, 256], [400, 256]]}]}
    posted = hung.post(f"{page_url}/messages", json={"text": "Máu tụ ở đây", "pin": pin}, timeout=10)
    assert posted.status_code == 201, posted.text
    message_id = posted.json()["id"]
    thumb = hung.get(f"{page_url}/pins/{message_id}.jpg", timeout=30)
    assert thumb.status_code == 200 and thumb.headers["Content-Type"] == "image/jpeg" and thumb.content[:2] == b"\xff\xd8"
    page = hung.get(page_url, timeout=10).text
    assert f"/viewer/{site.study_uid}?series={site.series_uid}" in page and "consult=" in page and "ann=" in page
    form = {"findings": "Máu tụ ngoài màng cứng.", "impression": "Máu tụ ngoài màng cứng cấp tính.",
            "recommendation": "Chuyển tuyến.", "confirm_sign": "1"}
    questions = re.findall(r'name="answer-(\d+)"', page)
    assert len(questions) == 2
    form |= {f"answer-{q}": "Có." for q in questions}
    assert _post(hung, f"{page_url}/conclusion", page_url, **form).status_code == 303
    doctor = site.sessions["bs.lan"]
    seen = doctor.get(page_url, timeout=10).text
    assert "Máu tụ ngoài màng cứng cấp tính." in seen and "0012345/BYT-CCHN" in seen
    events = {"events": [{"study": site.study_uid, "series": site.series_uid, "instance": site.instance_uid,
                          "frame": 1, "wc": 40, "ww": 80, "quality": "lossy", "start": 1763865000000,
                          "end": 1763865001500}]}
    assert hung.post(f"{page_url}/review-events", json=events, timeout=10).json() == {"recorded": 1}
    pdf = doctor.get(f"{page_url}/minutes.pdf", timeout=60)
    assert pdf.status_code == 200 and pdf.headers["Content-Type"] == "application/pdf"
    (tmp_path / "m.pdf").write_bytes(pdf.content)
    text = " ".join(subprocess.run(["pdftotext", str(tmp_path / "m.pdf"), "-"], capture_output=True, text=True,
                                   check=True).stdout.split())
    assert "Máu tụ ngoài màng cứng cấp tính." in text and "TS.BS. Trần Văn Hùng" in text
    # Decision, close.
    assert _post(doctor, f"{page_url}/close", page_url).status_code == 409  # no decision yet
    assert _post(doctor, f"{page_url}/decision", page_url, follows_advice="yes",
                 text="Chuyển viện.").status_code == 303
    assert _post(doctor, f"{page_url}/close", page_url).status_code == 303
    assert 'id="state">' in doctor.get(page_url, timeout=10).text


def test_outsiders_get_404_and_roles_are_enforced(site):
    url = site.web.url
    cid = _create(site)
    page_url = f"{url}/consults/{cid}"
    stranger = site.sessions["bs.la"]
    assert stranger.get(page_url, timeout=10).status_code == 404
    assert stranger.get(f"{page_url}/minutes.pdf", timeout=10).status_code == 404
    refused = stranger.post(f"{page_url}/messages", json={"text": "hi"}, timeout=10)
    assert refused.status_code == 404 and refused.json()["error"]
    # The requester cannot accept their own request: 403 with the reason on the page.
    doctor = site.sessions["bs.lan"]
    answer = _post(doctor, f"{page_url}/accept", page_url)
    assert answer.status_code == 403 and "only a specialist or coordinator" in answer.text
    # Bad JSON: a JSON error, not a stack trace.
    bad = site.sessions["ts.hung"].post(f"{page_url}/review-events", json={"events": "nope"}, timeout=10)
    assert bad.status_code == 400 and "events" in bad.json()["error"]
    bad_pin = site.sessions["ts.hung"].post(f"{page_url}/messages", json={"text": "x", "pin": {"series": "1"}},
                                            timeout=10)
    assert bad_pin.status_code == 400 and "pin needs" in bad_pin.json()["error"]
    anonymous = requests.get(page_url, allow_redirects=False, timeout=10)
    assert anonymous.status_code in (302, 401)
    # No CSRF token: refused.
    no_token = requests.Session()
    no_token.cookies.update(doctor.cookies)
    assert no_token.post(f"{page_url}/withdraw", data={}, allow_redirects=False, timeout=10).status_code in (400, 403)


def test_observer_sees_the_consult_deidentified_and_read_only(site):
    url = site.web.url
    cid = _create(site)
    page_url = f"{url}/consults/{cid}"
    doctor = site.sessions["bs.lan"]
    page = doctor.get(page_url, timeout=10).text
    observer_id = re.search(r'<option value="(\d+)">hv\.an', page)
    assert observer_id, "the observer is offered"
    assert _post(doctor, f"{page_url}/observers", page_url, user=observer_id.group(1),
                 role="observer").status_code == 303
    observer = site.sessions["hv.an"]
    seen = observer.get(page_url, timeout=10)
    assert seen.status_code == 200 and 'id="deid-note"' in seen.text
    assert "Lò Văn Páo" not in seen.text and "MT-0001" not in seen.text and f"CONSULT-{cid}" in seen.text
    assert observer.post(f"{page_url}/messages", json={"text": "hỏi"}, timeout=10).status_code == 403
    pdf = observer.get(f"{page_url}/minutes.pdf", timeout=60)
    assert pdf.status_code == 200 and "Páo".encode("utf-16-be") not in pdf.content


def test_resumable_upload_check(site):
    doctor = site.sessions["bs.lan"]
    data = site.ct_file.read_bytes()
    claim = {"uid": site.instance_uid, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    other = {"uid": "1.2.3.999", "size": 10, "sha256": "0" * 64}
    changed = dict(claim, sha256="f" * 64)
    answer = doctor.post(site.web.url + "/consults/uploads/check", json={"files": [claim, other, changed]},
                         timeout=30)
    assert answer.status_code == 200
    assert answer.json()["files"] == [
        {"uid": site.instance_uid, "stored": True, "same": True, "study": site.study_uid},
        {"uid": "1.2.3.999", "stored": False, "same": False, "study": ""},
        {"uid": site.instance_uid, "stored": True, "same": False, "study": site.study_uid}]
    bad = doctor.post(site.web.url + "/consults/uploads/check", json={"files": [{"uid": "x/../y", "size": 1,
                                                                                  "sha256": "0" * 64}]}, timeout=10)
    assert bad.status_code == 400 and "not a UID" in bad.json()["error"]
