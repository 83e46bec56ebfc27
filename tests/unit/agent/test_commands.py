"""The agent's command runner: what runs, what is refused, and that nothing runs twice.

Real signatures, real state (in memory and on disk), a real HTTPS endpoint for the log upload
and a real subprocess for the reboot command."""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
import json
import shlex
import ssl
import sys
import tarfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec

from agent.commands import CommandRunner
from agent.identity import certificate_pem, generate_key, load_certificate, private_key_pem
from agent.renewal import Renewer
from agent.settings import AgentSettings
from agent.state import COMMANDS_KEPT, AgentState
from protocol.messages import (
    CommandResult,
    CommandStatus,
    RenewalRequest,
    RenewalResponse,
    RenewalStatus,
    decode,
)
from protocol.signing import canonical_json, sign_document
from tests.unit.agent.factories import DEVICE_ID, LocalCA

UPLOAD_TOKEN = "sfu_test-token-0123456789"


def command(
    name: str,
    key: ec.EllipticCurvePrivateKey | None,
    *,
    command_id: str = "cmd-00000001",
    device_id: str = DEVICE_ID,
    args: dict[str, Any] | None = None,
    ttl: timedelta = timedelta(minutes=10),
) -> dict[str, Any]:
    now = datetime.now(UTC)
    document = {
        "schema": 1,
        "device_id": device_id,
        "command_id": command_id,
        "name": name,
        "args": args or {},
        "issued_at": now.isoformat(),
        "expires_at": (now + ttl).isoformat(),
    }
    return sign_document(document, key) if key is not None else document


def payload(document: dict[str, Any]) -> bytes:
    return canonical_json(document)


@dataclass
class Outbox:
    results: list[CommandResult] = field(default_factory=list)

    async def send(self, data: bytes) -> None:
        self.results.append(decode(CommandResult, data))


def make_runner(tmp_path: Path, state: AgentState, **overrides: Any) -> CommandRunner:
    settings = AgentSettings(state_dir=tmp_path, **overrides)
    renewer = Renewer(settings=settings, state=state, device_id=DEVICE_ID)
    return CommandRunner(
        settings=settings, state=state, device_id=DEVICE_ID, renewer=renewer, applied_version=lambda: 7
    )


async def test_ping_answers_and_a_redelivery_is_answered_from_the_record(tmp_path, state, signing_key):
    runner, outbox = make_runner(tmp_path, state), Outbox()
    message = payload(command("ping", signing_key))

    first = await runner.process(message, outbox.send)
    again = await runner.process(message, outbox.send)

    assert first is not None
    assert first.status is CommandStatus.SUCCEEDED
    assert first.output["applied_version"] == 7
    assert {"agent_version", "uptime_s"} <= set(first.output)
    assert runner.executed == 1  # the re-delivery did not run it again
    assert again == first  # the same result, `at` included
    assert [r.status for r in outbox.results] == [CommandStatus.SUCCEEDED, CommandStatus.SUCCEEDED]


async def test_a_restarted_agent_still_remembers_what_it_ran(tmp_path, disk_state, signing_key):
    message = payload(command("ping", signing_key))
    await make_runner(tmp_path, disk_state).process(message, Outbox().send)
    restarted = AgentState.open(disk_state.directory or tmp_path)
    try:
        runner = make_runner(tmp_path, restarted)
        result = await runner.process(message, Outbox().send)
        assert result is not None
        assert result.status is CommandStatus.SUCCEEDED
        assert runner.executed == 0
    finally:
        restarted.close()


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        ("tamper", "bad_signature"),
        ("unsigned", "bad_signature"),
        ("foreign_key", "unknown_signing_key"),
        ("other_device", "wrong_device"),
        ("unknown_name", "unknown_command"),
        ("bad_expiry", "invalid_message"),
    ],
)
async def test_untrusted_commands_are_rejected_not_run_and_do_not_block_the_real_one(
    tmp_path, state, signing_key, mutate, reason
):
    runner, outbox = make_runner(tmp_path, state), Outbox()
    if mutate == "tamper":
        document = command("reboot", signing_key)
        document["args"] = {"delay_s": 5}
    elif mutate == "unsigned":
        document = command("reboot", None)
    elif mutate == "foreign_key":
        document = command("reboot", ec.generate_private_key(ec.SECP256R1()))
    elif mutate == "other_device":
        document = command("reboot", signing_key, device_id="dev-9999")
    elif mutate == "unknown_name":
        document = command("format_disk", signing_key)
    else:
        document = sign_document({**command("reboot", None), "expires_at": "soon"}, signing_key)

    result = await runner.process(payload(document), outbox.send)

    assert result is not None
    assert (result.status, result.reason) == (CommandStatus.REJECTED, reason)
    assert result.device_id == DEVICE_ID
    assert runner.executed == 0
    assert state.command_result("cmd-00000001") is None
    # The genuine command with the same id still runs.
    genuine = await runner.process(payload(command("ping", signing_key)), outbox.send)
    assert genuine is not None
    assert genuine.status is CommandStatus.SUCCEEDED


