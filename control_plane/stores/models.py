"""API shapes of stores."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from control_plane.desired.layers import ConfigLayer
from control_plane.enrollment.models import TokenCreated
from control_plane.provisioning.models import ProvisioningView
from control_plane.templates.models import TemplateId, TimeZoneName, TradingHoursInput
from protocol.topics import STORE_ID_PATTERN

StoreId = Annotated[str, Field(pattern=STORE_ID_PATTERN, examples=["DE-BER-0001"])]


class StoreConfig(ConfigLayer):
    """The store layer of the configuration: merged over the template's, under groups and devices."""


class StoreCreate(StoreConfig):
    id: StoreId
    name: Annotated[str, Field(min_length=1, max_length=200)]
    timezone: TimeZoneName | None = Field(
        default=None, description="IANA time zone; default: the template's, else UTC."
    )
    region: Annotated[str, Field(max_length=64)] | None = None
    template_id: TemplateId | None = Field(
        default=None, description="Make the store from this template (its devices, roles' configuration)."
    )
    template_version: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="A version of the template; default: its current one."
    )
    trading_hours: TradingHoursInput | None = Field(
        default=None,
        description="day or day range → 'HH:MM-HH:MM' | '00:00-24:00' | 'closed'; default: the template's.",
        examples=[{"mon-sat": "08:00-20:00", "sun": "closed"}],
    )
    provision: bool | None = Field(
        default=None,
        description="Start provisioning (tokens, then wait for the template's devices); "
        "default: true with a template. Needs a template.",
    )

    @field_validator("template_version", "provision")
    @classmethod
    def _needs_template(cls, value: Any, info: ValidationInfo) -> Any:
        # (A template_id that failed its own validation is missing from `data`: no second error.)
        if value not in (None, False) and "template_id" in info.data and info.data["template_id"] is None:
            raise PydanticCustomError(
                "template_required", "{field} needs a template_id", {"field": info.field_name}
            )
        return value

    @property
    def provisions(self) -> bool:
        return self.template_id is not None and self.provision is not False


class StorePatch(BaseModel):
    """A change to the store itself (not its configuration layer): the fields sent replace
    theirs; `null` clears `region` or `trading_hours` (no trading hours: always in a
    maintenance window)."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    timezone: TimeZoneName | None = None
    region: Annotated[str, Field(max_length=64)] | None = None
    trading_hours: TradingHoursInput | None = Field(
        default=None,
        description="day or day range → 'HH:MM-HH:MM' | '00:00-24:00' | 'closed'.",
        examples=[{"mon-sat": "08:00-20:00", "sun": "closed"}, {"mon-sun": "closed"}],
    )

    @model_validator(mode="after")
    def _something_and_nothing_unclearable(self) -> StorePatch:
        if not self.model_fields_set:
            raise PydanticCustomError(
                "empty_patch", "send at least one of name, timezone, region, trading_hours"
            )
        for field in ("name", "timezone"):
            if field in self.model_fields_set and getattr(self, field) is None:
                raise PydanticCustomError("not_nullable", "{field} cannot be cleared", {"field": field})
        return self

    def values(self) -> dict[str, Any]:
        """The columns to write: only the fields that were sent."""
        return {field: getattr(self, field) for field in sorted(self.model_fields_set)}


class StoreView(BaseModel):
    id: str
    name: str
    timezone: str
    region: str | None
    config: dict[str, Any]
    policies: dict[str, Any]
    checks: dict[str, Any] = Field(default_factory=dict)
    config_revision: int = Field(
        description='the store\'s ETag is "r<config_revision>"; it changes with its configuration layer '
        "and with its own fields (PATCH)"
    )
    device_count: int
    status: str = Field(description="provisioning, ready, degraded, offline or decommissioned")
    status_changed_at: datetime | None
    template_id: str | None
    template_version: int | None
    trading_hours: dict[str, Any] | None = Field(description="Normal form: all seven days, [[start, end], …]")
    ready_at: datetime | None = Field(description="When provisioning made the store ready")
    created_at: datetime
    updated_at: datetime


class StoreCreated(StoreView):
    """The new store; with provisioning, its saga and the enrollment tokens' secrets (shown once)."""

    provisioning: ProvisioningView | None = None
    enrollment_tokens: list[TokenCreated] = Field(
        default_factory=list,
        description="One token per role of the template (max_uses = its count). Secrets shown once.",
    )
