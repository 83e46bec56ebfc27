"""What a device must refuse and what the control plane must notice, on both stacks."""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import UTC, datetime

import aiomqtt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.tls import broker_client_context
from protocol.signing import canonical_json, sign_document
from protocol.topics import TopicKind, device_topic
from tests.support.agents import enroll_agent, running
from tests.support.control_plane import RunningControlPlane

pytestmark = pytest.mark.integration


def _desired(device_id: str, store_id: str, version: int, config: dict) -> dict:
    return {
        "schema": 1,
        "device_id": device_id,
        "store_id": store_id,
        "version": version,
        "issued_at": datetime.now(UTC).isoformat(),
        "config": config,
        "policies": {},
    }


async def _push(stack: RunningControlPlane, document: dict) -> None:
    """Publish on the device's desired topic with the control plane's own (authorised) session."""
    await stack.control_plane.services.link.publish(
        device_topic(document["device_id"], TopicKind.DESIRED), canonical_json(document), qos=1, retain=True
    )


async def test_agent_rejects_forged_and_stale_desired_state_and_reports_it(
    stack: RunningControlPlane, tmp_path
):
    await stack.create_store("DE-BER-0001", config={"pos": {"currency": "EUR"}})
    enrolled = await enroll_agent(stack, "DE-BER-0001", tmp_path / "agent")
    async with running(enrolled.build()) as agent:
        await agent.wait_applied(1)
        before = enrolled.config_file.read_text()

        forged = sign_document(
            _desired(enrolled.device_id, "DE-BER-0001", 99, {"pos": {"currency": "XXX"}}),
            ec.generate_private_key(ec.SECP256R1()),
        )
        await _push(stack, forged)
        view = await stack.wait_for_device(enrolled.device_id, lambda d: d["apply_status"] == "rejected")
        assert view["apply_reason"] == "unknown_signing_key"
        assert view["applied_version"] == 1

        # Tampered content under the real key id: the signature no longer verifies.
        genuine = sign_document(
            _desired(enrolled.device_id, "DE-BER-0001", 5, {"x": 1}),
            stack.control_plane.services.publisher._keyring.active,
        )
        genuine["config"] = {"pos": {"currency": "XXX"}}
        await _push(stack, genuine)
        view = await stack.wait_for_device(enrolled.device_id, lambda d: d["apply_reason"] == "bad_signature")

        # Properly signed but older than what the device runs (anti-rollback).
        await stack.api.put("/v1/stores/DE-BER-0001/config", json={"config": {"pos": {"currency": "CHF"}}})
        await agent.wait_applied(2)
        current = enrolled.config_file.read_text()
        stale = sign_document(
            _desired(enrolled.device_id, "DE-BER-0001", 1, {"old": True}),
            stack.control_plane.services.publisher._keyring.active,
        )
        await _push(stack, stale)
        view = await stack.wait_for_device(enrolled.device_id, lambda d: d["apply_reason"] == "stale_version")
        assert view["applied_version"] == 2
        assert agent.applied_version == 2
        assert enrolled.config_file.read_text() == current
        assert before != current

    audit = await stack.control_plane.services.audit.records(action="desired.rejected_by_device")
    reasons = {record["detail"]["reason"] for record in audit}
    assert {"unknown_signing_key", "bad_signature"} <= reasons


async def test_malformed_forged_and_oversized_device_messages_are_rejected_without_harm(
    stack: RunningControlPlane, tmp_path
):
    await stack.create_store("DE-MUN-0002")
    enrolled = await enroll_agent(stack, "DE-MUN-0002", tmp_path / "agent")
    other = await enroll_agent(stack, "DE-MUN-0002", tmp_path / "other")
    ingest = stack.control_plane.services.ingest
    health_topic = device_topic(enrolled.device_id, TopicKind.HEALTH)
    host, port = stack.settings.broker_endpoint

    async with aiomqtt.Client(
        host, port, identifier=enrolled.device_id, tls_context=broker_client_context(enrolled.state)
    ) as device:
        await device.publish(health_topic, b"{not json", qos=1)
        await device.publish(
            health_topic, json.dumps({"schema": 1, "device_id": enrolled.device_id}).encode(), qos=1
        )
        await device.publish(
            health_topic, json.dumps({"schema": 9, "device_id": enrolled.device_id}).encode(), qos=1
        )
        # Its own topic, but claiming to be another device in the payload.
        spoof = {
            "schema": 1,
            "device_id": other.device_id,
            "seq": 1,
            "cpu_percent": 1,
            "memory_percent": 1,
            "disk_percent": 1,
            "uptime_s": 1,
        }
        await device.publish(health_topic, json.dumps(spoof).encode(), qos=1)

    async def rejected() -> bool:
        return (
            ingest.rejected["invalid_message"] >= 2
            and ingest.rejected["unsupported_schema"] >= 1
            and ingest.rejected["device_id_mismatch"] >= 1
        )

    for _ in range(50):
        if await rejected():
            break
        await asyncio.sleep(0.1)
    assert await rejected(), dict(ingest.rejected)

    # The spoofed report did not land on the other device, and the alarm is in the audit log.
    assert (await stack.device(other.device_id))["health"] is None
    audit = await stack.control_plane.services.audit.records(action="mqtt.identity_mismatch")
    assert audit
    assert audit[0]["actor"] == enrolled.device_id

    # Oversized: the broker drops it (embedded) or cuts the connection (Mosquitto); never ingested.
    with contextlib.suppress(aiomqtt.MqttError):
        async with aiomqtt.Client(
            host, port, identifier=enrolled.device_id, tls_context=broker_client_context(enrolled.state)
        ) as device:
            big = {
                **spoof,
                "device_id": enrolled.device_id,
                "padding": "x" * stack.settings.max_message_bytes,
            }
            await device.publish(health_topic, json.dumps(big).encode(), qos=1, timeout=5)
    await asyncio.sleep(0.5)
    assert (await stack.device(enrolled.device_id))["health"] is None
    assert ingest.accepted["health"] == 0

    # The device itself still works normally afterwards.
    async with running(enrolled.build()) as agent:
        await agent.wait_applied(1)
        await stack.wait_for_device(enrolled.device_id, lambda d: d["health"] is not None)
