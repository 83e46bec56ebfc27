"""Which groups a device belongs to, for the layered configuration.

(Static membership only; dynamic selectors arrive with the inventory work.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from control_plane.db.schema import group_members, groups

_CHUNK = 900  # SQLite's bound-parameter limit, with room to spare


@dataclass(frozen=True, slots=True)
class GroupLayer:
    group_id: str
    priority: int
    layer: dict[str, Any]


async def group_layers_for(conn: AsyncConnection, device_ids: Sequence[str]) -> dict[str, list[GroupLayer]]:
    """For each device id, the layers of its groups ordered by (priority, group id)."""
    found: dict[str, list[GroupLayer]] = {}
    for start in range(0, len(device_ids), _CHUNK):
        chunk = list(device_ids[start : start + _CHUNK])
        rows = await conn.execute(
            sa.select(group_members.c.device_id, groups.c.id, groups.c.priority, groups.c.layer)
            .join(groups, groups.c.id == group_members.c.group_id)
            .where(group_members.c.device_id.in_(chunk))
        )
        for row in rows:
            found.setdefault(row.device_id, []).append(GroupLayer(row.id, row.priority, row.layer or {}))
    for layers in found.values():
        layers.sort(key=lambda g: (g.priority, g.group_id))
    return found
