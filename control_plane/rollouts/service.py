"""Rollouts as operators see them: create, dry-run plan, progress, events and control.

The API only writes intentions (a new rollout, state paused / running / rolling_back); the
driver (`control_plane.rollouts.driver`, one replica at a time) acts on them. So any replica
can serve the API, and a control request never races a half-done wave.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from control_plane.audit import AuditEvent, AuditLog, Outcome
from control_plane.clock import Clock, utc_now
from control_plane.db.schema import releases, rollout_devices, rollout_events, rollouts, stores
from control_plane.desired.assembly import assemble
from control_plane.desired.layers import content_hash, effective_state
from control_plane.errors import Conflict, InvalidInput, NotFound
from control_plane.rollouts.engine import all_skipped, assign_waves
from control_plane.rollouts.models import (
    ACTIVE_STATES,
    DeviceState,
    DiffEntry,
    DryRunPlan,
    PlanGroup,
    PlanRefusal,
    PlanWave,
    RolloutCreate,
    RolloutDeviceView,
    RolloutEvent,
    RolloutState,
    RolloutView,
    WaveProgress,
)
from control_plane.rollouts.selector import resolve_groups, selector_clause, targets_query
from control_plane.rollouts.windows import in_window
from protocol.sections import SectionError, check_document

MAX_PLAN_DEVICES_LISTED = 1000
FINAL_STATES = (RolloutState.COMPLETED, RolloutState.ROLLED_BACK)


class RolloutService:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        audit: AuditLog,
        clock: Clock = utc_now,
        wake_driver: Callable[[], None] = lambda: None,
    ) -> None:
        self._engine = engine
        self._audit = audit
        self._clock = clock
        self.wake_driver = wake_driver

    # --- create and plan -----------------------------------------------------------------

    async def create(self, request: RolloutCreate, *, actor: str) -> RolloutView:
        now = self._clock()
        rollout_id = request.id or f"ro-{secrets.token_hex(6)}"
        # Before the write transaction (it assembles every target's layers): a layer written
        # in between is still checked by the agents themselves.
        async with self._engine.connect() as conn:
            release_layer = await _release_layer(conn, request.release_id)
            groups_clause = await resolve_groups(conn, request.selector)
            assembled = await assemble(conn, selector_clause(request.selector, groups_clause))
        refused = _refusals(_changes(assembled, release_layer))
        if refused:
            first = refused[0]
            total = sum(r.devices for r in refused)
            raise InvalidInput(
                f"field 'release_id': with this release {total} targeted devices would get a configuration "
                f"their agents refuse (e.g. {first.example_device}: {first.message}); "
                "see POST /v1/rollouts/plan",
                code="refused_by_agents",
            )
        async with self._engine.begin() as conn:
            await _release_layer(conn, request.release_id)
            targets = (await conn.execute(await targets_query(conn, request.selector))).all()
            if not targets:
                raise InvalidInput("field 'selector': matches no active device")
            if await conn.scalar(sa.select(rollouts.c.id).where(rollouts.c.id == rollout_id)) is not None:
                raise Conflict(f"rollout {rollout_id!r} exists already")
            busy = await _devices_in_active_rollouts(conn, [t.id for t in targets])
            if busy:
                raise Conflict(
                    f"{len(busy)} targeted devices are in an unfinished rollout already "
                    f"(e.g. {busy[0][0]!r} in {busy[0][1]!r}): finish, abort or roll it back first"
                )
            waves = assign_waves(
                request.plan, [(t.id, t.store_id, t.region) for t in targets], order_key=rollout_id
            )
            await conn.execute(
                rollouts.insert().values(
                    id=rollout_id,
                    release_id=request.release_id,
                    selector=request.selector.model_dump(mode="json"),
                    plan=request.plan.model_dump(mode="json"),
                    state=RolloutState.SCHEDULED,
                    current_wave=0,
                    seq=int(now.timestamp() * 1_000_000),
                    start_at=request.start_at,
                    created_by=actor,
                    created_at=now,
                    updated_at=now,
                )
            )
            await conn.execute(
                rollout_devices.insert(),
                [
                    {
                        "rollout_id": rollout_id,
                        "device_id": t.id,
                        "wave": waves[t.id],
                        "store_id": t.store_id,
                        "role": t.role,
                        "state": "queued",
                        "updated_at": now,
                    }
                    for t in targets
                ],
            )
            await conn.execute(
                rollout_events.insert().values(
                    rollout_id=rollout_id,
                    at=now,
                    kind="created",
                    detail={"release_id": request.release_id, "devices": len(targets), "by": actor},
                )
            )
            await self._audit.record(
                AuditEvent(
                    action="rollout.create",
                    outcome=Outcome.SUCCESS,
                    actor=actor,
                    target=rollout_id,
                    detail={"release_id": request.release_id, "devices": len(targets)},
                ),
                connection=conn,
            )
        self.wake_driver()
        return await self.get(rollout_id)

    async def dry_run(self, request: RolloutCreate) -> DryRunPlan:
        """Which devices in which wave, who is deferred right now, and what changes, per group
        of devices that change the same way. Nothing is written."""
        now = self._clock()
        async with self._engine.connect() as conn:
            release_layer = await _release_layer(conn, request.release_id)
            targets = (await conn.execute(await targets_query(conn, request.selector))).all()
            if not targets:
                raise InvalidInput("field 'selector': matches no active device")
            waves = assign_waves(
                request.plan,
                [(t.id, t.store_id, t.region) for t in targets],
                order_key=request.id or "dry-run",
            )
            store_rows = await conn.execute(
                sa.select(stores.c.id, stores.c.timezone, stores.c.trading_hours).where(
                    stores.c.id.in_(sorted({t.store_id for t in targets}))
                )
            )
            open_now = {
                row.id: in_window(
                    window=request.plan.window,
                    trading_hours=row.trading_hours,
                    timezone=row.timezone,
                    maintenance_hours=request.plan.maintenance_hours,
                    at=now,
                )
                for row in store_rows
            }
            groups_clause = await resolve_groups(conn, request.selector)
            assembled = await assemble(conn, selector_clause(request.selector, groups_clause))
        plan_waves = [PlanWave(index=i, devices=[], deferred=[]) for i in range(len(request.plan.waves))]
        for target in targets:
            wave = plan_waves[waves[target.id]]
            (wave.devices if open_now.get(target.store_id, True) else wave.deferred).append(target.id)
        for wave in plan_waves:
            wave.devices = wave.devices[:MAX_PLAN_DEVICES_LISTED]
            wave.deferred = wave.deferred[:MAX_PLAN_DEVICES_LISTED]
        groups, examples, unchanged = _changes(assembled, release_layer)
        changes = [
            PlanGroup(devices=len(ids), example_device=ids[0], diff=_diff(*examples[key]))
            for key, ids in _largest_first(groups)
        ]
        return DryRunPlan(
            release_id=request.release_id,
            targets=len(targets),
            waves=plan_waves,
            unchanged=unchanged,
            changes=changes,
            refused=_refusals((groups, examples, unchanged)),
        )

    # --- read ----------------------------------------------------------------------------

    async def get(self, rollout_id: str) -> RolloutView:
        async with self._engine.connect() as conn:
            row = (await conn.execute(sa.select(rollouts).where(rollouts.c.id == rollout_id))).first()
            if row is None:
                raise NotFound(f"rollout {rollout_id!r} does not exist", code="rollout_not_found")
            counts = (
                await conn.execute(
                    sa.select(rollout_devices.c.wave, rollout_devices.c.state, sa.func.count())
                    .where(rollout_devices.c.rollout_id == rollout_id)
                    .group_by(rollout_devices.c.wave, rollout_devices.c.state)
                )
            ).all()
        per_wave: dict[int, Counter[str]] = defaultdict(Counter)
        totals: Counter[str] = Counter()
        for wave, state, count in counts:
            per_wave[wave][state] += count
            totals[state] += count
        waves = [
            WaveProgress(index=i, devices=sum(per_wave[i].values()), states=dict(per_wave[i]))
            for i in range(len(row.plan["waves"]))
        ]
        return RolloutView(
            id=row.id,
            release_id=row.release_id,
            state=row.state,
            reason=row.reason,
            current_wave=row.current_wave,
            evidence_waived_wave=row.evidence_waived_wave,
            selector=row.selector,
            plan=row.plan,
            start_at=row.start_at,
            created_by=row.created_by,
            created_at=row.created_at,
            updated_at=row.updated_at,
            finished_at=row.finished_at,
            devices=sum(totals.values()),
            states=dict(totals),
            waves=waves,
        )

    async def recent(self, *, limit: int = 100) -> list[RolloutView]:
        async with self._engine.connect() as conn:
            ids = (
                await conn.scalars(sa.select(rollouts.c.id).order_by(rollouts.c.seq.desc()).limit(limit))
            ).all()
        return [await self.get(rollout_id) for rollout_id in ids]

    async def devices(
        self, rollout_id: str, *, state: str | None = None, limit: int = 1000, offset: int = 0
    ) -> list[RolloutDeviceView]:
        await self.get(rollout_id)
        query = sa.select(rollout_devices).where(rollout_devices.c.rollout_id == rollout_id)
        if state is not None:
            query = query.where(rollout_devices.c.state == state)
        query = (
            query.order_by(rollout_devices.c.wave, rollout_devices.c.device_id).limit(limit).offset(offset)
        )
        async with self._engine.connect() as conn:
            return [RolloutDeviceView(**row._mapping) for row in await conn.execute(query)]

    async def events(
        self, rollout_id: str, *, after: int = 0, wait_s: float = 0.0, limit: int = 500
    ) -> list[RolloutEvent]:
        """Events with id > `after`; with `wait_s`, wait (long-poll) until there is one."""
        await self.get(rollout_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            async with self._engine.connect() as conn:
                rows = await conn.execute(
                    sa.select(rollout_events)
                    .where(rollout_events.c.rollout_id == rollout_id, rollout_events.c.id > after)
                    .order_by(rollout_events.c.id)
                    .limit(limit)
                )
                found = [RolloutEvent(id=r.id, at=r.at, kind=r.kind, detail=r.detail) for r in rows]
            if found or loop.time() >= deadline:
                return found
            await asyncio.sleep(min(0.25, max(0.0, deadline - loop.time())))

    # --- control -------------------------------------------------------------------------

    async def pause(self, rollout_id: str, *, actor: str) -> RolloutView:
        return await self._control(
            rollout_id, actor, "pause", {RolloutState.RUNNING, RolloutState.SCHEDULED}, RolloutState.PAUSED
        )

    async def resume(self, rollout_id: str, *, actor: str) -> RolloutView:
        """Continue a paused rollout; the failures seen so far are accepted (the threshold
        counts new failures from here). If every device of the waves started so far was
        skipped (the engine's no-evidence pause), the operator waives the evidence through the
        current wave: it may pass on none; a later wave with still none pauses again. A rollout
        paused before it started is scheduled again (it starts at its start time)."""
        return await self._control(rollout_id, actor, "resume", {RolloutState.PAUSED}, RolloutState.RUNNING)

    async def abort(self, rollout_id: str, *, actor: str) -> RolloutView:
        """Stop and roll back every device that moved."""
        return await self._control(
            rollout_id,
            actor,
            "abort",
            {RolloutState.SCHEDULED, RolloutState.RUNNING, RolloutState.PAUSED},
            RolloutState.ROLLING_BACK,
        )

    async def rollback(self, rollout_id: str, *, actor: str) -> RolloutView:
        """Roll back a rollout in any state, a completed one included."""
        return await self._control(
            rollout_id,
            actor,
            "rollback",
            {RolloutState.SCHEDULED, RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.COMPLETED},
            RolloutState.ROLLING_BACK,
        )

    async def _control(
        self, rollout_id: str, actor: str, action: str, allowed: set[RolloutState], to: RolloutState
    ) -> RolloutView:
        now = self._clock()
        async with self._engine.begin() as conn:
            row = (
                await conn.execute(
                    sa.select(rollouts.c.state, rollouts.c.current_wave, rollouts.c.wave_started_at)
                    .where(rollouts.c.id == rollout_id)
                    .with_for_update()
                )
            ).first()
            if row is None:
                raise NotFound(f"rollout {rollout_id!r} does not exist", code="rollout_not_found")
            if row.state not in allowed:
                raise Conflict(f"cannot {action} a rollout that is {row.state}", code="rollout_state")
            if action == "resume" and row.wave_started_at is None:
                # Paused before the driver started it: back to waiting for its start time (the
                # driver then starts it as any other: `started` event, wave clock, skips).
                to = RolloutState.SCHEDULED
            values: dict[str, Any] = {"state": to, "updated_at": now, "reason": f"{action} by {actor}"}
            waiver: dict[str, Any] = {}
            if action == "resume":
                values["failures_accepted"] = await _failures(conn, rollout_id)
                # Waive only what the operator sees: a wave whose devices are not all skipped
                # yet (say, paused by hand while its canaries were still queued) keeps the gate.
                if all_skipped(await _started_states(conn, rollout_id, row.current_wave)):
                    waiver["evidence_waived_wave"] = values["evidence_waived_wave"] = row.current_wave
                    values["reason"] += f"; missing evidence waived through wave {row.current_wave}"
            await conn.execute(sa.update(rollouts).where(rollouts.c.id == rollout_id).values(**values))
            await conn.execute(
                rollout_events.insert().values(
                    rollout_id=rollout_id, at=now, kind=action, detail={"by": actor, **waiver}
                )
            )
            await self._audit.record(
                AuditEvent(
                    action=f"rollout.{action}",
                    outcome=Outcome.SUCCESS,
                    actor=actor,
                    target=rollout_id,
                    detail=waiver,
                ),
                connection=conn,
            )
        self.wake_driver()
        return await self.get(rollout_id)


_ContentKey = tuple[str, str]  # content hashes before and after the release
_Changes = tuple[dict[_ContentKey, list[str]], dict[_ContentKey, tuple[dict[str, Any], dict[str, Any]]], int]


def _changes(assembled: Any, release_layer: Mapping[str, Any]) -> _Changes:
    """Targets grouped by how the release changes them: device ids and one (before, after)
    example per group, and how many it does not change."""
    groups: dict[_ContentKey, list[str]] = defaultdict(list)
    examples: dict[_ContentKey, tuple[dict[str, Any], dict[str, Any]]] = {}
    unchanged = 0
    # Devices of a store share its layer objects (template, role, store, groups): merge and
    # hash once per distinct stack (2,708 stacks for 10,000 devices in benchmarks.issue).
    by_stack: dict[tuple[int, ...], tuple[_ContentKey, dict[str, Any], dict[str, Any]]] = {}
    for item in assembled:
        stack = tuple(id(layer) for _, layer in item.layers)
        if stack not in by_stack:
            layers = [layer for _, layer in item.layers]
            before = effective_state(*layers)
            after = effective_state(*layers, release_layer)
            by_stack[stack] = ((content_hash(before), content_hash(after)), before, after)
        key, before, after = by_stack[stack]
        if key[0] == key[1]:
            unchanged += 1
            continue
        groups[key].append(item.device_id)
        examples.setdefault(key, (before, after))
    return groups, examples, unchanged


def _largest_first(groups: dict[_ContentKey, list[str]]) -> list[tuple[_ContentKey, list[str]]]:
    return sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[1][0]))


def _refusals(changes: _Changes) -> list[PlanRefusal]:
    """The changed groups whose result the agents' handlers would refuse (`protocol.sections`),
    checked once per distinct result."""
    groups, examples, _ = changes
    refused = []
    for key, ids in _largest_first(groups):
        after = examples[key][1]
        try:
            check_document(after["policies"], after["config"])
        except SectionError as exc:
            refused.append(
                PlanRefusal(devices=len(ids), example_device=ids[0], field=exc.field, message=exc.message)
            )
    return refused


async def _release_layer(conn: AsyncConnection, release_id: str) -> dict[str, Any]:
    layer = await conn.scalar(sa.select(releases.c.layer).where(releases.c.id == release_id))
    if layer is None:
        raise InvalidInput(f"field 'release_id': release {release_id!r} does not exist")
    return dict(layer)


async def _devices_in_active_rollouts(conn: AsyncConnection, device_ids: list[str]) -> list[tuple[str, str]]:
    busy: list[tuple[str, str]] = []
    for start in range(0, len(device_ids), 5000):
        chunk = device_ids[start : start + 5000]
        rows = await conn.execute(
            sa.select(rollout_devices.c.device_id, rollout_devices.c.rollout_id)
            .join(rollouts, rollouts.c.id == rollout_devices.c.rollout_id)
            .where(
                rollouts.c.state.in_([s.value for s in ACTIVE_STATES]), rollout_devices.c.device_id.in_(chunk)
            )
        )
        busy.extend((r.device_id, r.rollout_id) for r in rows)
    return busy


async def _failures(conn: AsyncConnection, rollout_id: str) -> int:
    count = await conn.scalar(
        sa.select(sa.func.count()).where(
            rollout_devices.c.rollout_id == rollout_id, rollout_devices.c.state.in_(["failed", "timed_out"])
        )
    )
    return int(count or 0)


async def _started_states(conn: AsyncConnection, rollout_id: str, current_wave: int) -> Counter[DeviceState]:
    """Device counts per state over the waves started so far (the engine's evidence)."""
    rows = await conn.execute(
        sa.select(rollout_devices.c.state, sa.func.count())
        .where(rollout_devices.c.rollout_id == rollout_id, rollout_devices.c.wave <= current_wave)
        .group_by(rollout_devices.c.state)
    )
    return Counter({DeviceState(state): count for state, count in rows})


def _diff(before: Mapping[str, Any], after: Mapping[str, Any], path: str = "") -> list[DiffEntry]:
    """Leaf-level differences as JSON pointers (objects recurse, anything else compares whole)."""
    entries: list[DiffEntry] = []
    for key in sorted(set(before) | set(after)):
        here = f"{path}/{str(key).replace('~', '~0').replace('/', '~1')}"
        old, new = before.get(key), after.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            entries.extend(_diff(old, new, here))
        elif old != new:
            entries.append(DiffEntry(path=here, before=old, after=new))
    return entries
