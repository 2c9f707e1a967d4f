"""Schema upgrades on the embedded database."""

from __future__ import annotations

from sqlalchemy import text

from alembic.script import ScriptDirectory

from archive.db import alembic_config, make_engine, upgrade_schema


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
