"""The provisioning worker: moves every active saga, many stores per pass, until cancelled.

A pass reads all non-terminal sagas and, in one query, the devices of every store still
going forward; evaluates each saga (`saga.advance`, no I/O); and writes every saga that
changed — state, milestones, timeline events, the store's status on ready — in one
transaction. The cost of a pass is a fixed handful of statements whatever the number of
stores, so 100 stores x 10 devices cost what one store does, plus rows.

Each write re-checks, under a row lock, that the saga is still as it was read (its
`updated_at`): an operator's cancel that lands between the read and the write wins, and two
control planes running the worker cannot both apply a step.

Compensation (cancelling / failing) is per store and idempotent step by step, so a restart
anywhere in it carries on:

1. revoke every unrevoked enrollment token of the store (no new device can join);
2. decommission every device of the store that is not yet (certificates revoked, CRL
   re-published, the embedded broker drops it, retained topics cleared);
3. on a later pass, once no device needed decommissioning: clear the retained desired and
   status topics of all of them again, with the broker connected (a desired state that the
   publisher issued just before step 2 cannot land after this), then mark the store
   decommissioned and the saga cancelled / failed.

Wake-ups: a new saga, a cancel, an enrollment (`wake()`), and a periodic tick for what
devices report (the ingest writes in batches every `ingest_flush_interval_s`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from control_plane.aio import wait_event
from control_plane.clock import Clock, utc_now
from control_plane.db.schema import devices, enrollment_tokens, store_events, store_provisioning, stores
from control_plane.desired.publisher import DesiredStatePublisher, Publisher
from control_plane.devices.lifecycle import DECOMMISSIONED, DeviceLifecycle
from control_plane.errors import Conflict, NotFound
from control_plane.provisioning.saga import (
    ACTIVE,
    COMPENSATED,
    COMPENSATING,
    FORWARD,
    SagaState,
    Step,
    advance,
    device_facts,
)
from control_plane.provisioning.service import device_columns, record_events
from protocol.topics import TopicKind, device_topic

logger = logging.getLogger(__name__)


class CompensationPending(Exception):
    """A compensation step cannot finish now (the broker is not connected); next pass."""


class ProvisioningWorker:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        publisher: DesiredStatePublisher,
        lifecycle: DeviceLifecycle,
        link: Publisher,
        offline_after: timedelta,
        interval_s: float,
        clock: Clock = utc_now,
    ) -> None:
        self._engine = engine
        self._publisher = publisher
        self._lifecycle = lifecycle
        self._link = link
        self._offline_after = offline_after
        self._interval_s = interval_s
        # Wake-ups shorten the wait, but passes stay at least half an interval apart: a burst of
        # enrollments makes a few passes, not one each.
        self._settle_s = interval_s / 2
        self._clock = clock
        self._wakeup = asyncio.Event()
        self.passes = 0  # for benchmarks and metrics: passes made, and their time in total
        self.pass_seconds = 0.0

    def wake(self) -> None:
        self._wakeup.set()

    async def run(self) -> None:
        """Passes on wake-up or every `interval_s`, until cancelled. The first pass at start-up
        picks up every saga a previous process left unfinished."""
        while True:
            try:
                await self.run_once()
            except Exception:
                logger.exception("provisioning pass failed; trying again on the next tick")
            await asyncio.sleep(self._settle_s)
            await wait_event(self._wakeup, self._interval_s)
            self._wakeup.clear()

    async def run_once(self) -> None:
        started = time.perf_counter()
        try:
            await self._pass(self._clock())
        finally:
            self.passes += 1
            self.pass_seconds += time.perf_counter() - started

    async def _pass(self, now: datetime) -> None:
        async with self._engine.connect() as conn:
            sagas = (
                await conn.execute(
                    sa.select(store_provisioning).where(
                        store_provisioning.c.state.in_([state.value for state in ACTIVE])
                    )
                )
            ).all()
            forward = [saga for saga in sagas if SagaState(saga.state) in FORWARD]
            rows: list[Any] = []
            if forward:
                rows = list(
                    await conn.execute(
                        sa.select(*device_columns(now=now, offline_after=self._offline_after))
                        .join(store_provisioning, store_provisioning.c.store_id == devices.c.store_id)
                        .where(
                            store_provisioning.c.state.in_([state.value for state in FORWARD]),
                            devices.c.state == "active",
                        )
                    )
                )
        if forward:
            await self._advance(forward, rows, now)
        for saga in sagas:
            if SagaState(saga.state) in COMPENSATING:
                try:
                    await self._compensate(saga)
                except CompensationPending as exc:
                    logger.info("compensation of store %s waits: %s", saga.store_id, exc)
                except Exception:
                    logger.exception("compensation of store %s failed; retrying", saga.store_id)

    # --- forward ---------------------------------------------------------------------------

    async def _advance(self, sagas: list[Any], rows: list[Any], now: datetime) -> None:
        by_store: dict[str, list[Any]] = defaultdict(list)
        overdue = set()  # no desired state yet, and enrolled a while ago (see REFRESH_GRACE)
        for row in rows:
            by_store[row.store_id].append(device_facts(row._mapping))
            if row.desired_version == 0 and row.overdue:
                overdue.add(row.id)
        changed: list[tuple[Any, Step]] = []
        refresh: list[str] = []
        for saga in sagas:
            step = advance(
                state=SagaState(saga.state),
                expected=saga.expected,
                progress=saga.progress or {},
                devices=by_store.get(saga.store_id, []),
                started_at=saga.started_at,
                deadline_at=saga.deadline_at,
                now=now,
            )
            refresh.extend(device_id for device_id in step.refresh if device_id in overdue)
            if step.events or step.state.value != saga.state or step.progress != (saga.progress or {}):
                changed.append((saga, step))
        if refresh:
            self._publisher.request_refresh(refresh)
        if changed:
            await self._write(changed, now)

    async def _write(self, changed: list[tuple[Any, Step]], now: datetime) -> None:
        failing = False
        async with self._engine.begin() as conn:
            current = {
                row.store_id: (row.state, row.updated_at)
                for row in await conn.execute(
                    sa.select(
                        store_provisioning.c.store_id,
                        store_provisioning.c.state,
                        store_provisioning.c.updated_at,
                    )
                    .where(store_provisioning.c.store_id.in_([saga.store_id for saga, _ in changed]))
                    .order_by(store_provisioning.c.store_id)  # one lock order: no deadlock between workers
                    .with_for_update()
                )
            }
            # Only sagas nobody touched since we read them (a cancel may have landed).
            changed = [
                (saga, step)
                for saga, step in changed
                if current.get(saga.store_id) == (saga.state, saga.updated_at)
            ]
            if not changed:
                return
            await conn.execute(
                sa.update(store_provisioning)
                .where(store_provisioning.c.store_id == sa.bindparam("b_store"))
                .values(
                    state=sa.bindparam("b_state"),
                    progress=sa.bindparam("b_progress"),
                    updated_at=now,
                    ready_at=sa.bindparam("b_ready_at"),
                    seconds_to_ready=sa.bindparam("b_seconds"),
                    error=sa.bindparam("b_error"),
                ),
                [
                    {
                        "b_store": saga.store_id,
                        "b_state": step.state.value,
                        "b_progress": step.progress,
                        "b_ready_at": now if step.ready else None,
                        "b_seconds": (now - saga.started_at).total_seconds() if step.ready else None,
                        "b_error": step.error,
                    }
                    for saga, step in changed
                ],
            )
            events = [
                {"store_id": saga.store_id, "at": now, "kind": kind, "detail": detail}
                for saga, step in changed
                for kind, detail in step.events
            ]
            if events:
                await conn.execute(store_events.insert(), events)
            ready = [saga for saga, step in changed if step.ready]
            if ready:
                # Hand-over: from here on the store's status follows its devices' health.
                await conn.execute(
                    sa.update(stores)
                    .where(stores.c.id.in_([saga.store_id for saga in ready]))
                    .values(status="ready", status_changed_at=now)
                )
                # Unused uses of the saga's tokens must not let more devices join later.
                await conn.execute(
                    sa.update(enrollment_tokens)
                    .where(
                        enrollment_tokens.c.id.in_([t for saga in ready for t in saga.token_ids]),
                        enrollment_tokens.c.revoked_at.is_(None),
                    )
                    .values(revoked_at=now)
                )
            failing = any(step.state is SagaState.FAILING for _, step in changed)
        for saga, step in changed:
            if step.ready:
                logger.info(
                    "store %s ready after %.1f s", saga.store_id, (now - saga.started_at).total_seconds()
                )
            elif step.state is SagaState.FAILING:
                logger.warning("store %s provisioning failed: %s", saga.store_id, step.error)
        if failing:
            self.wake()  # compensate without waiting for the tick

    # --- compensation ----------------------------------------------------------------------

    async def _compensate(self, saga: Any) -> None:
        store_id = saga.store_id
        actor = f"provisioning:{store_id}"
        now = self._clock()
        async with self._engine.begin() as conn:
            revoked = await conn.execute(
                sa.update(enrollment_tokens)
                .where(enrollment_tokens.c.store_id == store_id, enrollment_tokens.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            if revoked.rowcount:
                await record_events(conn, store_id, now, [("tokens_revoked", {"count": revoked.rowcount})])
            # Read after the tokens are revoked: no device can join after this list is made.
            enrolled = (
                await conn.execute(
                    sa.select(devices.c.id, devices.c.state).where(devices.c.store_id == store_id)
                )
            ).all()
        to_retire = [row.id for row in enrolled if row.state != DECOMMISSIONED]
        retired: list[tuple[str, dict[str, Any]]] = []
        for device_id in to_retire:
            try:
                serials = await self._lifecycle.decommission(device_id, actor=actor)
            except (Conflict, NotFound):
                continue  # decommissioned meanwhile (by an operator, or a pass before a crash)
            retired.append(
                ("device_decommissioned", {"device_id": device_id, "certificates_revoked": serials})
            )
        if retired:
            async with self._engine.begin() as conn:
                await record_events(conn, store_id, self._clock(), retired)
        if to_retire:
            self.wake()
            return  # step 3 on a later pass: anything published before the decommission is out by then
        device_ids = [row.id for row in enrolled]
        if device_ids:
            if not self._link.is_connected:
                raise CompensationPending("broker not connected: retained topics not cleared yet")
            for device_id in device_ids:
                for kind in (TopicKind.DESIRED, TopicKind.STATUS):
                    # An empty retained message deletes the retained one (MQTT 3.1.1 §3.3.1.3).
                    await self._link.publish(device_topic(device_id, kind), b"", qos=1, retain=True)
        final = COMPENSATED[SagaState(saga.state)]
        now = self._clock()
        async with self._engine.begin() as conn:
            state = await conn.scalar(
                sa.select(store_provisioning.c.state)
                .where(store_provisioning.c.store_id == store_id)
                .with_for_update()
            )
            if state != saga.state:
                return
            await conn.execute(
                sa.update(stores)
                .where(stores.c.id == store_id)
                .values(status="decommissioned", status_changed_at=now)
            )
            await conn.execute(
                sa.update(store_provisioning)
                .where(store_provisioning.c.store_id == store_id)
                .values(state=final.value, updated_at=now)
            )
            events: list[tuple[str, dict[str, Any]]] = [("retained_cleared", {"devices": len(device_ids)})]
            detail: dict[str, Any] = {"devices_decommissioned": len(device_ids)}
            if saga.error:
                detail["error"] = saga.error
            events.append((final.value, detail))
            events.append(("decommissioned", {}))
            await record_events(conn, store_id, now, events)
        logger.info("store %s provisioning %s; store decommissioned", store_id, final.value)
