"""The OHIF Viewer v3 (npm ``@ohif/app``'s prebuilt bundle) served by telepacs at /ohif/, against its DICOMweb.

The browser test drives Debian's chromium (``/usr/bin/chromium``, WebGL through SwiftShader) with
Playwright: OHIF's study list shows the studies of ../shared/testdata, and its viewer draws the CT
and an MR series. Any console error, page error, failed or 4xx/5xx request, or request leaving
the origin fails the test. Screenshots are saved in the test's tmp dir.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests

from archive.index import Source
from archive.service import Archive
from helpers import FMRI_DIR, MR_STUDY_DIR, TS_DIR, dicom_files, make_settings
from tests.viewer.conftest import ADMIN, ADMIN_PASSWORD, seed_admin
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
    index = web.http.get(web.url + "/ohif/", timeout=10)
    assert index.status_code == 200 and "text/html" in index.headers["Content-Type"]
    assert "window.PUBLIC_URL = '/ohif/'" in index.text and 'src="/ohif/app-config.js"' in index.text
    assert index.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    assert index.headers["Cross-Origin-Opener-Policy"] == "same-origin"
    # OHIF's client-side routes get its page (the SPA decides what to show) ...
    viewer = web.http.get(web.url + "/ohif/viewer?StudyInstanceUIDs=1.2.3", timeout=10)
    assert viewer.status_code == 200 and viewer.text == index.text
    # ... its files are served as they are, content-hashed ones cached for good ...
    bundle = next(ohif_bundle.glob("app.bundle.*.js")).name
    script = web.http.get(f"{web.url}/ohif/{bundle}", timeout=30)
    assert script.status_code == 200 and script.content == (ohif_bundle / bundle).read_bytes()
    assert "immutable" in script.headers["Cache-Control"]
    # ... and a missing file is a 404, not the page.
    assert web.http.get(web.url + "/ohif/no-such-chunk.js", timeout=10).status_code == 404
    # A path out of the bundle folder never reaches the file system outside it.
    escape = web.http.get(web.url + "/ohif/%2e%2e/%2e%2e/setup.cfg", timeout=10)
    assert escape.content != (Path(__file__).parents[2] / "setup.cfg").read_bytes()
    assert escape.text == index.text  # it is just one more client-side route


def test_app_config_points_at_this_servers_dicomweb(web, ohif_bundle):
    response = web.http.get(web.url + "/ohif/app-config.js", timeout=10)
    assert response.status_code == 200 and "javascript" in response.headers["Content-Type"]
    text = response.text
    assert "window.config = {" in text and '"routerBasename": "/ohif"' in text
    assert 'window.location.origin + "/dicomweb"' in text
    assert "source.qidoRoot = root; source.wadoRoot = root;" in text
    assert '"defaultDataSourceName": "telepacs"' in text and '"imageRendering": "wadors"' in text


def test_missing_bundle_is_a_clear_503(tmp_path, caplog, monkeypatch):
    archive = Archive.open(make_settings(tmp_path))
    token = seed_admin(archive)
    monkeypatch.setenv("TELEPACS_DATA_DIR", str(archive.settings.data_dir))
    app = create_app({"OHIF_DIR": str(tmp_path / "nothing-here"), "TELEPACS_ARCHIVE": archive})
    response = app.test_client().get("/ohif/", headers={"Authorization": f"Bearer {token}"})
    archive.close()
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
    frames_of: set[str] = field(default_factory=set)  # SOP Instance UIDs whose frames came back (200)

    def on_console(self, message) -> None:  # type: ignore[no-untyped-def]
        if message.type == "error":
            self.console.append(message.text)

    def on_page_error(self, error) -> None:  # type: ignore[no-untyped-def]
        self.console.append(f"uncaught: {error}")

    def on_response(self, response) -> None:  # type: ignore[no-untyped-def]
        if response.status >= 400:
            self.failed.append(f"{response.status} {response.request.method} {response.url}")
        elif response.status == 200 and "/frames/" in response.url:
            self.frames_of.add(response.url.split("/instances/")[1].split("/")[0])

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


# The viewport canvas scaled down to 160x120 grey levels, read in the page (faster than a screenshot).
_CANVAS_GREY = """() => {
  const source = document.querySelector('canvas.cornerstone-canvas');
  if (!source || !source.width) return null;
  const small = document.createElement('canvas');
  small.width = 160; small.height = 120;
  const context = small.getContext('2d');
  context.drawImage(source, 0, 0, 160, 120);
  const rgba = context.getImageData(0, 0, 160, 120).data;
  const grey = new Array(160 * 120);
  for (let i = 0; i < grey.length; i++) grey[i] = (rgba[4 * i] + rgba[4 * i + 1] + rgba[4 * i + 2]) / 3;
  return grey;
}"""


def _canvas_grey(page) -> np.ndarray | None:  # type: ignore[no-untyped-def]
    values = page.evaluate(_CANVAS_GREY)
    return None if values is None else np.asarray(values, dtype=np.float32)


def _wait_drawn(page, name: str, out: Path, minimum: float,  # type: ignore[no-untyped-def]
                like: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Poll the viewport canvas until enough of it is drawn (and, given ``like``, until it looks like
    that image: mean grey difference under 2 levels); save a screenshot of the page."""
    page.locator("canvas.cornerstone-canvas").first.wait_for(state="visible", timeout=DRAW_TIMEOUT * 1000)
    deadline = time.monotonic() + DRAW_TIMEOUT
    fraction = difference = 0.0
    while time.monotonic() < deadline:
        grey = _canvas_grey(page)
        if grey is not None:
            fraction = float((grey > 40).mean())  # share of pixels clearly above the black background
            difference = 0.0 if like is None else float(np.abs(grey - like).mean())
            if fraction >= minimum and difference < 2.0:
                page.screenshot(path=str(out / f"{name}.png"))
                return fraction, grey
        page.wait_for_timeout(100)
    page.screenshot(path=str(out / f"{name}-timeout.png"))
    raise AssertionError(f"{name}: the viewport stayed blank or wrong ({fraction:.1%} drawn, "
                         f"mean difference {difference:.1f} from the first image) for {DRAW_TIMEOUT} s")


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
    timings: dict[str, float] = {}
    clock = time.monotonic()

    def lap(name: str) -> None:
        nonlocal clock
        timings[name] = time.monotonic() - clock
        clock = time.monotonic()

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
            lap("browser")

            # OHIF is behind the login: log in through telepacs' page, then its DICOMweb calls carry the cookie.
            page.goto(web.url + "/ohif/")
            assert "/login?next=" in page.url, page.url
            page.fill("#username", ADMIN)
            page.fill("#password", ADMIN_PASSWORD)
            page.click("button[type=submit]")
            # The study list: one row per study, found through QIDO-RS.
            page.wait_for_url(lambda url: "/ohif/" in url and "/login" not in url)
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
            lap("study list")

            # The CT: the raw GE slices (wrapped as Part 10), 512x512 16-bit.
            page.goto(f"{web.url}/ohif/viewer?StudyInstanceUIDs={studies['PR0002']}")
            drawn = {"ct": _wait_drawn(page, "ct", shots, minimum=0.05)[0]}
            lap("CT")

            # The Siemens MR: the same image in 9 transfer syntaxes (RLE, JPEG lossless, JPEG-LS,
            # JPEG 2000, big endian, ...), decoded by OHIF from the frames telepacs sends. Step
            # through all 9 (down arrow = next image): each must look like the first.
            page.goto(f"{web.url}/ohif/viewer?StudyInstanceUIDs={studies['crlab']}")
            drawn["mr"], first = _wait_drawn(page, "mr", shots, minimum=0.05)
            position = page.locator('[data-cy="viewport-overlay-bottom-right"]')
            for index in range(2, 10):
                page.locator("canvas.cornerstone-canvas").first.hover()
                page.keyboard.press("ArrowDown")
                position.get_by_text(f"({index}/9)").wait_for(timeout=DRAW_TIMEOUT * 1000)
                _wait_drawn(page, f"mr-{index}", shots, minimum=0.05, like=first)
            lap("MR, 9 transfer syntaxes")
        finally:
            browser.close()
    mr_instances = {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in dicom_files(TS_DIR)}
    assert mr_instances <= problems.frames_of, "OHIF did not fetch the frames of every MR instance"
    print("OHIF: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items())
          + f"; drawn {drawn}; screenshots in {shots}")
    problems.assert_none()
