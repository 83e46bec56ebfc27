"""API shapes of devices."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel


class DeviceView(BaseModel):
    id: str
    store_id: str
    role: str | None
    model: str
    serial: str
    os: str
    hostname: str
    agent_version: str
    enrolled_at: datetime
    last_seen_at: datetime | None
    online: bool
    desired_version: int
    applied_version: int
    in_sync: bool
    apply_status: str | None
    apply_reason: str | None
    apply_detail: str | None
    health: dict[str, Any] | None
    health_at: datetime | None
    cert_serial: str | None
    cert_not_after: datetime | None


class DevicePage(BaseModel):
    items: list[DeviceView]
    next_cursor: str | None
