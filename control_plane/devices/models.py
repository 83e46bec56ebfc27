"""API shapes of devices."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from control_plane.devices.filters import DeviceSelector, Tag
from control_plane.devices.pagination import MAX_CURSOR_CHARS, DeviceSort, SortOrder
from control_plane.errors import InvalidInput

MAX_TAGS = 32

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """`3600`, `90m`, `72h`, `7d` → timedelta; anything else is a clear 422."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise InvalidInput(f"field 'expiring_within': {text!r} is not a duration like 3600, 90m, 72h or 7d")
    return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])


class DeviceView(BaseModel):
    id: str
    store_id: str
    state: str = Field(description="active, revoked or decommissioned")
    role: str | None
    model: str
    serial: str
    os: str
    hostname: str
    agent_version: str
    enrolled_at: datetime
    first_seen_at: datetime | None
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
    health_status: str = Field(description="healthy, unhealthy or unknown (no report yet)")
    checks: list[dict[str, Any]] = Field(description="app check results of the newest health report")
    health_dropped: int = Field(description="reports the agent's outbox had to discard, in total")
    cert_serial: str | None
    cert_not_after: datetime | None
    tags: list[str] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=list, description="ids of its groups, in layer order")


class DevicePage(BaseModel):
    items: list[DeviceView]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last")
    total: int | None = Field(default=None, description="devices matching the filters (with count=true)")


class DeviceListQuery(DeviceSelector):
    """Query parameters of `GET /v1/devices`: the filters, then sort and page.

    Lists are repeated parameters (`?role=pos&role=kiosk`); unknown parameters are refused.
    """

    sort: DeviceSort = DeviceSort.ID
    order: SortOrder = SortOrder.ASC
    limit: Annotated[int, Field(ge=1, le=1000)] = 100
    cursor: Annotated[str, Field(min_length=1, max_length=MAX_CURSOR_CHARS)] | None = None
    count: Annotated[bool, Field(description="also return the number of matching devices")] = False


class TagsReplace(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tags: Annotated[list[Tag], Field(max_length=MAX_TAGS)]


class TagsChange(BaseModel):
    """Add and remove in one step (removals first), so concurrent editors do not overwrite each other."""

    model_config = ConfigDict(extra="forbid")

    add: Annotated[list[Tag], Field(max_length=MAX_TAGS)] = Field(default_factory=list)
    remove: Annotated[list[Tag], Field(max_length=MAX_TAGS)] = Field(default_factory=list)


class RevokeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, Field(min_length=1, max_length=64)] = "unspecified"


class CertificateView(BaseModel):
    device_id: str
    serial: str
    not_before: datetime
    not_after: datetime
    status: str
    issued_by: str
    revoked_at: datetime | None
    revocation_reason: str | None
