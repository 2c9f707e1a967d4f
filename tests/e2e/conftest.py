"""Shared browser fixtures: telepacs under gunicorn with ../shared/testdata (and generated phantoms) loaded,
and Debian's chromium driven by Playwright (``/usr/bin/chromium``, headless; never a downloaded browser).

``page`` fails its test on any console error, page error, failed or 4xx/5xx request, or request that
leaves the origin. Screenshots go to ``test-output/e2e/<test name>/`` (gitignored).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pydicom
import pytest

from archive.index import Source
from archive.service import Archive
from helpers import FMRI_DIR, MR_STUDY_DIR, REPO, TS_DIR, dicom_files, make_settings
from tests.e2e import phantoms
from tests.peers import free_port
from tests.viewer.conftest import (ADMIN, ADMIN_PASSWORD, GUNICORN_CONFIG, WebServer, _wait_healthy, seed_admin,
                                   stop_server)

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = REPO / "test-output" / "e2e"


def _require(what: str, reason: str) -> None:
    if os.environ.get("TELEPACS_REQUIRE_BROWSER"):
        pytest.fail(f"{reason} (TELEPACS_REQUIRE_BROWSER is set; scripts/test.sh installs {what})")
    pytest.skip(reason)


@dataclass
class Loaded(WebServer):
    """The server, and the UIDs of what was loaded into it."""

    studies: dict[str, str] = field(default_factory=dict)  # name -> StudyInstanceUID
    series: dict[str, list[str]] = field(default_factory=dict)  # name -> SeriesInstanceUIDs
    browser_state: dict[str, Any] | None = None  # cookies of the admin logged in through /login


def _start(data_dir: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = dict(os.environ, TELEPACS_DATA_DIR=str(data_dir), TELEPACS_HTTP_PORT=str(port),
               TELEPACS_PUBLIC_URL=f"http://127.0.0.1:{port}")
    for name in ("TELEPACS_CONFIG", "TELEPACS_DB_URL", "TELEPACS_STORAGE_URL"):
        env.pop(name, None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1",
             "--worker-class", "gthread", "--threads", "4", *GUNICORN_CONFIG, "viewer:create_app()"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def loaded_web(tmp_path_factory: pytest.TempPathFactory, ct_part10_dir: Path) -> Iterator[Loaded]:
    """telepacs under gunicorn (as the ``web`` fixture runs it) with ../shared/testdata and the phantoms."""
    base = tmp_path_factory.mktemp("e2e-web")
    archive = Archive.open(make_settings(base))
    loaded = Loaded("", archive, base / "gunicorn.log", seed_admin(archive))
    source = Source(via="import")
    named = {"ct": dicom_files(ct_part10_dir), "mr": dicom_files(MR_STUDY_DIR), "fmri": dicom_files(FMRI_DIR),
             "ts": dicom_files(TS_DIR)}
    for name, files in named.items():
        for path in files:
            archive.ingest_file(path, source)
        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        loaded.studies[name] = str(first.StudyInstanceUID)
    generated = {
        "measure": phantoms.measurement_study(base / "measure"),
        "nospacing": phantoms.measurement_study(base / "nospacing", spacing=None, slices=1),
        "imager": phantoms.measurement_study(base / "imager", spacing=(0.2, 0.2), keyword="ImagerPixelSpacing",
                                             slices=1),
        "cine": phantoms.multiframe_study(base / "cine"),
        "parallel": phantoms.parallel_study(base / "parallel"),
        "large": phantoms.large_study(base / "large"),
    }
    for name, study in generated.items():
        for path in study.files:
            archive.ingest_file(path, source)
        loaded.studies[name] = study.study_uid
        loaded.series[name] = study.series_uids
    proc, loaded.url = _start(archive.settings.data_dir, loaded.log)
    try:
        _wait_healthy(loaded.url, proc, loaded.log)
        yield loaded
    finally:
        stop_server(proc)
        archive.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's chromium through Playwright, headless. Per module: Playwright's sync API allows one running
    instance at a time, and other test modules here start their own."""
    if not CHROMIUM.exists():
        _require("chromium", f"{CHROMIUM} not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class Problems:
    """What the browser saw go wrong."""

    origin: str
    console: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    external: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # every URL asked for, in order

    def on_console(self, message: Any) -> None:
        if message.type == "error":
            self.console.append(message.text)

    def on_page_error(self, error: Any) -> None:
        self.console.append(f"uncaught: {error}")

    def on_response(self, response: Any) -> None:
        if response.status >= 400:
            self.failed.append(f"{response.status} {response.request.method} {response.url}")

    def on_request_failed(self, request: Any) -> None:
        # ERR_ABORTED: the page cancelled the request itself (or was closed with it in flight).
        if request.failure != "net::ERR_ABORTED":
            self.failed.append(f"{request.failure} {request.method} {request.url}")

    def route(self, route: Any) -> None:
        """Everything must come from telepacs: a request elsewhere is recorded and refused."""
        url = route.request.url
        self.requests.append(url)
        if url.startswith(self.origin + "/") or url.startswith("data:"):
            route.continue_()
        else:
            self.external.append(url)
            route.abort()

    def assert_none(self) -> None:
        assert self.external == [], f"the viewer tried to load from outside telepacs: {self.external}"
        assert self.failed == [], f"failed requests: {self.failed}"
        assert self.console == [], f"browser console errors: {self.console}"


@dataclass
class Browsing:
    page: Any
    context: Any
    problems: Problems
    shots: Path
    web: Loaded

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path


@pytest.fixture
def screenshot_dir(request: pytest.FixtureRequest) -> Path:
    path = SHOTS / request.node.name.replace("/", "_").replace("[", "-").replace("]", "")
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.png"):
        old.unlink()
    return path


def _log_in(browser: Any, web: Loaded) -> dict[str, Any]:
    """Log the admin in through the login page once; later contexts start with its cookies."""
    if web.browser_state is None:
        context = browser.new_context()
        page = context.new_page()
        page.goto(web.url + "/login")
        page.fill("#username", ADMIN)
        page.fill("#password", ADMIN_PASSWORD)
        with page.expect_navigation():
            page.click("button[type=submit]")
        assert "/login" not in page.url, "logging in failed"
        web.browser_state = context.storage_state()
        context.close()
    return web.browser_state


def open_context(browser: Any, web: Loaded, shots: Path, locale: str = "en-GB", **options: Any) -> Browsing:
    """A browser context logged in as the admin, recording what goes wrong."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, locale=locale,
                                  storage_state=_log_in(browser, web), **options)
    page = context.new_page()
    problems = Problems(web.url)
    page.on("console", problems.on_console)
    page.on("pageerror", problems.on_page_error)
    page.on("response", problems.on_response)
    page.on("requestfailed", problems.on_request_failed)
    context.route("**/*", problems.route)
    return Browsing(page, context, problems, shots, web)


@pytest.fixture
def browsing(browser: Any, loaded_web: Loaded, screenshot_dir: Path) -> Iterator[Browsing]:
    """A fresh browser context on the loaded server; fails the test on any problem the browser saw."""
    session = open_context(browser, loaded_web, screenshot_dir)
    try:
        yield session
        session.problems.assert_none()
    finally:
        session.context.close()
