"""API shapes of stores."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator

from protocol.topics import STORE_ID_PATTERN

StoreId = Annotated[str, Field(pattern=STORE_ID_PATTERN, examples=["DE-BER-0001"])]


class StoreConfig(BaseModel):
    """The store layer of the configuration: free-form JSON objects, merged over the defaults."""

    model_config = ConfigDict(extra="forbid")

    config: dict[str, Any] = Field(default_factory=dict)
    policies: dict[str, Any] = Field(default_factory=dict)


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
    config_revision: int
    device_count: int
    status: str = Field(description="provisioning, ready, degraded, offline or decommissioned")
    created_at: datetime
    updated_at: datetime
