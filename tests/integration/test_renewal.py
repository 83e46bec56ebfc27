"""Certificate renewal end to end — real control plane, real agent, real broker — on both
stacks (embedded amqtt + SQLite, Mosquitto + PostgreSQL): seconds-long certificates renewed
over the live session without the device ever showing offline or missing a desired state;
the broker ACL keeping renewal to the device's own identity; refusals (weak or garbage CSR,
rate limit, request-id reuse) answered and audited; idempotent re-sends; and the
re-enrollment path of a device whose certificate expired while it was off."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from agent.cli import EXIT_OK, main
from agent.handlers import FileConfigHandler
from agent.health import SimulatedProbe
from agent.identity import build_csr, generate_key, load_certificate
from agent.runtime import Agent
from agent.tls import broker_client_context
from protocol.messages import RenewalRequest, RenewalResponse, RenewalStatus, decode
from protocol.topics import TopicKind, device_topic, parse_topic
from tests.conftest import start_stack
from tests.support.agents import EnrolledAgent, enroll_agent
from tests.support.control_plane import RunningControlPlane
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

STACKS = [
    pytest.param("embedded-sqlite", marks=pytest.mark.integration),
    pytest.param(
        "mosquitto-postgres", marks=[pytest.mark.integration, pytest.mark.mosquitto, pytest.mark.postgres]
    ),
]
# 0.003 h ≈ 10.8 s: renewal at ~7.2 s (±0.5 s jitter), well above the agent's minimum intervals.
SHORT_VALIDITY_HOURS = 0.003


def fast_renewal(enrolled: EnrolledAgent, **overrides: Any) -> Agent:
    settings = enrolled.settings.model_copy(
        update={
            "renewal_timeout_s": 3.0,
            "renewal_retry_min_s": 0.5,
            "renewal_retry_max_s": 2.0,
            "expired_recheck_s": 0.2,
            **overrides,
        }
    )
    return Agent(settings, enrolled.state, FileConfigHandler(settings.config_path), SimulatedProbe(1))


@contextlib.asynccontextmanager
async def running(agent: Agent, *, wait: bool = True) -> AsyncIterator[Agent]:
    task = asyncio.create_task(agent.run())
    try:
        if wait:
            await asyncio.wait_for(agent.wait_connected(), 15)
        yield agent
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def record_statuses(cp: RunningControlPlane, monkeypatch: pytest.MonkeyPatch, device_id: str) -> list[str]:
    """Every status message of `device_id` that reaches the control plane (before coalescing)."""
    link = cp.control_plane.services.link
    forward = link._on_message
    seen: list[str] = []

    def spy(topic: str, payload: bytes) -> None:
        with contextlib.suppress(Exception):
            parsed = parse_topic(topic)
            if parsed.device_id == device_id and parsed.kind is TopicKind.STATUS:
                seen.append(json.loads(payload)["state"])
        forward(topic, payload)

    monkeypatch.setattr(link, "_on_message", spy)
    return seen


@pytest.mark.parametrize("stack_name", STACKS)
async def test_short_lived_certificates_renew_twice_without_dropping_the_session(
    stack_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    async with start_stack(
        stack_name, tmp_path, device_cert_validity_hours=SHORT_VALIDITY_HOURS, renewal_min_interval_s=1
    ) as cp:
        await cp.create_store("DE-BER-0001", config={"pos": {"footer": "v1"}})
        enrolled = await enroll_agent(cp, "DE-BER-0001", tmp_path / "agent")
        statuses = record_statuses(cp, monkeypatch, enrolled.device_id)
        first_key = enrolled.state.private_key_pem()
        seen_online: list[bool] = []

        async def watch() -> None:  # what an operator polling the API would see
            while True:
                seen_online.append((await cp.device(enrolled.device_id))["online"])
                await asyncio.sleep(0.1)

        async with running(fast_renewal(enrolled)) as agent:
            await asyncio.wait_for(agent.wait_applied(1), 15)
            await cp.wait_for_device(enrolled.device_id, lambda d: d["online"])
            watcher = asyncio.create_task(watch())
            try:
                for round_ in (1, 2):
                    await wait_until(lambda r=round_: agent.renewer.renewals >= r, 30, f"renewal {round_}")
                    # Desired state keeps flowing between renewals and is applied.
                    footer = f"after renewal {round_}"
                    response = await cp.api.put(
                        "/v1/stores/DE-BER-0001/config", json={"config": {"pos": {"footer": footer}}}
                    )
                    assert response.status_code == 200, response.text
                    await asyncio.wait_for(agent.wait_applied(round_ + 1), 15)
                    assert json.loads(enrolled.config_file.read_text())["pos"]["footer"] == footer
                view = await cp.wait_for_device(enrolled.device_id, lambda d: d["applied_version"] == 3)
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            connects, losses = agent.stats.connects, agent.stats.connection_losses

        # Never offline while running: not in a status message, not in the API.
        assert "offline" not in statuses[:-1], statuses
        assert seen_online
        assert all(seen_online), seen_online
        assert losses == 0
        assert connects == 1 + agent.renewer.renewals
        assert view["online"]
        # The agent runs the certificate the control plane last issued, for a new key.
        current = load_certificate(enrolled.state.certificate_pem() or "")
        assert format(current.serial_number, "x") == view["cert_serial"]
        assert enrolled.state.private_key_pem() != first_key
        certificates = (await cp.api.get("/v1/certificates", params={"device_id": enrolled.device_id})).json()
        renewed = [c for c in certificates if c["issued_by"] == "renew"]
        assert len(renewed) >= 2
        audit = await cp.control_plane.services.audit.records(action="certificate.renew")
        assert len([r for r in audit if r["outcome"] == "success" and r["actor"] == enrolled.device_id]) >= 2
        enrolled.state.close()


# --- a device talking renewal by hand, with its own certificate ---------------------------


class RawDevice:
    """An MQTT client with an enrolled device's certificate, speaking the renewal protocol."""

    def __init__(self, client: aiomqtt.Client, device_id: str) -> None:
        self.client = client
        self.device_id = device_id
        self.received: list[tuple[str, RenewalResponse]] = []

    async def send(self, request: RenewalRequest, *, topic_device: str | None = None) -> None:
        topic = device_topic(topic_device or self.device_id, TopicKind.RENEW)
        await self.client.publish(topic, request.to_json(), qos=1)

    async def ask(self, request: RenewalRequest) -> RenewalResponse:
        await self.send(request)
        return await self.answer(request.request_id)

    async def answer(self, request_id: str, timeout: float = 10.0) -> RenewalResponse:
        async with asyncio.timeout(timeout):
            async for message in self.client.messages:
                response = decode(RenewalResponse, bytes(message.payload))  # type: ignore[arg-type]
                self.received.append((str(message.topic), response))
                if response.request_id == request_id:
                    return response
        raise AssertionError("unreachable")


