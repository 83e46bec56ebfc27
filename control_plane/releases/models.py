"""A release as operators create and read it."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from control_plane.desired.layers import ConfigLayer

ReleaseId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")]


class ReleaseCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: ReleaseId | None = None
    name: str = Field(min_length=1, max_length=200)
    notes: str = Field(default="", max_length=4000)
    layer: ConfigLayer = Field(description="merge patches over each device's configuration")


class ReleaseView(BaseModel):
    id: str
    name: str
    notes: str
    layer: dict[str, Any]
    created_by: str
    created_at: datetime
