"""Fixtures for the web side: the real app under a real gunicorn on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import requests

from archive import people
from archive.service import Archive
from helpers import REPO, make_settings
from tests.peers import free_port

ADMIN = "admin"
ADMIN_PASSWORD = "correct horse battery staple"
ADMIN_FACILITY = "LOCAL"


@dataclass
class WebServer:
    url: str  # e.g. http://127.0.0.1:PORT
    archive: Archive  # the same data dir, opened in the test process (to load data and check results)
    log: Path
    token: str = ""  # an API token of the admin user

    @property
    def dicomweb(self) -> str:
        return self.url + "/dicomweb"

    @property
    def http(self) -> requests.Session:
        """A requests session authenticated as the admin by API token (sees everything)."""
        return self.token_session(self.token)

    def token_session(self, token: str) -> requests.Session:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token}"
        return session

    def client(self, token: str | None = None) -> "DICOMwebClient":  # type: ignore[name-defined]  # noqa: F821
        """dicomweb-client's DICOMwebClient on this server, authenticated by ``token`` (default: the admin's)."""
        from dicomweb_client.api import DICOMwebClient

        return DICOMwebClient(url=self.dicomweb, session=self.token_session(token or self.token))

    def add_facility(self, code: str, tier: str = "district") -> None:
        with self.archive.index.write_session() as session, session.begin():
            people.create_facility(session, code=code, tier=tier, actor="test")

    def add_user(self, username: str, password: str, *, role: str = "requester",
                 facility: str = ADMIN_FACILITY) -> str:
        """A user (and their facility if new); returns an API token of theirs."""
        with self.archive.index.write_session() as session, session.begin():
            try:
                people.get_facility(session, facility)
            except people.NotFound:
                people.create_facility(session, code=facility, actor="test")
            people.create_user(session, username=username, password=password, role=role, facility_code=facility,
                               actor="test")
            _, secret = people.create_token(session, username, "tests", actor="test")
        return secret

    def login(self, username: str = ADMIN, password: str = ADMIN_PASSWORD) -> requests.Session:
        """A browser-like session logged in through the login page (cookie + CSRF token)."""
        session = requests.Session()
        page = session.get(self.url + "/login", timeout=10)
        token = csrf_from(page.text)
        answer = session.post(self.url + "/login", data={"username": username, "password": password,
                                                         "csrf_token": token}, timeout=30, allow_redirects=False)
        assert answer.status_code == 302, (answer.status_code, answer.text[:500])
        # The login starts a new session with a new CSRF token: take it from a page, as a script would.
        session.headers["X-CSRF-Token"] = csrf_from(session.get(self.url + "/account/password", timeout=10).text)
        return session


def browser_login(page, web: WebServer, username: str = ADMIN, password: str = ADMIN_PASSWORD) -> None:  # type: ignore[no-untyped-def]
    """Log a Playwright page in through the login page (its context keeps the session cookie)."""
    page.goto(web.url + "/login")
    page.fill("#username", username)
    page.fill("#password", password)
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/login" not in url)


def csrf_from(html: str) -> str:
    """The CSRF token a page carries (its meta tag)."""
    import re

    found = re.search(r'<meta name="csrf-token" content="([^"]+)"', html)
    assert found, "no csrf-token meta tag in the page"
    return found.group(1)


def seed_admin(archive: Archive) -> str:
    """Facility LOCAL, user admin and an API token of theirs (returned), as a fresh install would have."""
    with archive.index.write_session() as session, session.begin():
        people.create_facility(session, code=ADMIN_FACILITY, tier="provincial", actor="test")
        people.create_user(session, username=ADMIN, password=ADMIN_PASSWORD, role="admin",
                           facility_code=ADMIN_FACILITY, actor="test")
        _, secret = people.create_token(session, ADMIN, "tests", actor="test")
    return secret


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    raise RuntimeError(f"gunicorn did not answer /healthz within {timeout} s:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server this test run started (SIGTERM, then SIGKILL after 20 s)."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# `telepacs serve`'s gunicorn settings: workers log like the rest of telepacs and warm up before serving.
GUNICORN_CONFIG = ["--config", "python:viewer.gunicorn_conf"]


@pytest.fixture
def web(tmp_path: Path) -> Iterator[WebServer]:
    """telepacs' web app under gunicorn (gthread workers, as `telepacs serve` runs it) on a free port."""
    yield from serve_web(tmp_path)


@pytest.fixture(scope="module")
def module_web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebServer]:
    """The same, shared by the tests of one module (for many read-only checks against the same data)."""
    yield from serve_web(tmp_path_factory.mktemp("web"))


def start_gunicorn(data_dir: Path, port: int, log: Path, *, workers: int = 1, threads: int = 4,
                   **env_extra: str) -> subprocess.Popen[bytes]:
    """telepacs' web app under gunicorn with `telepacs serve`'s settings, on data_dir, logging to ``log``."""
    env = dict(os.environ, TELEPACS_DATA_DIR=str(data_dir), TELEPACS_HTTP_PORT=str(port),
               TELEPACS_PUBLIC_URL=f"http://127.0.0.1:{port}", **env_extra)
    for name in ("TELEPACS_CONFIG", "TELEPACS_DB_URL", "TELEPACS_STORAGE_URL"):
        env.pop(name, None)
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", str(workers),
             "--worker-class", "gthread", "--threads", str(threads), *GUNICORN_CONFIG, "viewer:create_app()"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )


def serve_web(tmp_path: Path) -> Iterator[WebServer]:
    archive = Archive.open(make_settings(tmp_path))  # creates the schema, as `telepacs serve` does
    token = seed_admin(archive)
    port = free_port()
    log = tmp_path / "gunicorn.log"
    proc = start_gunicorn(archive.settings.data_dir, port, log)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        yield WebServer(url, archive, log, token)
    finally:
        stop_server(proc)
        archive.close()
