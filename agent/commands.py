"""`CommandRunner`: operator commands on ``…/cmd``, answered on ``…/cmd/result``.

Each message goes through these checks, in order, before anything runs:

1. JSON object with a valid `command_id`   else dropped (there is no id to answer)
2. a known command name                    rejected ``unknown_command``
3. the Command model, schema rule          rejected ``invalid_message`` / ``unsupported_schema``
4. for this device                         rejected ``wrong_device``
5. signed by a pinned key (raw dict)       rejected ``unknown_signing_key`` / ``bad_signature``
6. ran here before (same command id)       the recorded result is published again, not re-run
7. not past `expires_at`                   ``expired``, not run
8. its arguments                           rejected ``invalid_args``

then it runs, its result is recorded (the newest 200 per device, `AgentState`) and published.
Rejections and expiries are not recorded: a forged message must not block the real command
with the same id. Commands run one at a time, in arrival order; a ping may wait behind a log
collection.

=====================  =================================================================
command                what ``succeeded`` means
=====================  =================================================================
ping                   answered; output: agent_version, applied_version, uptime_s
reboot                 the result is published, then after `delay_s` the reboot command
                       (`AgentSettings.reboot_command`) is started; in the simulator
                       (state in memory) a no-op
collect_logs           the newest `lines` of the agent's log (its file, else the journal) and
                       a state summary, as a tar.gz, uploaded over HTTPS to the URL in the
                       signed command (TLS verified against the CA pinned at enrollment, the
                       single-use token in the command); output: bytes, sha256, files
rotate_certificate     a renewal was requested: the renewer renews at once over the session
                       (the new certificate shows in the control plane's certificate list)
=====================  =================================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import json
import logging
import re
import shlex
import shutil
import ssl
import tarfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from agent import AGENT_VERSION
from agent.errors import AgentError, StateError
from agent.reconciler import trusted_keys
from agent.renewal import Renewer
from agent.settings import AgentSettings
from agent.state import AgentState
from agent.tls import pinned_server_context
from protocol.digest import HEADER as DIGEST_HEADER
from protocol.digest import content_digest
from protocol.errors import ProtocolError, UnknownSigningKey
from protocol.messages import (
    MAX_MESSAGE_BYTES,
    Command,
    CommandName,
    CommandResult,
    CommandStatus,
    parse_object,
    validate,
)
from protocol.signing import verify_document

logger = logging.getLogger(__name__)

Send = Callable[[bytes], Awaitable[None]]
Reboot = Callable[[], Awaitable[None]]
Clock = Callable[[], datetime]
Log = logging.Logger | logging.LoggerAdapter[logging.Logger]

_COMMAND_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_NAMES = frozenset(name.value for name in CommandName)
# Commands waiting to run; more than this (a flood) are dropped: the control plane re-sends.
QUEUE_SIZE = 100
MAX_LOG_LINES = 100_000
MAX_REBOOT_DELAY_S = 3600
_DETAIL_MAX = 1000
_SUBPROCESS_TIMEOUT_S = 30.0


class CommandFailed(AgentError):
    """A command ran and did not succeed; `code` becomes the result's reason."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class _Rejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _utc_now() -> datetime:
    return datetime.now(UTC)


