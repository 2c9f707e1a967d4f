"""S3ObjectStore against a SeaweedFS server that goes away and comes back."""

from __future__ import annotations

import time

import pytest

from storage import StorageError, open_store

from s3server import make_s3_store, new_bucket

pytestmark = pytest.mark.s3


def test_outage_fails_fast_and_recovers(outage_server, tmp_path):
    store = make_s3_store(outage_server)
    store.check()
    store.put_bytes("before/x.dcm", b"before")

    outage_server.stop()
    src = tmp_path / "in.dcm"
    src.write_bytes(b"during outage")

    t0 = time.monotonic()
    with pytest.raises(StorageError) as info:
        store.put_file("during/x.dcm", src)
    assert time.monotonic() - t0 < 15
    assert outage_server.secret_key not in str(info.value)
    assert outage_server.access_key not in str(info.value)
    assert "unreachable" in str(info.value)

    for call in (store.check, lambda: store.get_bytes("before/x.dcm"),
                 lambda: store.exists("before/x.dcm"), lambda: list(store.list_keys())):
        t0 = time.monotonic()
        with pytest.raises(StorageError):
            call()
        assert time.monotonic() - t0 < 15

    outage_server.start()
    store.check()
    assert list(store.list_keys()) == ["before/x.dcm"]  # nothing half-written appeared
    assert store.get_bytes("before/x.dcm") == b"before"
    store.put_file("after/x.dcm", src)
    assert store.get_bytes("after/x.dcm") == b"during outage"
    store.close()


def test_open_store_s3_url(outage_server):
    bucket = new_bucket()
    store = open_store(outage_server.url(bucket))
    try:
        assert outage_server.secret_key not in store.description
        assert outage_server.secret_key not in repr(store)
        assert store.description.startswith(f"s3://{outage_server.endpoint}/{bucket}")
        store.put_bytes("k", b"v")  # URL-decoded credentials work
        assert store.get_bytes("k") == b"v"
    finally:
        store.close()


def test_bad_credentials_are_storage_errors(outage_server):
    from storage import S3ObjectStore

    store = S3ObjectStore(outage_server.endpoint, "nobody", "wrong-secret", new_bucket(),
                          secure=False)
    with pytest.raises(StorageError) as info:
        store.check()
    assert "wrong-secret" not in str(info.value)