@contextlib.asynccontextmanager
async def raw_device(cp: RunningControlPlane, enrolled: EnrolledAgent) -> AsyncIterator[RawDevice]:
    host, port = cp.settings.broker_endpoint
    async with aiomqtt.Client(
        host,
        port,
        identifier=enrolled.device_id,
        tls_context=broker_client_context(enrolled.state),
        timeout=10,
    ) as client:
        await client.subscribe(device_topic(enrolled.device_id, TopicKind.RENEW_RESULT), qos=1)
        yield RawDevice(client, enrolled.device_id)


def request(device_id: str, csr_pem: str | None = None, request_id: str | None = None) -> RenewalRequest:
    return RenewalRequest(
        device_id=device_id,
        request_id=request_id or secrets.token_urlsafe(12),
        csr_pem=csr_pem or build_csr(generate_key()),
    )


def rsa_csr() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weak")]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


GARBAGE_CSR = (
    "-----BEGIN CERTIFICATE REQUEST-----\n" + "Z2FyYmFnZQ" * 12 + "\n-----END CERTIFICATE REQUEST-----\n"
)


async def test_a_device_can_renew_only_its_own_identity(stack: RunningControlPlane, tmp_path: Path):
    await stack.create_store("DE-BER-0001")
    alice = await enroll_agent(stack, "DE-BER-0001", tmp_path / "alice")
    bob = await enroll_agent(stack, "DE-BER-0001", tmp_path / "bob")
    bob_serial = (await stack.device(bob.device_id))["cert_serial"]
    renewals = stack.control_plane.services.renewals

    async with raw_device(stack, alice) as attacker:
        # Listening on Bob's answers and asking on Bob's topic: the broker ACL stops both.
        with contextlib.suppress(aiomqtt.MqttError):
            await attacker.client.subscribe(device_topic(bob.device_id, TopicKind.RENEW_RESULT), qos=1)
        forged = request(bob.device_id)
        await attacker.send(forged, topic_device=bob.device_id)
        # On her own topic with Bob's id in the payload: the control plane's identity check.
        await attacker.send(request(bob.device_id))
        # Her own, legitimate request: answered, and after the two above (same session, QoS 1).
        own = await attacker.ask(request(alice.device_id))
        assert own.status is RenewalStatus.ISSUED

        # Bob renews for real; Alice, subscribed to his answers if the broker let her, sees nothing.
        async with raw_device(stack, bob) as victim:
            genuine = await victim.ask(request(bob.device_id))
        assert genuine.status is RenewalStatus.ISSUED
        with contextlib.suppress(TimeoutError):
            await attacker.answer(genuine.request_id, timeout=1.0)

    assert {topic for topic, _ in attacker.received} == {
        device_topic(alice.device_id, TopicKind.RENEW_RESULT)
    }
    assert all(response.device_id == alice.device_id for _, response in attacker.received)
    assert forged.request_id not in {r.request_id for _, r in attacker.received}
    # The only certificate issued to Bob is the one he asked for.
    assert renewals.issued == 2
    bob_renewals = [
        r
        for r in await stack.control_plane.services.audit.records(action="certificate.renew")
        if r["target"] == bob.device_id
    ]
    assert [(r["outcome"], r["detail"]["request_id"]) for r in bob_renewals] == [
        ("success", genuine.request_id)
    ]
    assert (await stack.device(bob.device_id))["cert_serial"] != bob_serial
    mismatches = await stack.control_plane.services.audit.records(action="mqtt.identity_mismatch")
    assert any(r["actor"] == alice.device_id for r in mismatches)
    if stack.control_plane.broker is not None:  # the embedded broker reports what it denied
        denied = await stack.control_plane.services.audit.records(action="broker.publish_denied")
        assert any(r["target"] == device_topic(bob.device_id, TopicKind.RENEW) for r in denied)
    alice.state.close()
    bob.state.close()