async def test_garbage_without_a_command_id_is_dropped(tmp_path, memory_state):
    runner, outbox = make_runner(tmp_path, memory_state), Outbox()
    assert await runner.process(b"not json", outbox.send) is None
    assert await runner.process(b'{"name": "ping"}', outbox.send) is None
    assert outbox.results == []


async def test_an_expired_command_is_answered_expired_and_not_run(tmp_path, state, signing_key):
    runner, outbox = make_runner(tmp_path, state), Outbox()
    message = payload(command("ping", signing_key, ttl=timedelta(seconds=-1)))
    result = await runner.process(message, outbox.send)
    assert result is not None
    assert (result.status, result.reason) == (CommandStatus.EXPIRED, "expired")
    assert runner.executed == 0
    assert state.command_result("cmd-00000001") is None


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("ping", {"verbose": True}),
        ("reboot", {"delay_s": -1}),
        ("reboot", {"delay_s": "soon"}),
        ("collect_logs", {"lines": 10, "upload_url": "http://plain.example/x", "upload_token": "t"}),
        ("collect_logs", {"lines": 0, "upload_url": "https://cp.example/x", "upload_token": "t"}),
    ],
)
async def test_bad_arguments_are_rejected(tmp_path, memory_state, signing_key, name, args):
    runner = make_runner(tmp_path, memory_state)
    result = await runner.process(payload(command(name, signing_key, args=args)), Outbox().send)
    assert result is not None
    assert (result.status, result.reason) == (CommandStatus.REJECTED, "invalid_args")
    assert runner.executed == 0


async def test_reboot_publishes_its_result_before_running_the_reboot_command(
    tmp_path, disk_state, signing_key
):
    marker = tmp_path / "rebooted"
    script = f"from pathlib import Path; Path({str(marker)!r}).write_text('rebooted')"
    runner = make_runner(tmp_path, disk_state, reboot_command=shlex.join([sys.executable, "-c", script]))
    seen_before_send: list[bool] = []

    async def send(data: bytes) -> None:
        seen_before_send.append(marker.exists())

    result = await runner.process(payload(command("reboot", signing_key)), send)

    assert result is not None
    assert result.status is CommandStatus.SUCCEEDED
    assert seen_before_send == [False]
    async with asyncio.timeout(10):
        while not marker.exists():
            await asyncio.sleep(0.05)
    assert marker.read_text() == "rebooted"


async def test_a_delayed_reboot_is_abandoned_when_the_agent_stops(tmp_path, disk_state, signing_key):
    marker = tmp_path / "rebooted"
    script = f"from pathlib import Path; Path({str(marker)!r}).write_text('rebooted')"
    runner = make_runner(tmp_path, disk_state, reboot_command=shlex.join([sys.executable, "-c", script]))
    message = payload(command("reboot", signing_key, args={"delay_s": 1}))
    result = await runner.process(message, Outbox().send)
    assert result is not None
    assert result.output == {"delay_s": 1}
    runner.shutdown()
    await asyncio.sleep(1.5)
    assert not marker.exists()


async def test_reboot_in_the_simulator_is_a_no_op(tmp_path, memory_state, signing_key):
    runner = make_runner(tmp_path, memory_state, reboot_command="/nonexistent/reboot")
    result = await runner.process(payload(command("reboot", signing_key)), Outbox().send)
    assert result is not None
    assert result.status is CommandStatus.SUCCEEDED
    await asyncio.sleep(0.1)  # the deferred no-op ran without trying the command


# --- collect_logs --------------------------------------------------------------------------


@dataclass
class UploadServer:
    url: str = ""
    status: int = 200
    uploads: list[tuple[str, bytes]] = field(default_factory=list)

    async def put(self, request: web.Request) -> web.Response:
        self.uploads.append((request.headers.get("Authorization", ""), await request.read()))
        return web.json_response({"ok": True}, status=self.status)


@pytest.fixture
async def upload_server(tmp_path: Path, ca: LocalCA) -> AsyncIterator[UploadServer]:
    """An HTTPS endpoint whose certificate the test CA (the one pinned at enrollment) issued."""
    server = UploadServer()
    app = web.Application()
    app.router.add_put("/v1/devices/{device}/commands/{command}/artifact", server.put)
    key = generate_key()
    cert = ca.issue(key.public_key(), "127.0.0.1", server_names=["127.0.0.1"])
    (tmp_path / "srv.pem").write_text(certificate_pem(cert))
    (tmp_path / "srv.key").write_bytes(private_key_pem(key))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "srv.pem", tmp_path / "srv.key")
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    server.url = f"https://127.0.0.1:{port}/v1/devices/{DEVICE_ID}/commands/cmd-00000001/artifact"
    yield server
    await runner.cleanup()


def collect_args(server: UploadServer, **extra: Any) -> dict[str, Any]:
    return {"upload_url": server.url, "upload_token": UPLOAD_TOKEN, **extra}


def archive_files(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers()}  # type: ignore[union-attr]


