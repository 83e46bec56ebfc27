"""Gather every configuration layer that applies to each device, lowest first.

    platform defaults
    → template (its version's template-wide layer)        source "template:<id>@<version>"
    → template role (the layer for the device's role)     source "role:<role>@<template>@<version>"
    → store                                               source "store:<id>"
    → groups, by (priority, id)                           source "group:<id>"
    → device overrides                                    source "device:<id>"
    → releases in force (rollouts), by seq                source "release:<id>"

One query for the devices with their store, one for the template versions in use, one
(chunked) for group memberships: a refresh of ten thousand devices costs a handful of
queries, not one per device. Store and release layers are read once per store and per
release, not once per device row: decoding the same JSON ten thousand times was a third of
the assembly, and every device of a store shares one layer object (the publisher memoises
the merge per layer stack).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from control_plane.db.schema import device_releases, devices, releases, stores, template_versions
from control_plane.groups.membership import group_layers_for

Layer = Mapping[str, Any]

# IN lists of store and release ids stay under SQLite's historical 999 bound parameters.
_ID_CHUNK = 900


@dataclass(slots=True)
class DeviceLayers:
    device_id: str
    store_id: str
    role: str | None
    desired_version: int
    desired_hash: str | None
    layers: list[tuple[str, Layer]] = field(default_factory=list)


async def assemble(conn: AsyncConnection, which: sa.ColumnElement[bool]) -> list[DeviceLayers]:
    """The layers of every active device matching `which`."""
    rows = (
        await conn.execute(
            sa.select(
                devices.c.id,
                devices.c.store_id,
                devices.c.role,
                devices.c.desired_version,
                devices.c.desired_hash,
                devices.c.overrides,
                stores.c.template_id,
                stores.c.template_version,
            )
            .join(stores, stores.c.id == devices.c.store_id)
            .where(which, devices.c.state == "active")
            .order_by(devices.c.id)
        )
    ).all()
    if not rows:
        return []
    specs = await _template_specs(conn, {(r.template_id, r.template_version) for r in rows if r.template_id})
    store_layers = await _store_layers(conn, sorted({r.store_id for r in rows}))
    memberships = await group_layers_for(conn, [r.id for r in rows])
    released = await release_layers_for(conn, [r.id for r in rows])
    assembled: list[DeviceLayers] = []
    for row in rows:
        item = DeviceLayers(row.id, row.store_id, row.role, row.desired_version, row.desired_hash)
        spec = specs.get((row.template_id, row.template_version)) if row.template_id else None
        if spec is not None:
            template = f"{row.template_id}@{row.template_version}"
            if spec.get("layer"):
                item.layers.append((f"template:{template}", spec["layer"]))
            role_layer = (spec.get("roles") or {}).get(row.role) if row.role else None
            if role_layer:
                item.layers.append((f"role:{row.role}@{template}", role_layer))
        store_layer = store_layers.get(row.store_id)
        if store_layer:
            item.layers.append((f"store:{row.store_id}", store_layer))
        for group in memberships.get(row.id, ()):
            item.layers.append((f"group:{group.group_id}", group.layer))
        if row.overrides:
            item.layers.append((f"device:{row.id}", row.overrides))
        item.layers.extend(released.get(row.id, ()))
        assembled.append(item)
    return assembled


async def release_layers_for(
    conn: AsyncConnection, device_ids: list[str]
) -> dict[str, list[tuple[str, Layer]]]:
    """The rollout release layers in force on each device, in `seq` order (chunked IN lists)."""
    in_force: list[tuple[str, str]] = []
    for start in range(0, len(device_ids), 5000):
        chunk = device_ids[start : start + 5000]
        rows = await conn.execute(
            sa.select(device_releases.c.device_id, device_releases.c.release_id)
            .where(device_releases.c.device_id.in_(chunk))
            .order_by(device_releases.c.device_id, device_releases.c.seq, device_releases.c.rollout_id)
        )
        in_force.extend((row.device_id, row.release_id) for row in rows)
    # A wave puts one release on thousands of devices: read each release's layer once.
    wanted = sorted({release_id for _, release_id in in_force})
    layers: dict[str, Layer] = {}
    for start in range(0, len(wanted), _ID_CHUNK):
        rows = await conn.execute(
            sa.select(releases.c.id, releases.c.layer).where(
                releases.c.id.in_(wanted[start : start + _ID_CHUNK])
            )
        )
        layers.update((row.id, row.layer) for row in rows)
    found: dict[str, list[tuple[str, Layer]]] = {}
    for device_id, release_id in in_force:
        found.setdefault(device_id, []).append((f"release:{release_id}", layers[release_id]))
    return found


async def _store_layers(conn: AsyncConnection, store_ids: list[str]) -> dict[str, Layer]:
    found: dict[str, Layer] = {}
    for start in range(0, len(store_ids), _ID_CHUNK):
        rows = await conn.execute(
            sa.select(stores.c.id, stores.c.config).where(
                stores.c.id.in_(store_ids[start : start + _ID_CHUNK])
            )
        )
        found.update((row.id, row.config) for row in rows)
    return found


async def _template_specs(
    conn: AsyncConnection, wanted: set[tuple[str, int]]
) -> dict[tuple[str, int], dict[str, Any]]:
    if not wanted:
        return {}
    # A fleet uses a handful of template versions: one OR of pairs is portable and small.
    rows = await conn.execute(
        sa.select(
            template_versions.c.template_id, template_versions.c.version, template_versions.c.spec
        ).where(
            sa.or_(
                *(
                    sa.and_(template_versions.c.template_id == tid, template_versions.c.version == version)
                    for tid, version in sorted(wanted)
                )
            )
        )
    )
    return {(row.template_id, row.version): row.spec or {} for row in rows}
