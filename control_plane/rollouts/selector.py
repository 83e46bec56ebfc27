"""A rollout's target selector as SQL over devices ⋈ stores (active devices only).

Groups are matched by their membership now: static groups through `group_members`, dynamic
groups through their saved selector (`control_plane.groups.membership.members_clause`); the
group rows are read once, by `resolve_groups`, before the clause is built.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from control_plane.db.schema import device_tags, devices, groups, stores
from control_plane.groups.membership import members_clause, stored_selector
from control_plane.rollouts.models import Selector


async def resolve_groups(conn: AsyncConnection, selector: Selector) -> sa.ColumnElement[bool] | None:
    """Membership of any of the selector's groups as one clause (None: no groups asked for).
    An unknown group id matches nothing."""
    if not selector.groups:
        return None
    rows = await conn.execute(
        sa.select(groups.c.id, groups.c.kind, groups.c.selector).where(groups.c.id.in_(selector.groups))
    )
    clauses = [members_clause(row.id, stored_selector(row.kind, row.selector)) for row in rows]
    return sa.or_(*clauses) if clauses else sa.false()


def selector_clause(
    selector: Selector, group_membership: sa.ColumnElement[bool] | None = None
) -> sa.ColumnElement[bool]:
    """Every criterion must hold; within one list any value matches. Join `stores` to use it.
    `group_membership` comes from `resolve_groups` when the selector names groups."""
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
        clauses.append(group_membership if group_membership is not None else sa.false())
    return sa.and_(*clauses)


async def targets_query(
    conn: AsyncConnection, selector: Selector
) -> sa.Select[tuple[str, str, str | None, str | None]]:
    """(device_id, store_id, region, role) of every targeted device, by id."""
    return (
        sa.select(devices.c.id, devices.c.store_id, stores.c.region, devices.c.role)
        .join(stores, stores.c.id == devices.c.store_id)
        .where(selector_clause(selector, await resolve_groups(conn, selector)))
        .order_by(devices.c.id)
    )