async def test_collect_logs_uploads_the_tail_of_the_log_file_and_a_state_summary(
    tmp_path, disk_state, signing_key, upload_server
):
    log_file = tmp_path / "agent.log"
    log_file.write_text("".join(f"line {i}\n" for i in range(1, 6)))
    runner = make_runner(tmp_path, disk_state, log_file=log_file)
    message = payload(command("collect_logs", signing_key, args=collect_args(upload_server, lines=3)))

    result = await runner.process(message, Outbox().send)

    assert result is not None
    assert result.status is CommandStatus.SUCCEEDED, result.detail
    [(authorization, body)] = upload_server.uploads
    assert authorization == f"Bearer {UPLOAD_TOKEN}"
    assert result.output["sha256"] == hashlib.sha256(body).hexdigest()
    assert result.output["bytes"] == len(body)
    files = archive_files(body)
    assert files["agent.log"] == b"line 3\nline 4\nline 5\n"
    summary = json.loads(files["state.json"])
    assert summary["device_id"] == DEVICE_ID
    assert summary["applied_version"] == 7
    assert "BEGIN" not in files["state.json"].decode()  # no keys or certificates


async def test_collect_logs_in_the_simulator_uploads_the_state_summary(
    tmp_path, memory_state, signing_key, upload_server
):
    runner = make_runner(tmp_path, memory_state)
    result = await runner.process(
        payload(command("collect_logs", signing_key, args=collect_args(upload_server))), Outbox().send
    )
    assert result is not None
    assert result.status is CommandStatus.SUCCEEDED, result.detail
    assert result.output["files"] == ["state.json"]


async def test_a_refused_upload_fails_the_command_once(tmp_path, memory_state, signing_key, upload_server):
    upload_server.status = 401
    runner, outbox = make_runner(tmp_path, memory_state), Outbox()
    message = payload(command("collect_logs", signing_key, args=collect_args(upload_server)))
    result = await runner.process(message, outbox.send)
    assert result is not None
    assert (result.status, result.reason) == (CommandStatus.FAILED, "upload_failed")
    assert "HTTP 401" in (result.detail or "")
    await runner.process(message, outbox.send)
    assert len(upload_server.uploads) == 1  # answered from the record, not uploaded again


async def test_the_upload_refuses_a_server_the_pinned_ca_did_not_certify(
    tmp_path, memory_state, signing_key, upload_server
):
    # The agent's pinned CA is replaced by another one: the real server no longer verifies.
    other = LocalCA.create("someone else")
    memory_state._blobs.write("ca.pem", other.pem.encode(), private=False)
    runner = make_runner(tmp_path, memory_state)
    result = await runner.process(
        payload(command("collect_logs", signing_key, args=collect_args(upload_server))), Outbox().send
    )
    assert result is not None
    assert (result.status, result.reason) == (CommandStatus.FAILED, "upload_failed")
    assert upload_server.uploads == []


# --- rotate_certificate --------------------------------------------------------------------


async def test_rotate_certificate_makes_the_renewer_renew_now(tmp_path, memory_state, signing_key, ca):
    settings = AgentSettings(state_dir=tmp_path, renewal_timeout_s=2.0)
    ticks = itertools.count()

    def clock() -> datetime:  # time moves on between any two readings, as it may for real
        return datetime.now(UTC) + timedelta(milliseconds=next(ticks))

    renewer = Renewer(settings=settings, state=memory_state, device_id=DEVICE_ID, clock=clock)
    runner = CommandRunner(
        settings=settings, state=memory_state, device_id=DEVICE_ID, renewer=renewer, applied_version=lambda: 0
    )
    assert await renewer.select() is not None
    requests: list[RenewalRequest] = []

    async def answer(data: bytes) -> None:
        request = decode(RenewalRequest, data)
        requests.append(request)
        cert = ca.sign_csr(request.csr_pem, request.device_id)
        response = RenewalResponse(
            device_id=request.device_id,
            request_id=request.request_id,
            status=RenewalStatus.ISSUED,
            certificate_pem=cert,
            ca_chain_pem=ca.pem,
            not_after=load_certificate(cert).not_valid_after_utc,
        )
        asyncio.get_running_loop().call_soon(renewer.deliver, response.to_json())

    renewing = asyncio.create_task(renewer.run(answer))
    await asyncio.sleep(0.2)
    assert requests == []  # a fresh certificate: renewal not due for a long while

    result = await runner.process(payload(command("rotate_certificate", signing_key)), Outbox().send)

    assert result is not None
    assert result.status is CommandStatus.SUCCEEDED
    assert result.output["requested"] is True
    async with asyncio.timeout(5):
        await renewing  # returns once the renewed pair is staged
    assert len(requests) == 1
    assert memory_state.pending_certificate_pem() is not None


def test_the_state_keeps_only_the_newest_command_results(memory_state):
    for index in range(COMMANDS_KEPT + 5):
        memory_state.record_command_result(f"cmd-{index:08d}", b'{"n": %d}' % index)
    ids = memory_state.command_ids()
    assert len(ids) == COMMANDS_KEPT
    assert ids[0] == f"cmd-{COMMANDS_KEPT + 4:08d}"
    assert memory_state.command_result("cmd-00000000") is None
    assert memory_state.command_result(f"cmd-{COMMANDS_KEPT + 4:08d}") is not None
