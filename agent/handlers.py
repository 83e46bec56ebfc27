"""Apply handlers: what "apply a desired state" means on a device.

The reconciler has checked the signature, the device and the version; the handlers turn the
document into effect through the `agent.pipeline.ApplyPipeline`, which validates all of them
before anything changes, installs them as one unit and reverts them as one unit.

Two kinds:

* **File handlers** (`FileHandler`) are pure: `render(desired)` validates their section of
  the document and returns the files it becomes, or raises `InvalidConfig`. The pipeline
  writes every handler's files crash-safely (journal, staged temporaries, backups, renames),
  so a new file handler only decides *what* to write.

  - `FileConfigHandler`: ``config.json`` and ``policies.json``, the documents as sent, for
    the store applications.
  - `EnvFileHandler`: ``storefleet.env`` from ``config.env`` (name → string), for systemd
    ``EnvironmentFile=`` and shells (``. storefleet.env``).
  - `PolicyHandler`: ``policy.enforced.json`` from ``policies``, checked against `Policies`,
    for the device's policy daemon.

* **Imperative handlers** (`ApplyHandler`): ``apply(desired)`` and ``revert(previous)``.
  `MemoryHandler` is one, for the simulator (faults and delays on demand).

Every file handler writes its files for every document (an empty env file when there is no
``env``), so the set of files never depends on the version and a revert has a file to put back.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, model_validator

from agent.errors import ApplyError, InvalidConfig
from agent.files import PUBLIC
from protocol.messages import DesiredState

CONFIG_FILE = "config.json"
POLICIES_FILE = "policies.json"
ENV_FILE = "storefleet.env"
ENFORCED_POLICY_FILE = "policy.enforced.json"

ENV_KEY = "env"
ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
MAX_ENV_VARIABLES = 256
MAX_ENV_VALUE = 4096
_ENV_FORBIDDEN = ("\n", "\r", "\0")


@dataclass(frozen=True, slots=True)
class Output:
    """One file a handler wants in place: `path` gets exactly `data` with `mode`."""

    path: Path
    data: bytes
    mode: int = PUBLIC


@runtime_checkable
class FileHandler(Protocol):
    def render(self, desired: DesiredState) -> list[Output]:
        """The files `desired` becomes; raise `InvalidConfig` if its section is not acceptable.
        Pure: no side effects (the pipeline calls it to validate, then to install)."""
        ...


@runtime_checkable
class ApplyHandler(Protocol):
    """An imperative handler. Optionally also ``validate(desired)`` (raise `InvalidConfig`,
    change nothing) and ``async revert(previous)`` (put `previous`, None if nothing was
    applied yet, back in force after a later step failed); the pipeline calls them if present."""

    async def apply(self, desired: DesiredState) -> None:
        """Make `desired` take effect, or raise `ApplyError` with the previous state in force."""
        ...


Handler = FileHandler | ApplyHandler


def render_json(document: Any, *, what: str) -> bytes:
    try:
        text = json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidConfig(f"{what} is not serialisable", detail=f"{what}: {exc}") from exc
    return text.encode() + b"\n"


class FileConfigHandler:
    """``config.json`` and ``policies.json``: the configuration and policies as sent."""

    name = "config"

    def __init__(self, config_dir: Path) -> None:
        self.config_dir = config_dir

    def render(self, desired: DesiredState) -> list[Output]:
        return [
            Output(self.config_dir / CONFIG_FILE, render_json(desired.config, what="config")),
            Output(self.config_dir / POLICIES_FILE, render_json(desired.policies, what="policies")),
        ]


# --- environment -------------------------------------------------------------------------


def env_variables(config: dict[str, Any]) -> dict[str, str]:
    """``config.env`` checked: names like ``POS_CURRENCY``, string values on one line."""
    env = config.get(ENV_KEY, {})
    if not isinstance(env, dict):
        raise InvalidConfig("config.env must be an object of NAME: value")
    if len(env) > MAX_ENV_VARIABLES:
        raise InvalidConfig(f"config.env has {len(env)} variables; at most {MAX_ENV_VARIABLES}")
    for name, value in env.items():
        if not ENV_NAME.match(name):
            raise InvalidConfig(f"config.env: {name[:64]!r} is not a valid name (^[A-Z_][A-Z0-9_]*$)")
        if not isinstance(value, str):
            raise InvalidConfig(f"config.env.{name} must be a string, not {type(value).__name__}")
        if any(char in value for char in _ENV_FORBIDDEN):
            raise InvalidConfig(f"config.env.{name} contains a newline or NUL character")
        if len(value) > MAX_ENV_VALUE:
            raise InvalidConfig(f"config.env.{name} is longer than {MAX_ENV_VALUE} characters")
    return dict(env)


def _quote(value: str) -> str:
    """Double-quoted with the escapes both systemd's EnvironmentFile parser and POSIX sh
    honour inside double quotes (``\\`` ``"`` ``$`` and the backtick): no expansion either way."""
    escaped = "".join("\\" + char if char in '\\"$`' else char for char in value)
    return f'"{escaped}"'


def render_env(variables: dict[str, str], *, version: int) -> bytes:
    lines = [f"# storefleet desired state version {version}; written by storefleet-agent, do not edit"]
    lines.extend(f"{name}={_quote(value)}" for name, value in sorted(variables.items()))
    return ("\n".join(lines) + "\n").encode()


class EnvFileHandler:
    """``storefleet.env`` for store applications started by systemd (``EnvironmentFile=``)."""

    name = "env"

    def __init__(self, config_dir: Path) -> None:
        self.config_dir = config_dir

    def render(self, desired: DesiredState) -> list[Output]:
        variables = env_variables(desired.config)
        return [Output(self.config_dir / ENV_FILE, render_env(variables, version=desired.version))]


# --- policies ----------------------------------------------------------------------------

AppId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]


