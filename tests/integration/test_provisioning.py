"""Store provisioning with real agents: to ready, cancelled midway, and failed at the deadline."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from protocol.topics import TopicKind, device_topic
from tests.conftest import start_stack
from tests.integration.test_enrollment_api import _enroll
from tests.support.control_plane import RunningControlPlane
from tests.support.provisioning import (
    create_provisioned_store,
    create_template,
    provisioning,
    retained_messages,
    running_fleet,
    timeline,
    wait_for_state,
)

pytestmark = pytest.mark.integration


async def test_stores_from_a_template_become_ready_with_real_agents(stack: RunningControlPlane):
    await create_template(stack)
    stores = ["DE-BER-0001", "DE-BER-0002", "DE-BER-0003"]
    created = {store_id: await create_provisioned_store(stack, store_id) for store_id in stores}
    first = created["DE-BER-0001"]
    # The store takes the template's version, time zone and trading hours; tokens per role.
    assert (first["template_id"], first["template_version"]) == ("compact", 1)
    assert first["timezone"] == "Europe/Berlin"
    assert first["trading_hours"]["sun"] == []
    assert first["provisioning"]["state"] == "waiting_enrollment"
    tokens = first["enrollment_tokens"]
    assert sorted((t["role"], t["max_uses"]) for t in tokens) == [("pos", 2), ("tablet", 1)]
    assert all(t["token"].startswith("sfe_") for t in tokens)

    all_tokens = [token for store in created.values() for token in store["enrollment_tokens"]]
    async with running_fleet(stack, all_tokens) as fleet:
        assert len(fleet.devices) == 9
        views = {store_id: await wait_for_state(stack, store_id, "ready") for store_id in stores}

    for store_id, view in views.items():
        assert view["roles"]["pos"]["expected"] == 2
        assert view["roles"]["pos"]["ready"] == 2
        assert view["roles"]["tablet"]["ready"] == 1
        assert 0 < view["seconds_to_ready"] < 30
        store = (await stack.api.get(f"/v1/stores/{store_id}")).json()
        assert store["status"] == "ready"
        assert store["ready_at"] == view["ready_at"]
        assert store["device_count"] == 3
        # The saga's tokens are closed once the store is ready.
        assert all(token["revoked"] for token in view["tokens"])

        kinds = Counter(event["kind"] for event in await timeline(stack, store_id))
        assert kinds["created"] == kinds["tokens_issued"] == kinds["ready"] == 1
        assert kinds["device_enrolled"] == kinds["device_configured"] == kinds["device_healthy"] == 3
        events = await timeline(stack, store_id)
        assert events[0]["kind"] == "created"
        assert events[-1]["kind"] == "ready"
        assert events[-1]["detail"]["seconds_to_ready"] == pytest.approx(view["seconds_to_ready"], abs=0.01)
        enrolled = [e["detail"] for e in events if e["kind"] == "device_enrolled"]
        assert Counter(e["role"] for e in enrolled) == {"pos": 2, "tablet": 1}

    # Each device got the template's layers (effective config is the lead's; at least the
    # store's own layer arrived and was applied).
    device = (await stack.api.get("/v1/devices", params={"store_id": "DE-BER-0001"})).json()["items"][0]
    assert device["in_sync"] is True
    # A leftover use of a token cannot add a device after ready.
    refused = await _enroll(stack, tokens[0]["token"])
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] in {"token_revoked", "token_used"}


async def test_cancel_midway_leaves_nothing_behind(stack: RunningControlPlane):
    await create_template(stack)
    created = await create_provisioned_store(stack, "DE-BER-0001")
    tokens = {token["role"]: token for token in created["enrollment_tokens"]}
    async with running_fleet(stack, [tokens["pos"]]) as fleet:
        # Two POS enrolled, configured and healthy; the tablet never comes.
        for device in fleet.devices:
            await asyncio.wait_for(device.agent.wait_applied(1), 15)
        view = await provisioning(stack, "DE-BER-0001")
        assert view["state"] == "waiting_enrollment"
        assert view["roles"]["pos"]["enrolled"] == 2
        device_ids = [device.agent.device_id for device in fleet.devices]
        # The probe sees what the broker retains (so that its empty answer below means something).
        desired = await retained_messages(stack, [device_topic(device_ids[0], TopicKind.DESIRED)])
        assert list(desired) == [device_topic(device_ids[0], TopicKind.DESIRED)]

        response = await stack.api.post("/v1/stores/DE-BER-0001/provisioning/cancel")
        assert response.status_code == 202, response.text
        assert response.json()["state"] in {"cancelling", "cancelled"}
        await wait_for_state(stack, "DE-BER-0001", "cancelled")
        # Nothing retained is left on the broker for those devices.
        topics = [device_topic(d, kind) for d in device_ids for kind in (TopicKind.DESIRED, TopicKind.STATUS)]
        assert await retained_messages(stack, topics) == {}
        if stack.mosquitto is not None:
            # Mosquitto reads its CRL only at start (docs/security.md): restart it, as documented.
            await stack.mosquitto.restart()
        for device in fleet.devices:  # cut off, and refused when they try again
            for _ in range(100):
                if not device.agent.connected:
                    break
                await asyncio.sleep(0.1)
            assert not device.agent.connected
        await asyncio.sleep(1.0)
        assert not any(device.agent.connected for device in fleet.devices)

    # The tablet's token is revoked: nobody can join the store with it.
    refused = await _enroll(stack, tokens["tablet"]["token"])
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "token_revoked"
    listed = (await stack.api.get("/v1/stores/DE-BER-0001/enrollment-tokens")).json()
    assert listed
    assert all(token["revoked"] for token in listed)
    again = await stack.api.post("/v1/stores/DE-BER-0001/enrollment-tokens", json={})
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "store_decommissioned"

    # Devices decommissioned, every certificate revoked and in the CRL.
    for device_id in device_ids:
        assert (await stack.device(device_id))["state"] == "decommissioned"
        certificates = (await stack.api.get("/v1/certificates", params={"device_id": device_id})).json()
        assert certificates
        assert all(c["status"] == "revoked" for c in certificates)
    store = (await stack.api.get("/v1/stores/DE-BER-0001")).json()
    assert store["status"] == "decommissioned"

    kinds = [event["kind"] for event in await timeline(stack, "DE-BER-0001")]
    assert kinds.count("device_decommissioned") == 2
    for kind in ("cancel_requested", "tokens_revoked", "retained_cleared", "cancelled", "decommissioned"):
        assert kind in kinds
    assert kinds.index("cancel_requested") < kinds.index("tokens_revoked") < kinds.index("cancelled")

    # Cancelling again is harmless; a cancelled store cannot be re-provisioned by token re-issue.
    assert (await stack.api.post("/v1/stores/DE-BER-0001/provisioning/cancel")).status_code == 202
    reissue = await stack.api.post("/v1/stores/DE-BER-0001/provisioning/tokens")
    assert reissue.status_code == 409


async def test_deadline_passed_fails_and_compensates(tmp_path):
    async with start_stack("embedded-sqlite", tmp_path, provisioning_timeout_s=3.0) as cp:
        await create_template(cp)
        created = await create_provisioned_store(cp, "DE-BER-0001")
        tokens = {token["role"]: token for token in created["enrollment_tokens"]}
        async with running_fleet(cp, [tokens["pos"]], uses={"pos": 1}) as fleet:
            view = await wait_for_state(cp, "DE-BER-0001", "failed", timeout=20)
            device_id = fleet.devices[0].agent.device_id
        assert view["error"].startswith("deadline passed in waiting_enrollment")
        assert "pos 1/2 enrolled" in view["error"]
        assert "tablet 0/1 enrolled" in view["error"]
        assert view["ready_at"] is None
        assert (await cp.device(device_id))["state"] == "decommissioned"
        assert (await cp.api.get("/v1/stores/DE-BER-0001")).json()["status"] == "decommissioned"
        kinds = [event["kind"] for event in await timeline(cp, "DE-BER-0001")]
        assert kinds[kinds.index("deadline_passed") :] == [
            "deadline_passed",
            "tokens_revoked",
            "device_decommissioned",
            "retained_cleared",
            "failed",
            "decommissioned",
        ]
        assert (await _enroll(cp, tokens["pos"]["token"])).json()["error"]["code"] == "token_revoked"


async def test_lost_secrets_are_reissued_for_the_devices_still_missing(embedded: RunningControlPlane):
    await create_template(embedded)
    created = await create_provisioned_store(embedded, "DE-BER-0001")
    old = {token["role"]: token for token in created["enrollment_tokens"]}
    async with running_fleet(embedded, [old["pos"]], uses={"pos": 1}):
        await embedded.wait_for_device(
            (await embedded.api.get("/v1/devices")).json()["items"][0]["id"], lambda d: d["in_sync"]
        )
        response = await embedded.api.post("/v1/stores/DE-BER-0001/provisioning/tokens")
        assert response.status_code == 201, response.text
        fresh = {token["role"]: token for token in response.json()}
        # One POS is already there: the new POS token has one use left to give.
        assert {role: t["max_uses"] for role, t in fresh.items()} == {"pos": 1, "tablet": 1}
        assert (await _enroll(embedded, old["tablet"]["token"])).json()["error"]["code"] == "token_revoked"
        async with running_fleet(embedded, list(fresh.values())):
            view = await wait_for_state(embedded, "DE-BER-0001", "ready")
    assert view["roles"]["pos"]["ready"] == 2
    kinds = [event["kind"] for event in await timeline(embedded, "DE-BER-0001")]
    assert "tokens_reissued" in kinds
