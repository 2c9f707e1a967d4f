"""In the browser, with the login cookie: a user of another facility gets 404 on every URL of a study.

The same routes as tests/viewer/test_access.py (enumerated from the app), fetched by chromium with the
session cookie of a user who logged in through the login page; the OHIF viewer opened on the study shows
no image for them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from helpers import TS_DIR, dicom_files
from tests.viewer.conftest import WebServer, browser_login, serve_web
from tests.viewer.test_access import RULES, STOW_ENDPOINT, Setting, _url
from tests.viewer.test_dicomweb import _stow, _uids

PASSWORD = "mật khẩu của bác sĩ"
SHOTS = Path(__file__).resolve().parents[2] / "test-output" / "e2e-access"


@pytest.fixture
def access_web(tmp_path: Path) -> Iterator[WebServer]:
    yield from serve_web(tmp_path)


def _log_in(browser, web: WebServer, username: str):  # type: ignore[no-untyped-def]
    context = browser.new_context(viewport={"width": 1100, "height": 700})
    page = context.new_page()
    browser_login(page, web, username, PASSWORD)
    return context, page


@pytest.mark.browser
@pytest.mark.timeout(240)
def test_another_facility_gets_404_on_every_url_of_the_study(browser, access_web):
    web = access_web
    owner_token = web.add_user("bs.chu", PASSWORD, facility="BV-HUYEN-A")
    web.add_user("bs.tu", PASSWORD, facility="BV-XA-D", role="specialist")
    path = dicom_files(TS_DIR)[0]
    assert _stow(web, [path], http=web.token_session(owner_token)).status_code == 200
    study, series, instance = _uids(path)
    setting = Setting(web, study, series, instance, web.token_session(owner_token), web.http, "")
    urls = [_url(setting, rule) for rule, method, endpoint in RULES if method == "GET" and endpoint != STOW_ENDPOINT]
    assert len(urls) >= 17
    SHOTS.mkdir(parents=True, exist_ok=True)
    for username, expected in (("bs.tu", 404), ("bs.chu", 200)):
        context, page = _log_in(browser, web, username)
        try:
            answers = {url: page.request.get(url, timeout=60_000).status for url in urls}
            wrong = {url: status for url, status in answers.items() if status != expected}
            assert not wrong, f"{username}: {wrong}"
            page.goto(f"{web.dicomweb}/studies/{study}/series/{series}/instances/{instance}/rendered")
            page.screenshot(path=str(SHOTS / f"rendered-as-{username}.png"))
        finally:
            context.close()
