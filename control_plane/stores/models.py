"""API shapes of stores."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, Field, field_validator

from control_plane.desired.layers import ConfigLayer
from protocol.topics import STORE_ID_PATTERN

StoreId = Annotated[str, Field(pattern=STORE_ID_PATTERN, examples=["DE-BER-0001"])]


class StoreConfig(ConfigLayer):
    """The store layer of the configuration: merged over the template's, under groups and devices."""


class StoreCreate(StoreConfig):
    id: StoreId
    name: Annotated[str, Field(min_length=1, max_length=200)]
    timezone: Annotated[str, Field(examples=["Europe/Berlin"])] = "UTC"
    region: Annotated[str, Field(max_length=64)] | None = None

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown IANA time zone {value!r}") from None
        return value


class StoreView(BaseModel):
    id: str
    name: str
    timezone: str
    region: str | None
    config: dict[str, Any]
    policies: dict[str, Any]
    checks: dict[str, Any] = Field(default_factory=dict)
    config_revision: int = Field(description='the ETag of the store layer is "r<config_revision>"')
    device_count: int
    status: str = Field(description="provisioning, ready, degraded, offline or decommissioned")
    created_at: datetime
    updated_at: datetime
