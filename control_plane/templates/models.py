"""API shapes of store templates.

The stored spec of a version (`template_versions.spec`) has exactly this shape, which the
effective-configuration code reads as well::

    {"description": str, "manifest": {role: count}, "layer": ConfigLayer JSON,
     "roles": {role: ConfigLayer JSON}, "timezone": IANA name | None,
     "trading_hours": normal-form trading hours | None}
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from control_plane.desired.layers import ConfigLayer
from control_plane.stores.trading_hours import TradingHoursError, normalize

TEMPLATE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
ROLE_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
MAX_PER_ROLE = 1000
MAX_ROLES = 50

TemplateId = Annotated[str, Field(pattern=TEMPLATE_ID_PATTERN, examples=["standard"])]
Role = Annotated[str, Field(pattern=ROLE_PATTERN, examples=["pos"])]
RoleCount = Annotated[int, Field(ge=1, le=MAX_PER_ROLE)]


def known_zone(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise PydanticCustomError(
            "time_zone", "unknown IANA time zone {zone} (e.g. Europe/Berlin)", {"zone": repr(value)}
        ) from None
    return value


def normal_trading_hours(value: Any) -> Any:
    """For a pydantic validator: the normal form, or an error that says which day and why."""
    try:
        return normalize(value)
    except TradingHoursError as exc:
        day = exc.field.removeprefix("trading_hours").lstrip(".")
        raise PydanticCustomError(
            "trading_hours", "{where}{detail}", {"where": f"{day!r}: " if day else "", "detail": exc.detail}
        ) from None


# Field types for a time zone and trading hours as operators write them (templates, stores).
TimeZoneName = Annotated[str, AfterValidator(known_zone), Field(examples=["Europe/Berlin"])]
TradingHoursInput = Annotated[dict[str, Any], AfterValidator(normal_trading_hours)]


class TemplateSpec(BaseModel):
    """What an operator writes for a template version (the body of PUT)."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=200)]
    description: Annotated[str, Field(max_length=2000)] = ""
    manifest: Annotated[
        dict[Role, RoleCount],
        Field(
            min_length=1,
            max_length=MAX_ROLES,
            description="Devices the store must have before it is ready: role → count (1..1000).",
            examples=[{"pos": 2, "tablet": 6, "kiosk": 1, "backoffice": 1}],
        ),
    ]
    layer: ConfigLayer | None = Field(
        default=None, description="Template-wide configuration layer (under every role's)."
    )
    roles: Annotated[
        dict[Role, ConfigLayer],
        Field(max_length=MAX_ROLES, description="Per-role configuration layers; roles of the manifest only."),
    ] = Field(default_factory=dict)
    timezone: TimeZoneName | None = Field(
        default=None, description="Default time zone of stores made from it."
    )
    trading_hours: TradingHoursInput | None = Field(
        default=None,
        description="Default trading hours: day or day range → 'HH:MM-HH:MM' | 'closed' (normalised).",
        examples=[{"mon-sat": "08:00-20:00", "sun": "closed"}],
    )

    @field_validator("roles")
    @classmethod
    def _roles_in_manifest(
        cls, roles: dict[str, ConfigLayer], info: ValidationInfo
    ) -> dict[str, ConfigLayer]:
        manifest = info.data.get("manifest")
        if manifest is None:  # the manifest itself is invalid; that error is reported
            return roles
        unknown = sorted(set(roles) - set(manifest))
        if unknown:
            raise PydanticCustomError(
                "unknown_role",
                "{unknown} not in the manifest ({known}): configure only roles the store has",
                {"unknown": ", ".join(map(repr, unknown)), "known": ", ".join(sorted(manifest))},
            )
        return roles

    def stored_spec(self) -> dict[str, Any]:
        """The immutable version's JSON (see the module docstring for the shape)."""
        return {
            "description": self.description,
            "manifest": dict(self.manifest),
            "layer": (self.layer or ConfigLayer()).as_layer(),
            "roles": {role: layer.as_layer() for role, layer in sorted(self.roles.items())},
            "timezone": self.timezone,
            "trading_hours": self.trading_hours,
        }


class TemplateCreate(TemplateSpec):
    id: TemplateId


class _SpecView(BaseModel):
    description: str
    manifest: dict[str, int]
    device_count: int = Field(description="Devices in the manifest, all roles.")
    layer: dict[str, Any]
    roles: dict[str, Any]
    timezone: str | None
    trading_hours: dict[str, Any] | None


class TemplateVersionView(_SpecView):
    """One immutable version."""

    template_id: str
    version: int
    created_at: datetime
    created_by: str


class TemplateView(_SpecView):
    """A template with its current version's spec. Its ETag is that version ("r<version>")."""

    id: str
    name: str
    version: int = Field(description="The current version: what new stores get by default.")
    created_at: datetime
    updated_at: datetime
    updated_by: str = Field(description="Who made the current version.")
    archived_at: datetime | None