async def test_renewal_refusals_are_answered_and_audited_and_resends_are_idempotent(
    stack: RunningControlPlane, tmp_path: Path
):
    await stack.create_store("DE-BER-0001")
    device = await enroll_agent(stack, "DE-BER-0001", tmp_path / "device")
    audit = stack.control_plane.services.audit

    async with raw_device(stack, device) as raw:
        weak = await raw.ask(request(device.device_id, csr_pem=rsa_csr()))
        garbage = await raw.ask(request(device.device_id, csr_pem=GARBAGE_CSR))
        first = request(device.device_id)
        issued = await raw.ask(first)
        again = await raw.ask(first)  # the answer was "lost": the same request again
        conflict = await raw.ask(request(device.device_id, request_id=first.request_id))
        too_soon = await raw.ask(request(device.device_id))

    assert (weak.status, weak.reason) == (RenewalStatus.REFUSED, "csr_weak_key")
    assert (garbage.status, garbage.reason) == (RenewalStatus.REFUSED, "csr_rejected")
    assert issued.status is RenewalStatus.ISSUED
    assert issued.not_after is not None
    assert issued.not_after > datetime.now(UTC)
    assert again == issued  # same certificate, not a second one
    assert (conflict.status, conflict.reason) == (RenewalStatus.REFUSED, "request_id_conflict")
    assert (too_soon.status, too_soon.reason) == (RenewalStatus.REFUSED, "rate_limited")
    assert too_soon.retry_after_s is not None
    assert too_soon.retry_after_s > 0

    certificates = (await stack.api.get("/v1/certificates", params={"device_id": device.device_id})).json()
    assert [c["issued_by"] for c in certificates].count("renew") == 1
    assert (await stack.device(device.device_id))["cert_serial"] == format(
        load_certificate(issued.certificate_pem or "").serial_number, "x"
    )
    records = [r for r in await audit.records(action="certificate.renew") if r["actor"] == device.device_id]
    outcomes = sorted((r["outcome"], r["detail"].get("reason")) for r in records)
    assert outcomes == sorted(
        [
            ("denied", "csr_weak_key"),
            ("denied", "csr_rejected"),
            ("success", None),
            ("denied", "request_id_conflict"),
            ("denied", "rate_limited"),
        ]
    )
    device.state.close()


