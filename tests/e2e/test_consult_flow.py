"""Teleconsultation end to end in Debian chromium (Playwright) against gunicorn (issue 6).

A district doctor logs in, uploads a CT study from the browser (the link drops once: the upload resumes
and sends only what is missing), and requests an emergency consult; the hub's specialist sees it first in
the inbox, accepts, pins a slice with a length measurement from the viewer, concludes and signs; the
district doctor opens the pinned message and the viewer shows the same slice, window and measurement;
an observer of a third facility sees the consult de-identified; the audit chain verifies, then fails
after a row is altered; the exported PDF opens (pdftoppm) and shows the conclusion.
Screenshots: test-output/e2e/consult_flow/.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, urlparse

import pydicom
import pytest
from sqlalchemy import text

from archive import audit, people
from archive.models import Facility, User
from archive.service import Archive
from helpers import REPO, dicom_files, make_settings
from tests.peers import free_port
from tests.viewer.conftest import GUNICORN_CONFIG, _wait_healthy, stop_server

SHOTS = REPO / "test-output" / "e2e" / "consult_flow"
PASSWORD = "mật khẩu đủ dài 2026"
USERS = {  # username: (role, facility, display name, specialty, certificate number, scope)
    "bs.lan": ("requester", "DIST", "BS. Nguyễn Thị Lan", "", "", ""),
    "ts.hung": ("specialist", "HUB", "TS.BS. Trần Văn Hùng", "radiology", "0012345/BYT-CCHN", "Chẩn đoán hình ảnh"),
    "hv.an": ("observer", "THIRD", "HV. Lê Văn An", "", "", ""),
    "bs.la": ("requester", "FOURTH", "BS. Lý A Pủa", "", "", ""),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Archive]]:
    base = tmp_path_factory.mktemp("consult-e2e")
    archive = Archive.open(make_settings(base))
    with archive.index.write_session() as s, s.begin():
        for code, name, tier in (("HUB", "Bệnh viện Bạch Mai", "central"), ("DIST", "TTYT huyện Mường Tè", "district"),
                                 ("THIRD", "BVĐK tỉnh Lai Châu", "provincial"), ("FOURTH", "Trạm y tế xã Pa Ủ", "commune")):
            people.create_facility(s, code=code, name=name, tier=tier, actor="test")
        for username, (role, facility, display, specialty, cert, scope) in USERS.items():
            people.create_user(s, username=username, password=PASSWORD, role=role, facility_code=facility,
                               display_name=display, specialty=specialty, certificate_number=cert,
                               certificate_scope=scope, actor="test")
    port = free_port()
    env = dict(os.environ, TELEPACS_DATA_DIR=str(archive.settings.data_dir), TELEPACS_HTTP_PORT=str(port),
               TELEPACS_PUBLIC_URL=f"http://127.0.0.1:{port}")
    for name in ("TELEPACS_CONFIG", "TELEPACS_DB_URL", "TELEPACS_STORAGE_URL"):
        env.pop(name, None)
    log = base / "gunicorn.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1",
                                 "--worker-class", "gthread", "--threads", "4", *GUNICORN_CONFIG,
                                 "viewer:create_app()"],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        yield url, archive
    finally:
        stop_server(proc)
        archive.close()


def _login(chromium: Any, url: str, username: str, errors: list[str]) -> Any:
    context = chromium.new_context(viewport={"width": 1280, "height": 900}, locale="vi-VN")
    page = context.new_page()
    page.on("pageerror", lambda exc: errors.append(f"{username}: page error {exc}"))
    # Failed requests are reported by URL below (the console line does not name it).
    page.on("console", lambda msg: errors.append(f"{username}: console {msg.text}")
            if msg.type == "error" and "Failed to load resource" not in msg.text else None)
    page.on("response", lambda r: errors.append(f"{username}: HTTP {r.status} {r.url}")
            if r.status >= 400 and not r.url.endswith("/favicon.ico") else None)
    page.on("request", lambda req: errors.append(f"{username}: left the origin {req.url}")
            if not req.url.startswith((url, "data:", "blob:")) else None)
    page.goto(url + "/login?next=/consults")
    page.fill("#username", username)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_load_state()
    assert "/login" not in page.url, f"{username} could not log in"
    page.goto(url + "/lang/vi?next=/consults")  # the screenshots in Vietnamese, as the users read them
    return page


def _shot(page: Any, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def test_consult_flow(server, browser, ct_part10_dir, tmp_path):
    url, archive = server
    errors: list[str] = []
    files = dicom_files(ct_part10_dir)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)

    # -- the district doctor uploads the study; the link drops once -------------------------------
    doctor = _login(browser, url, "bs.lan", errors)
    doctor.goto(url + "/consults/new")
    stow_bodies: list[int] = []
    dropped: list[str] = []

    def flaky_link(route: Any) -> None:
        stow_bodies.append(len(route.request.post_data_buffer or b""))
        if len(stow_bodies) == 2 and not dropped:
            dropped.append(route.request.url)
            route.abort("connectionreset")
        else:
            route.continue_()

    doctor.route("**/dicomweb/studies", flaky_link)
    doctor.set_input_files("#upload-files", [str(f) for f in files])
    doctor.wait_for_function("document.body.dataset.uploadDone === '1'", timeout=60_000)
    doctor.unroute("**/dicomweb/studies")
    assert dropped, "the second STOW-RS request was cut"
    total = sum(f.stat().st_size for f in files)
    # Resumed: what reached the archive before the drop was not sent again.
    assert sum(stow_bodies) < total + stow_bodies[1] + 64 * 1024, stow_bodies
    assert len(stow_bodies) >= 3
    assert doctor.locator(f'input[name=study][value="{study_uid}"]').is_checked()
    doctor.fill("input[name=patient_name]", "Lò Văn Páo")
    doctor.fill("input[name=patient_id]", "MT-0001")
    doctor.fill("textarea[name=clinical_summary]", "Nam 45 tuổi, ngã xe máy, đau đầu, GCS 13.")
    doctor.fill("#questions textarea", "Có máu tụ nội sọ không?")
    doctor.select_option("select[name=urgency]", "emergency")
    doctor.select_option("select[name=hub]", "HUB")
    doctor.check("input[name=patient_informed]")
    doctor.check("input[name=observers_allowed]")
    _shot(doctor, "01-doctor-new-consult")
    doctor.click("#submit-consult")
    doctor.wait_for_url(re.compile(r"/consults/\d+$"))
    consult_id = int(doctor.url.rsplit("/", 1)[-1])
    _shot(doctor, "02-doctor-consult-requested")

    # An older routine consult, so "first in the inbox" means something.
    with archive.index.write_session() as s, s.begin():
        from viewer.consults import service as svc

        lan = s.query(User).filter_by(username="bs.lan").one()
        svc.create_consult(s, lan, svc.ConsultRequest(
            patient_id="MT-0002", patient_name="Giàng Thị Mai", clinical_summary="Ho kéo dài.",
            questions=["Lao phổi?"], urgency="routine", hub_facility_code="HUB", patient_informed=True,
            specialty="radiology", study_uids=[study_uid]))

    # -- the specialist: inbox, accept, pin a slice with a measurement -----------------------------
    hung = _login(browser, url, "ts.hung", errors)
    hung.goto(url + "/consults")
    first = hung.locator("#inbox tbody tr").first
    assert first.get_attribute("data-consult") == str(consult_id)
    assert "c-emergency" in first.get_attribute("class")
    assert first.locator(".c-count").inner_text().strip() != ""
    hung.wait_for_function("document.querySelector('.c-timer').textContent.includes(':')")
    _shot(hung, "03-specialist-inbox")
    hung.goto(f"{url}/consults/{consult_id}")
    hung.click("#accept")
    hung.wait_for_load_state()
    assert "accept" not in [b.get_attribute("id") for b in hung.locator("#actions button").all()]

    length = {"type": "length", "points": [[120, 250], [380, 250]]}
    hung.goto(f"{url}/viewer/{study_uid}?consult={consult_id}")
    hung.wait_for_function("window.telepacsViewer && document.body.dataset.firstImageMs")
    hung.evaluate("""(ann) => { telepacsViewer.scrollTo(4);
        telepacsViewer.setState({wc: 40, ww: 120, annotations: [ann]}); }""", length)
    hung.wait_for_function("telepacsViewer.getState().ww == 120 && telepacsViewer.getState().annotations.length")
    pinned_state = hung.evaluate("telepacsViewer.getState()")
    hung.fill("#cp-text", "Máu tụ ngoài màng cứng, đo bề dày.")
    hung.click("#cp-pin")
    hung.wait_for_function("document.getElementById('consult-panel').dataset.lastMessage")
    _shot(hung, "04-specialist-viewer-pinned")

    # -- conclusion, signed -----------------------------------------------------------------------
    hung.goto(f"{url}/consults/{consult_id}")
    # leaving the viewer sent what was on screen: the review evidence
    deadline = time.monotonic() + 15
    while not hung.locator("section[aria-labelledby=reviews-h] tbody tr").count():
        assert time.monotonic() < deadline, "no review evidence recorded from the viewer"
        hung.wait_for_timeout(250)
        hung.reload()
    rows = hung.locator("section[aria-labelledby=reviews-h] tbody tr").all_inner_texts()
    assert all("TS.BS. Trần Văn Hùng" in r for r in rows)
    assert any(pinned_state["instance"][-16:] in r and "40/120" in r for r in rows), rows  # the pinned view

    for area in hung.locator("#conclusion-form textarea[name^=answer-]").all():
        area.fill("Có: máu tụ ngoài màng cứng thái dương phải.")
    hung.fill("textarea[name=findings]", "Máu tụ ngoài màng cứng thái dương phải dày 12 mm.")
    hung.fill("textarea[name=impression]", "Máu tụ ngoài màng cứng cấp tính.")
    hung.fill("textarea[name=recommendation]", "Chuyển ngay lên tuyến trên để phẫu thuật.")
    hung.check("input[name=transfer_recommended]")
    hung.fill("input[name=transfer_to]", "Bệnh viện Bạch Mai")
    hung.check("input[name=confirm_sign]")
    hung.click("#sign")
    hung.wait_for_load_state()
    assert hung.locator("#conclusions .impression").first.inner_text() == "Máu tụ ngoài màng cứng cấp tính."
    assert "0012345/BYT-CCHN" in hung.locator("#conclusions").inner_text()
    _shot(hung, "05-specialist-signed")

    # -- the district doctor opens the pinned image ------------------------------------------------
    doctor.goto(f"{url}/consults/{consult_id}")
    pin = doctor.locator("a.c-pin").first
    doctor.wait_for_function("[...document.querySelectorAll('a.c-pin img')].every(i => i.complete && i.naturalWidth > 0)")
    _shot(doctor, "06-doctor-thread-with-pin")
    href = pin.get_attribute("href")
    query = parse_qs(urlparse(href).query)
    assert urlparse(href).path == f"/viewer/{study_uid}"
    assert query["instance"] == [pinned_state["instance"]] and query["series"] == [pinned_state["series"]]
    assert float(query["ww"][0]) == 120 and float(query["wc"][0]) == 40 and query["consult"] == [str(consult_id)]
    ann = json.loads(base64.urlsafe_b64decode(query["ann"][0] + "=" * (-len(query["ann"][0]) % 4)))
    assert ann == [length]
    pin.click()
    doctor.wait_for_function("window.telepacsViewer && document.body.dataset.firstImageMs")
    doctor.wait_for_function("telepacsViewer.getState().annotations.length == 1")
    shown = doctor.evaluate("telepacsViewer.getState()")
    assert (shown["instance"], shown["frame"]) == (pinned_state["instance"], pinned_state["frame"])
    assert (float(shown["wc"]), float(shown["ww"])) == (40.0, 120.0)
    assert [{"type": a["type"], "points": a["points"]} for a in shown["annotations"]] == [length]
    _shot(doctor, "07-doctor-viewer-same-state")

    # -- an observer of a third facility sees it de-identified -----------------------------------
    doctor.goto(f"{url}/consults/{consult_id}")
    doctor.select_option("#observer-user", doctor.locator("#observer-user option", has_text="HV. Lê Văn An")
                         .get_attribute("value"))
    doctor.click("#add-observer")
    doctor.wait_for_load_state()
    observer = _login(browser, url, "hv.an", errors)
    observer.goto(f"{url}/consults/{consult_id}")
    body = observer.locator("main").inner_text()
    assert "Lò Văn Páo" not in body and "MT-0001" not in body and f"CONSULT-{consult_id}" in body
    assert observer.locator("#deid-note").is_visible() and observer.locator("#message-form").count() == 0
    _shot(observer, "08-observer-deidentified")

    # -- a user of a fourth facility sees nothing of it; the observer reaches its images -------------
    series = pinned_state["series"]
    instance = pinned_state["instance"]
    base = f"{url}/dicomweb/studies/{study_uid}"
    urls = [f"{base}", f"{base}/metadata", f"{base}/series/{series}", f"{base}/series/{series}/metadata",
            f"{base}/series/{series}/instances/{instance}", f"{base}/series/{series}/instances/{instance}/metadata",
            f"{base}/series/{series}/instances/{instance}/frames/1",
            f"{base}/series/{series}/instances/{instance}/rendered",
            f"{base}/series/{series}/instances/{instance}/thumbnail", f"{base}/thumbnail", f"{base}/rendered"]
    stranger = _login(browser, url, "bs.la", errors)
    for target in urls:
        assert stranger.request.get(target).status == 404, target
    assert stranger.request.get(f"{url}/consults/{consult_id}").status == 404
    found = stranger.request.get(f"{url}/dicomweb/studies?StudyInstanceUID={study_uid}")
    assert found.status in (200, 204) and study_uid not in found.text()
    assert observer.request.get(f"{base}/series/{series}/instances/{instance}/rendered").status == 200
    errors[:] = [e for e in errors if not e.startswith("bs.la: HTTP 404")]  # asked for on purpose

    # -- the minutes as PDF -----------------------------------------------------------------------
    pdf = doctor.request.get(f"{url}/consults/{consult_id}/minutes.pdf")
    assert pdf.status == 200 and pdf.headers["content-type"] == "application/pdf"
    pdf_path = tmp_path / "minutes.pdf"
    pdf_path.write_bytes(pdf.body())
    subprocess.run(["pdftoppm", "-r", "70", "-png", str(pdf_path), str(SHOTS / "09-minutes")], check=True)
    pages = sorted(SHOTS.glob("09-minutes-*.png"))
    assert pages
    pdf_text = " ".join(subprocess.run(["pdftotext", str(pdf_path), "-"], capture_output=True, text=True,
                                       check=True).stdout.split())
    assert "Máu tụ ngoài màng cứng cấp tính." in pdf_text and "0012345/BYT-CCHN" in pdf_text
    assert "Máu tụ ngoài màng cứng, đo bề dày." in pdf_text

    # -- the record: audit chain verifies, then an edited row is detected --------------------------
    with archive.index.session() as s:
        result = audit.verify(s)
        assert result.ok, result
        actions = set(s.execute(text("SELECT action FROM audit_log WHERE object_type = 'consult'")).scalars())
    assert {"consult_created", "consult_study_attached", "consult_state_changed", "message_posted",
            "conclusion_signed", "consult_participant_added", "consult_exported"} <= actions
    with archive.index.engine.begin() as conn:
        conn.execute(text("UPDATE audit_log SET actor = 'someone else' WHERE action = 'conclusion_signed'"))
    with archive.index.session() as s:
        assert not audit.verify(s).ok

    with archive.index.session() as s:
        hub = s.query(Facility).filter_by(code="HUB").one()
        assert hub.name == "Bệnh viện Bạch Mai"
    assert not errors, errors


def test_zip_upload_reports_what_is_not_dicom(server, browser, ct_part10_dir, tmp_path):
    """A zip from the browser: its DICOM files are stored and confirmed, the rest named with the reason."""
    import zipfile

    url, _ = server
    errors: list[str] = []
    archive_zip = tmp_path / "ca-benh.zip"
    with zipfile.ZipFile(archive_zip, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for f in dicom_files(ct_part10_dir)[:2]:
            z.write(f, f"CT/{f.name}")
        z.writestr("CT/ghi-chu.txt", "không phải DICOM")
    doctor = _login(browser, url, "bs.lan", errors)
    doctor.goto(url + "/consults/new")
    doctor.set_input_files("#upload-zip", str(archive_zip))
    doctor.wait_for_function("document.body.dataset.uploadDone === '1'", timeout=60_000)
    problems = doctor.locator("#upload-errors li").all_inner_texts()
    assert len(problems) == 1 and "ca-benh.zip/CT/ghi-chu.txt" in problems[0] and "DICOM" in problems[0]
    assert "2" in doctor.locator("#upload-status").inner_text()
    _shot(doctor, "10-doctor-zip-upload")
    assert not errors, errors
