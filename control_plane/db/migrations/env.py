"""Alembic environment: runs on the connection handed over by `control_plane.db.engine.migrate`."""

from __future__ import annotations

from alembic import context

from control_plane.db.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through control_plane.db.engine.migrate (storefleet serve does)")

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
