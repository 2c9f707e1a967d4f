"""Session fixtures that start the real things: PostgreSQL, SeaweedFS S3, a DICOM node.

``TELEPACS_REQUIRE_PG`` / ``TELEPACS_REQUIRE_S3`` (set by scripts/test.sh)
turn a missing server into a failure instead of a skip.
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pydicom
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from archive.config import Settings, load_settings  # noqa: E402
from archive.service import Archive  # noqa: E402
from tests.peers import PostgresServer, free_port  # noqa: E402

TESTDATA = Path(os.environ.get("TELEPACS_TESTDATA", REPO.parent / "shared" / "testdata"))
TS_DIR = TESTDATA / "siemens_mr_9_transfer_syntaxes"
CT_RAW_DIR = TESTDATA / "ge_ct_phantom_10slices_nometa"
MR_STUDY_DIR = TESTDATA / "ge_mr_phantom_study"


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files of a testdata folder (READMEs and licences left out)."""
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() not in {".md", ".txt"} and not p.name.upper().startswith(("LICEN", "README"))
    )


def _require(env: str, reason: str) -> None:
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
        _require("TELEPACS_REQUIRE_PG", "PostgreSQL server binaries not installed (apt-get install postgresql)")
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


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    env: dict[str, str] = {}
    return load_settings(env=env, data_dir=str(tmp_path / "data"), **overrides)  # type: ignore[arg-type]


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


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def part10_dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part 10 file after its file meta group."""
    from archive.dataset import dataset_offset

    with open(path, "rb") as f:
        offset = dataset_offset(f)
        f.seek(offset)
        return f.read()


def read_uids(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


__all__ = ["free_port", "dicom_files", "TS_DIR", "CT_RAW_DIR", "MR_STUDY_DIR", "make_settings"]
