"""The rollout driver: holds the leader lease, runs the engine, persists, moves devices.

Each tick, for every unfinished rollout: load its devices (rollout rows joined with what
the devices report), `engine.step`, then persist the whole step in one transaction fenced
by the lease and guarded by the rollout's state (an operator's pause or abort in between
makes the write miss; the next tick re-evaluates). Only after that commit does it act:

* moving devices = their `device_releases` rows were inserted in the step's transaction;
  the publisher then issues each a new version (content-hashed, so repeating it issues
  nothing twice) and the version is recorded as the device's `target_version`;
* rolling back = delete the rollout's `device_releases` rows and mark the moved devices
  rolled_back in one transaction, then refresh them: each gets a *new* version with its
  previous effective configuration (the agent's anti-rollback is kept).

Both actions are idempotent and resumable: after a crash, devices `sent` without a target
version are refreshed again, and a rollout found `rolling_back` is rolled back again —
neither issues a duplicate version nor loses one (refresh only issues on a content change).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from control_plane.aio import wait_event
from control_plane.clock import Clock, utc_now
from control_plane.db.schema import (
    device_releases,
    devices,
    rollout_devices,
    rollout_events,
    rollouts,
    stores,
)
from control_plane.desired.publisher import DesiredStatePublisher
from control_plane.rollouts.engine import DeviceStatus, RolloutStatus, Step, step
from control_plane.rollouts.lease import Lease, LeaseLost
from control_plane.rollouts.models import ACTIVE_STATES, MOVED_STATES, DeviceState, Plan, RolloutState

logger = logging.getLogger(__name__)

LEASE_NAME = "rollout-driver"
_CHUNK = 5000
# Versions issued per publisher refresh: small enough that publishing overlaps signing.
_ISSUE_CHUNK = 1000
_DUTY_FACTOR = 2.0
# Per-device events for these transitions (rare and worth a look); the rest are counted.
_NOTABLE = frozenset({DeviceState.FAILED, DeviceState.TIMED_OUT, DeviceState.SKIPPED})
_NOTABLE_LISTED = 50


class StateChanged(Exception):
    """An operator changed the rollout's state while a step was computed: drop the step."""


