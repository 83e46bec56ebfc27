"""Device tags: free labels operators filter on and dynamic groups select by.

A tag change can move a device into or out of a dynamic group, and so change its effective
configuration: every change asks the desired-state publisher to re-evaluate the device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from control_plane.audit import AuditEvent, AuditLog, Outcome
from control_plane.db.schema import device_tags, devices
from control_plane.desired.publisher import DesiredStatePublisher
from control_plane.devices.models import MAX_TAGS
from control_plane.errors import InvalidInput, NotFound

# The new tag set, given the current one.
_Compute = Callable[[set[str]], set[str]]


class DeviceTags:
    def __init__(self, *, engine: AsyncEngine, publisher: DesiredStatePublisher, audit: AuditLog) -> None:
        self._engine = engine
        self._publisher = publisher
        self._audit = audit

    async def replace(self, device_id: str, tags: Iterable[str], *, actor: str) -> list[str]:
        """Make the device's tags exactly `tags`; returns them sorted."""
        wanted = set(tags)
        return await self._change(device_id, actor, lambda _current: wanted)

    async def change(
        self, device_id: str, *, add: Iterable[str], remove: Iterable[str], actor: str
    ) -> list[str]:
        """Remove, then add, against the tags the device has at that moment; returns them sorted."""
        added, removed = set(add), set(remove)
        return await self._change(device_id, actor, lambda current: (current - removed) | added)

    async def _change(self, device_id: str, actor: str, compute: _Compute) -> list[str]:
        async with self._engine.begin() as conn:
            current = await self._lock_and_read(conn, device_id)
            new = compute(current)
            if len(new) > MAX_TAGS:
                raise InvalidInput(
                    f"field 'tags': a device carries at most {MAX_TAGS} tags ({len(new)} asked)"
                )
            added, removed = sorted(new - current), sorted(current - new)
            if removed:
                await conn.execute(
                    sa.delete(device_tags).where(
                        device_tags.c.device_id == device_id, device_tags.c.tag.in_(removed)
                    )
                )
            if added:
                await conn.execute(device_tags.insert(), [{"device_id": device_id, "tag": t} for t in added])
            if added or removed:
                await self._audit.record(
                    AuditEvent(
                        action="device.tags",
                        outcome=Outcome.SUCCESS,
                        actor=actor,
                        target=device_id,
                        detail={"added": added, "removed": removed},
                    ),
                    connection=conn,
                )
        if added or removed:
            # Dynamic groups selecting on tags may take the device in or let it go.
            self._publisher.request_refresh([device_id])
        return sorted(new)

    async def _lock_and_read(self, conn: AsyncConnection, device_id: str) -> set[str]:
        # The row lock (PostgreSQL; SQLite has one writer anyway) orders concurrent edits of
        # one device's tags, so a PATCH never works from a stale read.
        found = await conn.scalar(sa.select(devices.c.id).where(devices.c.id == device_id).with_for_update())
        if found is None:
            raise NotFound(f"device {device_id!r} does not exist", code="device_not_found")
        rows = await conn.execute(sa.select(device_tags.c.tag).where(device_tags.c.device_id == device_id))
        return {tag for (tag,) in rows}
