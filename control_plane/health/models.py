"""API shapes of health: a store's roll-up and a device's history."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field


class StoreStatus(StrEnum):
    PROVISIONING = "provisioning"  # owned by the provisioning saga, never set by the roll-up
    READY = "ready"
    DEGRADED = "degraded"
    OFFLINE = "offline"
    DECOMMISSIONED = "decommissioned"  # final, never changed by the roll-up


class StoreHealth(BaseModel):
    store_id: str
    status: StoreStatus
    status_changed_at: datetime | None
    devices: int = Field(description="active devices")
    online: int
    healthy: int
    unhealthy: int
    unknown: int = Field(description="active devices that have not reported health yet")
    in_sync: int = Field(description="devices that applied their current desired version")
    failing_checks: dict[str, int] = Field(description="app check name → devices whose last report failed it")
    last_report_at: datetime | None


class HealthSample(BaseModel):
    """One health report as kept in the history (`at`: when the device sampled it)."""

    seq: int
    at: datetime
    healthy: bool
    cpu_percent: float
    memory_percent: float
    disk_percent: float
    checks: list[dict[str, Any]]
