"""API shapes of provisioning: the saga's state, per-role progress, the store timeline."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from control_plane.enrollment.models import TokenView


class RoleProgress(BaseModel):
    """Devices of one role: expected, and how many have reached each step (right now)."""

    expected: int
    enrolled: int
    configured: int = Field(description="applied their current desired version")
    healthy: int = Field(description="last health report healthy")
    online: int
    ready: int = Field(description="configured, healthy and online at once")


class ProvisioningView(BaseModel):
    store_id: str
    state: str = Field(
        description="waiting_enrollment, configuring, verifying, ready; cancelling → cancelled; "
        "failing → failed"
    )
    expected: dict[str, int]
    roles: dict[str, RoleProgress]
    tokens: list[TokenView]
    started_at: datetime
    updated_at: datetime
    deadline_at: datetime | None
    ready_at: datetime | None
    seconds_to_ready: float | None
    error: str | None


class StoreEvent(BaseModel):
    id: int
    store_id: str
    at: datetime
    kind: str
    detail: dict[str, Any]


class StoreEventPage(BaseModel):
    items: list[StoreEvent]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; None at the end.")
