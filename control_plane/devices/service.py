"""Device inventory queries.

`online` is what the device last said (status and will) *and* that it was heard from within
`offline_after`: a device whose connection died without a will (broker restart) goes
offline by staleness.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from control_plane.clock import Clock, utc_now
from control_plane.db.schema import certificates, device_tags, devices
from control_plane.devices.filters import DeviceSelector, selector_clause
from control_plane.devices.models import CertificateView, DeviceListQuery, DevicePage, DeviceView
from control_plane.devices.pagination import after, decode_cursor, encode_cursor, filter_digest, order_by
from control_plane.errors import NotFound
from control_plane.groups.membership import among_ids, group_ids_for

# Built once: SQLAlchemy memoizes a statement's cache key on the object, and building and
# keying a select again on every request cost ~0.1 ms each.
_DEVICE_BY_ID = sa.select(devices).where(devices.c.id == sa.bindparam("device_id"))


class DeviceService:
    def __init__(self, *, engine: AsyncEngine, offline_after: timedelta, clock: Clock = utc_now) -> None:
        self._engine = engine
        self._offline_after = offline_after
        self._clock = clock

    async def get(self, device_id: str) -> DeviceView:
        async with self._engine.connect() as conn:
            row = (await conn.execute(_DEVICE_BY_ID, {"device_id": device_id})).first()
            if row is None:
                raise NotFound(f"device {device_id!r} does not exist", code="device_not_found")
            return (await self._views(conn, [row]))[0]

    async def list_devices(
        self, query: DeviceListQuery, *, within: sa.ColumnElement[bool] | None = None, scope: str = ""
    ) -> DevicePage:
        """One page of the devices matching `query` (and `within`, e.g. a group's members).

        `scope` names what `within` restricts to, so a cursor is only honoured in its own listing.
        """
        sort, order = query.sort, query.order
        where = selector_clause(query, online_after=self._clock() - self._offline_after)
        if within is not None:
            where = sa.and_(where, within)
        filters = query.model_dump(mode="json", include=set(DeviceSelector.model_fields))
        digest = filter_digest({"filters": filters, "scope": scope})
        page_query = sa.select(devices).where(where)
        if query.cursor is not None:
            cursor = decode_cursor(query.cursor, sort=sort, order=order, digest=digest)
            page_query = page_query.where(after(cursor, sort, order))
        page_query = page_query.order_by(*order_by(sort, order)).limit(query.limit + 1)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(page_query)).all()
            total = (
                await conn.scalar(sa.select(sa.func.count()).select_from(devices).where(where))
                if query.count
                else None
            )
            items = await self._views(conn, rows[: query.limit])
        next_cursor = (
            encode_cursor(rows[query.limit - 1]._mapping, sort=sort, order=order, digest=digest)
            if len(rows) > query.limit
            else None
        )
        return DevicePage(items=items, next_cursor=next_cursor, total=total)

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

    async def _views(self, conn: AsyncConnection, rows: Sequence[Any]) -> list[DeviceView]:
        """Device views with their tags and groups (two queries plus one per dynamic group)."""
        ids = [row.id for row in rows]
        tags: dict[str, list[str]] = defaultdict(list)
        tag_query = sa.select(device_tags.c.device_id, device_tags.c.tag).order_by(device_tags.c.tag)
        for query in among_ids(conn, tag_query, device_tags.c.device_id, ids):
            tagged = await conn.execute(query)
            for device_id, tag in tagged:
                tags[device_id].append(tag)
        groups = await group_ids_for(conn, ids)
        fresh_after = self._clock() - self._offline_after
        return [self._view(row._mapping, tags[row.id], groups.get(row.id, []), fresh_after) for row in rows]

    def _view(self, row: Any, tags: list[str], groups: list[str], fresh_after: datetime) -> DeviceView:
        last_seen = row["last_seen_at"]
        fresh = last_seen is not None and last_seen >= fresh_after
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
            first_seen_at=row["first_seen_at"],
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
            tags=tags,
            groups=groups,
        )
