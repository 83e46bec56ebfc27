"""Inventory test data: a migrated database, and device rows written directly.

Enrolling real agents proves the device path; listing, paging and group membership need
hundreds or thousands of devices with chosen attributes (equal enrolment times, tags,
never-seen devices), which only direct rows give in seconds. Rows are written the way
enrollment and ingest write them (same table, same columns).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from control_plane.db.engine import create_engine, migrate
from control_plane.db.schema import device_tags, devices, stores
from tests.support.postgres import fresh_database

T0 = datetime(2026, 1, 1, 8, 0, tzinfo=UTC)


@contextlib.asynccontextmanager
async def migrated_engine(kind: str, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """An engine on a fresh, migrated SQLite file or PostgreSQL database."""
    async with contextlib.AsyncExitStack() as stack:
        if kind == "sqlite":
            url = f"sqlite+aiosqlite:///{tmp_path / 'inventory.sqlite'}"
        else:
            url = await stack.enter_async_context(fresh_database())
        engine = create_engine(url)
        try:
            await migrate(engine)
            yield engine
        finally:
            await engine.dispose()


async def insert_stores(engine: AsyncEngine, store_ids: Iterable[str]) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            stores.insert(),
            [
                {
                    "id": s,
                    "name": s,
                    "timezone": "UTC",
                    "config": {"config": {}, "policies": {}},
                    "created_at": T0,
                    "updated_at": T0,
                }
                for s in store_ids
            ],
        )


def device_row(device_id: str, store_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": device_id,
        "store_id": store_id,
        "role": "pos",
        "model": "POS-T1",
        "serial": f"SN-{device_id}",
        "os": "Debian 12",
        "hostname": f"host-{device_id}",
        "agent_version": "1.0.0",
        "enrolled_at": T0,
        "first_seen_at": None,
        "last_seen_at": None,
        "online": False,
        "desired_version": 0,
        "applied_version": 0,
        "apply_status": None,
        "health_status": "unknown",
        "state": "active",
        **fields,
    }


async def insert_devices(
    engine: AsyncEngine, rows: list[dict[str, Any]], tags: dict[str, list[str]] | None = None
) -> None:
    async with engine.begin() as conn:
        await conn.execute(devices.insert(), rows)  # device_row gives every row the same keys
        tag_rows = [{"device_id": d, "tag": t} for d, ts in (tags or {}).items() for t in ts]
        if tag_rows:
            await conn.execute(device_tags.insert(), tag_rows)
