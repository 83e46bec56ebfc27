"""What the agent's handlers accept in a desired state's sections: one schema, two users.

The agent checks every document against these before it changes anything (a refusal is
`rejected invalid_config`). The control plane checks the same rules earlier, where an
operator can still fix the input: every configuration layer (a merge patch) when it is
written, and the merged result of each targeted device when a rollout is planned or created.

- ``config.env``: environment variables for the store applications (`EnvFileHandler`):
  names like ``POS_CURRENCY``, string values on one line.
- ``policies``: the policies the agent enforces (`PolicyHandler`), strictly typed. Unknown
  policy names are not an error (a newer control plane may send policies an older agent
  does not know): the agent lists them as unenforced.

Errors are `SectionError`: `field` is the dotted path (``policies.allowed_apps.1``), the
message says what is wrong there.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo

ENV_KEY = "env"
ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
MAX_ENV_VARIABLES = 256
MAX_ENV_VALUE = 4096
_ENV_FORBIDDEN = ("\n", "\r", "\0")
EMPTY: Mapping[str, Any] = MappingProxyType({})

AppId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]


class SectionError(ValueError):
    """A section value the agent would refuse: `field` (dotted path) and what is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class Policies(BaseModel):
    """The policies the agent enforces. A field left out (None) is not managed: the device
    keeps its own default. Strict types: ``"300"`` is not a timeout, ``1`` is not ``true``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    # Seconds of inactivity before the screen locks; 0 = never (kiosks).
    screen_lock_timeout_s: Annotated[StrictInt, Field(ge=0, le=86_400)] | None = None
    # Applications allowed to run; None = no restriction, [] = none.
    allowed_apps: Annotated[list[AppId], Field(max_length=256)] | None = None
    # Whether USB mass storage may be mounted.
    usb_storage: StrictBool | None = None
    # Lock the device to `kiosk_app`.
    kiosk_mode: StrictBool | None = None
    kiosk_app: AppId | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Policies:
        if self.allowed_apps is not None and len(set(self.allowed_apps)) != len(self.allowed_apps):
            raise ValueError("allowed_apps lists an application twice")
        if self.kiosk_mode and self.kiosk_app is None:
            raise ValueError("kiosk_mode needs kiosk_app")
        allowed = self.allowed_apps
        if self.kiosk_app is not None and allowed is not None and self.kiosk_app not in allowed:
            raise ValueError("kiosk_app must be one of allowed_apps")
        return self


@functools.cache
def _policy_values() -> dict[str, TypeAdapter[Any]]:
    """Each policy on its own (a layer sets some of them; the combination is checked on the
    result). Built on first use: only the control plane checks layers, agents never do."""

    def adapter(field: FieldInfo) -> TypeAdapter[Any]:
        if field.metadata:  # constraints pydantic moved off the annotation
            return TypeAdapter(Annotated[(field.annotation, *field.metadata)])  # type: ignore[arg-type]
        return TypeAdapter(field.annotation)  # type: ignore[arg-type]

    return {name: adapter(field) for name, field in Policies.model_fields.items()}


def parse_policies(policies: Mapping[str, Any]) -> tuple[Policies, list[str]]:
    """The enforceable policies of a complete document, and the names the agent does not know."""
    try:
        parsed = Policies.model_validate(policies)
    except ValidationError as exc:
        raise _section_error("policies", exc) from None
    unknown = sorted(set(policies) - set(Policies.model_fields))
    return parsed, unknown


def env_variables(config: Mapping[str, Any]) -> dict[str, str]:
    """``config.env`` of a complete document, checked."""
    env = _env_object(config.get(ENV_KEY, {}))
    if len(env) > MAX_ENV_VARIABLES:
        raise SectionError("config.env", f"config.env has {len(env)} variables; at most {MAX_ENV_VARIABLES}")
    for name, value in env.items():
        _check_env_name(name)
        _check_env_value(name, value)
    return dict(env)


def check_patch(policies: Mapping[str, Any] = EMPTY, config: Mapping[str, Any] = EMPTY) -> None:
    """A layer's sections (merge patches: `null` deletes): every value it sets must be one the
    agent accepts on its own. What depends on other layers (kiosk_mode needs kiosk_app, the
    number of variables) is checked on the merged result (`check_document`)."""
    adapters = _policy_values()
    for name, value in policies.items():
        if value is None or name not in adapters:
            continue
        try:
            adapters[name].validate_python(value)
        except ValidationError as exc:
            raise _section_error(f"policies.{name}", exc) from None
    env = config.get(ENV_KEY)
    if env is None:
        return
    for name, value in _env_object(env).items():
        _check_env_name(name)
        if value is not None:
            _check_env_value(name, value)


def check_document(policies: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """A complete (merged) desired state: what the agent's handlers will check."""
    env_variables(config)
    parse_policies(policies)


def _env_object(env: Any) -> Mapping[str, Any]:
    if not isinstance(env, Mapping):
        raise SectionError("config.env", "config.env must be an object of NAME: value")
    return env


def _check_env_name(name: str) -> None:
    if not ENV_NAME.match(name):
        field = f"config.env.{name[:64]}"
        raise SectionError(field, f"{field}: not a valid name (^[A-Z_][A-Z0-9_]*$)")


def _check_env_value(name: str, value: Any) -> None:
    field = f"config.env.{name}"
    if not isinstance(value, str):
        raise SectionError(field, f"{field} must be a string, not {type(value).__name__}")
    if any(char in value for char in _ENV_FORBIDDEN):
        raise SectionError(field, f"{field} contains a newline or NUL character")
    if len(value) > MAX_ENV_VALUE:
        raise SectionError(field, f"{field} is longer than {MAX_ENV_VALUE} characters")


def _section_error(prefix: str, exc: ValidationError) -> SectionError:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    field = f"{prefix}.{where}" if where else prefix
    return SectionError(field, f"{field}: {first['msg']}")
