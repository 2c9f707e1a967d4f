"""The per-instance ingest path's shortcuts keep the guarantees: incoming names, the DBAPI fast path."""

from __future__ import annotations

import os
import stat
import threading
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select, text

from archive.dataset import parse_instance
from archive.db import make_engine
from archive.index import CatalogIndex, ConcurrentInsert, Source, StoredObject, _BUMP_STUDY
from archive.models import Instance, Series, Study, utcnow
from archive.service import Archive
from helpers import MR_STUDY_DIR, dicom_files, make_settings

SRC = Source("import")
SERIES_DIR = MR_STUDY_DIR / "3D_Ax_T1_MP_RAGE_R22"


def ingest_path(archive: Archive, path: Path):
    with open(path, "rb") as f:
        return archive.ingest_stream(f, SRC, name=path.name)


def count_full_path_records(index: CatalogIndex, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make ``index._record`` (the ORM path) note the series of each instance it records."""
    calls: list[str] = []
    full_path = index._record

    def spy(s, p, *args, **kwargs):
        calls.append(p.series_uid)
        return full_path(s, p, *args, **kwargs)

    monkeypatch.setattr(index, "_record", spy)
    return calls


def test_incoming_paths_are_unique_across_threads(sqlite_archive):
    names: list[list[Path]] = [[] for _ in range(8)]

    def take(out: list[Path]) -> None:
        for _ in range(250):
            out.append(sqlite_archive.new_incoming_path())

    threads = [threading.Thread(target=take, args=(out,)) for out in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    paths = [p for out in names for p in out]
    assert len(paths) == 2000
    assert len(set(paths)) == 2000
    for path in paths:
        assert path.parent == sqlite_archive.settings.incoming_dir
        assert path.name.startswith(f"in-{os.getpid()}-") and path.suffix == ".dcm"
        info = path.stat()
        assert info.st_size == 0
        assert stat.S_IMODE(info.st_mode) == 0o600  # as tempfile.mkstemp made them


def test_incoming_path_never_reuses_an_existing_file(sqlite_archive, monkeypatch):
    incoming = sqlite_archive.settings.incoming_dir
    leftover = incoming / "in-1-cafe-0.dcm"
    leftover.write_bytes(b"left by a crashed process that had the same pid and token")
    offered = iter(["in-1-cafe-0.dcm", "in-1-cafe-1.dcm"])
    monkeypatch.setattr(sqlite_archive._incoming_names, "next", lambda suffix: next(offered))
    path = sqlite_archive.new_incoming_path()
    assert path == incoming / "in-1-cafe-1.dcm"
    assert leftover.read_bytes() == b"left by a crashed process that had the same pid and token"


def test_fast_path_rows_equal_full_path_rows(archive, monkeypatch):
    files = dicom_files(SERIES_DIR)[:4]
    full_path = count_full_path_records(archive.index, monkeypatch)
    for path in files:
        ingest_path(archive, path)
    series_uid = parse_instance(files[0]).series_uid
    assert full_path == [series_uid]  # the first instance only: the others took the fast path
    with archive.index.session() as s:
        rows = s.scalars(select(Instance).order_by(Instance.id)).all()
        assert s.scalar(select(Series)).num_instances == 4
        assert s.scalar(select(Study)).num_instances == 4
    assert len(rows) == 4
    first = rows[0]
    for row, path in zip(rows, files):
        parsed = parse_instance(path)
        assert row.sop_instance_uid == parsed.sop_instance_uid
        assert row.display == parsed.display  # JSON written as SQLAlchemy writes it, read back alike
        assert row.slice_position == pytest.approx(parsed.slice_position)
        assert (row.instance_number, row.rows, row.columns) == (parsed.instance_number, parsed.rows, parsed.columns)
        assert row.series_fk == first.series_fk
        assert row.received_via == "import"
        assert type(row.received_at) is type(first.received_at)
        assert row.received_at.tzinfo == first.received_at.tzinfo
        assert row.received_at >= first.received_at


def test_same_instance_twice_on_the_fast_path_is_a_concurrent_insert(archive):
    first, second = dicom_files(SERIES_DIR)[:2]
    ingest_path(archive, first)  # the series is now known: record_instance takes the fast path
    parsed = parse_instance(second)
    stored = StoredObject("k/k/k.dcm", 1, "c" * 64, "d" * 64)
    archive.index.record_instance(parsed, stored, SRC)
    with pytest.raises(ConcurrentInsert):
        archive.index.record_instance(parsed, stored, SRC)
    assert archive.index.counts()["instances"] == 2
    with archive.index.session() as s:
        assert s.scalar(select(Series)).num_instances == 2  # the failed insert's counter bumps rolled back


def test_a_failed_transaction_rolls_back_and_leaves_the_pool(archive):
    ingest_path(archive, dicom_files(SERIES_DIR)[0])
    raw = archive.index._raw
    with archive.index.session() as s:
        study_id = s.scalar(select(Study.id))
    bump = raw.statement(_BUMP_STUDY)
    idle_before = len(raw._idle)
    with pytest.raises(RuntimeError, match="stop here"):
        with raw.transaction() as cur:
            cur.execute(bump.sql, bump.parameters({"b_study": study_id, "b_now": utcnow()}))
            assert cur.rowcount == 1
            raise RuntimeError("stop here")
    assert len(raw._idle) <= idle_before  # the connection was closed, not pooled again
    with archive.index.session() as s:
        assert s.scalar(select(Study.num_instances)) == 1


def test_ingest_after_the_index_connections_were_killed(tmp_path, pg_server):
    """PostgreSQL ends idle connections on a restart or failover: the next ingest opens fresh ones."""
    db_url = pg_server.create_database("t" + uuid.uuid4().hex[:12])
    arc = Archive.open(make_settings(tmp_path, db_url=db_url))
    try:
        files = dicom_files(SERIES_DIR)[:3]
        ingest_path(arc, files[0])
        ingest_path(arc, files[1])  # leaves pooled DBAPI connections behind (lookup and fast path)
        assert arc.index._raw._idle
        admin = make_engine(db_url)
        with admin.connect() as conn:
            killed = conn.execute(text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()")).scalar()
        admin.dispose()
        assert killed >= 1
        ingest_path(arc, files[2])
        assert arc.index.counts()["instances"] == 3
    finally:
        arc.close()


def test_fast_path_sqlite_connections_commit_durably(sqlite_archive):
    """The pooled connections get the engine's connect settings: WAL, synchronous=FULL, busy timeout."""
    raw = sqlite_archive.index._raw
    with raw.transaction() as cur:
        cur.execute("PRAGMA synchronous")
        assert cur.fetchone()[0] == 2  # FULL: a commit is on disk when it returns
        cur.execute("PRAGMA journal_mode")
        assert cur.fetchone()[0] == "wal"
        cur.execute("PRAGMA busy_timeout")
        assert cur.fetchone()[0] == 30000


def test_a_forked_child_opens_its_own_connections(sqlite_archive):
    raw = sqlite_archive.index._raw
    ingest_path(sqlite_archive, dicom_files(SERIES_DIR)[0])
    assert raw._idle  # the parent keeps pooled connections
    parent_idle = list(raw._idle)
    pid = os.fork()
    if pid == 0:  # the child: must not take one of its parent's connections
        code = 1
        try:
            conn, pooled = raw._take()
            code = 0 if not pooled and all(conn is not c for c in parent_idle) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert raw._idle == parent_idle  # and the parent's pool is as it was