class CommandRunner:
    """The command side of one agent. `Agent` feeds it the messages of the cmd topic through
    `deliver` and runs `run(send)` as a child of each session."""

    def __init__(
        self,
        *,
        settings: AgentSettings,
        state: AgentState,
        device_id: str,
        renewer: Renewer,
        applied_version: Callable[[], int],
        log: Log | None = None,
        reboot: Reboot | None = None,
        clock: Clock = _utc_now,
        pinned_keys: Callable[[], Mapping[str, ec.EllipticCurvePublicKey]] | None = None,
    ) -> None:
        self._settings = settings
        self._state = state
        self.device_id = device_id
        self._renewer = renewer
        self._applied_version = applied_version
        self.log = log or logger
        self._reboot = reboot or (self._run_reboot_command if state.on_disk else self._simulated_reboot)
        self._clock = clock
        self._keys: dict[str, ec.EllipticCurvePublicKey] | None = None
        # The reconciler's live set, when given: a rotation (adding or retiring a key) takes
        # effect for commands the moment the desired state that carried it is applied.
        self._pinned_keys = pinned_keys
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=QUEUE_SIZE)
        self._deferred: set[asyncio.Task[None]] = set()
        self._started = time.monotonic()
        self.executed = 0
        self.dropped = 0

    # --- plumbing ------------------------------------------------------------------------

    def deliver(self, payload: bytes) -> None:
        """A message on this device's cmd topic (from the session's message loop; never blocks)."""
        try:
            self._queue.put_nowait(payload)
        except asyncio.QueueFull:
            self.dropped += 1
            self.log.warning("too many commands waiting: dropped one (the control plane sends it again)")

    async def run(self, send: Send) -> None:
        """A child of each session: run queued commands one at a time, until cancelled."""
        while True:
            payload = await self._queue.get()
            await self.process(payload, send)

    def shutdown(self) -> None:
        """The agent stops: abandon deferred actions (a reboot waiting for its delay)."""
        for task in self._deferred:
            task.cancel()

    # --- one command ---------------------------------------------------------------------

    async def process(self, payload: bytes, send: Send) -> CommandResult | None:
        """Check, run (at most once per command id), record and publish one command."""
        try:
            raw = parse_object(payload, max_bytes=MAX_MESSAGE_BYTES)
        except ProtocolError as exc:
            self.log.warning("dropping an unreadable command: %s", exc)
            return None
        command_id = raw.get("command_id")
        if not isinstance(command_id, str) or not _COMMAND_ID.match(command_id):
            self.log.warning("dropping a command without a valid command_id")
            return None
        try:
            command = await self._verified(raw)
        except _Rejected as exc:
            self.log.warning("rejected command %s: %s (%s)", command_id, exc.reason, exc.detail)
            return await self._answer(send, command_id, CommandStatus.REJECTED, exc.reason, exc.detail)

        recorded = await self._state.io(self._state.command_result, command_id)
        if recorded is not None:
            self.log.info("command %s ran already: publishing its result again", command_id)
            await send(recorded)
            return CommandResult.model_validate_json(recorded)
        if self._clock() >= command.expires_at:
            self.log.warning("command %s (%s) arrived after it expired: not run", command_id, command.name)
            detail = f"expired at {command.expires_at.isoformat()}"
            return await self._answer(send, command_id, CommandStatus.EXPIRED, "expired", detail)

        self.log.info("running command %s (%s)", command_id, command.name.value)
        after: Callable[[], None] | None = None
        try:
            output, after = await self._execute(command)
            result = self._result(command_id, CommandStatus.SUCCEEDED, output=output)
        except _Rejected as exc:
            self.log.warning("rejected command %s: %s (%s)", command_id, exc.reason, exc.detail)
            return await self._answer(send, command_id, CommandStatus.REJECTED, exc.reason, exc.detail)
        except CommandFailed as exc:
            self.log.warning("command %s (%s) failed: %s", command_id, command.name.value, exc.message)
            result = self._result(command_id, CommandStatus.FAILED, exc.code, exc.message)
        except Exception as exc:
            # A bug in one command must not end the session (the re-send would crash it again).
            self.log.exception("command %s (%s) crashed", command_id, command.name.value)
            result = self._result(command_id, CommandStatus.FAILED, "crashed", f"{type(exc).__name__}: {exc}")
        payload_out = result.to_json()
        await self._state.io(self._state.record_command_result, command_id, payload_out)
        self.executed += 1
        try:
            await send(payload_out)
        finally:
            # Ran and recorded: the follow-up happens even if the answer could not be sent now
            # (the control plane sends the command again; the record answers it).
            if after is not None:
                after()
        return result

    async def _verified(self, raw: dict[str, Any]) -> Command:
        if raw.get("name") not in _NAMES:
            raise _Rejected("unknown_command", f"unknown command {str(raw.get('name'))[:64]!r}")
        try:
            command = validate(Command, raw)
        except ProtocolError as exc:
            raise _Rejected(exc.reason, str(exc)) from None
        if command.device_id != self.device_id:
            raise _Rejected("wrong_device", f"command is for device {command.device_id!r}")
        keys = await self._trusted_keys(reload=False)
        try:
            try:
                verify_document(raw, keys)
            except UnknownSigningKey:
                # The pinned set may have changed (a key rotation): read it again once.
                verify_document(raw, await self._trusted_keys(reload=True))
        except ProtocolError as exc:
            raise _Rejected(exc.reason, str(exc)) from None
        return command

    async def _trusted_keys(self, *, reload: bool) -> Mapping[str, ec.EllipticCurvePublicKey]:
        if self._pinned_keys is not None:
            return self._pinned_keys()
        if self._keys is None or reload:
            self._keys = trusted_keys(await self._state.io(self._state.signing_keys))
        return self._keys

    def _result(
        self,
        command_id: str,
        status: CommandStatus,
        reason: str | None = None,
        detail: str | None = None,
        *,
        output: dict[str, Any] | None = None,
    ) -> CommandResult:
        return CommandResult(
            device_id=self.device_id,
            command_id=command_id,
            status=status,
            reason=reason,
            detail=detail[:_DETAIL_MAX] if detail else None,
            output=output or {},
        )

    async def _answer(
        self, send: Send, command_id: str, status: CommandStatus, reason: str, detail: str
    ) -> CommandResult:
        result = self._result(command_id, status, reason, detail)
        await send(result.to_json())
        return result

    async def _execute(self, command: Command) -> tuple[dict[str, Any], Callable[[], None] | None]:
        """Run `command`: its output, and what to do once the result is out (or None)."""
        args = command.args
        if command.name is CommandName.PING:
            _no_args(args)
            return {
                "agent_version": AGENT_VERSION,
                "applied_version": self._applied_version(),
                "uptime_s": round(time.monotonic() - self._started, 3),
            }, None
        if command.name is CommandName.REBOOT:
            delay = _int_arg(args, "delay_s", default=0, low=0, high=MAX_REBOOT_DELAY_S)
            _no_args(args, allowed={"delay_s"})
            return {"delay_s": delay}, lambda: self._defer(self._reboot_after(delay))
        if command.name is CommandName.COLLECT_LOGS:
            return await self._collect_logs(command), None
        # rotate_certificate
        _no_args(args)
        active = self._renewer.active
        output = {
            "requested": True,
            "certificate_not_after": active.not_after.isoformat() if active else None,
        }
        return output, self._renewer.renew_now

    # --- reboot --------------------------------------------------------------------------

    def _defer(self, action: Awaitable[None]) -> None:
        task = asyncio.ensure_future(action)
        self._deferred.add(task)
        task.add_done_callback(self._deferred.discard)

    async def _reboot_after(self, delay_s: int) -> None:
        if delay_s:
            await asyncio.sleep(delay_s)
        self.log.warning("rebooting the device (operator command)")
        try:
            await self._reboot()
        except Exception:
            self.log.exception("the reboot failed")

    async def _run_reboot_command(self) -> None:
        argv = shlex.split(self._settings.reboot_command)
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL
        )
        try:
            async with asyncio.timeout(_SUBPROCESS_TIMEOUT_S):
                code = await process.wait()
        except TimeoutError:
            self.log.warning("the reboot command is still running after %gs", _SUBPROCESS_TIMEOUT_S)
            return
        if code != 0:
            self.log.error("the reboot command %r exited with %d", argv[0], code)

    async def _simulated_reboot(self) -> None:
        self.log.info("simulated device: reboot is a no-op")

    # --- collect_logs --------------------------------------------------------------------

    async def _collect_logs(self, command: Command) -> dict[str, Any]:
        args = command.args
        lines = _int_arg(args, "lines", default=1000, low=1, high=MAX_LOG_LINES)
        since_s = _int_arg(args, "since_s", default=None, low=1, high=None)
        url, token = args.get("upload_url"), args.get("upload_token")
        if not isinstance(url, str) or not url.startswith("https://"):
            raise _Rejected("invalid_args", "upload_url must be an https:// URL")
        if not isinstance(token, str) or not token:
            raise _Rejected("invalid_args", "upload_token is missing")
        _no_args(args, allowed={"lines", "since_s", "upload_url", "upload_token"})

        files = await self._log_files(lines, since_s)
        files["state.json"] = json.dumps(await self._state.io(self._summary), indent=2, default=str).encode()
        archive = _tar_gz(files, self._clock())
        ca_pem = await self._state.io(self._state.ca_chain_pem)
        if ca_pem is None:
            raise CommandFailed("no CA chain pinned at enrollment to verify the upload", code="upload_failed")
        await self._upload(url, token, archive, ca_pem)
        self.log.info("uploaded %d bytes of logs for command %s", len(archive), command.command_id)
        return {"bytes": len(archive), "sha256": hashlib.sha256(archive).hexdigest(), "files": sorted(files)}

    async def _log_files(self, lines: int, since_s: int | None) -> dict[str, bytes]:
        settings, cap = self._settings, self._settings.collect_logs_max_bytes
        if settings.log_file is not None:
            try:
                return {"agent.log": await asyncio.to_thread(_tail, settings.log_file, lines, cap)}
            except OSError as exc:
                return {"agent.log.error": f"cannot read {settings.log_file}: {exc}\n".encode()}
        if not self._state.on_disk:
            return {}  # the simulator: the state summary is the whole story
        journalctl = shutil.which("journalctl")
        if journalctl is None:
            return {"journal.error": b"no log file configured and no journalctl on this system\n"}
        argv = [journalctl, "-u", settings.journal_unit, "-n", str(lines), "--no-pager", "-o", "short-iso"]
        if since_s is not None:
            argv += ["--since", f"-{since_s}s"]
        return {"journal.txt": await _run_capped(argv, cap)}

    def _summary(self) -> dict[str, Any]:
        """What the device knows about itself; no keys, certificates or tokens."""
        enrollment = self._state.enrollment()
        return {
            "collected_at": self._clock().isoformat(),
            "agent_version": AGENT_VERSION,
            "device_id": self.device_id,
            "enrollment": asdict(enrollment) if enrollment is not None else None,
            "applied_version": self._applied_version(),
            "renewal": asdict(self._state.renewal()),
            "signing_key_ids": sorted(self._state.signing_keys()),
            "recent_commands": self._state.command_ids()[:20],
        }

    async def _upload(self, url: str, token: str, archive: bytes, ca_pem: str) -> None:
        try:
            context = pinned_server_context(ca_pem)
        except StateError as exc:
            raise CommandFailed(str(exc), code="upload_failed") from exc
        import aiohttp  # ~11 MB resident: only an agent that uploads logs pays for it

        timeout = aiohttp.ClientTimeout(total=self._settings.http_timeout_s)
        headers = {
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/gzip",
            DIGEST_HEADER: content_digest(archive),  # the control plane refuses a damaged archive
        }
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.put(url, data=archive, headers=headers, ssl=context) as response,
            ):
                if response.status >= 300:
                    text = (await response.text())[:300]
                    raise CommandFailed(f"HTTP {response.status}: {text}", code="upload_failed")
        except (aiohttp.ClientError, ssl.SSLError, OSError, TimeoutError) as exc:
            raise CommandFailed(
                f"upload to {url} failed: {exc or type(exc).__name__}", code="upload_failed"
            ) from exc


