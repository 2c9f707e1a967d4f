"""The OHIF Viewer v3 (npm ``@ohif/app``'s prebuilt bundle) served by telepacs at /ohif/, against its DICOMweb.

The browser test drives Debian's chromium (``/usr/bin/chromium``, WebGL through SwiftShader) with
Playwright: OHIF's study list shows the studies of ../shared/testdata, and its viewer draws the CT
and an MR series. Any console error, page error, failed or 4xx/5xx request, or request leaving
the origin fails the test. Screenshots are saved in the test's tmp dir.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image

from archive.index import Source
from helpers import FMRI_DIR, MR_STUDY_DIR, TS_DIR, dicom_files
from viewer import create_app
from viewer.ohif import DEFAULT_DIR

CHROMIUM = Path("/usr/bin/chromium")
OHIF_DIR = Path(os.environ.get("TELEPACS_OHIF_DIR") or DEFAULT_DIR)
DRAW_TIMEOUT = 30.0  # seconds for OHIF to fetch, decode and draw a series


def _require(what: str, reason: str) -> None:
    """Skip when a browser test prerequisite is missing, unless scripts/test.sh said it must be there."""
    if os.environ.get("TELEPACS_REQUIRE_BROWSER"):
        pytest.fail(f"{reason} (TELEPACS_REQUIRE_BROWSER is set; scripts/test.sh installs {what})")
    pytest.skip(reason)


@pytest.fixture
def ohif_bundle() -> Path:
    if not (OHIF_DIR / "index.html").is_file():
        _require("it", f"OHIF bundle missing in {OHIF_DIR}: run scripts/fetch_ohif.py")
    return OHIF_DIR


# --- the adapter (no browser) -------------------------------------------------------------------------


def test_pages_and_files_under_gunicorn(web, ohif_bundle):
    index = requests.get(web.url + "/ohif/", timeout=10)
    assert index.status_code == 200 and "text/html" in index.headers["Content-Type"]
    assert "window.PUBLIC_URL = '/ohif/'" in index.text and 'src="/ohif/app-config.js"' in index.text
    assert index.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    assert index.headers["Cross-Origin-Opener-Policy"] == "same-origin"
    # OHIF's client-side routes get its page (the SPA decides what to show) ...
    viewer = requests.get(web.url + "/ohif/viewer?StudyInstanceUIDs=1.2.3", timeout=10)
    assert viewer.status_code == 200 and viewer.text == index.text
    # ... its files are served as they are, content-hashed ones cached for good ...
    bundle = next(ohif_bundle.glob("app.bundle.*.js")).name
    script = requests.get(f"{web.url}/ohif/{bundle}", timeout=30)
    assert script.status_code == 200 and script.content == (ohif_bundle / bundle).read_bytes()
    assert "immutable" in script.headers["Cache-Control"]
    # ... and a missing file is a 404, not the page.
    assert requests.get(web.url + "/ohif/no-such-chunk.js", timeout=10).status_code == 404
    assert requests.get(web.url + "/ohif/../setup.cfg", timeout=10).status_code == 404


def test_app_config_points_at_this_servers_dicomweb(web, ohif_bundle):
    response = requests.get(web.url + "/ohif/app-config.js", timeout=10)
    assert response.status_code == 200 and "javascript" in response.headers["Content-Type"]
    text = response.text
    assert "window.config = {" in text and '"routerBasename": "/ohif"' in text
    assert 'window.location.origin + "/dicomweb"' in text
    assert "source.qidoRoot = root; source.wadoRoot = root;" in text
    assert '"defaultDataSourceName": "telepacs"' in text and '"imageRendering": "wadors"' in text


def test_missing_bundle_is_a_clear_503(tmp_path, caplog):
    app = create_app({"OHIF_DIR": str(tmp_path / "nothing-here")})
    response = app.test_client().get("/ohif/")
    assert response.status_code == 503
    assert b"scripts/fetch_ohif.py" in response.data and b"nothing-here" in response.data
    assert any("OHIF viewer is not installed" in r.getMessage() for r in caplog.records)


# --- OHIF in a real browser ---------------------------------------------------------------------------


@dataclass
class Problems:
    """What the browser saw go wrong."""

    origin: str
    console: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    external: list[str] = field(default_factory=list)

    def on_console(self, message) -> None:  # type: ignore[no-untyped-def]
        if message.type == "error":
            self.console.append(message.text)

    def on_page_error(self, error) -> None:  # type: ignore[no-untyped-def]
        self.console.append(f"uncaught: {error}")

    def on_response(self, response) -> None:  # type: ignore[no-untyped-def]
        if response.status >= 400:
            self.failed.append(f"{response.status} {response.request.method} {response.url}")

    def on_request_failed(self, request) -> None:  # type: ignore[no-untyped-def]
        # ERR_ABORTED is the page itself cancelling a request (OHIF cancels prefetches it no longer
        # needs; closing a page aborts what is in flight): not the server failing.
        if request.failure != "net::ERR_ABORTED":
            self.failed.append(f"{request.failure} {request.method} {request.url}")

    def route(self, route) -> None:  # type: ignore[no-untyped-def]
        """Everything must come from telepacs: a request elsewhere is recorded and refused."""
        if route.request.url.startswith(self.origin + "/"):
            route.continue_()
        else:
            self.external.append(route.request.url)
            route.abort()

    def assert_none(self) -> None:
        assert self.external == [], f"OHIF tried to load from outside telepacs: {self.external}"
        assert self.failed == [], f"failed requests: {self.failed}"
        assert self.console == [], f"browser console errors: {self.console}"


def _bright_fraction(png: bytes) -> float:
    """Share of pixels clearly above black (the viewport background)."""
    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    return float((grey > 40).mean())


def _wait_drawn(page, name: str, out: Path, minimum: float) -> float:  # type: ignore[no-untyped-def]
    """Poll the viewport canvas until enough of it is drawn; save the viewport and the page."""
    canvas = page.locator("canvas.cornerstone-canvas").first
    canvas.wait_for(state="visible", timeout=DRAW_TIMEOUT * 1000)
    deadline = time.monotonic() + DRAW_TIMEOUT
    fraction = 0.0
    while time.monotonic() < deadline:
        png = canvas.screenshot()
        fraction = _bright_fraction(png)
        if fraction >= minimum:
            (out / f"{name}-viewport.png").write_bytes(png)
            page.screenshot(path=str(out / f"{name}.png"))
            return fraction
        page.wait_for_timeout(250)
    page.screenshot(path=str(out / f"{name}-timeout.png"))
    raise AssertionError(f"{name}: the viewport stayed blank ({fraction:.1%} drawn) for {DRAW_TIMEOUT} s")


def _load_testdata(web, ct_part10_dir: Path) -> dict[str, str]:
    """Every file of ../shared/testdata into the archive; returns {PatientID: StudyInstanceUID}."""
    source = Source(via="import")
    studies: dict[str, str] = {}
    files = [*dicom_files(MR_STUDY_DIR), *dicom_files(FMRI_DIR), *dicom_files(TS_DIR), *dicom_files(ct_part10_dir)]
    for path in files:
        web.archive.ingest_file(path, source)
    for path in (MR_STUDY_DIR / "Ax_DWI_TENSOR_R2", FMRI_DIR, TS_DIR, ct_part10_dir):
        first = pydicom.dcmread(dicom_files(path)[0], stop_before_pixels=True)
        studies[str(first.PatientID)] = str(first.StudyInstanceUID)
    return studies


@pytest.mark.browser
@pytest.mark.timeout(180)
def test_ohif_lists_and_displays_testdata(web, ohif_bundle, ct_part10_dir, tmp_path):
    if not CHROMIUM.exists():
        _require("chromium", f"{CHROMIUM} not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    studies = _load_testdata(web, ct_part10_dir)
    assert len(set(studies.values())) == 4
    problems = Problems(web.url)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    started = time.monotonic()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=["--use-angle=swiftshader", "--enable-unsafe-swiftshader"])
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 900})
            # OHIF's first-visit tour covers the viewport, and its own step selectors miss the
            # v3.11 DOM (console errors from OHIF, not from telepacs): start as a returning user.
            context.add_init_script("localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))")
            context.route("**/*", problems.route)
            page = context.new_page()
            page.on("console", problems.on_console)
            page.on("pageerror", problems.on_page_error)
            page.on("response", problems.on_response)
            page.on("requestfailed", problems.on_request_failed)

            # The study list: one row per study, found through QIDO-RS.
            page.goto(web.url + "/ohif/")
            for uid in studies.values():
                page.locator(f'[data-cy="studyRow-{uid}"]').wait_for(timeout=DRAW_TIMEOUT * 1000)
            assert page.locator('[data-cy^="studyRow-"]').count() == 4
            assert page.locator('[data-cy="num-studies"]').inner_text().strip() == "4"
            names = {"PR0002": "BAREX CYLINDER", "crlab": "stc_test", "DEV": "Test, Regression", "dicom": "dicom"}
            for patient_id, uid in studies.items():
                row = page.locator(f'[data-cy="studyRow-{uid}"]').inner_text()
                assert names[patient_id] in row and patient_id in row, row
            page.get_by_role("button", name="Confirm and hide").click()  # OHIF's investigational-use notice
            page.screenshot(path=str(shots / "study-list.png"))

            # The CT (raw GE slices wrapped as Part 10) and the Siemens MR (9 transfer syntaxes).
            ct = _wait_drawn_study(page, web.url, studies["PR0002"], "ct", shots, minimum=0.05)
            mr = _wait_drawn_study(page, web.url, studies["crlab"], "mr", shots, minimum=0.05)
        finally:
            browser.close()
    elapsed = time.monotonic() - started
    print(f"OHIF: list + CT ({ct:.0%} drawn) + MR ({mr:.0%} drawn) in {elapsed:.1f} s; screenshots in {shots}")
    problems.assert_none()


def _wait_drawn_study(page, url: str, study: str, name: str, out: Path, minimum: float) -> float:  # type: ignore[no-untyped-def]
    page.goto(f"{url}/ohif/viewer?StudyInstanceUIDs={study}")
    return _wait_drawn(page, name, out, minimum)
