"""What operators send and read for rollouts: the target selector, the plan, the views.

Waves: `percent` is cumulative (a wave of 25 % means that a quarter of the targets have been
in this wave or an earlier one); `count` is the wave's own size, and with `per` it is taken
per region (or store): "canary: one device per region". The last wave must be 100 %.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Identifier = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")]


class RolloutState(StrEnum):
    SCHEDULED = "scheduled"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"


ACTIVE_STATES = (RolloutState.SCHEDULED, RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.ROLLING_BACK)


class DeviceState(StrEnum):
    QUEUED = "queued"
    DEFERRED = "deferred"  # its store is not in a maintenance window
    SENT = "sent"
    APPLIED = "applied"
    HEALTHY = "healthy"  # applied and stayed healthy through the bake
    FAILED = "failed"  # apply failed/rejected, or unhealthy / silent after the apply
    TIMED_OUT = "timed_out"
    SKIPPED = "skipped"  # offline past the deadline
    ROLLED_BACK = "rolled_back"


# Devices carrying the release right now (rollback moves them back).
MOVED_STATES = frozenset(
    {DeviceState.SENT, DeviceState.APPLIED, DeviceState.HEALTHY, DeviceState.FAILED, DeviceState.TIMED_OUT}
)


class Selector(BaseModel):
    """Which devices: every given criterion must hold (AND); within one list, any (OR)."""

    model_config = ConfigDict(extra="forbid")

    stores: list[str] = Field(default_factory=list, max_length=10_000)
    regions: list[str] = Field(default_factory=list, max_length=1000)
    roles: list[str] = Field(default_factory=list, max_length=100)
    tags: list[str] = Field(default_factory=list, max_length=100)
    groups: list[str] = Field(default_factory=list, max_length=100)
    devices: list[str] = Field(default_factory=list, max_length=100_000)
    all: bool = Field(default=False, description="the whole fleet; required when nothing else is given")

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        given = any((self.stores, self.regions, self.roles, self.tags, self.groups, self.devices))
        if not given and not self.all:
            raise ValueError("an empty selector would target every device: give criteria or all=true")
        return self


class Wave(BaseModel):
    model_config = ConfigDict(extra="forbid")

    percent: float | None = Field(default=None, gt=0, le=100)
    count: int | None = Field(default=None, ge=1)
    per: Literal["region", "store"] | None = None
    bake_s: float | None = Field(default=None, ge=0, description="overrides the plan's bake_s")

    @model_validator(mode="after")
    def _one_size(self) -> Self:
        if (self.percent is None) == (self.count is None):
            raise ValueError("a wave has either percent or count")
        if self.per is not None and self.count is None:
            raise ValueError("per applies to count waves only")
        return self


def _default_waves() -> list[Wave]:
    return [Wave(count=1, per="region"), Wave(percent=5), Wave(percent=25), Wave(percent=100)]


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    waves: list[Wave] = Field(default_factory=_default_waves, min_length=1, max_length=20)
    bake_s: float = Field(default=300.0, ge=0)
    apply_timeout_s: float = Field(default=300.0, gt=0)
    # A wave passes when healthy / settled >= success_threshold over at least min_sample devices.
    success_threshold: float = Field(default=0.95, ge=0, le=1)
    min_sample: int = Field(default=1, ge=1)
    # Stop when failed / settled >= failure_ratio (after failure_min_sample settled devices) or
    # when failures >= failure_count. Failed and timed-out devices count; deferred/skipped do not.
    failure_ratio: float | None = Field(default=0.1, gt=0, le=1)
    failure_count: int | None = Field(default=None, ge=1)
    failure_min_sample: int = Field(default=1, ge=1)
    on_failure: Literal["pause", "abort"] = "abort"
    # Per store and role: at most this share of the devices in flight at once (at least one)...
    store_cap_percent: float = Field(default=100.0, gt=0, le=100)
    # ...and at least one device left on known-good (not moved, or proven healthy) meanwhile.
    keep_known_good: bool = True
    # "closed_hours": only while the store is closed per its trading hours (or inside
    # maintenance_hours when given); "now": immediately.
    window: Literal["closed_hours", "now"] = "closed_hours"
    maintenance_hours: dict[str, Any] | None = None
    offline_skip_after_s: float = Field(default=600.0, gt=0)
    # No health report for this long after the apply fails the device (heartbeats stopped).
    heartbeat_grace_s: float = Field(default=120.0, gt=0)

    @field_validator("waves")
    @classmethod
    def _ends_at_all(cls, waves: list[Wave]) -> list[Wave]:
        if waves[-1].percent != 100:
            raise ValueError("the last wave must be percent 100 (every targeted device)")
        last = 0.0
        for wave in waves:
            if wave.percent is not None:
                if wave.percent < last:
                    raise ValueError("wave percentages are cumulative and must not decrease")
                last = wave.percent
        return waves

    @field_validator("maintenance_hours")
    @classmethod
    def _hours(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        from control_plane.rollouts.windows import normalize_hours

        return normalize_hours(value, field="plan.maintenance_hours")

    def bake_for(self, wave: int) -> float:
        own = self.waves[wave].bake_s if wave < len(self.waves) else None
        return self.bake_s if own is None else own


class RolloutCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: Identifier | None = None
    release_id: Identifier
    selector: Selector
    plan: Plan = Field(default_factory=Plan)
    start_at: datetime | None = Field(default=None, description="scheduled start (UTC); default now")

    @field_validator("start_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("start_at needs a time zone (e.g. 2026-12-24T02:00:00Z)")
        return value


class WaveProgress(BaseModel):
    index: int
    devices: int
    states: dict[str, int]


class RolloutView(BaseModel):
    id: str
    release_id: str
    state: RolloutState
    reason: str | None
    current_wave: int
    evidence_waived_wave: int | None = Field(
        default=None, description="waves up to this one may pass with every device skipped (resumed)"
    )
    selector: dict[str, Any]
    plan: dict[str, Any]
    start_at: datetime | None
    created_by: str
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    devices: int
    states: dict[str, int]
    waves: list[WaveProgress]


class RolloutDeviceView(BaseModel):
    device_id: str
    store_id: str
    role: str | None
    wave: int
    state: DeviceState
    reason: str | None
    previous_version: int | None
    target_version: int | None
    sent_at: datetime | None
    applied_at: datetime | None
    settled_at: datetime | None


class RolloutEvent(BaseModel):
    id: int
    at: datetime
    kind: str
    detail: dict[str, Any]


class DiffEntry(BaseModel):
    path: str
    before: Any = None
    after: Any = None


class PlanGroup(BaseModel):
    """Devices whose configuration changes the same way (same before → after content)."""

    devices: int
    example_device: str
    diff: list[DiffEntry]


class PlanRefusal(BaseModel):
    """Devices whose configuration with the release is one their agents would refuse."""

    devices: int
    example_device: str
    field: str = Field(description="where in the merged document, e.g. policies.kiosk_app")
    message: str


class PlanWave(BaseModel):
    index: int
    devices: list[str]
    deferred: list[str]


class DryRunPlan(BaseModel):
    release_id: str
    targets: int
    waves: list[PlanWave]
    unchanged: int = Field(description="targets whose effective configuration the release does not change")
    changes: list[PlanGroup]
    refused: list[PlanRefusal] = Field(
        default_factory=list,
        description="devices whose agents would refuse the result (e.g. kiosk_mode without kiosk_app "
        "once merged with their other layers): a rollout of this release to them is refused",
    )