class RolloutDriver:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        publisher: DesiredStatePublisher,
        tick_s: float,
        lease_ttl_s: float,
        holder: str | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self._engine = engine
        self._publisher = publisher
        self._tick_s = tick_s
        self._clock = clock
        self.lease = Lease(
            engine,
            name=LEASE_NAME,
            holder=holder or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}",
            ttl_s=lease_ttl_s,
            clock=clock,
        )
        self._wakeup = asyncio.Event()
        self._evaluating_s = 0.0
        self.ticks = 0

    def wake(self) -> None:
        self._wakeup.set()

    @property
    def is_leader(self) -> bool:
        return self.lease.held

    async def run(self) -> None:
        """Drive rollouts while holding the lease, until cancelled."""
        try:
            while True:
                self._evaluating_s = 0.0
                try:
                    if await self.lease.acquire_or_renew():
                        await self.tick()
                except LeaseLost:
                    logger.warning("rollout lease lost; another replica drives rollouts now")
                except Exception:
                    logger.exception("rollout tick failed; retrying")
                # Evaluating costs time proportional to the devices in unfinished rollouts: wait
                # at least twice as long as it took, so polling keeps to about a third of a core
                # (the ingest and publisher share it). Issuing versions is not counted: it is
                # work done, not polling. An API call on this replica wakes it early.
                pause = max(self._tick_s, _DUTY_FACTOR * self._evaluating_s)
                await wait_event(self._wakeup, pause)
                self._wakeup.clear()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.lease.release())

    async def tick(self) -> None:
        self.ticks += 1
        async with self._engine.connect() as conn:
            active = (
                await conn.execute(
                    sa.select(rollouts)
                    .where(rollouts.c.state.in_([s.value for s in ACTIVE_STATES]))
                    .order_by(rollouts.c.seq)
                )
            ).all()
        for row in active:
            try:
                await self._drive(row)
            except StateChanged:
                logger.info("rollout %s changed state during a step; re-evaluating", row.id)

    async def _drive(self, row: Any) -> None:
        if row.state == RolloutState.ROLLING_BACK:
            await self._rollback(row.id, row.state)
            return
        await self._issue_pending(row.id)
        rollout = RolloutStatus(
            id=row.id,
            state=RolloutState(row.state),
            current_wave=row.current_wave,
            wave_started_at=row.wave_started_at,
            start_at=row.start_at,
            failures_accepted=row.failures_accepted,
            evidence_waived_wave=row.evidence_waived_wave,
            plan=Plan.model_validate(row.plan),
        )
        started = time.perf_counter()
        statuses = await self._load(row.id)
        now = self._clock()
        decided = step(rollout, statuses, now)
        if not decided.transitions and decided.state is None and decided.current_wave is None:
            self._evaluating_s += time.perf_counter() - started
            return
        versions = {d.device_id: d.desired_version for d in statuses}
        await self._persist(row, decided, versions, now)
        self._evaluating_s += time.perf_counter() - started
        if decided.sends:
            await self._issue(row.id, decided.sends)
        if decided.rollback:
            await self._rollback(row.id, RolloutState.ROLLING_BACK)

    async def _load(self, rollout_id: str) -> list[DeviceStatus]:
        """The rollout's devices with what they report. JSON columns are decoded once per
        store (trading hours) and only for devices being watched after an apply (health):
        at ten thousand devices per tick, per-row JSON decoding dominated the load."""
        query = (
            sa.select(
                rollout_devices.c.device_id,
                rollout_devices.c.store_id,
                rollout_devices.c.role,
                rollout_devices.c.wave,
                rollout_devices.c.state,
                rollout_devices.c.sent_at,
                rollout_devices.c.applied_at,
                rollout_devices.c.target_version,
                devices.c.desired_version,
                devices.c.applied_version,
                devices.c.apply_status,
                devices.c.apply_reported_at,
                devices.c.health_status,
                devices.c.health_at,
                devices.c.online,
                devices.c.last_seen_at,
            )
            .join(devices, devices.c.id == rollout_devices.c.device_id)
            .where(rollout_devices.c.rollout_id == rollout_id)
        )
        store_query = sa.select(stores.c.id, stores.c.timezone, stores.c.trading_hours).where(
            stores.c.id.in_(
                sa.select(rollout_devices.c.store_id)
                .where(rollout_devices.c.rollout_id == rollout_id)
                .distinct()
                .scalar_subquery()
            )
        )
        watched = (
            sa.select(devices.c.id, devices.c.health)
            .join(rollout_devices, rollout_devices.c.device_id == devices.c.id)
            .where(
                rollout_devices.c.rollout_id == rollout_id,
                rollout_devices.c.state == DeviceState.APPLIED,
                devices.c.health_status == "unknown",
            )
        )
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
            store_rows = {r.id: (r.timezone, r.trading_hours) for r in await conn.execute(store_query)}
            health = {r.id: r.health for r in await conn.execute(watched)}
        loaded = []
        for r in rows:
            timezone, trading_hours = store_rows.get(r.store_id, ("UTC", None))
            loaded.append(
                DeviceStatus(
                    device_id=r.device_id,
                    store_id=r.store_id,
                    role=r.role,
                    wave=r.wave,
                    state=DeviceState(r.state),
                    sent_at=r.sent_at,
                    applied_at=r.applied_at,
                    target_version=r.target_version,
                    applied_version=r.applied_version,
                    apply_status=r.apply_status,
                    apply_reported_at=r.apply_reported_at,
                    health_status=_health_verdict(r.health_status, health.get(r.device_id)),
                    health_at=r.health_at,
                    online=r.online,
                    last_seen_at=r.last_seen_at,
                    timezone=timezone,
                    trading_hours=trading_hours,
                    desired_version=r.desired_version,
                )
            )
        return loaded

    async def _persist(self, row: Any, decided: Step, versions: dict[str, int], now: datetime) -> None:
        async with self._engine.begin() as conn:
            await self.lease.fence(conn)
            values: dict[str, Any] = {"updated_at": now}
            if decided.state is not None:
                values["state"] = decided.state
                values["reason"] = decided.reason
                if decided.state is RolloutState.COMPLETED:
                    values["finished_at"] = now
                if decided.state is RolloutState.RUNNING and row.wave_started_at is None:
                    values["wave_started_at"] = now
            if decided.current_wave is not None:
                values["current_wave"] = decided.current_wave
                values["wave_started_at"] = now
            guarded = await conn.execute(
                sa.update(rollouts)
                .where(rollouts.c.id == row.id, rollouts.c.state == row.state)
                .values(**values)
            )
            if guarded.rowcount != 1:
                raise StateChanged(row.id)
            await _apply_transitions(conn, row.id, decided, versions, now)
            sends = decided.sends
            for start in range(0, len(sends), _CHUNK):
                await conn.execute(
                    device_releases.insert(),
                    [
                        {"device_id": d, "rollout_id": row.id, "release_id": row.release_id, "seq": row.seq}
                        for d in sends[start : start + _CHUNK]
                    ],
                )
            await _record_events(conn, row.id, decided, now)

    async def _issue_pending(self, rollout_id: str) -> None:
        """Devices moved but without a recorded version (a crash after the move): issue now."""
        async with self._engine.connect() as conn:
            pending = (
                await conn.scalars(
                    sa.select(rollout_devices.c.device_id).where(
                        rollout_devices.c.rollout_id == rollout_id,
                        rollout_devices.c.state == DeviceState.SENT,
                        rollout_devices.c.target_version.is_(None),
                    )
                )
            ).all()
        if pending:
            await self._issue(rollout_id, list(pending))

    async def _issue(self, rollout_id: str, device_ids: Sequence[str]) -> None:
        """Issue in chunks: the publisher sends one chunk while the next is being signed."""
        started = time.perf_counter()
        issued = 0
        for start in range(0, len(device_ids), _ISSUE_CHUNK):
            chunk = list(device_ids[start : start + _ISSUE_CHUNK])
            issued += await self._publisher.refresh_devices(chunk)
            async with self._engine.begin() as conn:
                await self.lease.fence(conn)
                await conn.execute(
                    sa.update(rollout_devices)
                    .where(
                        rollout_devices.c.rollout_id == rollout_id,
                        rollout_devices.c.device_id.in_(chunk),
                        rollout_devices.c.target_version.is_(None),
                    )
                    .values(
                        target_version=sa.select(devices.c.desired_version)
                        .where(devices.c.id == rollout_devices.c.device_id)
                        .scalar_subquery()
                    )
                )
        logger.info(
            "rollout %s: %d devices moved, %d versions issued in %.2f s",
            rollout_id,
            len(device_ids),
            issued,
            time.perf_counter() - started,
        )

    async def _rollback(self, rollout_id: str, seen_state: str) -> None:
        now = self._clock()
        async with self._engine.begin() as conn:
            await self.lease.fence(conn)
            guarded = await conn.execute(
                sa.update(rollouts)
                .where(rollouts.c.id == rollout_id, rollouts.c.state == seen_state)
                .values(updated_at=now)
            )
            if guarded.rowcount != 1:
                raise StateChanged(rollout_id)
            moved = await conn.execute(
                sa.update(rollout_devices)
                .where(
                    rollout_devices.c.rollout_id == rollout_id,
                    rollout_devices.c.state.in_([s.value for s in MOVED_STATES]),
                )
                .values(state=DeviceState.ROLLED_BACK, reason="rolled back", updated_at=now, settled_at=now)
            )
            await conn.execute(sa.delete(device_releases).where(device_releases.c.rollout_id == rollout_id))
        # Committed: from here on a restart re-runs this refresh, which issues only what is missing.
        async with self._engine.connect() as conn:
            rolled = list(
                (
                    await conn.scalars(
                        sa.select(rollout_devices.c.device_id).where(
                            rollout_devices.c.rollout_id == rollout_id,
                            rollout_devices.c.state == DeviceState.ROLLED_BACK,
                        )
                    )
                ).all()
            )
        issued = 0
        for start in range(0, len(rolled), _ISSUE_CHUNK):
            issued += await self._publisher.refresh_devices(rolled[start : start + _ISSUE_CHUNK])
        async with self._engine.begin() as conn:
            await self.lease.fence(conn)
            await conn.execute(
                sa.update(rollouts)
                .where(rollouts.c.id == rollout_id, rollouts.c.state == RolloutState.ROLLING_BACK)
                .values(state=RolloutState.ROLLED_BACK, updated_at=self._clock(), finished_at=self._clock())
            )
            await conn.execute(
                rollout_events.insert().values(
                    rollout_id=rollout_id,
                    at=self._clock(),
                    kind="rolled_back",
                    detail={
                        "devices": len(rolled),
                        "versions_issued": issued,
                        "newly_marked": moved.rowcount,
                    },
                )
            )
        logger.info("rollout %s rolled back: %d devices, %d new versions", rollout_id, len(rolled), issued)