@pytest.mark.parametrize("stack_name", STACKS)
async def test_a_device_whose_certificate_expired_offline_comes_back_by_reenrollment(
    stack_name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    async with start_stack(
        stack_name, tmp_path, device_cert_validity_hours=0.002, renewal_min_interval_s=1
    ) as cp:
        await cp.create_store("DE-BER-0001", config={"pos": {"footer": "v1"}})
        enrolled = await enroll_agent(cp, "DE-BER-0001", tmp_path / "agent")
        state_dir = tmp_path / "agent"
        async with running(fast_renewal(enrolled)) as agent:
            await asyncio.wait_for(agent.wait_applied(1), 15)
        # Off for longer than the certificate lives.
        not_after = load_certificate(enrolled.state.certificate_pem() or "").not_valid_after_utc
        await asyncio.sleep(max(0.0, (not_after - datetime.now(UTC)).total_seconds()) + 0.5)
        old_key = enrolled.state.private_key_pem()

        async with running(fast_renewal(enrolled), wait=False) as agent:
            await wait_until(lambda: agent.needs_reenrollment, 10, "the expired state")
            assert agent.stats.connect_attempts == 0  # the expired certificate is never presented

            assert await asyncio.to_thread(main, ["status", "--state-dir", str(state_dir)]) == EXIT_OK
            out, err = capsys.readouterr()
            status = json.loads(out)
            assert (status["needs_reenrollment"], status["renewal"]["status"]) == (True, "expired")
            assert "reenroll" in err

            # The operator's side: a token bound to this device; the device's side: `reenroll`.
            token = await cp.api.post(f"/v1/devices/{enrolled.device_id}/reenrollment-tokens", json={})
            assert token.status_code == 201, token.text
            code = await asyncio.to_thread(
                main,
                [
                    "reenroll",
                    "--server",
                    cp.base_url,
                    "--token",
                    token.json()["token"],
                    "--ca-file",
                    str(cp.ca_file),
                    "--state-dir",
                    str(state_dir),
                ],
            )
            out, err = capsys.readouterr()
            assert code == EXIT_OK, err
            assert json.loads(out)["device_id"] == enrolled.device_id
            assert token.json()["token"] not in out + err

            await asyncio.wait_for(agent.wait_connected(), 15)  # it picked up the new credentials
            assert not agent.needs_reenrollment
            assert agent.applied_version == 1  # applied state kept across re-enrollment
            response = await cp.api.put(
                "/v1/stores/DE-BER-0001/config", json={"config": {"pos": {"footer": "v2"}}}
            )
            assert response.status_code == 200, response.text
            await asyncio.wait_for(agent.wait_applied(2), 15)
            view = await cp.wait_for_device(enrolled.device_id, lambda d: d["applied_version"] == 2)

        assert view["state"] == "active"
        assert enrolled.state.private_key_pem() != old_key
        enrolled.state.close()
