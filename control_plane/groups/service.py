"""Group rules: create, change under optimistic locking, membership, delete.

Every change that can alter a device's effective configuration asks the desired-state
publisher to re-evaluate the devices concerned (after the commit): the members of a group
whose layer, priority or existence changed; old and new members when a selector changes;
the devices added to or removed from a static group. The publisher issues a new version
only where the merged content actually changed.

Writes with an expected revision (If-Match) put the revision in the UPDATE's WHERE clause,
so of two writers holding the same ETag exactly one wins and the other gets 412.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from control_plane.api.preconditions import etag_for
from control_plane.audit import AuditEvent, AuditLog, Outcome
from control_plane.clock import Clock, utc_now
from control_plane.db.schema import devices, group_members, groups
from control_plane.desired.layers import ConfigLayer
from control_plane.desired.publisher import DesiredStatePublisher
from control_plane.devices.filters import GroupSelector
from control_plane.errors import Conflict, InvalidInput, NotFound, PreconditionFailed
from control_plane.groups.membership import members_clause, stored_selector
from control_plane.groups.models import GroupCreate, GroupKind, GroupUpdate, GroupView

ACTIVE = devices.c.state == "active"


class GroupService:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        publisher: DesiredStatePublisher,
        audit: AuditLog,
        clock: Clock = utc_now,
    ) -> None:
        self._engine = engine
        self._publisher = publisher
        self._audit = audit
        self._clock = clock

    # --- reading ---------------------------------------------------------------------

    async def get(self, group_id: str) -> GroupView:
        async with self._engine.connect() as conn:
            row = await self._row(conn, group_id)
            return await self._view(conn, row)

    async def list_groups(self) -> list[GroupView]:
        """Every group in layer order (priority, then id)."""
        async with self._engine.connect() as conn:
            rows = (await conn.execute(sa.select(groups).order_by(groups.c.priority, groups.c.id))).all()
            return [await self._view(conn, row) for row in rows]

    async def members_clause(self, group_id: str) -> sa.ColumnElement[bool]:
        """The group's members as a WHERE clause over `devices`, for the inventory listing."""
        async with self._engine.connect() as conn:
            row = await self._row(conn, group_id)
        return members_clause(row.id, stored_selector(row.kind, row.selector))

    # --- writing ---------------------------------------------------------------------

    async def create(self, spec: GroupCreate, *, actor: str) -> GroupView:
        now = self._clock()
        try:
            async with self._engine.begin() as conn:
                await conn.execute(
                    groups.insert().values(
                        id=spec.id,
                        name=spec.name,
                        kind=spec.kind.value,
                        selector=_selector_json(spec.selector),
                        layer=spec.layer.as_layer(),
                        priority=spec.priority,
                        revision=1,
                        created_at=now,
                        updated_at=now,
                    )
                )
                await self._record(conn, "group.create", actor, spec.id, kind=spec.kind.value)
                affected = await self._member_ids(conn, spec.id, spec.selector)
        except IntegrityError:
            raise Conflict(f"group {spec.id!r} already exists", code="group_exists") from None
        self._refresh(affected)
        return await self.get(spec.id)

    async def set_layer(
        self, group_id: str, layer: ConfigLayer, *, expected_revision: int | None, actor: str
    ) -> GroupView:
        """Replace the group's configuration layer; its members get new versions where it matters."""
        async with self._engine.begin() as conn:
            row = await self._update(conn, group_id, expected_revision, layer=layer.as_layer())
            await self._record(conn, "group.set_layer", actor, group_id, revision=row.revision + 1)
            affected = await self._member_ids(conn, group_id, stored_selector(row.kind, row.selector))
        self._refresh(affected)
        return await self.get(group_id)

    async def set_selector(
        self, group_id: str, selector: GroupSelector, *, expected_revision: int | None, actor: str
    ) -> GroupView:
        """Replace a dynamic group's selector; devices that join or leave are re-evaluated."""
        async with self._engine.begin() as conn:
            current = await self._row(conn, group_id)
            if current.kind != GroupKind.DYNAMIC:
                raise Conflict(
                    f"group {group_id!r} is static: it has members, not a selector", code="group_static"
                )
            before = await self._member_ids(conn, group_id, stored_selector(current.kind, current.selector))
            row = await self._update(conn, group_id, expected_revision, selector=_selector_json(selector))
            await self._record(
                conn,
                "group.set_selector",
                actor,
                group_id,
                revision=row.revision + 1,
                selector=_selector_json(selector),
            )
            after = await self._member_ids(conn, group_id, selector)
        # Joining and leaving devices change; those in both keep the same layers in the same order.
        self._refresh(before ^ after)
        return await self.get(group_id)

    async def update(
        self, group_id: str, change: GroupUpdate, *, expected_revision: int | None, actor: str
    ) -> GroupView:
        values = change.model_dump(exclude_none=True)
        if not values:
            raise InvalidInput("give at least one of 'name', 'priority'")
        async with self._engine.begin() as conn:
            row = await self._update(conn, group_id, expected_revision, **values)
            await self._record(conn, "group.update", actor, group_id, revision=row.revision + 1, **values)
            affected: set[str] = set()
            if "priority" in values and values["priority"] != row.priority:
                # The order of layers may change for the members.
                affected = await self._member_ids(conn, group_id, stored_selector(row.kind, row.selector))
        self._refresh(affected)
        return await self.get(group_id)

    async def add_members(self, group_id: str, device_ids: Sequence[str], *, actor: str) -> GroupView:
        """Add devices to a static group (devices already in it are left alone)."""
        wanted = list(dict.fromkeys(device_ids))
        try:
            async with self._engine.begin() as conn:
                await self._static_row(conn, group_id)
                known = set(await conn.scalars(sa.select(devices.c.id).where(devices.c.id.in_(wanted))))
                unknown = [d for d in wanted if d not in known]
                if unknown:
                    raise InvalidInput(
                        f"field 'device_ids': no such devices: {', '.join(unknown[:10])}"
                        + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""),
                        code="device_not_found",
                    )
                present = set(
                    await conn.scalars(
                        sa.select(group_members.c.device_id).where(
                            group_members.c.group_id == group_id, group_members.c.device_id.in_(wanted)
                        )
                    )
                )
                added = [d for d in wanted if d not in present]
                if added:
                    now = self._clock()
                    await conn.execute(
                        group_members.insert(),
                        [{"group_id": group_id, "device_id": d, "added_at": now} for d in added],
                    )
                    await self._record(conn, "group.add_members", actor, group_id, device_ids=added)
        except IntegrityError:
            raise Conflict(
                "the group's members changed meanwhile; try again", code="concurrent_change"
            ) from None
        self._refresh(added)
        return await self.get(group_id)

    async def remove_member(self, group_id: str, device_id: str, *, actor: str) -> None:
        async with self._engine.begin() as conn:
            await self._static_row(conn, group_id)
            result = await conn.execute(
                sa.delete(group_members).where(
                    group_members.c.group_id == group_id, group_members.c.device_id == device_id
                )
            )
            if result.rowcount == 0:
                raise NotFound(f"device {device_id!r} is not in group {group_id!r}", code="member_not_found")
            await self._record(conn, "group.remove_member", actor, group_id, device_id=device_id)
        self._refresh([device_id])

    async def delete(self, group_id: str, *, expected_revision: int | None, actor: str) -> None:
        """Delete the group and its memberships; its former members lose its layer."""
        async with self._engine.begin() as conn:
            row = await self._row(conn, group_id)
            self._check_revision(row, expected_revision)
            affected = await self._member_ids(conn, group_id, stored_selector(row.kind, row.selector))
            await conn.execute(sa.delete(group_members).where(group_members.c.group_id == group_id))
            where = [groups.c.id == group_id]
            if expected_revision is not None:
                where.append(groups.c.revision == expected_revision)
            if (await conn.execute(sa.delete(groups).where(*where))).rowcount == 0:
                # A concurrent writer got in between the read and the delete.
                await self._row(conn, group_id)  # 404 if it was a delete
                raise PreconditionFailed(f"group {group_id!r} changed meanwhile; re-read it")
            await self._record(conn, "group.delete", actor, group_id, revision=row.revision)
        self._refresh(affected)

    # --- helpers ---------------------------------------------------------------------

    async def _row(self, conn: AsyncConnection, group_id: str) -> Any:
        row = (await conn.execute(sa.select(groups).where(groups.c.id == group_id))).first()
        if row is None:
            raise NotFound(f"group {group_id!r} does not exist", code="group_not_found")
        return row

    async def _static_row(self, conn: AsyncConnection, group_id: str) -> Any:
        row = await self._row(conn, group_id)
        if row.kind != GroupKind.STATIC:
            raise Conflict(
                f"group {group_id!r} is dynamic: its members are the devices its selector matches",
                code="group_dynamic",
            )
        return row

    @staticmethod
    def _check_revision(row: Any, expected_revision: int | None) -> None:
        if expected_revision is not None and row.revision != expected_revision:
            raise PreconditionFailed(
                f"group {row.id!r} is at revision {row.revision}, not {expected_revision}; re-read it",
                current_etag=etag_for(row.revision),
            )

    async def _update(
        self, conn: AsyncConnection, group_id: str, expected_revision: int | None, **values: Any
    ) -> Any:
        """UPDATE with the revision check in its WHERE clause; returns the row as it was before."""
        where = [groups.c.id == group_id]
        if expected_revision is not None:
            where.append(groups.c.revision == expected_revision)
        before = (await conn.execute(sa.select(groups).where(*where))).first()
        result = await conn.execute(
            sa.update(groups)
            .where(*where)
            .values(**values, revision=groups.c.revision + 1, updated_at=self._clock())
        )
        if result.rowcount == 0 or before is None:
            self._check_revision(await self._row(conn, group_id), expected_revision)
            # The revision matched on re-read but the UPDATE missed it: a writer got in between.
            raise PreconditionFailed(f"group {group_id!r} changed meanwhile; re-read it")
        return before

    async def _member_ids(
        self, conn: AsyncConnection, group_id: str, selector: GroupSelector | None
    ) -> set[str]:
        """Active members now (the only devices the publisher issues desired state to)."""
        rows = await conn.scalars(sa.select(devices.c.id).where(members_clause(group_id, selector), ACTIVE))
        return set(rows)

    async def _view(self, conn: AsyncConnection, row: Any) -> GroupView:
        selector = stored_selector(row.kind, row.selector)
        count = await conn.scalar(
            sa.select(sa.func.count()).select_from(devices).where(members_clause(row.id, selector), ACTIVE)
        )
        return GroupView(
            id=row.id,
            name=row.name,
            kind=GroupKind(row.kind),
            selector=row.selector if row.kind == GroupKind.DYNAMIC else None,
            layer=row.layer,
            priority=row.priority,
            revision=row.revision,
            member_count=int(count or 0),
            created_at=row.created_at,
            updated_at=row.updated_at,
        )

    async def _record(
        self, conn: AsyncConnection, action: str, actor: str, target: str, **detail: Any
    ) -> None:
        await self._audit.record(
            AuditEvent(action=action, outcome=Outcome.SUCCESS, actor=actor, target=target, detail=detail),
            connection=conn,
        )

    def _refresh(self, device_ids: Sequence[str] | set[str]) -> None:
        if device_ids:
            self._publisher.request_refresh(device_ids)


def _selector_json(selector: GroupSelector | None) -> dict[str, Any] | None:
    return selector.model_dump(mode="json", exclude_none=True) if selector is not None else None
