"""Layered configuration on both stacks: template → role → store → groups → device, with
provenance, optimistic locking (If-Match → 412), Idempotency-Key and signing-key rotation."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from control_plane.db.schema import (
    group_members,
    groups,
    idempotency_keys,
    stores,
    template_versions,
    templates,
)
from tests.support.agents import enroll_agent, running
from tests.support.control_plane import RunningControlPlane

pytestmark = pytest.mark.integration

TEMPLATE_SPEC = {
    "description": "two tills and a tablet",
    "manifest": {"pos": 2, "tablet": 1},
    "layer": {
        "config": {"pos": {"currency": "EUR", "tax": 19}, "locale": "de_DE"},
        "policies": {"usb": False},
    },
    "roles": {"pos": {"config": {"pos": {"printer": "epson"}}, "policies": {"screen_lock_timeout_s": 120}}},
    "timezone": "Europe/Berlin",
    "trading_hours": None,
}


async def _use_template_and_group(stack: RunningControlPlane, store_id: str, device_id: str) -> None:
    """Template and group rows as their own APIs store them (this test is about the merge)."""
    now = datetime.now(UTC)
    async with stack.control_plane.services.engine.begin() as conn:
        await conn.execute(
            templates.insert().values(
                id="small", name="Small", current_version=1, created_at=now, updated_at=now
            )
        )
        await conn.execute(
            template_versions.insert().values(
                template_id="small", version=1, spec=TEMPLATE_SPEC, created_at=now, created_by="test"
            )
        )
        await conn.execute(
            sa.update(stores).where(stores.c.id == store_id).values(template_id="small", template_version=1)
        )
        await conn.execute(
            groups.insert().values(
                id="eu-tills",
                name="EU tills",
                kind="static",
                selector=None,
                layer={"config": {"pos": {"tax": 7}}, "policies": {}, "checks": {}},
                priority=10,
                created_at=now,
                updated_at=now,
            )
        )
        await conn.execute(
            group_members.insert().values(group_id="eu-tills", device_id=device_id, added_at=now)
        )


async def test_effective_config_merges_every_layer_and_names_the_one_that_set_each_value(
    stack: RunningControlPlane, tmp_path
):
    await stack.create_store("DE-BER-0001", config={"locale": "de_DE", "pos": {"footer": "Danke"}})
    enrolled = await enroll_agent(stack, "DE-BER-0001", tmp_path / "agent", role="pos")
    await _use_template_and_group(stack, "DE-BER-0001", enrolled.device_id)
    # The till application the device-level app check looks for (the agent checks it after apply).
    till_app = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0)
    till_port = till_app.sockets[0].getsockname()[1]
    response = await stack.api.put(
        f"/v1/devices/{enrolled.device_id}/overrides",
        json={
            "config": {"pos": {"printer": "star"}, "locale": None},
            "checks": {"till-app": {"kind": "tcp", "target": f"127.0.0.1:{till_port}"}},
        },
    )
    assert response.status_code == 200, response.text

    effective = (await stack.api.get(f"/v1/devices/{enrolled.device_id}/effective-config")).json()

    assert effective["config"] == {"pos": {"currency": "EUR", "tax": 7, "printer": "star", "footer": "Danke"}}
    assert effective["policies"] == {"usb": False, "screen_lock_timeout_s": 120}
    assert effective["checks"]["till-app"]["target"] == f"127.0.0.1:{till_port}"
    source = {path: f"{s['layer']}:{s['id']}" for path, s in effective["provenance"].items()}
    assert source == {
        "/config/pos/currency": "template:small@1",
        "/config/pos/tax": "group:eu-tills",
        "/config/pos/printer": f"device:{enrolled.device_id}",
        "/config/pos/footer": "store:DE-BER-0001",
        "/policies/usb": "template:small@1",
        "/policies/screen_lock_timeout_s": "role:pos@small@1",
        "/checks/till-app/kind": f"device:{enrolled.device_id}",
        "/checks/till-app/target": f"device:{enrolled.device_id}",
        "/checks/till-app/interval_s": f"device:{enrolled.device_id}",
        "/checks/till-app/timeout_s": f"device:{enrolled.device_id}",
        "/checks/till-app/expect_status": f"device:{enrolled.device_id}",
    }
    assert [f"{s['layer']}:{s['id']}" for s in effective["layers"]] == [
        "template:small@1",
        "role:pos@small@1",
        "store:DE-BER-0001",
        "group:eu-tills",
        f"device:{enrolled.device_id}",
    ]

    # The device receives exactly that, signed.
    await stack.control_plane.services.publisher.refresh_devices([enrolled.device_id])
    async with till_app, running(enrolled.build()) as agent:
        view = await stack.wait_for_device(
            enrolled.device_id, lambda d: d["in_sync"] and d["applied_version"] >= 2
        )
        assert agent.applied_version == view["desired_version"]
        assert view["apply_status"] == "applied"
    assert json.loads(enrolled.config_file.read_text()) == effective["config"]


async def test_new_version_only_when_the_effective_config_changes(stack: RunningControlPlane, tmp_path):
    await stack.create_store("S1", config={"a": 1})
    enrolled = await enroll_agent(stack, "S1", tmp_path / "agent")
    path = f"/v1/devices/{enrolled.device_id}/overrides"
    # The first version is issued just after enrollment (the publisher's worker).
    await stack.wait_for_device(enrolled.device_id, lambda d: d["desired_version"] == 1)

    # Overrides that restate what the store already says: nothing new to send.
    assert (await stack.api.put(path, json={"config": {"a": 1}})).status_code == 200
    assert (await stack.device(enrolled.device_id))["desired_version"] == 1

    assert (await stack.api.put(path, json={"config": {"a": 2}})).status_code == 200
    assert (await stack.device(enrolled.device_id))["desired_version"] == 2


async def test_stale_if_match_is_412_and_loses_nothing(stack: RunningControlPlane, tmp_path):
    await stack.create_store("S1", config={"a": 1})
    first = await stack.api.get("/v1/stores/S1")
    etag = first.headers["ETag"]
    assert etag == '"r1"'

    ok = await stack.api.put("/v1/stores/S1/config", json={"config": {"a": 2}}, headers={"If-Match": etag})
    assert ok.status_code == 200, ok.text
    assert ok.headers["ETag"] == '"r2"'

    stale = await stack.api.put("/v1/stores/S1/config", json={"config": {"a": 3}}, headers={"If-Match": etag})
    assert stale.status_code == 412
    assert stale.json()["error"]["code"] == "precondition_failed"
    assert stale.headers["ETag"] == '"r2"'
    assert (await stack.api.get("/v1/stores/S1")).json()["config"] == {"a": 2}

    garbage = await stack.api.put(
        "/v1/stores/S1/config", json={"config": {}}, headers={"If-Match": "yesterday"}
    )
    assert garbage.status_code == 422

    enrolled = await enroll_agent(stack, "S1", tmp_path / "agent")
    path = f"/v1/devices/{enrolled.device_id}/overrides"
    read = await stack.api.get(path)
    assert read.headers["ETag"] == '"r0"'
    assert (
        await stack.api.put(path, json={"config": {"b": 1}}, headers={"If-Match": '"r0"'})
    ).status_code == 200
    lost_update = await stack.api.put(path, json={"config": {"b": 2}}, headers={"If-Match": '"r0"'})
    assert lost_update.status_code == 412
    assert (await stack.api.get(path)).json()["config"] == {"b": 1}


async def test_idempotency_key_replays_the_first_answer(embedded: RunningControlPlane):
    body = {"id": "IDEM-1", "name": "Idempotent"}
    headers = {"Idempotency-Key": "create-IDEM-1-attempt"}
    first = await embedded.api.post("/v1/stores", json=body, headers=headers)
    again = await embedded.api.post("/v1/stores", json=body, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["Idempotency-Replayed"] == "true"

    # Without the key the retry is a second request (and the store exists now).
    assert (await embedded.api.post("/v1/stores", json=body)).status_code == 409
    # The same key for another request is refused, not silently replayed.
    other = await embedded.api.post("/v1/stores", json={"id": "IDEM-2", "name": "Other"}, headers=headers)
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert (await embedded.api.get("/v1/stores/IDEM-2")).status_code == 404

    # Enrollment tokens: a retried POST does not mint a second token, and the secret, shown
    # once, is neither stored with the answer nor replayed.
    headers = {"Idempotency-Key": "token-1"}
    token = await embedded.api.post("/v1/stores/IDEM-1/enrollment-tokens", json={}, headers=headers)
    retry = await embedded.api.post("/v1/stores/IDEM-1/enrollment-tokens", json={}, headers=headers)
    assert token.json()["id"] == retry.json()["id"]
    assert token.json()["token"].startswith("sfe_")
    assert retry.json()["token"] != token.json()["token"]
    assert retry.headers["Idempotency-Secrets-Redacted"] == "true"
    assert len((await embedded.api.get("/v1/stores/IDEM-1/enrollment-tokens")).json()) == 1
    async with embedded.control_plane.services.engine.connect() as conn:
        stored = [json.dumps(row.response) for row in await conn.execute(sa.select(idempotency_keys))]
    assert stored
    assert not any(token.json()["token"] in answer for answer in stored)
