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

from archive.service import Archive
from helpers import REPO, make_settings
from tests.peers import free_port


@dataclass
class WebServer:
    url: str  # e.g. http://127.0.0.1:PORT
    archive: Archive  # the same data dir, opened in the test process (to load data and check results)
    log: Path

    @property
    def dicomweb(self) -> str:
        return self.url + "/dicomweb"


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


@pytest.fixture
def web(tmp_path: Path) -> Iterator[WebServer]:
    """telepacs' web app under gunicorn (gthread workers, as `telepacs serve` runs it) on a free port."""
    archive = Archive.open(make_settings(tmp_path))  # creates the schema, as `telepacs serve` does
    port = free_port()
    env = dict(os.environ, TELEPACS_DATA_DIR=str(archive.settings.data_dir), TELEPACS_HTTP_PORT=str(port),
               TELEPACS_PUBLIC_URL=f"http://127.0.0.1:{port}")
    for name in ("TELEPACS_CONFIG", "TELEPACS_DB_URL", "TELEPACS_STORAGE_URL"):
        env.pop(name, None)
    log = tmp_path / "gunicorn.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1",
             "--worker-class", "gthread", "--threads", "4", "viewer:create_app()"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        yield WebServer(url, archive, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        archive.close()
