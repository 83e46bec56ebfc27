"""Config-signing key rotation end to end with a real agent, on both stacks: the device never
meets a signature it cannot check, and a retired key is no longer trusted."""

from __future__ import annotations

import pytest

from protocol.signing import canonical_json, sign_document
from protocol.topics import TopicKind, device_topic
from tests.support.agents import enroll_agent, running
from tests.support.control_plane import RunningControlPlane

pytestmark = pytest.mark.integration


async def test_rotation_add_activate_retire(stack: RunningControlPlane, tmp_path):
    await stack.create_store("DE-BER-0001", config={"pos": {"footer": "v1"}})
    enrolled = await enroll_agent(stack, "DE-BER-0001", tmp_path / "agent")
    keyring = stack.control_plane.services.publisher._keyring
    old_kid = keyring.active_kid
    old_key = keyring.active

    async with running(enrolled.build()) as agent:
        await agent.wait_applied(1)

        added = await stack.api.post("/v1/signing-keys")
        assert added.status_code == 201, added.text
        new_kid = added.json()["kid"]
        assert added.json()["active"] is False
        # Every device gets a version (signed by the old key) that makes it trust the new one.
        await agent.wait_applied(2)
        await stack.wait_for_device(enrolled.device_id, lambda d: d["in_sync"] and d["applied_version"] == 2)
        assert set(enrolled.state.signing_keys()) == {old_kid, new_kid}

        activated = await stack.api.post(f"/v1/signing-keys/{new_kid}/activate")
        assert activated.status_code == 200, activated.text
        await stack.api.put("/v1/stores/DE-BER-0001/config", json={"config": {"pos": {"footer": "v3"}}})
        await agent.wait_applied(3)
        latest = await _latest_document(stack, enrolled.device_id)
        assert latest["kid"] == new_kid

        retired = await stack.api.delete(f"/v1/signing-keys/{old_kid}")
        assert retired.status_code == 204, retired.text
        await agent.wait_applied(4)
        assert set(enrolled.state.signing_keys()) == {new_kid}

        # A document signed with the retired key is refused from now on.
        forged = await _latest_document(stack, enrolled.device_id)
        forged = {k: v for k, v in forged.items() if k not in ("kid", "sig")} | {"version": 50}
        await stack.control_plane.services.link.publish(
            device_topic(enrolled.device_id, TopicKind.DESIRED),
            canonical_json(sign_document(forged, old_key)),
            qos=1,
            retain=True,
        )
        view = await stack.wait_for_device(enrolled.device_id, lambda d: d["apply_status"] == "rejected")
        assert view["apply_reason"] == "unknown_signing_key"
        assert agent.applied_version == 4

    keys = (await stack.api.get("/v1/signing-keys")).json()
    assert [(k["kid"], k["active"]) for k in keys] == [(new_kid, True)]
    actions = {
        r["action"] for r in await stack.control_plane.services.audit.records(action="signing_key.add")
    }
    assert actions == {"signing_key.add"}


async def test_activation_waits_for_devices_to_trust_the_key(embedded: RunningControlPlane, tmp_path):
    await embedded.create_store("S1")
    await enroll_agent(embedded, "S1", tmp_path / "agent")  # enrolled, never runs: never in sync
    new_kid = (await embedded.api.post("/v1/signing-keys")).json()["kid"]

    refused = await embedded.api.post(f"/v1/signing-keys/{new_kid}/activate")
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "rotation_in_progress"
    forced = await embedded.api.post(f"/v1/signing-keys/{new_kid}/activate", params={"force": "true"})
    assert forced.status_code == 200
    assert (
        await embedded.api.delete(f"/v1/signing-keys/{new_kid}")
    ).status_code == 409  # active: not retirable


async def _latest_document(stack: RunningControlPlane, device_id: str) -> dict:
    documents = await stack.control_plane.services.publisher._latest_documents()
    return next(doc for doc in documents if doc["device_id"] == device_id)