class Policies(BaseModel):
    """The policies this agent enforces. A field left out (None) is not managed: the device
    keeps its own default. Strict types: ``"300"`` is not a timeout, ``1`` is not ``true``.

    Unknown policy names are not an error (a newer control plane may send policies this
    agent does not know): they stay in ``policies.json`` and are listed as ``unenforced``.
    """

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


def parse_policies(policies: dict[str, Any]) -> tuple[Policies, list[str]]:
    """The enforceable policies and the names of those this agent does not know."""
    try:
        parsed = Policies.model_validate(policies)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        field = f"policies.{where}" if where else "policies"
        raise InvalidConfig(f"{field}: {first['msg']}") from None
    unknown = sorted(set(policies) - set(Policies.model_fields))
    return parsed, unknown


class PolicyHandler:
    """``policy.enforced.json``: what the device's policy daemon enforces, normalised."""

    name = "policy"

    def __init__(self, config_dir: Path) -> None:
        self.config_dir = config_dir

    def render(self, desired: DesiredState) -> list[Output]:
        policies, unknown = parse_policies(desired.policies)
        document = {"version": desired.version, "policies": policies.model_dump(), "unenforced": unknown}
        return [Output(self.config_dir / ENFORCED_POLICY_FILE, render_json(document, what="policies"))]


def default_handlers(config_dir: Path) -> list[Handler]:
    """What a real device runs: config and policies as sent, environment, enforced policies."""
    return [FileConfigHandler(config_dir), EnvFileHandler(config_dir), PolicyHandler(config_dir)]


# --- simulator ---------------------------------------------------------------------------


class MemoryHandler:
    """Keeps the applied document in memory. Faults for the simulator:

    * `fail_versions`: these versions fail to apply;
    * `failure_rate`: probability that any apply fails (seeded, reproducible);
    * `delay_s`: how long an apply takes.

    It validates like a real device (env names, policies), so a simulated fleet refuses what
    a real one would.
    """

    name = "memory"

    def __init__(
        self,
        *,
        failure_rate: float = 0.0,
        fail_versions: set[int] | None = None,
        delay_s: float = 0.0,
        seed: int | None = None,
    ) -> None:
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError("failure_rate must be between 0 and 1")
        self.failure_rate = failure_rate
        self.fail_versions: set[int] = set(fail_versions or ())
        self.delay_s = delay_s
        # Fault injection, not security: a seeded PRNG makes runs reproducible.
        self._rng = random.Random(seed)  # noqa: S311
        self.applied: DesiredState | None = None
        self.attempts = 0
        self.reverts = 0

    def validate(self, desired: DesiredState) -> None:
        env_variables(desired.config)
        parse_policies(desired.policies)

    async def apply(self, desired: DesiredState) -> None:
        self.attempts += 1
        if self.delay_s > 0:
            await asyncio.sleep(self.delay_s)
        if desired.version in self.fail_versions:
            raise ApplyError(f"injected failure for version {desired.version}")
        if self.failure_rate and self._rng.random() < self.failure_rate:
            raise ApplyError(f"injected random failure applying version {desired.version}")
        self.applied = desired

    async def revert(self, previous: DesiredState | None) -> None:
        self.reverts += 1
        self.applied = previous
