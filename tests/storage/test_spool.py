"""SpooledObjectStore: local durable spool + background upload to a real SeaweedFS."""

from __future__ import annotations

import collections
import os
import threading
import time

import pytest

from storage import LocalObjectStore, S3ObjectStore, SpooledObjectStore, StorageError, open_store

from s3server import make_s3_store

pytestmark = pytest.mark.s3

FAST = dict(retry_initial=0.1, retry_max=1.0, health_interval=0.2)


def wait_for(predicate, timeout=30.0, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class CountingStore:
    """Delegates to a real store and counts uploads per key (thread-safe)."""

    def __init__(self, inner, counts, lock):
        self.inner = inner
        self.description = inner.description
        self.counts = counts
        self.lock = lock

    def put_file(self, key, path, *, move=False):
        with self.lock:
            self.counts[key] += 1
        self.inner.put_file(key, path, move=move)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def spooled_files(spool_dir):
    ready = spool_dir / "ready"
    return sorted(p.name for p in ready.iterdir()) if ready.exists() else []


def test_spool_drains_everything(s3_server, tmp_path):
    remote = make_s3_store(s3_server)
    remote.check()
    spool_dir = tmp_path / "spool"
    store = SpooledObjectStore(remote, spool_dir, **FAST)
    expected = {}
    for i in range(40):
        key = f"1.2.3/1.2.3.{i % 4}/1.2.3.{i % 4}.{i}.dcm"
        data = os.urandom(1000 + i * 37)
        expected[key] = data
        if i % 3 == 0:
            store.put_bytes(key, data)
        else:
            src = tmp_path / f"in{i}.dcm"
            src.write_bytes(data)
            store.put_file(key, src, move=(i % 3 == 1))
    # Not started yet: everything is pending and served from the spool.
    assert store.pending_count() == 40
    assert store.pending_bytes() == sum(len(d) for d in expected.values())
    key0 = next(iter(expected))
    assert store.get_bytes(key0) == expected[key0]
    assert not remote.exists(key0)

    store.start()
    assert store.drain(60), f"{store.pending_count()} left in the spool"
    assert store.pending_count() == 0
    assert spooled_files(spool_dir) == []
    for key, data in expected.items():
        assert remote.get_bytes(key) == data
        assert store.get_bytes(key) == data  # now served by the remote
    assert sorted(store.list_keys()) == sorted(expected)
    assert store.remote_healthy()
    store.close()


def test_reads_and_delete_while_spooled(s3_server, tmp_path):
    remote = make_s3_store(s3_server)
    remote.check()
    remote.put_bytes("a/remote.dcm", b"remote")
    store = SpooledObjectStore(remote, tmp_path / "spool", **FAST)  # drainer not started
    store.put_bytes("a/spooled.dcm", b"spooled bytes")
    assert store.exists("a/spooled.dcm") and store.size("a/spooled.dcm") == 13
    with store.open("a/spooled.dcm") as f:
        assert f.read() == b"spooled bytes"
    assert b"".join(store.iter_chunks("a/spooled.dcm", 4)) == b"spooled bytes"
    assert store.get_bytes("a/remote.dcm") == b"remote"
    assert sorted(store.list_keys("a/")) == ["a/remote.dcm", "a/spooled.dcm"]
    store.delete("a/spooled.dcm")
    store.delete("a/remote.dcm")
    assert not store.exists("a/spooled.dcm") and not store.exists("a/remote.dcm")
    assert store.pending_count() == 0
    with pytest.raises(ValueError):
        store.put_bytes("../x", b"1")
    store.close()


def test_backlog_limit_refuses(s3_server, tmp_path):
    remote = make_s3_store(s3_server)
    store = SpooledObjectStore(remote, tmp_path / "spool", max_backlog_bytes=1000, **FAST)
    store.put_bytes("a", b"x" * 600)
    with pytest.raises(StorageError, match="full"):
        store.put_bytes("b", b"x" * 600)
    assert store.pending_count() == 1
    store.start()
    assert store.drain(30)
    store.put_bytes("b", b"x" * 600)  # room again
    assert store.drain(30)
    store.close()


def test_outage_keeps_spool_and_restart_resumes(outage_server, tmp_path):
    bucket_store = make_s3_store(outage_server)
    bucket_store.check()
    bucket = bucket_store.bucket
    spool_dir = tmp_path / "spool"
    store = SpooledObjectStore(bucket_store, spool_dir, **FAST)
    store.start()
    store.put_bytes("ok/before.dcm", b"before")
    assert store.drain(30)

    outage_server.stop()
    accepted = {}
    # The drainer has not noticed yet: the first write is accepted into the spool.
    store.put_bytes("out/0.dcm", b"zero")
    accepted["out/0.dcm"] = b"zero"
    wait_for(lambda: not store.remote_healthy(), timeout=20, what="remote marked down")
    assert store.last_failure is not None

    src = tmp_path / "in.dcm"
    src.write_bytes(b"refused")
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="unreachable") as info:
        store.put_file("out/1.dcm", src)
    assert time.monotonic() - t0 < 1
    assert outage_server.secret_key not in str(info.value)
    assert src.read_bytes() == b"refused"  # caller keeps its file

    # Files already spooled stay there while the remote is down (never deleted).
    assert store.pending_count() == 1
    assert store.get_bytes("out/0.dcm") == b"zero"  # still readable from the spool
    store.close()  # "telepacs stops" during the outage
    assert store.pending_count() == 1

    outage_server.start()
    remote2 = make_s3_store(outage_server, bucket)
    store2 = SpooledObjectStore(remote2, spool_dir, **FAST)  # "telepacs restarts"
    store2.start()
    assert store2.drain(60)
    for key, data in accepted.items():
        assert remote2.get_bytes(key) == data
    assert spooled_files(spool_dir) == []
    assert store2.remote_healthy()
    store2.put_file("after/1.dcm", src)  # accepted again
    assert store2.drain(30)
    assert remote2.get_bytes("after/1.dcm") == b"refused"
    store2.close()


