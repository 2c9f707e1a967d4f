"""Schema upgrades on the embedded database."""

from __future__ import annotations

import sqlite3

from sqlalchemy import text

from alembic.script import ScriptDirectory

from archive.db import alembic_config, make_engine, upgrade_schema, write_engine
from archive.rawdb import RawConnections


def test_upgrade_gives_sqlite_planner_statistics_once(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    upgrade_schema(engine)
    with engine.connect() as conn:
        tables = {row[0] for row in conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'table'"))}
        assert "sqlite_stat1" in tables  # ANALYZE ran
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == _newest_revision(engine)
    upgrade_schema(engine)  # idempotent
    engine.dispose()


def _newest_revision(engine) -> str:
    return ScriptDirectory.from_config(alembic_config(engine)).get_current_head()


def test_sqlite_write_transactions_take_the_lock_at_begin_and_reads_do_not(tmp_path):
    path = tmp_path / "index.sqlite3"
    engine = make_engine(f"sqlite:///{path}")
    with write_engine(engine).begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    other = sqlite3.connect(path, timeout=0.05, isolation_level=None)

    def other_writer_waits() -> bool:
        try:
            other.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            assert "locked" in str(exc)
            return True
        other.execute("ROLLBACK")
        return False

    with write_engine(engine).begin():
        assert other_writer_waits()  # IMMEDIATE: locked before any statement ran
    raw = RawConnections(engine)
    with raw.transaction():
        assert other_writer_waits()  # the ingest fast path's transactions too
    with engine.begin() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM t").scalar() == 0
        assert not other_writer_waits()  # a read transaction is deferred: writers go on
    other.close()
    raw.close()
    engine.dispose()
