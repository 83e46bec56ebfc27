"""Device inventory queries.

`online` is what the device last said (status and will) *and* that it was heard from within
`offline_after`: a device whose connection died without a will (broker restart) goes
offline by staleness.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from control_plane.clock import Clock, utc_now
from control_plane.db.schema import certificates, devices
from control_plane.devices.models import CertificateView, DevicePage, DeviceView
from control_plane.errors import NotFound

MAX_PAGE = 1000


class DeviceService:
    def __init__(self, *, engine: AsyncEngine, offline_after: timedelta, clock: Clock = utc_now) -> None:
        self._engine = engine
        self._offline_after = offline_after
        self._clock = clock

    async def get(self, device_id: str) -> DeviceView:
        async with self._engine.connect() as conn:
            row = (await conn.execute(sa.select(devices).where(devices.c.id == device_id))).first()
        if row is None:
            raise NotFound(f"device {device_id!r} does not exist", code="device_not_found")
        return self._view(row._mapping)

    async def list_devices(
        self, *, store_id: str | None = None, limit: int = 100, cursor: str | None = None
    ) -> DevicePage:
        """Devices ordered by id; `cursor` is the last id of the previous page."""
        limit = max(1, min(limit, MAX_PAGE))
        query = sa.select(devices).order_by(devices.c.id).limit(limit + 1)
        if store_id is not None:
            query = query.where(devices.c.store_id == store_id)
        if cursor:
            query = query.where(devices.c.id > cursor)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        items = [self._view(row._mapping) for row in rows[:limit]]
        return DevicePage(items=items, next_cursor=items[-1].id if len(rows) > limit else None)

    async def list_certificates(
        self, *, expiring_within: timedelta | None, status: str | None, device_id: str | None, limit: int
    ) -> list[CertificateView]:
        """Certificates soonest-expiring first. `expiring_within` implies status valid."""
        query = sa.select(certificates).order_by(certificates.c.not_after, certificates.c.serial).limit(limit)
        if expiring_within is not None:
            query = query.where(
                certificates.c.status == "valid", certificates.c.not_after <= self._clock() + expiring_within
            )
        if status is not None:
            query = query.where(certificates.c.status == status)
        if device_id is not None:
            query = query.where(certificates.c.device_id == device_id)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [
            CertificateView(
                device_id=r.device_id,
                serial=r.serial,
                not_before=r.not_before,
                not_after=r.not_after,
                status=r.status,
                issued_by=r.issued_by,
                revoked_at=r.revoked_at,
                revocation_reason=r.revocation_reason,
            )
            for r in rows
        ]

    async def certificate_expiry_buckets(self, bounds: list[tuple[str, timedelta]]) -> dict[str, int]:
        """Valid certificates counted by how soon they expire (for the metrics gauge), in SQL."""
        now = self._clock()
        bucket = sa.case(
            (certificates.c.not_after <= now, "expired"),
            *((certificates.c.not_after <= now + bound, label) for label, bound in bounds),
            else_="later",
        ).label("bucket")
        counts = {"expired": 0, **{label: 0 for label, _ in bounds}, "later": 0}
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                sa.select(bucket, sa.func.count()).where(certificates.c.status == "valid").group_by(bucket)
            )
            for label, count in rows:
                counts[label] = int(count)
        return counts

    async def counts_by_state(self) -> dict[tuple[str, bool], int]:
        """(state, online) → devices, with staleness applied like the device view."""
        fresh_after = self._clock() - self._offline_after
        online = sa.and_(devices.c.online, devices.c.last_seen_at >= fresh_after)
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                sa.select(devices.c.state, online.label("online"), sa.func.count()).group_by(
                    devices.c.state, online
                )
            )
            return {(r[0], bool(r[1])): int(r[2]) for r in rows}

    def _view(self, row: Any) -> DeviceView:
        last_seen = row["last_seen_at"]
        fresh = last_seen is not None and last_seen >= self._clock() - self._offline_after
        return DeviceView(
            id=row["id"],
            store_id=row["store_id"],
            state=row["state"],
            role=row["role"],
            model=row["model"],
            serial=row["serial"],
            os=row["os"],
            hostname=row["hostname"],
            agent_version=row["agent_version"],
            enrolled_at=row["enrolled_at"],
            last_seen_at=last_seen,
            online=bool(row["online"]) and fresh,
            desired_version=row["desired_version"],
            applied_version=row["applied_version"],
            in_sync=row["desired_version"] > 0 and row["applied_version"] == row["desired_version"],
            apply_status=row["apply_status"],
            apply_reason=row["apply_reason"],
            apply_detail=row["apply_detail"],
            health=row["health"],
            health_at=row["health_at"],
            health_status=row["health_status"],
            checks=(row["health"] or {}).get("checks") or [],
            health_dropped=row["health_dropped"],
            cert_serial=row["cert_serial"],
            cert_not_after=row["cert_not_after"],
        )