def test_accept_while_remote_down(outage_server, tmp_path):
    remote = make_s3_store(outage_server)
    remote.check()
    store = SpooledObjectStore(remote, tmp_path / "spool", accept_while_remote_down=True, **FAST)
    store.start()
    outage_server.stop()
    store.put_bytes("x/0", b"0")
    wait_for(lambda: not store.remote_healthy(), timeout=20, what="remote marked down")
    store.put_bytes("x/1", b"1")  # still accepted
    assert store.pending_count() == 2
    outage_server.start()
    # The drainer notices on its own (health probe) and uploads the backlog.
    assert store.drain(60)
    assert store.remote_healthy()
    assert remote.get_bytes("x/0") == b"0" and remote.get_bytes("x/1") == b"1"
    store.close()


def test_two_drainers_share_one_spool(s3_server, tmp_path):
    remote_a = make_s3_store(s3_server)
    remote_a.check()
    remote_b = make_s3_store(s3_server, remote_a.bucket)
    counts = collections.Counter()
    lock = threading.Lock()
    spool_dir = tmp_path / "spool"
    a = SpooledObjectStore(CountingStore(remote_a, counts, lock), spool_dir, **FAST)
    b = SpooledObjectStore(CountingStore(remote_b, counts, lock), spool_dir, **FAST)
    expected = {}
    # Some backlog before the drainers start, then writes through both while they run.
    for i in range(60):
        key = f"s/{i}.dcm"
        expected[key] = os.urandom(500 + i)
        (a if i % 2 else b).put_bytes(key, expected[key])
    a.start()
    b.start()
    for i in range(60, 120):
        key = f"s/{i}.dcm"
        expected[key] = os.urandom(500 + i)
        (a if i % 2 else b).put_bytes(key, expected[key])
    assert a.drain(60) and b.drain(60)
    assert spooled_files(spool_dir) == []
    assert sorted(remote_a.list_keys("s/")) == sorted(expected)
    for key, data in expected.items():
        assert remote_a.get_bytes(key) == data
    doubles = {k: n for k, n in counts.items() if n != 1}
    assert doubles == {}, f"uploaded more than once: {doubles}"
    assert set(counts) == set(expected)
    a.close()
    b.close()


def test_restart_cleans_stale_temp_files(s3_server, tmp_path):
    remote = make_s3_store(s3_server)
    spool_dir = tmp_path / "spool"
    SpooledObjectStore(remote, spool_dir, **FAST).close()
    stale = spool_dir / "tmp" / ".tmp-crashed"
    stale.write_bytes(b"half")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    store = SpooledObjectStore(make_s3_store(s3_server, remote.bucket), spool_dir, **FAST)
    assert not stale.exists()
    assert store.pending_count() == 0
    store.close()


def test_idle_drainer_is_quiet(tmp_path, monkeypatch):
    store = SpooledObjectStore(LocalObjectStore(tmp_path / "remote"), tmp_path / "spool", **FAST)
    scans = []
    real_scan = store._scan
    monkeypatch.setattr(store, "_scan", lambda: scans.append(1) or real_scan())
    store.start()
    store.put_bytes("k", b"v")
    assert store.drain(10)
    before = len(scans)
    time.sleep(0.5)  # a measurement window, not a wait for readiness
    assert len(scans) - before <= 1, "drainer polls while idle"
    store.put_bytes("k2", b"v2")  # wakes it at once
    assert store.drain(10)
    store.close()


def test_open_store_s3_spooled(s3_server, tmp_path):
    url = s3_server.url("t-openstore")
    plain = open_store(url)
    assert isinstance(plain, S3ObjectStore)
    plain.close()
    assert isinstance(open_store(url + "&spool=false", spool_dir=tmp_path), S3ObjectStore)
    spooled = open_store(url, spool_dir=tmp_path / "spool")
    assert isinstance(spooled, SpooledObjectStore)
    spooled.put_bytes("a/b", b"c")
    assert spooled.drain(30)  # already started
    assert plain.get_bytes("a/b") == b"c"
    spooled.close()


def test_puts_do_not_rescan_the_spool(tmp_path, monkeypatch):
    from storage.spool import _BACKLOG_CACHE_SECONDS

    """A put counts itself into the cached backlog: no directory scan per put while the drainer lags."""
    store = SpooledObjectStore(LocalObjectStore(tmp_path / "remote"), tmp_path / "spool",
                               max_backlog_bytes=10_000, **FAST)  # drainer not started: the spool only grows
    scans = []
    real_scan = store._scan
    monkeypatch.setattr(store, "_scan", lambda: scans.append(1) or real_scan())
    started = time.monotonic()
    for n in range(20):
        store.put_bytes(f"k{n}", b"x" * 400)  # 8,000 bytes in all
    refreshes = int((time.monotonic() - started) / _BACKLOG_CACHE_SECONDS) + 1
    assert len(scans) <= 1 + refreshes < 20  # the first put's count, then one per cache period, not one per put
    assert store.pending_bytes() == 8_000
    with pytest.raises(StorageError, match="full"):
        store.put_bytes("over", b"x" * 2_500)
    store.close()
