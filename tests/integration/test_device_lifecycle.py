"""Revocation, decommissioning, re-enrollment and token revocation, on both stacks."""

from __future__ import annotations

import asyncio

import aiomqtt
import pytest
from cryptography import x509

from agent.enrollment import enroll
from agent.state import AgentState
from agent.tls import broker_client_context
from protocol.messages import DeviceInfo
from protocol.topics import TopicKind, device_topic
from tests.conftest import start_stack
from tests.integration.test_enrollment_api import _csr, _enroll
from tests.support.agents import EnrolledAgent, enroll_agent, running
from tests.support.control_plane import RunningControlPlane
from tests.support.provisioning import retained_messages

pytestmark = pytest.mark.integration


async def _can_connect(stack: RunningControlPlane, enrolled) -> bool:
    host, port = stack.settings.broker_endpoint
    try:
        async with aiomqtt.Client(
            host,
            port,
            identifier=enrolled.device_id,
            tls_context=broker_client_context(enrolled.state),
            timeout=5,
        ) as client:
            await client.subscribe(device_topic(enrolled.device_id, TopicKind.DESIRED), qos=1, timeout=5)
    except (aiomqtt.MqttError, OSError):
        return False
    return True


async def test_revoked_device_is_cut_off_and_listed_in_the_crl(stack: RunningControlPlane, tmp_path):
    await stack.create_store("DE-BER-0001")
    victim = await enroll_agent(stack, "DE-BER-0001", tmp_path / "victim")
    bystander = await enroll_agent(stack, "DE-BER-0001", tmp_path / "bystander")
    serial = (await stack.device(victim.device_id))["cert_serial"]

    async with running(victim.build()) as agent:
        await agent.wait_applied(1)
        response = await stack.api.post(f"/v1/devices/{victim.device_id}/revoke", json={"reason": "stolen"})
        assert response.status_code == 200, response.text
        assert response.json()["state"] == "revoked"
        if stack.mosquitto is not None:
            # Mosquitto 2.0 reads its CRL only at start: the documented reload is a restart.
            await stack.mosquitto.restart()
        for _ in range(100):
            if not agent.connected:
                break
            await asyncio.sleep(0.1)
        assert not agent.connected
        await asyncio.sleep(1.0)  # it keeps trying, and keeps being refused
        assert not agent.connected

    assert not await _can_connect(stack, victim)
    assert await _can_connect(stack, bystander)

    crl = x509.load_pem_x509_crl((await stack.anonymous.get("/v1/pki/crl")).content)
    assert crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None
    on_disk = x509.load_pem_x509_crl((stack.settings.pki_dir / "crl.pem").read_bytes())
    assert on_disk.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None

    certs = (await stack.api.get("/v1/certificates", params={"device_id": victim.device_id})).json()
    assert [(c["status"], c["revocation_reason"]) for c in certs] == [("revoked", "stolen")]
    audit = await stack.control_plane.services.audit.records(action="device.revoke")
    assert audit[0]["target"] == victim.device_id
    if stack.mosquitto is None:
        refused = await stack.control_plane.services.audit.records(action="broker.connection_refused")
        assert any("revoked" in str(record["detail"]) for record in refused)


async def test_reenrollment_token_gives_the_same_device_a_new_certificate(
    stack: RunningControlPlane, tmp_path
):
    await stack.create_store("DE-BER-0001", config={"pos": {"currency": "EUR"}})
    original = await enroll_agent(stack, "DE-BER-0001", tmp_path / "first")
    old_serial = (await stack.device(original.device_id))["cert_serial"]
    await stack.api.post(f"/v1/devices/{original.device_id}/revoke", json={"reason": "key lost"})

    token = (await stack.api.post(f"/v1/devices/{original.device_id}/reenrollment-tokens", json={})).json()
    assert token["device_id"] == original.device_id
    assert token["max_uses"] == 1
    response = await _enroll(stack, token["token"])
    assert response.status_code == 200, response.text
    assert response.json()["device_id"] == original.device_id
    view = await stack.device(original.device_id)
    assert view["state"] == "active"
    assert view["cert_serial"] != old_serial
    # Single use: the same re-enrollment token cannot mint a second identity.
    assert (await _enroll(stack, token["token"])).json()["error"]["code"] == "token_used"
    audit = await stack.control_plane.services.audit.records(action="device.reenroll")
    assert audit[0]["target"] == original.device_id


