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
  - `PolicyHandler`: ``policy.enforced.json`` from ``policies``, checked against
    `protocol.sections.Policies`, for the device's policy daemon.

  The rules of ``config.env`` and ``policies`` live in `protocol.sections`: the control plane
  checks layers, releases and rollouts against the same ones.

* **Imperative handlers** (`ApplyHandler`): ``apply(desired)`` and ``revert(previous)``.
  `MemoryHandler` is one, for the simulator (faults and delays on demand).

Every file handler writes its files for every document (an empty env file when there is no
``env``), so the set of files never depends on the version and a revert has a file to put back.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from agent.errors import ApplyError, InvalidConfig
from agent.files import PUBLIC
from protocol import sections
from protocol.messages import DesiredState

CONFIG_FILE = "config.json"
POLICIES_FILE = "policies.json"
ENV_FILE = "storefleet.env"
ENFORCED_POLICY_FILE = "policy.enforced.json"


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
    """``config.env`` checked (`protocol.sections`): names like ``POS_CURRENCY``, string values
    on one line."""
    try:
        return sections.env_variables(config)
    except sections.SectionError as exc:
        raise InvalidConfig(exc.message) from None


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


def parse_policies(policies: dict[str, Any]) -> tuple[sections.Policies, list[str]]:
    """The enforceable policies (`protocol.sections.Policies`) and the names of those this
    agent does not know (not an error: they stay in ``policies.json``, listed as unenforced)."""
    try:
        return sections.parse_policies(policies)
    except sections.SectionError as exc:
        raise InvalidConfig(exc.message) from None


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
