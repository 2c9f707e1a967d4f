"""The ObjectStore contract, run against every backend (local directory, S3)."""

from __future__ import annotations

import hashlib
import os

import pytest

from storage import ObjectNotFound, ObjectStore

KEY = "1.2.3/1.2.3.4/1.2.3.4.5.dcm"


def test_is_an_object_store(store):
    assert isinstance(store, ObjectStore)
    assert store.description
    assert "secret" not in store.description
    store.check()


def test_put_bytes_round_trip(store):
    data = os.urandom(1000) + b"\x00\xff" * 10
    store.put_bytes(KEY, data)
    assert store.get_bytes(KEY) == data
    assert store.size(KEY) == len(data)
    assert store.exists(KEY)


def test_put_bytes_empty_object(store):
    store.put_bytes("a/empty.dcm", b"")
    assert store.get_bytes("a/empty.dcm") == b""
    assert store.size("a/empty.dcm") == 0


def test_put_bytes_replaces(store):
    store.put_bytes(KEY, b"first")
    store.put_bytes(KEY, b"second version")
    assert store.get_bytes(KEY) == b"second version"


def test_put_file_copies(store, tmp_path):
    src = tmp_path / "in.dcm"
    src.write_bytes(b"DICM" * 1000)
    store.put_file(KEY, src)
    assert src.read_bytes() == b"DICM" * 1000  # copy leaves the source alone
    assert store.get_bytes(KEY) == b"DICM" * 1000


def test_put_file_move(store, tmp_path):
    src = tmp_path / "in.dcm"
    data = os.urandom(5000)
    src.write_bytes(data)
    store.put_file(KEY, src, move=True)
    assert store.get_bytes(KEY) == data
    assert not src.exists() or src.read_bytes() == data


def test_large_file_round_trip_streaming(store, tmp_path):
    """40 MB: multipart on S3 (16 MiB parts); read back by open() and iter_chunks()."""
    src = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with open(src, "wb") as f:
        for _ in range(40):
            block = os.urandom(1_000_000)
            digest.update(block)
            f.write(block)
    store.put_file("big/object.bin", src)
    assert store.size("big/object.bin") == 40_000_000

    h = hashlib.sha256()
    with store.open("big/object.bin") as stream:
        while block := stream.read(1 << 20):
            h.update(block)
    assert h.hexdigest() == digest.hexdigest()

    h = hashlib.sha256()
    sizes = []
    for chunk in store.iter_chunks("big/object.bin", chunk_size=4 << 20):
        sizes.append(len(chunk))
        h.update(chunk)
    assert h.hexdigest() == digest.hexdigest()
    assert max(sizes) <= 4 << 20
    assert len(sizes) >= 10  # streamed, not one blob


def test_open_partial_reads(store):
    store.put_bytes(KEY, b"0123456789")
    with store.open(KEY) as f:
        assert f.read(3) == b"012"
        assert f.read(3) == b"345"
        assert f.read() == b"6789"


def test_missing_key(store):
    missing = "no/such/key.dcm"
    assert not store.exists(missing)
    with pytest.raises(ObjectNotFound):
        store.get_bytes(missing)
    with pytest.raises(ObjectNotFound):
        store.open(missing)
    with pytest.raises(ObjectNotFound):
        store.size(missing)
    with pytest.raises(ObjectNotFound):
        list(store.iter_chunks(missing))
    store.delete(missing)  # no error


def test_delete(store):
    store.put_bytes(KEY, b"x")
    store.delete(KEY)
    assert not store.exists(KEY)
    store.delete(KEY)  # idempotent
    assert list(store.list_keys()) == []


def test_list_keys(store):
    keys = ["1.2/1.2.3/a.dcm", "1.2/1.2.3/b.dcm", "1.2/1.2.4/c.dcm", "1.3/1.3.1/d.dcm"]
    for k in keys:
        store.put_bytes(k, k.encode())
    assert sorted(store.list_keys()) == keys
    assert sorted(store.list_keys("1.2/")) == keys[:3]
    assert sorted(store.list_keys("1.2/1.2.3/")) == keys[:2]
    assert sorted(store.list_keys("1.2/1.2.")) == keys[:3]  # plain string prefix
    assert sorted(store.list_keys("1.3")) == keys[3:]
    assert list(store.list_keys("9")) == []


BAD_KEYS = [
    "",
    "/etc/passwd",
    "../../etc/passwd",
    "a/../../b",
    "a//b",
    "a/b/",
    "./a",
    "a\\b",
    "a\x00b",
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_rejected(store, key):
    with pytest.raises(ValueError):
        store.put_bytes(key, b"x")
    with pytest.raises(ValueError):
        store.get_bytes(key)
    with pytest.raises(ValueError):
        store.exists(key)
    with pytest.raises(ValueError):
        store.delete(key)
    assert list(store.list_keys()) == []