async def test_reenrolled_device_uses_its_new_identity_and_the_old_one_is_refused(
    stack: RunningControlPlane, tmp_path
):
    await stack.create_store("DE-BER-0001", config={"pos": {"currency": "EUR"}})
    first = await enroll_agent(stack, "DE-BER-0001", tmp_path / "first")
    async with running(first.build()) as agent:
        await agent.wait_applied(1)
    # A superseding re-enrollment (say the device was re-imaged): same identity, new key.
    token = (await stack.api.post(f"/v1/devices/{first.device_id}/reenrollment-tokens", json={})).json()

    state = AgentState.open(tmp_path / "reimaged")
    response = await enroll(
        server_url=stack.base_url,
        token=token["token"],
        state=state,
        ca_fingerprint=token["ca_fingerprint"],
        device=DeviceInfo(role="pos"),
        timeout_s=10,
    )
    assert response.device_id == first.device_id
    again = EnrolledAgent(
        settings=first.settings.model_copy(update={"state_dir": tmp_path / "reimaged"}),
        state=state,
        device_id=response.device_id,
    )
    async with running(again.build()) as agent:
        await agent.wait_applied(1)
    if stack.mosquitto is not None:
        await stack.mosquitto.restart()  # Mosquitto 2.0 reloads its CRL only at start
    assert not await _can_connect(stack, first)  # the old certificate was superseded
    assert await _can_connect(stack, again)


async def test_decommission_clears_retained_state_and_is_final(stack: RunningControlPlane, tmp_path):
    await stack.create_store("DE-BER-0001", config={"x": 1})
    enrolled = await enroll_agent(stack, "DE-BER-0001", tmp_path / "agent")
    early_token = (
        await stack.api.post(f"/v1/devices/{enrolled.device_id}/reenrollment-tokens", json={})
    ).json()
    async with running(enrolled.build()) as agent:
        await agent.wait_applied(1)
        response = await stack.api.post(f"/v1/devices/{enrolled.device_id}/decommission")
        assert response.status_code == 200
        assert response.json()["state"] == "decommissioned"

    # Nothing retained is left for the device id: a new subscriber gets no desired state.
    assert await retained_messages(stack, [device_topic(enrolled.device_id, TopicKind.DESIRED)]) == {}

    again = await stack.api.post(f"/v1/devices/{enrolled.device_id}/reenrollment-tokens", json={})
    assert again.status_code == 409
    # A re-enrollment token made before the decommission is refused too, loudly.
    late = await _enroll(stack, early_token["token"])
    assert late.status_code == 409
    assert late.json()["error"]["code"] == "device_decommissioned"
    refused = await stack.control_plane.services.audit.records(action="device.enroll")
    assert any(r["detail"].get("reason") == "device_decommissioned" for r in refused)
    assert (await stack.api.post(f"/v1/devices/{enrolled.device_id}/revoke")).status_code == 409


async def test_revoked_enrollment_token_is_refused(stack: RunningControlPlane):
    await stack.create_store("DE-BER-0001")
    token = await stack.create_token("DE-BER-0001", max_uses=5)
    response = await stack.api.delete(f"/v1/stores/DE-BER-0001/enrollment-tokens/{token['id']}")
    assert response.status_code == 204
    refused = await _enroll(stack, token["token"])
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "token_revoked"
    listed = (await stack.api.get("/v1/stores/DE-BER-0001/enrollment-tokens")).json()
    assert listed[0]["revoked"] is True
    assert (await stack.api.delete("/v1/stores/DE-BER-0001/enrollment-tokens/nope")).status_code == 404


async def test_enrollment_is_rate_limited_per_source(tmp_path):
    async with start_stack(
        "embedded-sqlite", tmp_path, enroll_rate_per_source_s=0.5, enroll_burst_per_source=3
    ) as cp:
        await cp.create_store("DE-BER-0001")
        statuses = [(await _enroll(cp, "sfe_" + "x" * 40)).status_code for _ in range(4)]
        assert statuses == [401, 401, 401, 429]
        limited = await _enroll(cp, "sfe_" + "x" * 40)
        assert limited.status_code == 429
        assert int(limited.headers["Retry-After"]) >= 1
        assert limited.json()["error"]["code"] == "rate_limited"


async def test_certificates_by_expiry_and_metrics(stack: RunningControlPlane, tmp_path):
    await stack.create_store("DE-BER-0001")
    for _i in range(2):
        response = await _enroll(stack, (await stack.create_token("DE-BER-0001"))["token"], _csr())
        assert response.status_code == 200
    soon = (await stack.api.get("/v1/certificates", params={"expiring_within": "1h"})).json()
    later = (await stack.api.get("/v1/certificates", params={"expiring_within": "73h"})).json()
    assert (len(soon), len(later)) == (0, 2)
    assert {"device_id", "serial", "not_after", "status"} <= set(later[0])
    bad = await stack.api.get("/v1/certificates", params={"expiring_within": "soon"})
    assert bad.status_code == 422
    assert "expiring_within" in bad.json()["error"]["message"]

    text = (await stack.anonymous.get("/metrics")).text
    assert 'storefleet_certificates_valid{expires_within="7d"} 2.0' in text
    assert 'storefleet_devices{online="false",state="active"} 2.0' in text
    assert 'storefleet_renewals_total{outcome="issued"} 0.0' in text
