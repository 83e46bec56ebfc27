"""Template rules: create, new version on change (optimistic locking), read, archive.

A version is never changed after it is written: stores record the version they were made
from and keep it (and their devices' template-role configuration) until someone moves them.
Archiving hides a template from new stores; existing stores keep using their version.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from control_plane.api.preconditions import etag_for
from control_plane.audit import AuditEvent, AuditLog, Outcome
from control_plane.clock import Clock, utc_now
from control_plane.db.schema import template_versions, templates
from control_plane.errors import Conflict, InvalidInput, NotFound, PreconditionFailed
from control_plane.templates.models import TemplateCreate, TemplateSpec, TemplateVersionView, TemplateView


class TemplateService:
    def __init__(self, *, engine: AsyncEngine, audit: AuditLog, clock: Clock = utc_now) -> None:
        self._engine = engine
        self._audit = audit
        self._clock = clock

    async def create(self, spec: TemplateCreate, *, actor: str) -> TemplateView:
        now = self._clock()
        try:
            async with self._engine.begin() as conn:
                await conn.execute(
                    templates.insert().values(
                        id=spec.id, name=spec.name, current_version=1, created_at=now, updated_at=now
                    )
                )
                await conn.execute(
                    template_versions.insert().values(
                        template_id=spec.id,
                        version=1,
                        spec=spec.stored_spec(),
                        created_at=now,
                        created_by=actor,
                    )
                )
                await self._audit.record(
                    AuditEvent(
                        action="template.create",
                        outcome=Outcome.SUCCESS,
                        actor=actor,
                        target=spec.id,
                        detail={"version": 1, "manifest": dict(spec.manifest)},
                    ),
                    connection=conn,
                )
        except IntegrityError:
            raise Conflict(f"template {spec.id!r} already exists", code="template_exists") from None
        return await self.get(spec.id)

    async def update(
        self, template_id: str, spec: TemplateSpec, *, expected_version: int | None, actor: str
    ) -> TemplateView:
        """A new version, unless nothing changed. `expected_version` (If-Match) → 412 if stale."""
        now = self._clock()
        stored = spec.stored_spec()
        async with self._engine.begin() as conn:
            row = (
                await conn.execute(
                    sa.select(templates.c.current_version, templates.c.name, templates.c.archived_at)
                    .where(templates.c.id == template_id)
                    .with_for_update()
                )
            ).first()
            if row is None:
                raise NotFound(f"template {template_id!r} does not exist", code="template_not_found")
            if expected_version is not None and expected_version != row.current_version:
                raise PreconditionFailed(
                    f"template {template_id!r} is at version {row.current_version}, not "
                    f"{expected_version}: read it again and re-apply your change",
                    current_etag=etag_for(row.current_version),
                )
            if row.archived_at is not None:
                raise Conflict(f"template {template_id!r} is archived", code="template_archived")
            current = await conn.scalar(
                sa.select(template_versions.c.spec).where(
                    template_versions.c.template_id == template_id,
                    template_versions.c.version == row.current_version,
                )
            )
            if current == stored and row.name == spec.name:
                return await self._get(conn, template_id)  # a repeated PUT makes no new version
            version = row.current_version + 1
            # The version in the WHERE clause: of two concurrent writers only one moves it.
            moved = await conn.execute(
                sa.update(templates)
                .where(templates.c.id == template_id, templates.c.current_version == row.current_version)
                .values(current_version=version, name=spec.name, updated_at=now)
            )
            if moved.rowcount != 1:
                raise PreconditionFailed(
                    f"template {template_id!r} changed meanwhile; read it again",
                    current_etag=etag_for(row.current_version + 1),
                )
            await conn.execute(
                template_versions.insert().values(
                    template_id=template_id, version=version, spec=stored, created_at=now, created_by=actor
                )
            )
            await self._audit.record(
                AuditEvent(
                    action="template.update",
                    outcome=Outcome.SUCCESS,
                    actor=actor,
                    target=template_id,
                    detail={"version": version, "manifest": dict(spec.manifest)},
                ),
                connection=conn,
            )
            return await self._get(conn, template_id)

    async def archive(self, template_id: str, *, actor: str) -> None:
        async with self._engine.begin() as conn:
            result = await conn.execute(
                sa.update(templates)
                .where(templates.c.id == template_id)
                .values(archived_at=sa.func.coalesce(templates.c.archived_at, self._clock()))
            )
            if result.rowcount == 0:
                raise NotFound(f"template {template_id!r} does not exist", code="template_not_found")
            await self._audit.record(
                AuditEvent(
                    action="template.archive", outcome=Outcome.SUCCESS, actor=actor, target=template_id
                ),
                connection=conn,
            )

    async def get(self, template_id: str) -> TemplateView:
        async with self._engine.connect() as conn:
            return await self._get(conn, template_id)

    async def list_templates(self, *, include_archived: bool = False) -> list[TemplateView]:
        query = _current().order_by(templates.c.id)
        if not include_archived:
            query = query.where(templates.c.archived_at.is_(None))
        async with self._engine.connect() as conn:
            return [_view(row._mapping) for row in await conn.execute(query)]

    async def get_version(self, template_id: str, version: int) -> TemplateVersionView:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(template_versions).where(
                        template_versions.c.template_id == template_id, template_versions.c.version == version
                    )
                )
            ).first()
            if row is None:
                await self._get(conn, template_id)  # 404 for the template first
                raise NotFound(
                    f"template {template_id!r} has no version {version}", code="template_version_not_found"
                )
        return _version_view(row._mapping)

    async def list_versions(self, template_id: str) -> list[TemplateVersionView]:
        async with self._engine.connect() as conn:
            await self._get(conn, template_id)
            rows = await conn.execute(
                sa.select(template_versions)
                .where(template_versions.c.template_id == template_id)
                .order_by(template_versions.c.version)
            )
            return [_version_view(row._mapping) for row in rows]

    async def _get(self, conn: AsyncConnection, template_id: str) -> TemplateView:
        row = (await conn.execute(_current().where(templates.c.id == template_id))).first()
        if row is None:
            raise NotFound(f"template {template_id!r} does not exist", code="template_not_found")
        return _view(row._mapping)


async def resolve_version(
    conn: AsyncConnection, template_id: str, version: int | None
) -> tuple[int, dict[str, Any]]:
    """(version, spec) a new store is made from: `version` or the current one. Refuses an
    unknown or archived template with a 422 naming the field (it is a reference in a body)."""
    row = (
        await conn.execute(
            sa.select(templates.c.current_version, templates.c.archived_at).where(
                templates.c.id == template_id
            )
        )
    ).first()
    if row is None:
        raise InvalidInput(f"field 'template_id': template {template_id!r} does not exist")
    if row.archived_at is not None:
        raise Conflict(f"template {template_id!r} is archived", code="template_archived")
    chosen = row.current_version if version is None else version
    spec = await conn.scalar(
        sa.select(template_versions.c.spec).where(
            template_versions.c.template_id == template_id, template_versions.c.version == chosen
        )
    )
    if spec is None:
        raise InvalidInput(
            f"field 'template_version': template {template_id!r} has no version {chosen} "
            f"(current: {row.current_version})"
        )
    return chosen, dict(spec)


def _current() -> sa.Select[Any]:
    return sa.select(
        templates,
        template_versions.c.spec,
        template_versions.c.created_by,
    ).join(
        template_versions,
        sa.and_(
            template_versions.c.template_id == templates.c.id,
            template_versions.c.version == templates.c.current_version,
        ),
    )


def _spec_fields(spec: dict[str, Any]) -> dict[str, Any]:
    manifest = {str(role): int(count) for role, count in spec["manifest"].items()}
    return {
        "description": spec.get("description", ""),
        "manifest": manifest,
        "device_count": sum(manifest.values()),
        "layer": spec.get("layer") or {},
        "roles": spec.get("roles") or {},
        "timezone": spec.get("timezone"),
        "trading_hours": spec.get("trading_hours"),
    }


def _view(row: Any) -> TemplateView:
    return TemplateView(
        id=row["id"],
        name=row["name"],
        version=row["current_version"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        updated_by=row["created_by"],
        archived_at=row["archived_at"],
        **_spec_fields(row["spec"]),
    )


def _version_view(row: Any) -> TemplateVersionView:
    return TemplateVersionView(
        template_id=row["template_id"],
        version=row["version"],
        created_at=row["created_at"],
        created_by=row["created_by"],
        **_spec_fields(row["spec"]),
    )
