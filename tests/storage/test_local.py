"""LocalObjectStore specifics: atomic writes, disk-full handling, root confinement."""

from __future__ import annotations

import errno
import os
import time

import pytest

from storage import LocalObjectStore, StorageError, open_store
from storage import local as local_mod


def _all_files(root):
    return sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
    )


def test_disk_full_leaves_nothing(tmp_path, monkeypatch):
    store = LocalObjectStore(tmp_path / "objects")
    real_write = os.write
    calls = {"n": 0}

    def failing_write(fd, data):
        calls["n"] += 1
        if calls["n"] >= 2:  # let the first chunk through: a partial file exists
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data[: len(data) // 2 or 1])

    monkeypatch.setattr(local_mod.os, "write", failing_write)
    with pytest.raises(StorageError) as info:
        store.put_bytes("1.2/1.2.3/x.dcm", b"x" * 10_000)
    monkeypatch.undo()
    msg = str(info.value)
    assert "disk full" in msg and "1.2/1.2.3/x.dcm" in msg and str(store.root) in msg
    assert _all_files(store.root) == []  # no object, no temp file
    assert not store.exists("1.2/1.2.3/x.dcm")


def test_disk_full_put_file_copy(tmp_path, monkeypatch):
    store = LocalObjectStore(tmp_path / "objects")
    src = tmp_path / "in.dcm"
    src.write_bytes(b"y" * 3_000_000)

    def failing_write(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local_mod.os, "write", failing_write)
    with pytest.raises(StorageError, match="disk full writing a/b.dcm under"):
        store.put_file("a/b.dcm", src)
    monkeypatch.undo()
    assert _all_files(store.root) == []
    assert src.read_bytes() == b"y" * 3_000_000  # the caller keeps its file


def test_fsync_failure_is_storage_error(tmp_path, monkeypatch):
    store = LocalObjectStore(tmp_path / "objects")

    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(local_mod.os, "fsync", failing_fsync)
    with pytest.raises(StorageError, match="I/O error writing k under"):
        store.put_bytes("k", b"data")
    monkeypatch.undo()
    assert _all_files(store.root) == []


def test_permission_denied(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    root = tmp_path / "objects"
    store = LocalObjectStore(root)
    os.chmod(root / ".tmp", 0o500)
    try:
        with pytest.raises(StorageError, match="permission denied"):
            store.put_bytes("k", b"data")
        with pytest.raises(StorageError):
            store.check()
    finally:
        os.chmod(root / ".tmp", 0o700)


def test_temp_files_not_listed_and_stale_removed(tmp_path):
    root = tmp_path / "objects"
    store = LocalObjectStore(root)
    stale = root / ".tmp" / ".tmp-stale"
    fresh = root / ".tmp" / ".tmp-fresh"
    stale.write_bytes(b"old")
    fresh.write_bytes(b"new")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    store.put_bytes("a/b", b"1")
    assert list(store.list_keys()) == ["a/b"]
    LocalObjectStore(root)  # a restart cleans stale temp files only
    assert not stale.exists()
    assert fresh.exists()


def test_reserved_tmp_key_refused(tmp_path):
    store = LocalObjectStore(tmp_path / "objects")
    with pytest.raises(ValueError):
        store.put_bytes(".tmp/x", b"1")


def test_symlink_escape_refused(tmp_path):
    root = tmp_path / "objects"
    outside = tmp_path / "outside"
    outside.mkdir()
    store = LocalObjectStore(root)
    os.symlink(outside, root / "evil")
    with pytest.raises(ValueError, match="escapes"):
        store.put_bytes("evil/passwd", b"x")
    with pytest.raises(ValueError):
        store.get_bytes("evil/passwd")
    assert list(outside.iterdir()) == []


def test_move_renames_on_same_device(tmp_path):
    store = LocalObjectStore(tmp_path / "objects")
    src = tmp_path / "in.dcm"
    src.write_bytes(b"abc")
    ino = os.stat(src).st_ino
    store.put_file("s/i.dcm", src, move=True)
    assert not src.exists()
    assert os.stat(store.root / "s" / "i.dcm").st_ino == ino


def test_open_store_local(tmp_path):
    s1 = open_store(str(tmp_path / "a"))
    s2 = open_store((tmp_path / "b").as_uri())
    assert isinstance(s1, LocalObjectStore) and isinstance(s2, LocalObjectStore)
    assert s2.root == tmp_path / "b"
    assert s2.description == (tmp_path / "b").as_uri()
    with pytest.raises(ValueError, match="gopher"):
        open_store("gopher://x/y")


def test_parent_directories_checked_once_still_refuse_escapes(tmp_path):
    root = tmp_path / "objects"
    outside = tmp_path / "outside"
    outside.mkdir()
    store = LocalObjectStore(root)
    store.put_bytes("study/series/1.dcm", b"1")
    store.put_bytes("study/series/2.dcm", b"2")  # the parent's check is remembered now
    src = tmp_path / "in.dcm"
    src.write_bytes(b"3")
    store.put_file("study/series/3.dcm", src, move=True)
    assert [store.get_bytes(f"study/series/{n}.dcm") for n in (1, 2, 3)] == [b"1", b"2", b"3"]
    os.symlink(outside, root / "study" / "evil")
    with pytest.raises(ValueError, match="escapes"):
        store.put_bytes("study/evil/x.dcm", b"x")
    src.write_bytes(b"x")
    with pytest.raises(ValueError, match="escapes"):
        store.put_file("study/evil/x.dcm", src)
    with pytest.raises(ValueError, match="reserved"):
        store.put_bytes(".tmp/x", b"x")
    assert list(outside.iterdir()) == []
    # A symlink that stays inside the root is fine, as before.
    os.symlink(root / "study" / "series", root / "study" / "alias")
    store.put_bytes("study/alias/4.dcm", b"4")
    assert (root / "study" / "series" / "4.dcm").read_bytes() == b"4"
