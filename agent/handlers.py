"""Apply handlers: what "apply a desired state" means on a device.

The reconciler has already checked the signature, the device and the version; a handler only
makes the new configuration take effect, or raises `ApplyError` and leaves the previous one
in force (last-known-good).

* `FileConfigHandler` writes ``config.json`` and ``policies.json`` into a directory that the
  store applications read. Both files are staged and fsynced before either is renamed, so a
  crash leaves the old pair or the new pair, and a failure restores the old one.
* `MemoryHandler` keeps the last applied document in memory, for the simulator; it can be
  told to fail or to take time.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from pathlib import Path
from typing import Any, Protocol

from agent.errors import ApplyError
from agent.files import PUBLIC, discard, fsync_dir, stage
from protocol.messages import DesiredState

CONFIG_FILE = "config.json"
POLICIES_FILE = "policies.json"


class ApplyHandler(Protocol):
    async def apply(self, desired: DesiredState) -> None:
        """Make `desired` take effect, or raise `ApplyError` with the old state still in force."""
        ...


def _render(document: dict[str, Any]) -> bytes:
    try:
        text = json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ApplyError("configuration is not serialisable", detail=str(exc)) from exc
    return text.encode() + b"\n"


class FileConfigHandler:
    """Writes the desired config and policies as JSON files, atomically, as one unit."""

    def __init__(self, config_dir: Path) -> None:
        self.config_dir = config_dir

    async def apply(self, desired: DesiredState) -> None:
        files = {CONFIG_FILE: _render(desired.config), POLICIES_FILE: _render(desired.policies)}
        await asyncio.to_thread(self._write, files)

    def _write(self, files: dict[str, bytes]) -> None:
        try:
            self.config_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ApplyError(f"cannot create {self.config_dir}", detail=f"{self.config_dir}: {exc}") from exc
        targets = {name: self.config_dir / name for name in files}
        previous = {name: _read_or_none(path) for name, path in targets.items()}
        staged: dict[str, Path] = {}
        try:
            for name, data in files.items():
                staged[name] = stage(targets[name], data, mode=PUBLIC)
        except OSError as exc:
            discard(list(staged.values()))
            raise ApplyError("cannot write the configuration", detail=f"{exc}") from exc
        replaced: list[str] = []
        try:
            for name, tmp in staged.items():
                os.replace(tmp, targets[name])
                replaced.append(name)
            fsync_dir(self.config_dir)
        except OSError as exc:
            discard([tmp for name, tmp in staged.items() if name not in replaced])
            self._restore({name: previous[name] for name in replaced})
            raise ApplyError("cannot install the configuration", detail=f"{exc}") from exc

    def _restore(self, previous: dict[str, bytes | None]) -> None:
        """Best effort: put back the files replaced before a failure."""
        for name, data in previous.items():
            path = self.config_dir / name
            try:
                if data is None:
                    path.unlink(missing_ok=True)
                else:
                    os.replace(stage(path, data, mode=PUBLIC), path)
            except OSError:
                continue
        try:
            fsync_dir(self.config_dir)
        except OSError:
            return


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ApplyError(f"cannot read {path.name}", detail=f"{exc}") from exc


class MemoryHandler:
    """Keeps the applied document in memory. Faults for the simulator:

    * `fail_versions`: these versions fail to apply;
    * `failure_rate`: probability that any apply fails (seeded, reproducible);
    * `delay_s`: how long an apply takes.
    """

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

    async def apply(self, desired: DesiredState) -> None:
        self.attempts += 1
        if self.delay_s > 0:
            await asyncio.sleep(self.delay_s)
        if desired.version in self.fail_versions:
            raise ApplyError(f"injected failure for version {desired.version}")
        if self.failure_rate and self._rng.random() < self.failure_rate:
            raise ApplyError(f"injected random failure applying version {desired.version}")
        self.applied = desired