def _health_verdict(status: str, summary: dict[str, Any] | None) -> str:
    """`health_status` when the health ingest has set it, else the last report's own verdict."""
    if status != "unknown" or not summary or "healthy" not in summary:
        return status
    return "healthy" if summary["healthy"] else "unhealthy"


async def _apply_transitions(
    conn: AsyncConnection, rollout_id: str, decided: Step, versions: dict[str, int], now: datetime
) -> None:
    by_state: dict[DeviceState, list[dict[str, Any]]] = {}
    for t in decided.transitions:
        params: dict[str, Any] = {
            "b_id": t.device_id,
            "b_state": t.state.value,
            "b_reason": t.reason,
            "b_at": t.at or now,
        }
        if t.state is DeviceState.SENT:
            params["b_previous"] = versions.get(t.device_id)
        by_state.setdefault(t.state, []).append(params)
    for state, batch in by_state.items():
        values: dict[str, Any] = {
            "state": sa.bindparam("b_state"),
            "reason": sa.bindparam("b_reason"),
            "updated_at": now,
        }
        if state is DeviceState.SENT:
            values |= {
                "sent_at": sa.bindparam("b_at"),
                "previous_version": sa.bindparam("b_previous"),
                "target_version": None,
            }
        elif state is DeviceState.APPLIED:
            values["applied_at"] = sa.bindparam("b_at")
        elif state not in (DeviceState.DEFERRED, DeviceState.QUEUED):
            values["settled_at"] = sa.bindparam("b_at")
        statement = (
            sa.update(rollout_devices)
            .where(
                rollout_devices.c.rollout_id == rollout_id,
                rollout_devices.c.device_id == sa.bindparam("b_id"),
            )
            .values(**values)
        )
        for start in range(0, len(batch), _CHUNK):
            await conn.execute(statement, batch[start : start + _CHUNK])


async def _record_events(conn: AsyncConnection, rollout_id: str, decided: Step, now: datetime) -> None:
    rows: list[dict[str, Any]] = [
        {"rollout_id": rollout_id, "at": now, "kind": kind, "detail": detail}
        for kind, detail in decided.events
    ]
    if decided.transitions:
        counts = Counter(t.state.value for t in decided.transitions)
        notable = [
            {"device_id": t.device_id, "state": t.state.value, "reason": t.reason}
            for t in decided.transitions
            if t.state in _NOTABLE
        ]
        detail: dict[str, Any] = {"counts": dict(counts)}
        if notable:
            detail["devices"] = notable[:_NOTABLE_LISTED]
        rows.insert(0, {"rollout_id": rollout_id, "at": now, "kind": "devices", "detail": detail})
    if rows:
        await conn.execute(rollout_events.insert(), rows)
