"""Alembic environment: migrations run on the connection telepacs hands over (see archive.db)."""

from __future__ import annotations

from alembic import context

from archive.models import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through archive.db.upgrade_schema(), which passes a connection")

context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
