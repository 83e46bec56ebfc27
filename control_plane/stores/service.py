"""Store rules: create (by hand, or from a template with provisioning), read, change the
store's configuration layer and its own fields."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from control_plane.api.preconditions import etag_for
from control_plane.audit import AuditEvent, AuditLog, Outcome
from control_plane.clock import Clock, utc_now
from control_plane.db.schema import devices, store_provisioning, stores
from control_plane.desired.publisher import DesiredStatePublisher
from control_plane.enrollment.models import TokenCreated
from control_plane.errors import Conflict, NotFound, PreconditionFailed
from control_plane.provisioning.service import ProvisioningService
from control_plane.stores.models import StoreConfig, StoreCreate, StoreCreated, StorePatch, StoreView
from control_plane.templates.service import resolve_version

_DEVICE_COUNT = sa.select(sa.func.count()).where(devices.c.store_id == stores.c.id).scalar_subquery()
_STORES = (
    sa.select(stores, _DEVICE_COUNT.label("device_count"), store_provisioning.c.ready_at)
    .outerjoin(store_provisioning, store_provisioning.c.store_id == stores.c.id)
    .order_by(stores.c.id)
)
# Built once: SQLAlchemy memoizes a statement's cache key on the object (rebuilding this
# select and its key cost ~0.2 ms a request).
_STORE_BY_ID = _STORES.where(stores.c.id == sa.bindparam("store_id"))


class StoreService:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        publisher: DesiredStatePublisher,
        audit: AuditLog,
        provisioning: ProvisioningService | None = None,
        read_engine: AsyncEngine | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self._engine = engine
        self._read_engine = read_engine or engine
        self._publisher = publisher
        self._audit = audit
        self._provisioning = provisioning
        self._clock = clock

    async def create(self, spec: StoreCreate, *, actor: str) -> StoreCreated:
        """Create the store; made from a template, with its provisioning saga and tokens in the
        same transaction (all or nothing)."""
        now = self._clock()
        tokens: list[TokenCreated] = []
        provisions = spec.provisions
        try:
            async with self._engine.begin() as conn:
                template: tuple[str, int] | None = None
                template_spec: dict[str, Any] = {}
                if spec.template_id is not None:
                    version, template_spec = await resolve_version(
                        conn, spec.template_id, spec.template_version
                    )
                    template = (spec.template_id, version)
                await conn.execute(
                    stores.insert().values(
                        id=spec.id,
                        name=spec.name,
                        timezone=spec.timezone or template_spec.get("timezone") or "UTC",
                        region=spec.region,
                        config=spec.as_layer(),
                        config_revision=1,
                        created_at=now,
                        updated_at=now,
                        template_id=template[0] if template else None,
                        template_version=template[1] if template else None,
                        trading_hours=(
                            spec.trading_hours
                            if spec.trading_hours is not None
                            else template_spec.get("trading_hours")
                        ),
                        status="provisioning" if provisions else "ready",
                        status_changed_at=now,
                    )
                )
                await self._audit.record(
                    AuditEvent(
                        action="store.create",
                        outcome=Outcome.SUCCESS,
                        actor=actor,
                        target=spec.id,
                        detail={"template": list(template) if template else None, "provision": provisions},
                    ),
                    connection=conn,
                )
                if provisions:
                    if self._provisioning is None:
                        raise RuntimeError("StoreService built without provisioning")
                    tokens = await self._provisioning.start(
                        conn,
                        store_id=spec.id,
                        expected=template_spec["manifest"],
                        template=template,
                        now=now,
                        actor=actor,
                    )
        except IntegrityError:
            raise Conflict(f"store {spec.id!r} already exists", code="store_exists") from None
        view = await self.get(spec.id)
        if not provisions or self._provisioning is None:
            return StoreCreated(**view.model_dump())
        self._provisioning.on_change()
        return StoreCreated(
            **view.model_dump(),
            provisioning=await self._provisioning.get(spec.id),
            enrollment_tokens=tokens,
        )

    async def get(self, store_id: str) -> StoreView:
        views = await self._select(_STORE_BY_ID, {"store_id": store_id})
        if not views:
            raise NotFound(f"store {store_id!r} does not exist", code="store_not_found")
        return views[0]

    async def list_stores(self) -> list[StoreView]:
        return await self._select(_STORES)

    async def set_config(
        self, store_id: str, layer: StoreConfig, *, actor: str, expected_revision: int | None = None
    ) -> StoreView:
        """Replace the store's configuration layer and push what changes to its devices.

        With `expected_revision` (If-Match) the change applies only to that revision (412 if
        another change came first); the check is part of the UPDATE, so two writers can't both win.
        """
        async with self._engine.begin() as conn:
            await self._update_row(conn, store_id, {"config": layer.as_layer()}, expected_revision)
            await self._audit.record(
                AuditEvent(action="store.set_config", outcome=Outcome.SUCCESS, actor=actor, target=store_id),
                connection=conn,
            )
        await self._publisher.refresh_now_or_later(stores=[store_id])
        return await self.get(store_id)

    async def update(
        self, store_id: str, patch: StorePatch, *, actor: str, expected_revision: int | None = None
    ) -> StoreView:
        """Change the store's own fields (name, time zone, region, trading hours). Nothing is
        sent to devices: these decide when rollouts may change them (maintenance windows), read
        by the rollout driver on its next tick. Same If-Match rule as `set_config`."""
        values = patch.values()
        async with self._engine.begin() as conn:
            await self._update_row(conn, store_id, values, expected_revision)
            await self._audit.record(
                AuditEvent(
                    action="store.update",
                    outcome=Outcome.SUCCESS,
                    actor=actor,
                    target=store_id,
                    detail=values,
                ),
                connection=conn,
            )
        return await self.get(store_id)

    async def _update_row(
        self, conn: AsyncConnection, store_id: str, values: dict[str, Any], expected_revision: int | None
    ) -> None:
        """Write `values` and the next revision, only at `expected_revision` when given."""
        where = [stores.c.id == store_id]
        if expected_revision is not None:
            where.append(stores.c.config_revision == expected_revision)
        result = await conn.execute(
            sa.update(stores)
            .where(*where)
            .values(**values, config_revision=stores.c.config_revision + 1, updated_at=self._clock())
        )
        if result.rowcount == 0:
            current = await conn.scalar(sa.select(stores.c.config_revision).where(stores.c.id == store_id))
            if current is None:
                raise NotFound(f"store {store_id!r} does not exist", code="store_not_found")
            raise PreconditionFailed(
                f"store {store_id!r} is at revision {current}, not {expected_revision}: "
                "read it again and re-apply your change",
                current_etag=etag_for(current),
            )

    async def _select(self, query: sa.Select[Any], params: dict[str, Any] | None = None) -> list[StoreView]:
        async with self._read_engine.connect() as conn:
            rows = (await conn.execute(query, params)).all()
        return [_view(row._mapping) for row in rows]


def _view(row: Any) -> StoreView:
    layer = row["config"] or {}
    return StoreView(
        id=row["id"],
        name=row["name"],
        timezone=row["timezone"],
        region=row["region"],
        config=layer.get("config", {}),
        policies=layer.get("policies", {}),
        checks=layer.get("checks", {}),
        config_revision=row["config_revision"],
        device_count=row["device_count"],
        status=row["status"],
        status_changed_at=row["status_changed_at"],
        template_id=row["template_id"],
        template_version=row["template_version"],
        trading_hours=row["trading_hours"],
        ready_at=row["ready_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )
