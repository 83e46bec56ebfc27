"""`ApplyPipeline`: validate → stage → commit → post-apply check → record, or revert.

    validate   every handler renders / validates; any refusal → `InvalidConfig`, nothing touched
    journal    "applying version N": each file's target, staged temporary, backup     (staging)
    stage      every file written to its temporary and fsynced; each existing target
               hard-linked (or copied) to its backup; then the journal says     (committing)
    commit     temporaries renamed over their targets, directories fsynced           (committed)
               imperative handlers (`MemoryHandler`…) apply in order
    verify     the app checks of the new document, once, with grace and retries
    record     one SQLite transaction: last-known-good = N, signing keys rotated,
               journal (done); then backups deleted and the journal cleared

A handler failure or a failed check reverts everything installed (backups renamed back,
imperative handlers told to revert, in reverse order) and raises `ApplyError` /
`PostApplyUnhealthy`; the previous version stays in force and recorded.

Crash safety. The agent may be killed at any instant; `recover()` (at start-up, and before the
next apply) reads the journal and puts the files back to one whole version:

==========  ==========================================================================
phase       recovery
==========  ==========================================================================
staging     targets untouched: drop temporaries and backups            → old version
committing  some renames done: backups renamed back, new files of
committed   targets that did not exist removed, temporaries dropped    → old version
reverting   (idempotent: a backup already renamed back is skipped)
done        the new version was recorded: drop backups and temporaries → new version
==========  ==========================================================================

An interrupted apply is rolled back, not rolled forward: the new version never passed its
post-apply check. The retained desired-state message brings it again after the reconnect, so
the device converges to it. The backups (not a re-rendering of the last-known-good document)
make the first apply revertible too: whatever files were there before come back.

The journal lives in the agent state; with in-memory state (the simulator) and no file
handlers there is nothing to journal and the pipeline costs a few function calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from agent.errors import ApplyError, InvalidConfig, PostApplyUnhealthy
from agent.files import discard, fsync_dir, sibling_name, write_new
from agent.handlers import ApplyHandler, FileHandler, Handler, Output
from agent.state import AgentState, Journal
from protocol.messages import DesiredState

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Journal phases.
STAGING = "staging"
COMMITTING = "committing"
COMMITTED = "committed"
REVERTING = "reverting"
DONE = "done"

# A health report carries at most this many check results (protocol.messages.HealthReport).
MAX_CHECKS = 64

# The post-apply check: given the new document, None if healthy, else what failed.
Verify = Callable[[DesiredState], Awaitable[str | None]]
# Called with the name of each step once it is done (fault injection in tests).
StepHook = Callable[[str], None]


class ApplyPipeline:
    def __init__(
        self,
        state: AgentState,
        handlers: Sequence[Handler],
        *,
        verify: Verify | None = None,
        step_delay_s: float = 0.0,
        on_step: StepHook | None = None,
        log: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
    ) -> None:
        self._state = state
        self.file_handlers: list[FileHandler] = []
        self.apply_handlers: list[ApplyHandler] = []
        for handler in handlers:
            if isinstance(handler, FileHandler):
                self.file_handlers.append(handler)
            elif isinstance(handler, ApplyHandler):
                self.apply_handlers.append(handler)
            else:
                raise TypeError(f"{handler!r} is neither a file handler nor an apply handler")
        self.verify = verify
        self._step_delay_s = step_delay_s
        self._on_step = on_step
        self._log = log or logger

    # --- validate ----------------------------------------------------------------------

    def validate(self, desired: DesiredState) -> list[Output]:
        """Every handler's verdict on `desired` (raise `InvalidConfig`); the files it becomes."""
        if len(desired.checks) > MAX_CHECKS:
            raise InvalidConfig(f"{len(desired.checks)} app checks; at most {MAX_CHECKS}")
        outputs: list[Output] = []
        for handler in self.file_handlers:
            outputs.extend(handler.render(desired))
        for apply_handler in self.apply_handlers:
            validate = getattr(apply_handler, "validate", None)
            if validate is not None:
                validate(desired)
        paths = [output.path for output in outputs]
        if len(set(paths)) != len(paths):
            raise InvalidConfig("two handlers want to write the same file")
        return outputs

    # --- apply -------------------------------------------------------------------------

    async def apply(
        self,
        desired: DesiredState,
        document: dict[str, Any],
        *,
        previous: DesiredState | None,
        signing_keys: dict[str, str] | None = None,
    ) -> None:
        """Install `desired` (its raw signed `document` becomes last-known-good), or raise with
        `previous` still in force. `signing_keys`: the pinned set to adopt with it."""
        if self.file_handlers or self._state.on_disk:
            # A journal left by a crash, or by an apply cancelled mid-way: one SELECT if none.
            await self._off_loop(self.recover)
        outputs = self.validate(desired)
        applied: list[ApplyHandler] = []
        try:
            if outputs:
                await self._off_loop(self._install, desired.version, outputs)
            for handler in self.apply_handlers:
                applied.append(handler)  # a half-done apply is reverted too
                await handler.apply(desired)
            self._step("handlers")
            await self._verify(desired)
            self._step("verified")
            # Not interruptible: once it started, it completes (then the journal says done).
            await self._off_loop(self._state.finish_apply, desired.version, document, signing_keys)
            self._step("recorded")
        except (ApplyError, asyncio.CancelledError):
            # Cancelled (shutdown, lost session): revert now rather than leave it to recovery.
            await self._shielded_revert(applied, previous)
            raise
        except Exception as exc:
            await self._shielded_revert(applied, previous)
            raise ApplyError(f"{type(exc).__name__}: {exc}") from exc
        if outputs:
            await self._off_loop(self._finish)

    def _install(self, version: int, outputs: list[Output]) -> None:
        entries: list[dict[str, Any]] = [
            {
                "target": str(output.path),
                "tmp": str(sibling_name(output.path, "tmp")),
                "backup": str(sibling_name(output.path, "lkg")),
                "existed": False,
            }
            for output in outputs
        ]
        directories = sorted({output.path.parent for output in outputs})
        self._state.write_journal(Journal(version=version, phase=STAGING, entries=entries))
        self._file_step("journal")
        try:
            for directory in directories:
                directory.mkdir(parents=True, exist_ok=True)
            for index, (output, entry) in enumerate(zip(outputs, entries, strict=True)):
                write_new(Path(entry["tmp"]), output.data, mode=output.mode)
                entry["existed"] = _backup(output.path, Path(entry["backup"]))
                self._file_step(f"staged:{index}")
            for directory in directories:
                fsync_dir(directory)
        except OSError as exc:
            self._drop(entries)
            raise ApplyError("cannot stage the configuration", detail=str(exc)) from exc
        self._file_step("staged")
        self._state.write_journal(Journal(version=version, phase=COMMITTING, entries=entries))
        self._file_step("committing")
        try:
            for index, entry in enumerate(entries):
                os.replace(entry["tmp"], entry["target"])
                self._file_step(f"renamed:{index}")
            for directory in directories:
                fsync_dir(directory)
        except OSError as exc:
            self._restore(entries)
            raise ApplyError("cannot install the configuration", detail=str(exc)) from exc
        self._state.set_journal_phase(COMMITTED)
        self._file_step("committed")

    async def _shielded_revert(self, applied: list[ApplyHandler], previous: DesiredState | None) -> None:
        revert = asyncio.ensure_future(self._revert(applied, previous))
        try:
            await asyncio.shield(revert)
        except asyncio.CancelledError:
            await revert  # finish putting the old version back, then go
            raise

    async def _revert(self, applied: list[ApplyHandler], previous: DesiredState | None) -> None:
        for handler in reversed(applied):
            revert = getattr(handler, "revert", None)
            if revert is None:
                continue
            try:
                await revert(previous)
            except Exception:
                self._log.exception("handler %r could not revert", handler)
        if self.file_handlers:
            # The journal says how far the files got (nothing, staged, some or all renamed).
            await self._off_loop(self.recover, announce=False)

    async def _verify(self, desired: DesiredState) -> None:
        if self.verify is not None and (failure := await self.verify(desired)) is not None:
            raise PostApplyUnhealthy(f"post-apply check failed: {failure}", detail=failure)

    def _restore(self, entries: list[dict[str, Any]]) -> None:
        self._state.set_journal_phase(REVERTING)
        _put_back(entries)
        self._state.clear_journal()

    def _drop(self, entries: list[dict[str, Any]]) -> None:
        discard([Path(entry["tmp"]) for entry in entries] + [Path(entry["backup"]) for entry in entries])
        self._state.clear_journal()

    def _clean(self, entries: list[dict[str, Any]]) -> None:
        discard([Path(entry["backup"]) for entry in entries])
        self._state.clear_journal()
        self._file_step("cleaned")

    def _finish(self) -> None:
        journal = self._state.journal()
        if journal is not None:
            self._clean(journal.entries)

    # --- recovery ----------------------------------------------------------------------

    def recover(self, *, announce: bool = True) -> str | None:
        """Finish or roll back an apply a crash interrupted (module docstring); say what was
        done, or None. Idempotent: a crash during recovery is recovered the same way."""
        journal = self._state.journal()
        if journal is None:
            return None
        entries = journal.entries
        if journal.phase == STAGING:
            self._drop(entries)
            outcome = f"dropped the staged files of version {journal.version}; the previous version stays"
        elif journal.phase == DONE:
            self._clean(entries)
            outcome = f"finished cleaning up after version {journal.version}"
        else:
            self._restore(entries)
            outcome = f"rolled back the interrupted apply of version {journal.version} (was {journal.phase})"
        if announce:
            self._log.warning("apply journal at start-up: %s", outcome)
        return outcome

    # --- helpers -----------------------------------------------------------------------

    def _step(self, name: str) -> None:
        if self._on_step is not None:
            self._on_step(name)

    def _file_step(self, name: str) -> None:
        """A step of the file work (on a worker thread): `step_delay_s` widens the windows
        between them, for crash tests that kill the process mid-apply."""
        self._step(name)
        if self._step_delay_s > 0:
            time.sleep(self._step_delay_s)

    async def _off_loop(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run file work on a thread; if cancelled meanwhile, let it finish first (it holds
        the journal), then re-raise. In-memory state (bound to the loop's thread): inline."""
        if not self._state.on_disk:
            return fn(*args, **kwargs)
        work = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await work
            raise


def _backup(target: Path, backup: Path) -> bool:
    """Keep the current `target` as `backup` (a hard link: no copy, the rename of the new file
    over the target leaves it intact); False if there is no target yet."""
    try:
        os.link(target, backup, follow_symlinks=False)
    except FileNotFoundError:
        return False
    except OSError:
        # No hard links here (some file systems, a directory in the way): a real copy.
        if not target.exists():
            return False
        shutil.copy2(target, backup)
        with open(backup, "rb") as copied:
            os.fsync(copied.fileno())
    return True


def _put_back(entries: list[dict[str, Any]]) -> None:
    """Targets back to what they were before the apply; re-entrant after a crash."""
    directories: set[Path] = set()
    for entry in entries:
        target, backup = Path(entry["target"]), Path(entry["backup"])
        directories.add(target.parent)
        if entry["existed"]:
            if backup.exists():
                os.replace(backup, target)
        else:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
    # A target that was never replaced shares its inode with the backup: rename() then does
    # nothing and leaves the backup behind.
    discard([Path(entry["tmp"]) for entry in entries] + [Path(entry["backup"]) for entry in entries])
    for directory in directories:
        with contextlib.suppress(FileNotFoundError):
            fsync_dir(directory)
