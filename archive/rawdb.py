"""Precompiled Core statements on pooled DBAPI connections: the per-instance ingest path.

Receiving an instance runs the same few statements hundreds of times a second
(look the SOP Instance UID up; bump two counters and insert the row). Through
SQLAlchemy each cost far more than the SQL itself: pool checkout, ``Connection``
set-up, the ``begin`` event, the statement cache, result objects; about 1.4 ms of
Python per instance against ~0.2 ms for the commit's fsync. Here a statement is
compiled once per dialect (SQL text, parameter order and the column types' bind
processors, so values are stored exactly as SQLAlchemy stores them) and runs on a
DBAPI connection taken from a small pool of autocommit connections; transactions
are explicit (``BEGIN IMMEDIATE`` on SQLite, as :func:`archive.db.write_engine`
does, ``BEGIN`` on PostgreSQL). SQLite and PostgreSQL run the same code.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable, cast

from sqlalchemy import Engine
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

_IDLE_CONNECTIONS = 8  # kept open between uses; more may be open at once under load


class CompiledStatement:
    """A Core statement compiled for one dialect, with its parameters' bind processors."""

    def __init__(self, stmt: ClauseElement, engine: Engine, column_keys: list[str] | None = None) -> None:
        dialect = engine.dialect
        compiled = cast(SQLCompiler, stmt.compile(dialect=dialect, column_keys=column_keys))
        self.sql: str = compiled.string
        self._order: tuple[str, ...] | None = tuple(compiled.positiontup or ()) if compiled.positional else None
        self._processors: dict[str, Callable[[Any], Any]] = {}
        # Values the statement carries itself, e.g. the 1 of ``num_instances + 1``.
        self._defaults: dict[str, Any] = {name: bind.effective_value for name, bind in compiled.binds.items()
                                          if not bind.required}
        for name, bind in compiled.binds.items():
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                self._processors[name] = processor

    def parameters(self, params: dict[str, Any]) -> Any:
        """The DBAPI parameters (a sequence for positional paramstyles, else a dict)."""
        processors = self._processors
        merged = {**self._defaults, **params} if self._defaults else params
        processed = {name: processors[name](value) if name in processors else value for name, value in merged.items()}
        if self._order is not None:
            return [processed[name] for name in self._order]
        return processed


def fetch_all(conn: Any, sql: str, args: Any) -> list[Any]:
    """Every row of ``sql`` run with ``args`` on a DBAPI connection (its cursor closed after)."""
    cur = conn.cursor()
    try:
        cur.execute(sql, args)
        return list(cur.fetchall())
    finally:
        cur.close()


class RawConnections:
    """A small pool of autocommit DBAPI connections of ``engine`` (its connect events run on each).

    A connection that raised a database error is closed, never returned to the pool.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dbapi: Any = engine.dialect.loaded_dbapi
        self._sqlite = engine.dialect.name == "sqlite"
        self._begin = "BEGIN IMMEDIATE" if self._sqlite else "BEGIN"
        self._idle: list[Any] = []
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._compiled: dict[int, tuple[ClauseElement, CompiledStatement]] = {}

    def statement(self, stmt: ClauseElement, column_keys: list[str] | None = None) -> CompiledStatement:
        """``stmt`` compiled (once, for statements that live as long as the process)."""
        found = self._compiled.get(id(stmt))
        if found is None or found[0] is not stmt:
            found = (stmt, CompiledStatement(stmt, self.engine, column_keys))
            self._compiled[id(stmt)] = found
        return found[1]

    def _open(self) -> Any:
        pooled = self.engine.raw_connection()
        conn: Any = pooled.driver_connection
        pooled.detach()  # ours, not counted against the engine's pool
        if not self._sqlite:
            conn.rollback()  # end whatever the pool's checkout began, so autocommit may be set
            conn.autocommit = True  # transactions are explicit: BEGIN ... COMMIT
        return conn

    def _take(self) -> tuple[Any, bool]:
        with self._lock:
            if self._pid != os.getpid():
                # A forked child must not talk over its parent's connections (nor close them).
                self._idle, self._pid = [], os.getpid()
            if self._idle:
                return self._idle.pop(), True
        return self._open(), False

    def _give_back(self, conn: Any) -> None:
        with self._lock:
            if len(self._idle) < _IDLE_CONNECTIONS:
                self._idle.append(conn)
                return
        self._close(conn)

    def _close(self, conn: Any) -> None:
        try:
            conn.close()
        except self.dbapi.Error:
            pass

    def fetch(self, stmt: ClauseElement, params: dict[str, Any]) -> list[Any]:
        """The rows of a read-only statement, run outside any transaction (the committed state)."""
        compiled = self.statement(stmt)
        args = compiled.parameters(params)
        conn, pooled = self._take()
        try:
            try:
                rows = fetch_all(conn, compiled.sql, args)
            except self.dbapi.OperationalError:
                if not (pooled and self._is_dead(conn)):
                    raise
                self._close(conn)  # died while idle (server restarted): once more on a fresh one
                conn = self._open()
                rows = fetch_all(conn, compiled.sql, args)
        except BaseException:
            self._close(conn)
            raise
        self._give_back(conn)
        return rows

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """A cursor inside ``BEGIN`` … ``COMMIT``; an exception rolls back (and drops the connection)."""
        conn, pooled = self._take()
        try:
            cur = conn.cursor()
            try:
                cur.execute(self._begin)
            except self.dbapi.OperationalError:
                if not (pooled and self._is_dead(conn)):
                    raise
                self._close(conn)  # died while idle: begin once more on a fresh one
                conn, pooled = self._open(), False
                cur = conn.cursor()
                cur.execute(self._begin)
            try:
                yield cur
                cur.execute("COMMIT")
            except BaseException:
                self._rollback(conn)
                raise
            finally:
                cur.close()
        except BaseException:
            self._close(conn)
            raise
        self._give_back(conn)

    def _rollback(self, conn: Any) -> None:
        try:
            conn.cursor().execute("ROLLBACK")
        except self.dbapi.Error:
            pass

    def _is_dead(self, conn: Any) -> bool:
        if self._sqlite:
            return False  # a file does not go away under an open connection
        return bool(conn.closed or getattr(conn, "broken", False))

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            self._close(conn)
