"""Operator commands to devices: create, sign and send, collect results and log archives.

::

    POST /v1/devices/{id}/commands ─▶ row `queued` (+ audit) ─▶ signed Command on …/cmd
                                       (QoS 1, not retained)  ─▶ `sent`
    agent ─▶ …/cmd/result ─▶ Ingest.handle ─▶ submit_result ─▶ run() ─▶ succeeded | failed |
                                                                        expired | rejected
    collect_logs: agent ─▶ PUT /v1/devices/{id}/commands/{cid}/artifact (upload token) ─▶
                  <data>/artifacts/<cid>.tar.gz (0600) ─▶ GET /v1/commands/{cid}/artifact

Delivery is at least once, execution at most once per command id (the agent keeps the
results of the ids it ran and answers a repeat from that record). A command is sent when it
is created; a device that is offline gets it from its persistent MQTT session when it
reconnects, and — in case the broker lost that session — it is sent again when the device
reports itself online, and every `resend_after` while no result came. `run()` also closes
commands whose time ran out: ``expired`` (reason ``not_delivered`` if never sent,
``no_result`` if sent and unanswered; a late answer from the device still lands).

The collect_logs upload token rides inside the signed command. It is not stored: it is an
HMAC of the command id under a key in ``<data>/pki/command-upload.key`` (0600), so a re-send
carries the same token and the database holds nothing that would let anyone upload. It is
good for one upload, until the command expires.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import secrets
from collections.abc import AsyncIterator, Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import sqlalchemy as sa
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from control_plane.audit import AuditEvent, AuditLog, Outcome
from control_plane.clock import Clock, utc_now
from control_plane.commands.models import ArtifactView, CommandCreate, CommandView, validated_args
from control_plane.db.schema import commands, devices
from control_plane.desired.publisher import Publisher
from control_plane.errors import AuthenticationFailed, Conflict, InvalidInput, NotFound, PayloadTooLarge
from control_plane.pki.files import write_private
from control_plane.pki.signing_keys import SigningKeyring
from protocol.digest import declared_sha256
from protocol.messages import CommandName, CommandResult, CommandStatus
from protocol.signing import canonical_json, sign_document
from protocol.topics import TopicKind, device_topic
from protocol.versions import SCHEMA_VERSION

logger = logging.getLogger(__name__)

QUEUED, SENT = "queued", "sent"
OPEN = (QUEUED, SENT)
EXPIRED = "expired"
ACTIVE = "active"
UPLOAD_KEY_FILE = "command-upload.key"
UPLOAD_TOKEN_PREFIX = "sfu_"  # noqa: S105 - a prefix, not a secret
# Results waiting for the worker; beyond this they are dropped (the re-send brings them back).
MAX_PENDING_RESULTS = 10_000
RESEND_BATCH = 500
_TTL_TOLERANCE = timedelta(milliseconds=1)
_OUTCOME = {
    CommandStatus.SUCCEEDED: Outcome.SUCCESS,
    CommandStatus.FAILED: Outcome.FAILED,
    CommandStatus.EXPIRED: Outcome.FAILED,
    CommandStatus.REJECTED: Outcome.DENIED,
}


def load_or_create_upload_key(path: Path) -> bytes:
    """The HMAC key of upload tokens (32 random bytes, 0600), made on first start."""
    if path.exists():
        key = path.read_bytes()
        if len(key) >= 32:
            return key
    key = secrets.token_bytes(32)
    write_private(path, key)
    return key


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


class CommandService:
    """Keyword-only rules over the `commands` table; `await run()` (results, re-sends, expiry)."""

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        keyring: SigningKeyring,
        link: Publisher,
        audit: AuditLog,
        artifacts_dir: Path,
        upload_key: bytes,
        base_url: str,
        default_ttl: timedelta,
        max_ttl: timedelta,
        sweep_interval_s: float,
        resend_after: timedelta,
        artifact_max_bytes: int,
        send_timeout_s: float = 5.0,
        clock: Clock = utc_now,
    ) -> None:
        self._engine = engine
        self._keyring = keyring
        self._link = link
        self._audit = audit
        self._artifacts_dir = artifacts_dir
        self._upload_key = upload_key
        self._base_url = base_url.rstrip("/")
        self._default_ttl = default_ttl
        self._max_ttl = max_ttl
        self._sweep_interval_s = sweep_interval_s
        self._resend_after = resend_after
        self.artifact_max_bytes = artifact_max_bytes
        self._send_timeout_s = send_timeout_s
        self._clock = clock
        self._results: list[CommandResult] = []
        self._online: set[str] = set()
        self._wakeup = asyncio.Event()
        self.sent = 0
        self.results = 0
        self.dropped_results = 0
        self.duplicate_results = 0

    # --- operator side -----------------------------------------------------------------

    async def create(self, device_id: str, spec: CommandCreate, *, actor: str) -> tuple[CommandView, bool]:
        """Create and send a command; (view, created). A repeat with the same `command_id` and
        body returns the existing command (created False); another body is a 409."""
        args = validated_args(spec.name, spec.args)
        ttl = timedelta(seconds=spec.ttl_s) if spec.ttl_s is not None else self._default_ttl
        if ttl > self._max_ttl:
            raise InvalidInput(f"field 'ttl_s': at most {self._max_ttl.total_seconds():g} seconds")
        command_id = spec.command_id or secrets.token_urlsafe(16)
        now = self._clock()
        row = {
            "id": command_id,
            "device_id": device_id,
            "name": spec.name.value,
            "args": args,
            "status": QUEUED,
            "created_by": actor,
            "created_at": now,
            "expires_at": now + ttl,
        }
        try:
            async with self._engine.begin() as conn:
                existing = await self._row(conn, command_id)
                if existing is not None:
                    return self._repeat(existing, device_id, spec.name, args, ttl), False
                state = await conn.scalar(sa.select(devices.c.state).where(devices.c.id == device_id))
                if state is None:
                    raise NotFound(f"device {device_id!r} does not exist", code="device_not_found")
                if state != ACTIVE:
                    raise Conflict(f"device {device_id!r} is {state}", code="device_not_active")
                await conn.execute(commands.insert(), [row])
                await self._audit.record(
                    AuditEvent(
                        action="command.create",
                        outcome=Outcome.SUCCESS,
                        actor=actor,
                        target=device_id,
                        detail={"command_id": command_id, "name": spec.name.value, "args": args},
                    ),
                    connection=conn,
                )
        except IntegrityError:
            # The same id was created concurrently: answer as for a repeat.
            async with self._engine.connect() as conn:
                existing = await self._row(conn, command_id)
            if existing is None:
                raise
            return self._repeat(existing, device_id, spec.name, args, ttl), False
        await self._send([row])
        return await self.get(command_id), True

    @staticmethod
    async def _row(conn: AsyncConnection, command_id: str) -> Row[Any] | None:
        return (await conn.execute(sa.select(commands).where(commands.c.id == command_id))).first()

    def _repeat(
        self, existing: Row[Any], device_id: str, name: CommandName, args: dict[str, Any], ttl: timedelta
    ) -> CommandView:
        same = (
            existing.device_id == device_id
            and existing.name == name.value
            and existing.args == args
            and abs((existing.expires_at - existing.created_at) - ttl) <= _TTL_TOLERANCE
        )
        if not same:
            raise Conflict(
                f"command id {existing.id!r} is already used by a different command",
                code="command_id_conflict",
            )
        return self._view(existing)

    async def get(self, command_id: str) -> CommandView:
        async with self._engine.connect() as conn:
            row = (await conn.execute(sa.select(commands).where(commands.c.id == command_id))).first()
        if row is None:
            raise NotFound(f"command {command_id!r} does not exist", code="command_not_found")
        return self._view(row)

    async def list_for_device(self, device_id: str, *, limit: int) -> list[CommandView]:
        """The device's commands, newest first."""
        async with self._engine.connect() as conn:
            if await conn.scalar(sa.select(devices.c.id).where(devices.c.id == device_id)) is None:
                raise NotFound(f"device {device_id!r} does not exist", code="device_not_found")
            rows = await conn.execute(
                sa.select(commands)
                .where(commands.c.device_id == device_id)
                .order_by(commands.c.created_at.desc(), commands.c.id.desc())
                .limit(limit)
            )
            return [self._view(row) for row in rows]

    async def artifact_file(self, command_id: str) -> tuple[Path, ArtifactView]:
        view = await self.get(command_id)
        path = self._artifact_path(command_id)
        if view.artifact is None or not path.is_file():
            raise NotFound(f"command {command_id!r} has no uploaded artifact", code="artifact_not_found")
        return path, view.artifact

    def _view(self, row: Row[Any]) -> CommandView:
        artifact = None
        if row.artifact_path is not None and row.artifact_bytes is not None:
            artifact = ArtifactView(
                bytes=row.artifact_bytes,
                sha256=row.artifact_sha256,
                download_url=f"/v1/commands/{row.id}/artifact",
            )
        return CommandView(
            id=row.id,
            device_id=row.device_id,
            name=row.name,
            args=row.args,
            status=row.status,
            reason=row.reason,
            detail=row.detail,
            output=row.output,
            created_by=row.created_by,
            created_at=row.created_at,
            expires_at=row.expires_at,
            sent_at=row.sent_at,
            completed_at=row.completed_at,
            artifact=artifact,
        )

    # --- sending -----------------------------------------------------------------------

    def upload_token(self, command_id: str) -> str:
        digest = hmac.new(self._upload_key, b"artifact-upload\x00" + command_id.encode(), hashlib.sha256)
        return UPLOAD_TOKEN_PREFIX + base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()

    def _document(self, row: Any) -> dict[str, Any]:
        args = dict(row["args"])
        if row["name"] == CommandName.COLLECT_LOGS.value:
            # Where and how to upload; covered by the signature, so only we can point the agent.
            path = f"/v1/devices/{row['device_id']}/commands/{row['id']}/artifact"
            args["upload_url"] = self._base_url + path
            args["upload_token"] = self.upload_token(row["id"])
        return sign_document(
            {
                "schema": SCHEMA_VERSION,
                "device_id": row["device_id"],
                "command_id": row["id"],
                "name": row["name"],
                "args": args,
                "issued_at": _iso(row["created_at"]),
                "expires_at": _iso(row["expires_at"]),
            },
            self._keyring.active,
        )

    async def _send(self, rows: Iterable[Any]) -> int:
        """Publish the commands (QoS 1, not retained) and mark them sent; a command that cannot
        be published now stays as it is and goes with the next sweep."""
        now = self._clock()
        sent: list[str] = []
        for row in rows:
            if row["expires_at"] <= now:
                continue
            if not self._link.is_connected:
                logger.info("broker not connected: command %s waits for the next sweep", row["id"])
                break
            try:
                async with asyncio.timeout(self._send_timeout_s):
                    await self._link.publish(
                        device_topic(row["device_id"], TopicKind.COMMAND),
                        canonical_json(self._document(row)),
                        qos=1,
                        retain=False,
                    )
            except (ConnectionError, aiomqtt.MqttError, TimeoutError) as exc:
                logger.warning("command %s not published (%s); it goes with the next sweep", row["id"], exc)
                break
            sent.append(row["id"])
        if sent:
            async with self._engine.begin() as conn:
                await conn.execute(
                    sa.update(commands)
                    .where(commands.c.id.in_(sent), commands.c.status.in_(OPEN))
                    .values(status=SENT, sent_at=now)
                )
            self.sent += len(sent)
        return len(sent)

    # --- device side -------------------------------------------------------------------

    def submit_result(self, result: CommandResult) -> None:
        """Queue a validated result (its device id is the topic's); never blocks, never raises."""
        if len(self._results) >= MAX_PENDING_RESULTS:
            self.dropped_results += 1
            logger.warning(
                "command results backlog full: dropped %s of %s", result.command_id, result.device_id
            )
            return
        self._results.append(result)
        self._wakeup.set()

    def device_online(self, device_id: str) -> None:
        """The device said it is online: send its open commands again (never blocks)."""
        self._online.add(device_id)
        self._wakeup.set()

    async def record_results(self, results: Iterable[CommandResult]) -> None:
        for result in results:
            await self._record_result(result)

    async def _record_result(self, result: CommandResult) -> None:
        now = self._clock()
        async with self._engine.begin() as conn:
            row = (await conn.execute(sa.select(commands).where(commands.c.id == result.command_id))).first()
            if row is None or row.device_id != result.device_id:
                await self._audit.record(
                    AuditEvent(
                        action="command.result",
                        outcome=Outcome.DENIED,
                        actor=result.device_id,
                        target=result.command_id,
                        detail={"reason": "unknown_command", "status": result.status.value},
                    ),
                    connection=conn,
                )
                return
            if row.status not in (*OPEN, EXPIRED):
                self.duplicate_results += 1  # a repeat of an answer we have
                return
            reported = (result.output or {}).get("sha256")
            if row.artifact_sha256 is not None and reported is not None and reported != row.artifact_sha256:
                # The upload was verified against its Content-Digest: the device now describes
                # another archive than the one it sent. Recorded, and loud.
                logger.warning("command %s: the device reports another archive than it uploaded", row.id)
                await self._audit.record(
                    AuditEvent(
                        action="command.artifact_mismatch",
                        outcome=Outcome.DENIED,
                        actor=result.device_id,
                        target=result.command_id,
                        detail={"stored_sha256": row.artifact_sha256, "reported_sha256": str(reported)[:64]},
                    ),
                    connection=conn,
                )
            await conn.execute(
                sa.update(commands)
                .where(commands.c.id == row.id)
                .values(
                    status=result.status.value,
                    reason=result.reason,
                    detail=result.detail,
                    output=result.output,
                    completed_at=now,
                )
            )
            await self._audit.record(
                AuditEvent(
                    action="command.result",
                    outcome=_OUTCOME[result.status],
                    actor=result.device_id,
                    target=result.command_id,
                    detail={"name": row.name, "status": result.status.value, "reason": result.reason},
                ),
                connection=conn,
            )
        self.results += 1

    async def store_artifact(
        self,
        *,
        device_id: str,
        command_id: str,
        token: str | None,
        body: AsyncIterator[bytes],
        declared_bytes: int | None,
        content_digest: str | None,
        source: str,
    ) -> CommandView:
        """Keep the archive a device uploads for its collect_logs command, once its SHA-256
        matches the `Content-Digest` the device declared. Refusals (401, 413, 422 on a damaged
        archive) are audited; the token is spent only by a stored upload."""
        now = self._clock()
        async with self._engine.connect() as conn:
            row = (await conn.execute(sa.select(commands).where(commands.c.id == command_id))).first()
        refusal: str | None = None
        if not token:
            refusal = "missing_token"
        elif row is None or row.device_id != device_id or row.name != CommandName.COLLECT_LOGS.value:
            refusal = "unknown_command"
        elif not hmac.compare_digest(token.encode(), self.upload_token(command_id).encode()):
            refusal = "bad_token"
        elif row.artifact_path is not None:
            refusal = "token_used"
        elif now >= row.expires_at:
            refusal = "token_expired"
        elif row.status not in OPEN:
            refusal = "command_closed"
        if refusal is not None:
            await self._refuse_upload(device_id, command_id, refusal, source)
            raise AuthenticationFailed(
                "the upload token is not valid for this command", code="upload_refused"
            )
        if content_digest is None:
            raise InvalidInput(
                "header 'Content-Digest' is required (sha-256=:<base64>:, RFC 9530)", code="digest_required"
            )
        try:
            expected_sha256 = declared_sha256(content_digest)
        except ValueError as exc:
            raise InvalidInput(f"header 'Content-Digest': {exc}") from None
        data = await self._read_bounded(body, declared_bytes, device_id, command_id, source)
        sha256 = hashlib.sha256(data).hexdigest()
        if not hmac.compare_digest(sha256, expected_sha256):
            await self._refuse_upload(
                device_id, command_id, "digest_mismatch", source, received_sha256=sha256, bytes=len(data)
            )
            raise InvalidInput(
                "the archive received does not match its Content-Digest (damaged on the way): "
                "nothing was stored; upload it again",
                code="digest_mismatch",
            )
        path = self._artifact_path(command_id)
        async with self._engine.begin() as conn:
            claimed = await conn.execute(
                sa.update(commands)
                .where(
                    commands.c.id == command_id,
                    commands.c.artifact_path.is_(None),
                    commands.c.status.in_(OPEN),
                )
                .values(artifact_path=str(path), artifact_bytes=len(data), artifact_sha256=sha256)
            )
        if claimed.rowcount != 1:  # another upload with the same token won the race
            await self._refuse_upload(device_id, command_id, "token_used", source)
            raise AuthenticationFailed(
                "the upload token is not valid for this command", code="upload_refused"
            )
        try:
            await asyncio.to_thread(write_private, path, data)
        except OSError:
            async with self._engine.begin() as conn:
                await conn.execute(
                    sa.update(commands)
                    .where(commands.c.id == command_id)
                    .values(artifact_path=None, artifact_bytes=None, artifact_sha256=None)
                )
            raise
        await self._audit.record(
            AuditEvent(
                action="command.artifact_upload",
                outcome=Outcome.SUCCESS,
                actor=device_id,
                target=command_id,
                source=source,
                detail={"bytes": len(data), "sha256": sha256},
            )
        )
        return await self.get(command_id)

    async def _read_bounded(
        self, body: AsyncIterator[bytes], declared: int | None, device_id: str, command_id: str, source: str
    ) -> bytes:
        limit = self.artifact_max_bytes
        if declared is not None and declared > limit:
            await self._refuse_upload(device_id, command_id, "too_large", source)
            raise PayloadTooLarge(f"the artifact is {declared} bytes; the limit is {limit}")
        chunks: list[bytes] = []
        size = 0
        async for chunk in body:
            size += len(chunk)
            if size > limit:
                await self._refuse_upload(device_id, command_id, "too_large", source)
                raise PayloadTooLarge(f"the artifact exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _refuse_upload(
        self, device_id: str, command_id: str, reason: str, source: str, **detail: object
    ) -> None:
        await self._audit.record(
            AuditEvent(
                action="command.artifact_upload",
                outcome=Outcome.DENIED,
                actor=device_id,
                target=command_id,
                source=source,
                detail={"reason": reason, **detail},
            )
        )

    def _artifact_path(self, command_id: str) -> Path:
        return self._artifacts_dir / f"{command_id}.tar.gz"

    # --- the worker --------------------------------------------------------------------

    async def run(self) -> None:
        """Record results, re-send to devices that came online, expire and re-send on a
        schedule; until cancelled."""
        loop = asyncio.get_running_loop()
        next_sweep = loop.time()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_sweep - loop.time())):
                    await self._wakeup.wait()
            self._wakeup.clear()
            results, self._results = self._results, []
            online, self._online = self._online, set()
            try:
                await self.record_results(results)
                if online:
                    await self.resend_to(online)
                if loop.time() >= next_sweep:
                    next_sweep = loop.time() + self._sweep_interval_s
                    await self.sweep()
            except Exception:
                logger.exception("command worker step failed; retrying at the next sweep")

    async def resend_to(self, device_ids: Iterable[str]) -> int:
        now = self._clock()
        async with self._engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(commands)
                    .join(devices, devices.c.id == commands.c.device_id)
                    .where(
                        commands.c.device_id.in_(list(device_ids)),
                        commands.c.status.in_(OPEN),
                        commands.c.expires_at > now,
                        devices.c.state == ACTIVE,
                    )
                    .order_by(commands.c.created_at)
                    .limit(RESEND_BATCH)
                )
            ).all()
        return await self._send([row._mapping for row in rows])

    async def sweep(self) -> None:
        """Close commands whose time ran out; send those never sent and, to online devices,
        those still unanswered after `resend_after`."""
        now = self._clock()
        async with self._engine.begin() as conn:
            for status, reason in ((QUEUED, "not_delivered"), (SENT, "no_result")):
                await conn.execute(
                    sa.update(commands)
                    .where(commands.c.status == status, commands.c.expires_at <= now)
                    .values(status=EXPIRED, reason=reason, completed_at=now)
                )
        async with self._engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(commands)
                    .join(devices, devices.c.id == commands.c.device_id)
                    .where(
                        commands.c.expires_at > now,
                        devices.c.state == ACTIVE,
                        sa.or_(
                            commands.c.status == QUEUED,
                            sa.and_(
                                commands.c.status == SENT,
                                commands.c.sent_at <= now - self._resend_after,
                                devices.c.online.is_(True),
                            ),
                        ),
                    )
                    .order_by(commands.c.created_at)
                    .limit(RESEND_BATCH)
                )
            ).all()
        if rows:
            await self._send([row._mapping for row in rows])
