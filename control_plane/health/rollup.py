"""A store's status derived from its active devices, and the counts behind it.

    no active device                                     → ready
    none online                                          → offline
    any unhealthy, any offline, any failed apply of its
    current desired version, or any device that has not
    applied its current version within `sync_grace`      → degraded
    otherwise                                            → ready

Stores in `provisioning` (the provisioning saga owns them until their provisioning row
reaches ready, cancelled or failed) and `decommissioned` stores are never touched. A change
is written with compare-and-set on the old status (a saga or another replica changing the
same store at the same moment wins, and this pass skips it) and recorded in the store's
timeline (`store_events`, kind `status_changed`).

Device online-ness uses the same staleness rule as the device view, so the roll-up does not
depend on the sweeper having run first.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from control_plane.clock import Clock, utc_now
from control_plane.db.schema import desired_states, devices, store_events, store_provisioning, stores
from control_plane.errors import NotFound
from control_plane.health.models import StoreHealth, StoreStatus

logger = logging.getLogger(__name__)

# Provisioning rows in these states no longer own the store's status.
PROVISIONING_DONE = ("ready", "cancelled", "failed")
UNTOUCHED = (StoreStatus.PROVISIONING.value, StoreStatus.DECOMMISSIONED.value)
APPLY_FAILURES = ("failed", "rejected")


@dataclass(frozen=True, slots=True)
class DeviceCounts:
    devices: int
    online: int
    unhealthy: int
    out_of_sync: int


def derive_status(counts: DeviceCounts) -> StoreStatus:
    """The rule in the module docstring, for one store's active devices."""
    if counts.devices == 0:
        return StoreStatus.READY
    if counts.online == 0:
        return StoreStatus.OFFLINE
    if counts.unhealthy or counts.out_of_sync or counts.online < counts.devices:
        return StoreStatus.DEGRADED
    return StoreStatus.READY


class StoreRollup:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        offline_after: timedelta,
        sync_grace: timedelta,
        clock: Clock = utc_now,
    ) -> None:
        self._engine = engine
        self._offline_after = offline_after
        self._sync_grace = sync_grace
        self._clock = clock
        self.changes: Counter[str] = Counter()  # new status → how many times a store went there

    def _online(self) -> sa.ColumnElement[bool]:
        return sa.and_(devices.c.online, devices.c.last_seen_at >= self._clock() - self._offline_after)

    def _in_sync(self) -> sa.ColumnElement[bool]:
        return sa.and_(devices.c.desired_version > 0, devices.c.applied_version == devices.c.desired_version)

    async def run_once(self) -> dict[str, tuple[str, str]]:
        """Derive every eligible store's status and write the changes; return {store: (from, to)}."""
        now = self._clock()

        def total(condition: sa.ColumnElement[bool]) -> sa.ColumnElement[Any]:
            return sa.func.coalesce(sa.func.sum(sa.case((condition, 1), else_=0)), 0)

        out_of_sync = sa.and_(
            sa.not_(self._in_sync()),
            sa.or_(
                devices.c.apply_status.in_(APPLY_FAILURES),
                desired_states.c.created_at < now - self._sync_grace,
            ),
        )
        per_store = (
            sa.select(
                devices.c.store_id,
                sa.func.count().label("devices"),
                total(self._online()).label("online"),
                total(devices.c.health_status == "unhealthy").label("unhealthy"),
                total(out_of_sync).label("out_of_sync"),
            )
            .select_from(
                devices.outerjoin(
                    desired_states,
                    sa.and_(
                        desired_states.c.device_id == devices.c.id,
                        desired_states.c.version == devices.c.desired_version,
                    ),
                )
            )
            .where(devices.c.state == "active")
            .group_by(devices.c.store_id)
            .subquery()
        )
        query = (
            sa.select(
                stores.c.id,
                stores.c.status,
                sa.func.coalesce(per_store.c.devices, 0),
                sa.func.coalesce(per_store.c.online, 0),
                sa.func.coalesce(per_store.c.unhealthy, 0),
                sa.func.coalesce(per_store.c.out_of_sync, 0),
            )
            .select_from(stores.outerjoin(per_store, per_store.c.store_id == stores.c.id))
            .where(stores.c.status.not_in(UNTOUCHED), _not_provisioning())
        )
        changed: dict[str, tuple[str, str]] = {}
        async with self._engine.begin() as conn:
            for store_id, old, *numbers in (await conn.execute(query)).all():
                new = derive_status(DeviceCounts(*(int(n) for n in numbers))).value
                if new == old:
                    continue
                result = await conn.execute(
                    sa.update(stores)
                    .where(stores.c.id == store_id, stores.c.status == old, _not_provisioning())
                    .values(status=new, status_changed_at=now)
                )
                if result.rowcount != 1:
                    continue  # someone else changed it meanwhile: theirs stands
                await conn.execute(
                    store_events.insert().values(
                        store_id=store_id, at=now, kind="status_changed", detail={"from": old, "to": new}
                    )
                )
                changed[store_id] = (old, new)
        for store_id, (old, new) in changed.items():
            self.changes[new] += 1
            logger.info("store %s: %s → %s", store_id, old, new)
        return changed

    async def store_health(self, store_id: str) -> StoreHealth:
        online = self._online().label("is_online")
        in_sync = self._in_sync().label("is_in_sync")
        async with self._engine.connect() as conn:
            store = (
                await conn.execute(
                    sa.select(stores.c.status, stores.c.status_changed_at).where(stores.c.id == store_id)
                )
            ).first()
            if store is None:
                raise NotFound(f"store {store_id!r} does not exist", code="store_not_found")
            rows = (
                await conn.execute(
                    sa.select(
                        online, in_sync, devices.c.health_status, devices.c.health, devices.c.health_at
                    ).where(devices.c.store_id == store_id, devices.c.state == "active")
                )
            ).all()
        statuses = Counter(row.health_status for row in rows)
        failing: Counter[str] = Counter()
        for row in rows:
            for check in (row.health or {}).get("checks") or []:
                if not check.get("ok", True):
                    failing[str(check.get("name"))] += 1
        reported = [row.health_at for row in rows if row.health_at is not None]
        return StoreHealth(
            store_id=store_id,
            status=StoreStatus(store.status),
            status_changed_at=store.status_changed_at,
            devices=len(rows),
            online=sum(1 for row in rows if row.is_online),
            healthy=statuses["healthy"],
            unhealthy=statuses["unhealthy"],
            unknown=statuses["unknown"],
            in_sync=sum(1 for row in rows if row.is_in_sync),
            failing_checks=dict(sorted(failing.items())),
            last_report_at=max(reported, default=None),
        )

    async def counts_by_status(self) -> dict[str, int]:
        """Stores per status (for the metrics gauge)."""
        async with self._engine.connect() as conn:
            rows = await conn.execute(sa.select(stores.c.status, sa.func.count()).group_by(stores.c.status))
            return {str(status): int(count) for status, count in rows}


def _not_provisioning() -> sa.ColumnElement[bool]:
    """No provisioning saga in progress for the store."""
    return ~sa.exists().where(
        store_provisioning.c.store_id == stores.c.id, store_provisioning.c.state.not_in(PROVISIONING_DONE)
    )
