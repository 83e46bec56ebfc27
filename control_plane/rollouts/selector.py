"""A rollout's target selector as SQL over devices ⋈ stores (active devices only).

Groups are matched through `group_members` (static membership; a dynamic group counts
the members materialized there).
"""

from __future__ import annotations

import sqlalchemy as sa

from control_plane.db.schema import device_tags, devices, group_members, stores
from control_plane.rollouts.models import Selector


def selector_clause(selector: Selector) -> sa.ColumnElement[bool]:
    """Every criterion must hold; within one list any value matches. Join `stores` to use it."""
    clauses: list[sa.ColumnElement[bool]] = [devices.c.state == "active"]
    if selector.stores:
        clauses.append(devices.c.store_id.in_(selector.stores))
    if selector.regions:
        clauses.append(stores.c.region.in_(selector.regions))
    if selector.roles:
        clauses.append(devices.c.role.in_(selector.roles))
    if selector.devices:
        clauses.append(devices.c.id.in_(selector.devices))
    if selector.tags:
        clauses.append(
            devices.c.id.in_(sa.select(device_tags.c.device_id).where(device_tags.c.tag.in_(selector.tags)))
        )
    if selector.groups:
        clauses.append(
            devices.c.id.in_(
                sa.select(group_members.c.device_id).where(group_members.c.group_id.in_(selector.groups))
            )
        )
    return sa.and_(*clauses)


def targets_query(selector: Selector) -> sa.Select[tuple[str, str, str | None, str | None]]:
    """(device_id, store_id, region, role) of every targeted device, by id."""
    return (
        sa.select(devices.c.id, devices.c.store_id, stores.c.region, devices.c.role)
        .join(stores, stores.c.id == devices.c.store_id)
        .where(selector_clause(selector))
        .order_by(devices.c.id)
    )
