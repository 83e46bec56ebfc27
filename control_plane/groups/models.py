"""API shapes of device groups."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from control_plane.desired.layers import ConfigLayer
from control_plane.devices.filters import GroupSelector
from protocol.messages import DeviceId

GROUP_ID_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
MAX_MEMBERS_PER_CALL = 500  # one IN list under SQLite's historical 999-parameter limit

GroupId = Annotated[str, Field(pattern=GROUP_ID_PATTERN, examples=["eu-pilot"])]
Priority = Annotated[
    int, Field(ge=0, le=10_000, description="lower applies first; equal priorities apply in id order")
]


class GroupKind(StrEnum):
    STATIC = "static"
    DYNAMIC = "dynamic"


class GroupCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: GroupId
    name: Annotated[str, Field(min_length=1, max_length=200)]
    kind: GroupKind
    selector: GroupSelector | None = Field(
        default=None, validate_default=True, description="dynamic groups only; {} matches every device"
    )
    layer: ConfigLayer = Field(default_factory=ConfigLayer)
    priority: Priority = 100

    @field_validator("selector")
    @classmethod
    def _selector_matches_kind(
        cls, value: GroupSelector | None, info: ValidationInfo
    ) -> GroupSelector | None:
        kind = info.data.get("kind")
        if kind is GroupKind.DYNAMIC and value is None:
            raise ValueError("a dynamic group needs a selector ({} matches every device)")
        if kind is GroupKind.STATIC and value is not None:
            raise ValueError("a static group has members, not a selector")
        return value


class GroupUpdate(BaseModel):
    """Rename or re-prioritise; omitted fields stay as they are."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    priority: Priority | None = None


class MembersAdd(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device_ids: Annotated[list[DeviceId], Field(min_length=1, max_length=MAX_MEMBERS_PER_CALL)]


class GroupView(BaseModel):
    id: str
    name: str
    kind: GroupKind
    selector: dict[str, Any] | None
    layer: dict[str, Any]
    priority: int
    revision: int = Field(description='the ETag is "r<revision>"')
    member_count: int
    created_at: datetime
    updated_at: datetime
