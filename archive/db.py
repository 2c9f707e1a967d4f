"""Database engine and sessions: SQLite (WAL) embedded, PostgreSQL by DSN, the same schema on both."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

_MIGRATIONS = Path(__file__).parent / "migrations"
# Execution option marking a connection used for writes (see write_engine()).
WRITE_OPTION = "telepacs_write"


def write_engine(engine: Engine) -> Engine:
    """The same engine, marked so that SQLite transactions on it begin IMMEDIATE."""
    return engine.execution_options(**{WRITE_OPTION: True})


def normalise_db_url(url: str) -> str:
    """Accept ``postgresql://`` and ``postgres://`` and use the psycopg 3 driver for them."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def describe_db_url(url: str) -> str:
    """The URL without its password, for logs."""
    return make_url(normalise_db_url(url)).render_as_string(hide_password=True)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take over transaction control from the sqlite3 module so BEGIN is ours.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk when it returns (a C-STORE success depends on it).
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Write transactions take the lock up front (IMMEDIATE): concurrent
        # ingesters queue on busy_timeout instead of failing when a read
        # transaction upgrades. Reads stay deferred and never block writers (WAL).
        # Straight on the DBAPI connection: exec_driver_sql ran the whole statement machinery
        # (execution context, cursor events) for every transaction of every request.
        begin = "BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE_OPTION) else "BEGIN"
        conn.connection.dbapi_connection.execute(begin)


def load_json(text: str | bytes) -> Any:
    """The JSON columns' reader: orjson (several times faster on a 300-instance series listing), with the
    standard library for what orjson refuses (NaN and Infinity, which ``json.dumps`` writes)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def make_engine(url: str, *, echo: bool = False) -> Engine:
    url = normalise_db_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, echo=echo, json_deserializer=load_json,
                               connect_args={"check_same_thread": False, "timeout": 30})
        _configure_sqlite(engine)
        return engine
    return create_engine(url, echo=echo, pool_pre_ping=True, pool_size=5, max_overflow=10, json_deserializer=load_json,
                         connect_args={"options": f"-c random_page_cost={POSTGRES_RANDOM_PAGE_COST} "
                                                  "-c cursor_tuple_fraction=1"})


# PostgreSQL's default random_page_cost (4) assumes spinning disks. The index lives on SSD or in
# memory, where an index probe costs about as much as a sequential read: with 4, the planner
# hashed 22,000 patients or scanned all 100,000 studies for a name prefix matching a few dozen
# (QIDO p95 60-90 ms at 1M instances); with 1.1 (the usual SSD setting) it probes the indexes
# (p95 under 20 ms). Set for telepacs' sessions only, at connection start.
POSTGRES_RANDOM_PAGE_COST = 1.1
# Query answers are streamed through server-side cursors (yield_per), which PostgreSQL plans to
# return the first tenth of the rows fastest (cursor_tuple_fraction 0.1): for "TRAN* + a month +
# a modality" at 1M instances it walked the studies in id order to skip the sort, 35-57 ms, where
# the plan for the whole answer (date index, then patients and series probed) takes 12 ms. Every
# answer is read to the end (C-FIND, QIDO), so plan for all of it (also at connection start).


if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig


def alembic_config(engine: Engine) -> AlembicConfig:
    # Alembic is imported only here: the receiving workers never migrate, and it costs ~10 MB each.
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade_schema(engine: Engine) -> None:
    """Bring the schema to the newest migration (idempotent)."""
    with write_engine(engine).begin() as conn:
        cfg = alembic_config(engine)
        cfg.attributes["connection"] = conn
        from alembic import command

        command.upgrade(cfg, "head")
    if engine.dialect.name == "sqlite":
        # Give the planner statistics once (the indexes of migration 0002 are chosen with them);
        # PostgreSQL's autovacuum does this by itself. After a large import, `ANALYZE` again (README).
        with write_engine(engine).begin() as conn:
            analyzed = conn.exec_driver_sql(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sqlite_stat1'").first()
            if analyzed is None:
                conn.exec_driver_sql("ANALYZE")
