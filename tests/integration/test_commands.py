"""Operator commands end to end — real control plane, real agent, real broker — on both stacks
(embedded amqtt + SQLite, Mosquitto + PostgreSQL): a ping answered and visible in the API; a
command for an offline device run once when it is back; an expired one never run; a log
archive uploaded over TLS and downloaded intact; upload refusals audited; idempotent
creation; bad requests refused; an operator-triggered certificate rotation."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import stat
import tarfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.enrollment import enroll
from agent.handlers import FileConfigHandler, MemoryHandler
from agent.health import SimulatedProbe
from agent.runtime import Agent
from agent.settings import AgentSettings
from agent.state import AgentState
from protocol.digest import content_digest
from protocol.messages import CommandResult, CommandStatus, DeviceInfo
from tests.conftest import start_stack
from tests.support.agents import EnrolledAgent, enroll_agent, running
from tests.support.control_plane import RunningControlPlane

pytestmark = pytest.mark.integration

STACKS = [
    pytest.param("embedded-sqlite", marks=pytest.mark.integration),
    pytest.param(
        "mosquitto-postgres", marks=[pytest.mark.integration, pytest.mark.mosquitto, pytest.mark.postgres]
    ),
]


@pytest.fixture(params=STACKS)
async def cp(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RunningControlPlane]:
    # Sweeps and re-sends every second or two instead of every minute; renewals not rate-limited.
    async with start_stack(
        request.param,
        tmp_path,
        command_sweep_interval_s=0.3,
        command_resend_after_s=2.0,
        renewal_min_interval_s=0.0,
    ) as plane:
        yield plane


def build(enrolled: EnrolledAgent, **overrides: Any) -> Agent:
    settings = enrolled.settings.model_copy(update=overrides)
    return Agent(settings, enrolled.state, FileConfigHandler(settings.config_path), SimulatedProbe(1))


async def post_command(cp: RunningControlPlane, device_id: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await cp.api.post(f"/v1/devices/{device_id}/commands", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


async def wait_command(
    cp: RunningControlPlane, command_id: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 15
) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        response = await cp.api.get(f"/v1/commands/{command_id}")
        assert response.status_code == 200, response.text
        view = dict(response.json())
        if predicate(view):
            return view
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"command {command_id} never reached the expected state: {view}")
        await asyncio.sleep(0.1)


def done(view: dict[str, Any]) -> bool:
    return view["status"] not in ("queued", "sent")


async def test_ping_round_trip_is_visible_in_the_api(cp: RunningControlPlane, tmp_path):
    await cp.create_store("DE-BER-0001")
    enrolled = await enroll_agent(cp, "DE-BER-0001", tmp_path / "agent")
    async with running(enrolled.build()) as agent:
        await agent.wait_applied(1)
        created = await post_command(cp, enrolled.device_id, {"name": "ping"})
        assert created["status"] in ("queued", "sent", "succeeded")  # a fast device may answer first
        assert created["created_by"] == "admin"
        view = await wait_command(cp, created["id"], done)

    assert view["status"] == "succeeded", view
    assert view["output"]["applied_version"] == 1
    assert view["output"]["agent_version"]
    assert view["sent_at"] is not None
    assert view["completed_at"] is not None
    listed = (await cp.api.get(f"/v1/devices/{enrolled.device_id}/commands")).json()
    assert [c["id"] for c in listed] == [created["id"]]
    audit = cp.control_plane.services.audit
    assert (await audit.records(action="command.create"))[0]["target"] == enrolled.device_id
    [result] = await audit.records(action="command.result")
    assert (result["actor"], result["target"], result["outcome"]) == (
        enrolled.device_id,
        created["id"],
        "success",
    )
    metrics = (await cp.api.get("/metrics")).text
    assert 'storefleet_commands_total{event="result"} 1.0' in metrics


async def test_a_command_for_an_offline_device_runs_once_when_it_is_back(cp: RunningControlPlane, tmp_path):
    await cp.create_store("FR-PAR-0002")
    known = await enroll_agent(cp, "FR-PAR-0002", tmp_path / "known")  # has a broker session
    fresh = await enroll_agent(cp, "FR-PAR-0002", tmp_path / "fresh")  # never connected yet
    async with running(known.build()):
        await cp.wait_for_device(known.device_id, lambda d: d["online"])
    await cp.wait_for_device(known.device_id, lambda d: not d["online"])

    waiting = [
        await post_command(cp, known.device_id, {"name": "ping"}),
        await post_command(cp, fresh.device_id, {"name": "ping"}),
    ]
    await asyncio.sleep(0.5)
    statuses = [(await cp.api.get(f"/v1/commands/{c['id']}")).json()["status"] for c in waiting]
    assert statuses == ["sent", "sent"]

    agents = [known.build(), fresh.build()]
    async with running(agents[0]), running(agents[1]):
        views = [await wait_command(cp, c["id"], done) for c in waiting]
        await asyncio.sleep(0.5)  # the broker's queued copy and our re-send both arrived by now

    assert [v["status"] for v in views] == ["succeeded", "succeeded"]
    assert [a.commands.executed for a in agents] == [1, 1]


async def test_an_expired_command_is_never_run_and_shown_expired(cp: RunningControlPlane, tmp_path):
    await cp.create_store("IT-ROM-0003")
    enrolled = await enroll_agent(cp, "IT-ROM-0003", tmp_path / "agent")
    async with running(enrolled.build()):
        await cp.wait_for_device(enrolled.device_id, lambda d: d["online"])
    await cp.wait_for_device(enrolled.device_id, lambda d: not d["online"])

    created = await post_command(cp, enrolled.device_id, {"name": "reboot", "ttl_s": 0.5})
    view = await wait_command(cp, created["id"], done)
    assert (view["status"], view["reason"]) == ("expired", "no_result")

    agent = build(enrolled, reboot_command=f"touch {tmp_path / 'rebooted'}")
    async with running(agent):
        # The broker kept it for the device's session: the device answers it, late, and does not run it.
        view = await wait_command(cp, created["id"], lambda v: v["reason"] == "expired")
    assert view["status"] == "expired"
    assert agent.commands.executed == 0
    assert not (tmp_path / "rebooted").exists()


async def test_collect_logs_uploads_an_archive_the_operator_downloads_intact(
    cp: RunningControlPlane, tmp_path
):
    await cp.create_store("ES-MAD-0004")
    enrolled = await enroll_agent(cp, "ES-MAD-0004", tmp_path / "agent")
    log_file = tmp_path / "agent.log"
    log_file.write_text("boot\nconnected\napplied version 1\n")
    async with running(build(enrolled, log_file=log_file)):
        created = await post_command(cp, enrolled.device_id, {"name": "collect_logs", "args": {"lines": 2}})
        assert created["args"] == {"lines": 2}  # the upload token is never shown
        view = await wait_command(cp, created["id"], done)

    assert view["status"] == "succeeded", view
    assert view["artifact"] == {
        "bytes": view["output"]["bytes"],
        "sha256": view["output"]["sha256"],  # verified against the agent's Content-Digest
        "download_url": f"/v1/commands/{created['id']}/artifact",
    }
    download = await cp.api.get(view["artifact"]["download_url"])
    assert download.status_code == 200
    assert hashlib.sha256(download.content).hexdigest() == view["output"]["sha256"]
    assert download.headers["Content-Digest"] == content_digest(download.content)
    with tarfile.open(fileobj=io.BytesIO(download.content), mode="r:gz") as archive:
        log = archive.extractfile("agent.log")
        assert log is not None
        assert log.read() == b"connected\napplied version 1\n"
        assert "state.json" in archive.getnames()
    stored = cp.settings.artifacts_dir / f"{created['id']}.tar.gz"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert (await cp.anonymous.get(view["artifact"]["download_url"])).status_code == 401

    # The token was spent by the agent's upload.
    token = cp.control_plane.services.commands.upload_token(created["id"])
    again = await cp.anonymous.put(
        f"/v1/devices/{enrolled.device_id}/commands/{created['id']}/artifact",
        content=b"x",
        headers={"Authorization": f"Bearer {token}"},
    )
    assert again.status_code == 401
    refusals = await cp.control_plane.services.audit.records(action="command.artifact_upload")
    assert refusals[0]["outcome"] == "denied"
    assert refusals[0]["detail"] == {"reason": "token_used"}


async def test_artifact_upload_refusals_are_audited(cp: RunningControlPlane, tmp_path):
    await cp.create_store("NL-AMS-0005")
    enrolled = await enroll_agent(cp, "NL-AMS-0005", tmp_path / "agent")  # not running
    created = await post_command(cp, enrolled.device_id, {"name": "collect_logs"})
    url = f"/v1/devices/{enrolled.device_id}/commands/{created['id']}/artifact"
    token = cp.control_plane.services.commands.upload_token(created["id"])

    async def put(body: bytes, token: str | None, digest: str | None = "of the body") -> int:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        if digest is not None:
            headers["Content-Digest"] = content_digest(body) if digest == "of the body" else digest
        return (await cp.anonymous.put(url, content=body, headers=headers)).status_code

    assert await put(b"data", "sfu_forged-token-000000000000000") == 401
    assert await put(b"data", None) == 401
    too_big = b"\0" * (cp.settings.artifact_max_bytes + 1)
    assert await put(too_big, token) == 413
    other = f"/v1/devices/{enrolled.device_id}/commands/not-a-command/artifact"
    response = await cp.anonymous.put(other, content=b"x", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "upload_refused"

    # An archive damaged on the way (or a device that does not say what it sent) is refused.
    assert await put(b"the archive", token, digest=content_digest(b"the archivE")) == 422
    assert await put(b"the archive", token, digest=None) == 422
    assert await put(b"the archive", token, digest="md5=:AAAA:") == 422

    records = await cp.control_plane.services.audit.records(action="command.artifact_upload")
    reasons = [r["detail"]["reason"] for r in reversed(records)]
    assert reasons == ["bad_token", "missing_token", "too_large", "unknown_command", "digest_mismatch"]
    assert all(r["outcome"] == "denied" for r in records)
    assert records[0]["detail"]["received_sha256"] == hashlib.sha256(b"the archive").hexdigest()
    # Refusals did not spend the token.
    assert await put(b"the archive", token) == 200
    view = (await cp.api.get(f"/v1/commands/{created['id']}")).json()
    assert view["artifact"]["bytes"] == len(b"the archive")
    assert view["artifact"]["sha256"] == hashlib.sha256(b"the archive").hexdigest()

    # A result describing another archive than the one stored is recorded, and loud.
    result = CommandResult(
        device_id=enrolled.device_id,
        command_id=created["id"],
        status=CommandStatus.SUCCEEDED,
        output={"bytes": 5, "sha256": hashlib.sha256(b"other").hexdigest()},
    )
    await cp.control_plane.services.commands.record_results([result])
    mismatch = await cp.control_plane.services.audit.records(action="command.artifact_mismatch")
    assert [(m["outcome"], m["detail"]["stored_sha256"]) for m in mismatch] == [
        ("denied", view["artifact"]["sha256"])
    ]


async def test_command_id_makes_creation_idempotent_and_bad_requests_are_refused(
    cp: RunningControlPlane, tmp_path
):
    await cp.create_store("PL-WAW-0006")
    enrolled = await enroll_agent(cp, "PL-WAW-0006", tmp_path / "agent")
    path = f"/v1/devices/{enrolled.device_id}/commands"
    body = {"name": "reboot", "args": {"delay_s": 30}, "ttl_s": 120, "command_id": "op-reboot-000001"}

    first = await cp.api.post(path, json=body)
    repeat = await cp.api.post(path, json=body)
    assert (first.status_code, repeat.status_code) == (201, 200)
    assert repeat.json()["id"] == first.json()["id"] == "op-reboot-000001"
    assert repeat.json()["created_at"] == first.json()["created_at"]
    conflict = await cp.api.post(path, json={**body, "args": {"delay_s": 60}})
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "command_id_conflict"
    assert len((await cp.api.get(path)).json()) == 1

    for bad, field in [
        ({"name": "collect_logs", "args": {"lines": 0}}, "args.lines"),
        ({"name": "ping", "args": {"verbose": True}}, "args.verbose"),
        ({"name": "reboot", "args": {"delay_s": 99999}}, "args.delay_s"),
        ({"name": "format_disk"}, "name"),
        ({"name": "ping", "ttl_s": 8 * 86_400}, "ttl_s"),
        ({"name": "ping", "command_id": "no spaces allowed"}, "command_id"),
    ]:
        response = await cp.api.post(path, json=bad)
        assert response.status_code == 422, (bad, response.text)
        assert field in response.json()["error"]["message"], response.text

    assert (await cp.api.post("/v1/devices/dev-nobody/commands", json={"name": "ping"})).status_code == 404
    assert (await cp.anonymous.post(path, json={"name": "ping"})).status_code == 401
    revoked = await cp.api.post(f"/v1/devices/{enrolled.device_id}/revoke", json={"reason": "stolen"})
    assert revoked.status_code == 200
    refused = await cp.api.post(path, json={"name": "ping"})
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "device_not_active"
    # A retry of a command made before the revocation still answers with that command.
    assert (await cp.api.post(path, json=body)).status_code == 200


async def test_rotate_certificate_renews_the_device_certificate_now(cp: RunningControlPlane, tmp_path):
    await cp.create_store("AT-VIE-0007")
    enrolled = await enroll_agent(cp, "AT-VIE-0007", tmp_path / "agent")
    before = (await cp.device(enrolled.device_id))["cert_serial"]
    async with running(enrolled.build()) as agent:
        await agent.wait_applied(1)
        created = await post_command(cp, enrolled.device_id, {"name": "rotate_certificate"})
        view = await wait_command(cp, created["id"], done)
        assert view["status"] == "succeeded", view
        await cp.wait_for_device(enrolled.device_id, lambda d: d["cert_serial"] != before and d["online"])
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                while agent.renewer.renewals < 1:
                    await asyncio.sleep(0.1)
        assert agent.renewer.renewals == 1


async def test_simulated_agents_with_state_in_memory_run_commands_too(cp: RunningControlPlane, tmp_path):
    await cp.create_store("BE-BRU-0008")
    token = await cp.create_token("BE-BRU-0008")
    state = AgentState.in_memory()
    await enroll(
        server_url=cp.base_url,
        token=token["token"],
        state=state,
        ca_fingerprint=token["ca_fingerprint"],
        device=DeviceInfo(hostname="sim-00001", os="simulated"),
        timeout_s=10,
    )
    device_id = state.require_enrollment().device_id
    # A reboot command that would fail loudly if a simulated agent ever ran it.
    settings = AgentSettings(state_dir=tmp_path / "unused", reboot_command="/nonexistent/reboot")
    async with running(Agent(settings, state, MemoryHandler(), SimulatedProbe(3))) as agent:
        await agent.wait_applied(1)
        reboot = await post_command(cp, device_id, {"name": "reboot"})
        logs = await post_command(cp, device_id, {"name": "collect_logs"})
        views = [await wait_command(cp, c["id"], done) for c in (reboot, logs)]
    assert [v["status"] for v in views] == ["succeeded", "succeeded"], views
    assert views[1]["output"]["files"] == ["state.json"]
    download = await cp.api.get(views[1]["artifact"]["download_url"])
    assert hashlib.sha256(download.content).hexdigest() == views[1]["output"]["sha256"]
    assert not (tmp_path / "unused").exists()  # nothing written to disk
