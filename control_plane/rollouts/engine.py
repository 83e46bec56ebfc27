"""The rollout state machine, pure: state and clock in, decisions out. No I/O.

Rollout states::

    scheduled ──start_at──▶ running ◀──resume── paused
                              │  ╲──failure threshold (on_failure=pause)──▶ paused
                              │   ╲─failure threshold (on_failure=abort)──▶ rolling_back ─▶ rolled_back
                              │    ╲no evidence: every device so far skipped, more waves to go──▶ paused
                              └──last wave passed, nothing deferred──▶ completed

Device states (per rollout)::

    queued ─(store open)─▶ deferred ─(window opens)─▶ sent
    queued ─(window, online, store cap allows)─▶ sent ─▶ applied ─(healthy through bake)─▶ healthy
    queued/deferred ─(offline past offline_skip_after_s)─▶ skipped
    sent ─(apply failed/rejected)─▶ failed          applied ─(unhealthy / silent)─▶ failed
    sent ─(apply timeout; device online)─▶ timed_out  ─(offline)─▶ skipped
    any moved ─(rollback)─▶ rolled_back

The evidence is cumulative: the success and failure ratios are over every settled device of
the waves started so far. A wave passes when none of its devices is queued or in flight
(deferred and skipped ones do not hold it up) and healthy / settled ≥ success_threshold
with settled ≥ min(min_sample, devices that could be changed) — but never on no evidence
at all: a wave whose devices are all deferred waits for a window (otherwise every wave
would "pass" empty and the deferred devices of all waves would then move at once), and
when every device of the waves started so far was skipped (offline), the rollout pauses
instead of starting a bigger wave blind (reason code ``no_evidence``, whatever
``on_failure`` says: nothing failed, it is the operator's call). An operator who resumes it
waives the evidence through the current wave (``evidence_waived_wave``); a later wave with
still no evidence pauses again. The last wave all skipped completes: nothing moved, and the
skipped devices are reported.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from control_plane.rollouts.models import DeviceState, Plan, RolloutState
from control_plane.rollouts.windows import in_window

IN_FLIGHT = frozenset({DeviceState.SENT, DeviceState.APPLIED})
PENDING = frozenset({DeviceState.QUEUED, DeviceState.SENT, DeviceState.APPLIED})
SETTLED_BAD = frozenset({DeviceState.FAILED, DeviceState.TIMED_OUT})


@dataclass(slots=True)
class RolloutStatus:
    id: str
    state: RolloutState
    current_wave: int
    wave_started_at: datetime | None
    start_at: datetime | None
    failures_accepted: int
    # Waves up to this one may pass with no evidence (an operator resumed a no-evidence pause).
    evidence_waived_wave: int | None
    plan: Plan


@dataclass(slots=True)
class DeviceStatus:
    """A targeted device as the engine sees it: its rollout row joined with what it reports."""

    device_id: str
    store_id: str
    role: str | None
    wave: int
    state: DeviceState
    sent_at: datetime | None = None
    applied_at: datetime | None = None
    target_version: int | None = None
    applied_version: int = 0
    apply_status: str | None = None
    apply_reported_at: datetime | None = None
    health_status: str = "unknown"
    health_at: datetime | None = None
    online: bool = True
    last_seen_at: datetime | None = None
    timezone: str = "UTC"
    trading_hours: Mapping[str, Any] | None = None
    desired_version: int = 0  # the device's version now (recorded as previous_version on a move)


@dataclass(slots=True)
class Transition:
    device_id: str
    state: DeviceState
    reason: str | None = None
    at: datetime | None = None  # when it happened (an apply: when its report was received)


@dataclass(slots=True)
class Step:
    """What to do: the driver persists all of it in one transaction, then acts."""

    transitions: list[Transition] = field(default_factory=list)
    state: RolloutState | None = None  # a new rollout state, if it changes
    current_wave: int | None = None  # a new wave, if it advances
    reason: str | None = None
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    @property
    def sends(self) -> list[str]:
        return [t.device_id for t in self.transitions if t.state is DeviceState.SENT]

    @property
    def rollback(self) -> bool:
        return self.state is RolloutState.ROLLING_BACK


def step(rollout: RolloutStatus, devices: Sequence[DeviceStatus], now: datetime) -> Step:
    """One evaluation of a rollout at `now`. Call it again after persisting the result."""
    out = Step()
    state = rollout.state
    if state is RolloutState.SCHEDULED:
        if rollout.start_at is not None and now < rollout.start_at:
            return out
        out.state = state = RolloutState.RUNNING
        out.events.append(("started", {"wave": rollout.current_wave}))
    if state not in (RolloutState.RUNNING, RolloutState.PAUSED):
        return out
    plan = rollout.plan
    current = {d.device_id: d.state for d in devices}

    def move(
        device: DeviceStatus, to: DeviceState, reason: str | None = None, at: datetime | None = None
    ) -> None:
        current[device.device_id] = to
        out.transitions.append(Transition(device.device_id, to, reason, at or now))

    # 1. Observe the devices in flight (while paused too: their outcome is evidence).
    for device in devices:
        _observe(device, plan, now, move)

    # 2. The failure threshold, over everything settled so far.
    started = [d for d in devices if d.wave <= rollout.current_wave]
    counts = Counter(current[d.device_id] for d in started)
    failures = sum(counts[s] for s in SETTLED_BAD)
    settled = failures + counts[DeviceState.HEALTHY]
    if state is RolloutState.RUNNING and _failure_threshold_hit(
        plan, failures - rollout.failures_accepted, settled
    ):
        reason = f"failure threshold reached: {failures} of {settled} settled devices failed"
        out.reason = reason
        out.state = RolloutState.ROLLING_BACK if plan.on_failure == "abort" else RolloutState.PAUSED
        out.events.append(("aborted" if out.rollback else "paused", {"reason": reason, "failures": failures}))
        return out
    if state is not RolloutState.RUNNING:
        return out

    # 3. Send what may go now: waves started so far, store in its window, online, under the cap.
    _send(rollout, started, devices, current, now, move)

    # 4. Advance the wave (or finish) when the current one has passed.
    counts = Counter(current[d.device_id] for d in started)
    if any(counts[s] for s in PENDING):
        return out
    # Failures an operator accepted (by resuming) are no longer evidence against the release.
    failures = max(0, sum(counts[s] for s in SETTLED_BAD) - rollout.failures_accepted)
    healthy = counts[DeviceState.HEALTHY]
    settled = healthy + failures
    changeable = (
        len(started) - counts[DeviceState.DEFERRED] - counts[DeviceState.SKIPPED] - rollout.failures_accepted
    )
    required = min(plan.min_sample, changeable)
    if counts[DeviceState.DEFERRED]:
        required = max(required, 1)
    if settled < required:
        return out  # waiting for deferred devices to reach a window
    if settled and healthy / settled < plan.success_threshold:
        reason = f"success ratio {healthy}/{settled} below {plan.success_threshold:g}"
        out.reason = reason
        out.state = RolloutState.ROLLING_BACK if plan.on_failure == "abort" else RolloutState.PAUSED
        out.events.append(("aborted" if out.rollback else "paused", {"reason": reason}))
        return out
    last = len(plan.waves) - 1
    if rollout.current_wave < last and all_skipped(counts) and not _waived(rollout):
        # Not one device proved the release (or disproved it): a bigger wave would start blind.
        waves = "wave 0" if rollout.current_wave == 0 else f"waves 0..{rollout.current_wave}"
        reason = f"no evidence: every device of {waves} was skipped (offline); resume to continue without it"
        out.reason = reason
        out.state = RolloutState.PAUSED
        out.events.append(
            ("paused", {"reason": reason, "code": "no_evidence", "skipped": counts[DeviceState.SKIPPED]})
        )
        return out
    if rollout.current_wave < last:
        out.current_wave = rollout.current_wave + 1
        out.events.append(
            ("wave_passed", {"wave": rollout.current_wave, "healthy": healthy, "settled": settled})
        )
        out.events.append(("wave_started", {"wave": out.current_wave}))
    elif not counts[DeviceState.DEFERRED]:
        out.state = RolloutState.COMPLETED
        out.events.append(
            ("completed", {"healthy": healthy, "failed": failures, "skipped": counts[DeviceState.SKIPPED]})
        )
    return out


def all_skipped(counts: Mapping[DeviceState, int]) -> bool:
    """Every device of the waves started so far (`counts`: per state) was skipped: no evidence.

    Shared by `step` and by the service, which waives the evidence on a resume only then.
    """
    skipped = counts.get(DeviceState.SKIPPED, 0)
    return skipped > 0 and skipped == sum(counts.values())


def _waived(rollout: RolloutStatus) -> bool:
    return rollout.evidence_waived_wave is not None and rollout.current_wave <= rollout.evidence_waived_wave


def _observe(device: DeviceStatus, plan: Plan, now: datetime, move: Any) -> None:
    if device.state is DeviceState.SENT:
        if device.target_version is None or device.sent_at is None:
            return  # the driver has not issued its version yet
        if device.applied_version >= device.target_version and device.apply_status == "applied":
            move(device, DeviceState.APPLIED, at=device.apply_reported_at or now)
        elif (
            device.apply_status in ("failed", "rejected")
            and device.apply_reported_at is not None
            and device.apply_reported_at >= device.sent_at
        ):
            move(device, DeviceState.FAILED, f"apply {device.apply_status}")
        elif now - device.sent_at >= timedelta(seconds=plan.apply_timeout_s):
            if device.online:
                move(device, DeviceState.TIMED_OUT, "no apply report before the timeout")
            else:
                move(device, DeviceState.SKIPPED, "offline: never applied")
        return
    if device.state is not DeviceState.APPLIED or device.applied_at is None:
        return
    applied_at = device.applied_at
    heard = device.health_at if device.health_at is not None and device.health_at >= applied_at else None
    if heard is not None and device.health_status == "unhealthy":
        move(device, DeviceState.FAILED, "unhealthy after apply")
    elif now - (heard or applied_at) >= timedelta(seconds=plan.heartbeat_grace_s):
        move(device, DeviceState.FAILED, "heartbeats stopped after apply")
    elif (
        heard is not None
        and device.health_status == "healthy"
        and heard >= applied_at + timedelta(seconds=plan.bake_for(device.wave))
    ):
        move(device, DeviceState.HEALTHY)


def _failure_threshold_hit(plan: Plan, failures: int, settled: int) -> bool:
    if failures <= 0:
        return False
    if plan.failure_count is not None and failures >= plan.failure_count:
        return True
    return (
        plan.failure_ratio is not None
        and settled >= plan.failure_min_sample
        and failures / settled >= plan.failure_ratio
    )


def _send(
    rollout: RolloutStatus,
    started: Sequence[DeviceStatus],
    everyone: Sequence[DeviceStatus],
    current: dict[str, DeviceState],
    now: datetime,
    move: Any,
) -> None:
    plan = rollout.plan
    # Per (store, role): targets, in flight, known-good (not moved, or proven healthy).
    total: Counter[tuple[str, str | None]] = Counter()
    in_flight: Counter[tuple[str, str | None]] = Counter()
    known_good: Counter[tuple[str, str | None]] = Counter()
    for device in everyone:
        key = (device.store_id, device.role)
        total[key] += 1
        state = current[device.device_id]
        if state in IN_FLIGHT:
            in_flight[key] += 1
        if state in (DeviceState.QUEUED, DeviceState.DEFERRED, DeviceState.SKIPPED, DeviceState.HEALTHY):
            known_good[key] += 1
    window_cache: dict[str, bool] = {}
    offline_since_floor = rollout.wave_started_at or now
    by_wave: dict[int, list[DeviceStatus]] = defaultdict(list)
    for device in started:
        by_wave[device.wave].append(device)
    for wave in sorted(by_wave):
        for device in by_wave[wave]:
            state = current[device.device_id]
            if state not in (DeviceState.QUEUED, DeviceState.DEFERRED):
                continue
            if device.store_id not in window_cache:
                window_cache[device.store_id] = in_window(
                    window=plan.window,
                    trading_hours=device.trading_hours,
                    timezone=device.timezone,
                    maintenance_hours=plan.maintenance_hours,
                    at=now,
                )
            if not window_cache[device.store_id]:
                if state is DeviceState.QUEUED:
                    move(device, DeviceState.DEFERRED, "store not in a maintenance window")
                continue
            if not device.online:
                since = max(device.last_seen_at or offline_since_floor, offline_since_floor)
                if now - since >= timedelta(seconds=plan.offline_skip_after_s):
                    move(device, DeviceState.SKIPPED, "offline past the deadline")
                continue
            key = (device.store_id, device.role)
            cap = max(1, math.floor(total[key] * plan.store_cap_percent / 100))
            if in_flight[key] >= cap:
                continue
            if plan.keep_known_good and total[key] > 1 and known_good[key] <= 1:
                continue
            in_flight[key] += 1
            known_good[key] -= 1
            move(device, DeviceState.SENT)


def assign_waves(
    plan: Plan, targets: Sequence[tuple[str, str, str | None]], *, order_key: str
) -> dict[str, int]:
    """Wave of each target `(device_id, store_id, region)`, deterministic for a rollout.

    Devices are taken in a pseudo-random but stable order (a hash of the rollout and device
    ids), so canaries spread over stores instead of being the alphabetically first ones.
    """
    ordered = sorted(targets, key=lambda t: hashlib.sha256(f"{order_key}/{t[0]}".encode()).digest())
    waves: dict[str, int] = {}
    total = len(ordered)
    for index, wave in enumerate(plan.waves):
        remaining = [t for t in ordered if t[0] not in waves]
        if wave.count is not None and wave.per is not None:
            taken: Counter[str] = Counter()
            for device_id, store_id, region in remaining:
                bucket = (region or "") if wave.per == "region" else store_id
                if taken[bucket] < wave.count:
                    taken[bucket] += 1
                    waves[device_id] = index
        elif wave.count is not None:
            for device_id, _, _ in remaining[: wave.count]:
                waves[device_id] = index
        else:
            assert wave.percent is not None
            goal = total if wave.percent >= 100 else math.ceil(total * wave.percent / 100)
            for device_id, _, _ in remaining[: max(0, goal - len(waves))]:
                waves[device_id] = index
    return waves
