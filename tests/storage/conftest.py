"""Fixtures for the storage tests: a real SeaweedFS S3 server and fresh stores."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for s3server

from s3server import make_s3_store  # noqa: E402

from storage import LocalObjectStore  # noqa: E402


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """A fresh, empty object store of each backend."""
    if request.param == "local":
        s = LocalObjectStore(tmp_path / "objects")
    else:
        s = make_s3_store(request.getfixturevalue("s3_server"))
        s.check()  # creates the bucket
    yield s
    s.close()


@pytest.fixture
def outage_server(own_s3_server):
    """``own_s3_server``, guaranteed running before and after the test."""
    own_s3_server.start()
    yield own_s3_server
    own_s3_server.start()
