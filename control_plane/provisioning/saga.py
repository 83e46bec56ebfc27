"""The provisioning saga's states and rules, without I/O.

    waiting_enrollment ──all expected devices enrolled──▶ configuring
    configuring ──every device has a desired state issued──▶ verifying
    verifying ──every expected device applied it, healthy, online──▶ ready
    (any forward state) ──deadline passed──▶ failing ──compensated──▶ failed
    (any forward state) ──operator cancels──▶ cancelling ──compensated──▶ cancelled

The forward state is *level-triggered*: each pass computes it from the facts (what the
devices table says now) instead of replaying edges, so a pass after a restart, after a
lost wake-up or after a device was revoked mid-way lands in the right state without
special cases (a store whose device was revoked while verifying goes back to
waiting_enrollment). Per-device milestones (enrolled, configured, healthy) are remembered in
the saga row's `progress` so that each is put on the timeline exactly once.

Tokens are issued in the transaction that creates the store (see `service.py`), so there is
no persisted "issuing tokens" state: a store either exists with its tokens or not at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from control_plane.provisioning.models import RoleProgress


class SagaState(StrEnum):
    WAITING_ENROLLMENT = "waiting_enrollment"
    CONFIGURING = "configuring"
    VERIFYING = "verifying"
    READY = "ready"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    FAILING = "failing"
    FAILED = "failed"


FORWARD = frozenset({SagaState.WAITING_ENROLLMENT, SagaState.CONFIGURING, SagaState.VERIFYING})
COMPENSATING = frozenset({SagaState.CANCELLING, SagaState.FAILING})
TERMINAL = frozenset({SagaState.READY, SagaState.CANCELLED, SagaState.FAILED})
ACTIVE = FORWARD | COMPENSATING
# Where compensation ends, by the state it started from.
COMPENSATED = {SagaState.CANCELLING: SagaState.CANCELLED, SagaState.FAILING: SagaState.FAILED}

ENROLLED, CONFIGURED, HEALTHY = "enrolled", "configured", "healthy"


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """What the saga needs to know about one active device of the store."""

    id: str
    role: str | None
    desired_version: int
    applied_version: int
    apply_status: str | None
    healthy: bool
    online: bool

    @property
    def configured(self) -> bool:
        """Applied its current desired version. (The agent commits an apply only after its
        post-apply health check passed, so this also says the new configuration works.)"""
        return (
            self.desired_version > 0
            and self.applied_version == self.desired_version
            and self.apply_status == "applied"
        )

    @property
    def ready(self) -> bool:
        return self.configured and self.healthy and self.online


def device_facts(row: Mapping[Any, Any]) -> DeviceFacts:
    """From a row of `service.device_columns`: healthy = the health roll-up says so, or, while
    it has no verdict, the last report did (at least one report needed); online = said
    online and heard from recently (computed in SQL, as the device view shows it)."""
    status = row["health_status"]
    return DeviceFacts(
        id=row["id"],
        role=row["role"],
        desired_version=int(row["desired_version"]),
        applied_version=int(row["applied_version"]),
        apply_status=row["apply_status"],
        healthy=status == "healthy" or (status in (None, "unknown") and bool(row["reported_healthy"])),
        online=bool(row["online"]),
    )


def role_counts(expected: Mapping[str, int], devices: Iterable[DeviceFacts]) -> dict[str, dict[str, int]]:
    """Per role: expected and the devices at each step now (roles outside the manifest too)."""
    counts: dict[str, dict[str, int]] = {
        role: {"expected": n, "enrolled": 0, "configured": 0, "healthy": 0, "online": 0, "ready": 0}
        for role, n in expected.items()
    }
    for device in devices:
        role = device.role or "(none)"
        row = counts.get(role)
        if row is None:
            row = counts[role] = {
                "expected": 0,
                "enrolled": 0,
                "configured": 0,
                "healthy": 0,
                "online": 0,
                "ready": 0,
            }
        row["enrolled"] += 1
        row["configured"] += device.configured
        row["healthy"] += device.healthy
        row["online"] += device.online
        row["ready"] += device.ready
    return counts


def role_progress(expected: Mapping[str, int], devices: Iterable[DeviceFacts]) -> dict[str, RoleProgress]:
    """`role_counts` as the API shows it."""
    return {role: RoleProgress(**row) for role, row in sorted(role_counts(expected, devices).items())}


@dataclass
class Step:
    """The outcome of one evaluation: the new state and what to record and do."""

    state: SagaState
    progress: dict[str, list[str]]
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    refresh: list[str] = field(default_factory=list)  # devices still without a desired state
    error: str | None = None

    @property
    def ready(self) -> bool:
        return self.state is SagaState.READY


def advance(
    *,
    state: SagaState,
    expected: Mapping[str, int],
    progress: Mapping[str, list[str]],
    devices: list[DeviceFacts],
    started_at: datetime,
    deadline_at: datetime | None,
    now: datetime,
) -> Step:
    """Evaluate a forward saga against its devices' current facts."""
    assert state in FORWARD
    step = Step(state=state, progress={device_id: list(flags) for device_id, flags in progress.items()})
    for device in sorted(devices, key=lambda d: d.id):
        flags = step.progress.setdefault(device.id, [])
        for milestone, reached, kind in (
            (ENROLLED, True, "device_enrolled"),
            (CONFIGURED, device.configured, "device_configured"),
            (HEALTHY, device.healthy, "device_healthy"),
        ):
            if reached and milestone not in flags:
                flags.append(milestone)
                detail: dict[str, Any] = {"device_id": device.id, "role": device.role}
                if milestone == CONFIGURED:
                    detail["version"] = device.applied_version
                step.events.append((kind, detail))

    roles = role_counts(expected, devices)
    target = _target(expected, roles, devices)
    # Normally the enrollment already asked the publisher; the worker asks again for those
    # enrolled a while ago (a request lost in a crash).
    step.refresh = [d.id for d in devices if d.desired_version == 0]
    if target is SagaState.READY:
        seconds = (now - started_at).total_seconds()
        step.events.append(("ready", {"seconds_to_ready": round(seconds, 3), "devices": len(devices)}))
    elif deadline_at is not None and now >= deadline_at:
        step.error = "deadline passed in " + target.value + ": " + missing(expected, roles)
        step.events.append(("deadline_passed", {"state": target.value, "error": step.error}))
        target = SagaState.FAILING
    elif target is not state:
        step.events.append(("state_changed", {"from": state.value, "to": target.value}))
    step.state = target
    return step


def missing(expected: Mapping[str, int], roles: Mapping[str, Mapping[str, int]]) -> str:
    """What keeps the store from ready, e.g. 'pos 1/2 enrolled, tablet 4/6 ready'."""
    parts = []
    for role, n in sorted(expected.items()):
        counts = roles[role]
        if counts["enrolled"] < n:
            parts.append(f"{role} {counts['enrolled']}/{n} enrolled")
        elif counts["ready"] < n:
            parts.append(f"{role} {counts['ready']}/{n} ready")
    return ", ".join(parts) or "devices without a desired state"


def _target(
    expected: Mapping[str, int], roles: Mapping[str, Mapping[str, int]], devices: list[DeviceFacts]
) -> SagaState:
    if any(roles[role]["enrolled"] < n for role, n in expected.items()):
        return SagaState.WAITING_ENROLLMENT
    if any(device.desired_version == 0 for device in devices):
        return SagaState.CONFIGURING
    if any(roles[role]["ready"] < n for role, n in expected.items()):
        return SagaState.VERIFYING
    return SagaState.READY