def _int_arg(args: Mapping[str, Any], name: str, *, default: Any, low: int, high: int | None) -> Any:
    value = args.get(name, default)
    if value is default:
        return value
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < low
        or (high is not None and value > high)
    ):
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        raise _Rejected("invalid_args", f"{name} must be an integer in {bounds}")
    return value


def _no_args(args: Mapping[str, Any], allowed: set[str] | frozenset[str] = frozenset()) -> None:
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise _Rejected("invalid_args", f"unknown arguments: {', '.join(unknown)[:200]}")


def _tail(path: Path, lines: int, max_bytes: int) -> bytes:
    """The last `lines` lines of `path`, at most `max_bytes` of them, read from the end."""
    with path.open("rb") as file:
        position = file.seek(0, io.SEEK_END)
        data = b""
        while position > 0 and data.count(b"\n") <= lines and len(data) < max_bytes:
            step = min(64 * 1024, position)
            position -= step
            file.seek(position)
            data = file.read(step) + data
    kept = data.splitlines(keepends=True)[-lines:]
    return b"".join(kept)[-max_bytes:]


async def _run_capped(argv: list[str], cap: int) -> bytes:
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(_SUBPROCESS_TIMEOUT_S):
            output, _ = await process.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        return b"journalctl did not finish in time\n"
    return output[-cap:]


def _tar_gz(files: Mapping[str, bytes], now: datetime) -> bytes:
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb", mtime=int(now.timestamp())) as compressed,
        tarfile.open(fileobj=compressed, mode="w") as archive,
    ):
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), int(now.timestamp()), 0o600
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
