"""Groups over the API on both stacks: CRUD, ETag/If-Match, static and dynamic membership, and
what the desired-state publisher is asked to re-evaluate.

Until the publisher merges group layers itself, "members get new desired state" is checked
at its contract: the devices whose effective configuration may change are handed to
`request_refresh`, and `group_layers_for` — what the layer assembly reads — returns the new
layer for exactly those devices.
"""

from __future__ import annotations

import asyncio

import pytest

from control_plane.groups.membership import group_layers_for
from tests.support.agents import enroll_agent
from tests.support.control_plane import RunningControlPlane

pytestmark = pytest.mark.integration

LAYER = {"config": {"pos": {"printer": "epson"}}, "policies": {"screen_lock_timeout_s": 60}}


@pytest.fixture
def refreshes(stack: RunningControlPlane, monkeypatch) -> list[set[str]]:
    """Each request_refresh the services make, passed on to the real publisher."""
    publisher = stack.control_plane.services.publisher
    original = publisher.request_refresh
    seen: list[set[str]] = []

    def recording(device_ids=(), *, stores=()):
        device_ids = set(device_ids)
        seen.append(device_ids)
        original(device_ids, stores=stores)

    monkeypatch.setattr(publisher, "request_refresh", recording)
    return seen


async def layers_of(cp: RunningControlPlane, *device_ids: str) -> dict[str, list[tuple[str, dict]]]:
    async with cp.control_plane.services.engine.connect() as conn:
        found = await group_layers_for(conn, device_ids)
    return {d: [(g.group_id, g.layer["config"]) for g in layers] for d, layers in found.items()}


async def member_ids(cp: RunningControlPlane, group_id: str, **params) -> list[str]:
    response = await cp.api.get(f"/v1/groups/{group_id}/members", params=params)
    assert response.status_code == 200, response.text
    return [d["id"] for d in response.json()["items"]]


async def test_create_read_list_and_validation(stack: RunningControlPlane):
    created = await stack.api.post(
        "/v1/groups",
        json={
            "id": "eu-pilot",
            "name": "EU pilot",
            "kind": "dynamic",
            "selector": {"tag": ["eu"]},
            "layer": LAYER,
        },
    )
    assert created.status_code == 201, created.text
    assert created.headers["ETag"] == '"r1"'
    body = created.json()
    assert (body["kind"], body["selector"], body["priority"], body["member_count"]) == (
        "dynamic",
        {"tag": ["eu"]},
        100,
        0,
    )
    assert body["layer"]["config"] == LAYER["config"]
    await stack.api.post(
        "/v1/groups", json={"id": "a-static", "name": "A", "kind": "static", "priority": 100}
    )
    await stack.api.post("/v1/groups", json={"id": "first", "name": "F", "kind": "static", "priority": 1})

    fetched = await stack.api.get("/v1/groups/eu-pilot")
    assert fetched.headers["ETag"] == '"r1"'
    assert fetched.json() == body
    assert [g["id"] for g in (await stack.api.get("/v1/groups")).json()] == ["first", "a-static", "eu-pilot"]
    assert (await stack.api.get("/v1/groups/nope")).status_code == 404

    again = await stack.api.post("/v1/groups", json={"id": "eu-pilot", "name": "x", "kind": "static"})
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "group_exists"
    for spec, field in [
        ({"id": "d", "name": "d", "kind": "dynamic"}, "selector"),
        ({"id": "s", "name": "s", "kind": "static", "selector": {"role": ["pos"]}}, "selector"),
        ({"id": "r", "name": "r", "kind": "dynamic", "selector": {"online": True}}, "selector.online"),
        ({"id": "t", "name": "t", "kind": "dynamic", "selector": {"tag": ["Bad Tag"]}}, "selector.tag.0"),
        ({"id": "l", "name": "l", "kind": "static", "layer": {"settings": {}}}, "layer.settings"),
        ({"id": "Bad Id", "name": "b", "kind": "static"}, "id"),
        ({"id": "k", "name": "k", "kind": "smart"}, "kind"),
    ]:
        response = await stack.api.post("/v1/groups", json=spec)
        assert response.status_code == 422, (spec, response.text)
        assert response.json()["error"]["fields"][0]["field"] == field, response.text


async def test_stale_if_match_is_refused_and_exactly_one_concurrent_writer_wins(stack: RunningControlPlane):
    await stack.api.post("/v1/groups", json={"id": "g", "name": "G", "kind": "dynamic", "selector": {}})

    updated = await stack.api.put("/v1/groups/g/layer", json=LAYER, headers={"If-Match": '"r1"'})
    assert updated.status_code == 200, updated.text
    assert updated.headers["ETag"] == '"r2"'
    assert updated.json()["layer"]["config"] == LAYER["config"]

    stale = await stack.api.put("/v1/groups/g/layer", json={"config": {"x": 1}}, headers={"If-Match": '"r1"'})
    assert stale.status_code == 412
    assert stale.json()["error"]["code"] == "precondition_failed"
    assert stale.headers["ETag"] == '"r2"'
    assert (await stack.api.get("/v1/groups/g")).json()["layer"]["config"] == LAYER["config"]  # untouched

    racing = await asyncio.gather(
        *(
            stack.api.put("/v1/groups/g/layer", json={"config": {"writer": n}}, headers={"If-Match": '"r2"'})
            for n in range(4)
        )
    )
    assert sorted(r.status_code for r in racing) == [200, 412, 412, 412]
    winner = next(r for r in racing if r.status_code == 200).json()
    final = await stack.api.get("/v1/groups/g")
    assert final.headers["ETag"] == '"r3"'
    assert final.json()["layer"] == winner["layer"]

    assert (
        await stack.api.put("/v1/groups/g/selector", json={}, headers={"If-Match": '"r1"'})
    ).status_code == 412
    assert (
        await stack.api.patch("/v1/groups/g", json={"priority": 5}, headers={"If-Match": '"r9"'})
    ).status_code == 412
    assert (await stack.api.delete("/v1/groups/g", headers={"If-Match": '"r2"'})).status_code == 412
    assert (await stack.api.put("/v1/groups/g/layer", json={}, headers={"If-Match": "r3"})).status_code == 422
    unconditional = await stack.api.patch(
        "/v1/groups/g", json={"name": "renamed"}
    )  # no If-Match: last writer wins
    assert unconditional.status_code == 200
    assert unconditional.headers["ETag"] == '"r4"'
    assert (await stack.api.delete("/v1/groups/g", headers={"If-Match": '"r4"'})).status_code == 204
    assert (await stack.api.get("/v1/groups/g")).status_code == 404
    assert (await stack.api.put("/v1/groups/g/layer", json={})).status_code == 404


async def test_static_membership_and_layer_changes_reach_the_members(
    stack: RunningControlPlane, tmp_path, refreshes
):
    await stack.create_store("S1")
    one = (await enroll_agent(stack, "S1", tmp_path / "a1")).device_id
    two = (await enroll_agent(stack, "S1", tmp_path / "a2")).device_id
    outsider = (await enroll_agent(stack, "S1", tmp_path / "a3")).device_id
    await stack.api.post(
        "/v1/groups", json={"id": "night", "name": "Night", "kind": "static", "layer": LAYER}
    )
    refreshes.clear()

    added = await stack.api.post("/v1/groups/night/members", json={"device_ids": [one, two, one]})
    assert added.status_code == 200, added.text
    assert added.json()["member_count"] == 2
    assert added.headers["ETag"] == '"r1"'
    assert refreshes == [{one, two}]
    assert sorted(await member_ids(stack, "night")) == sorted([one, two])
    assert (await stack.device(one))["groups"] == ["night"]
    assert await layers_of(stack, one, two, outsider) == {
        one: [("night", LAYER["config"])],
        two: [("night", LAYER["config"])],
    }

    refreshes.clear()
    again = await stack.api.post("/v1/groups/night/members", json={"device_ids": [one]})
    assert again.json()["member_count"] == 2
    assert refreshes == []

    unknown = await stack.api.post("/v1/groups/night/members", json={"device_ids": [outsider, "dev-missing"]})
    assert unknown.status_code == 422
    assert "dev-missing" in unknown.json()["error"]["message"]
    assert (await stack.api.get("/v1/groups/night")).json()["member_count"] == 2  # nothing half-added

    new_layer = {"config": {"pos": {"printer": "star"}}}
    response = await stack.api.put("/v1/groups/night/layer", json=new_layer, headers={"If-Match": '"r1"'})
    assert response.status_code == 200
    assert refreshes == [{one, two}]  # the members, and only them
    assert (await layers_of(stack, one))[one] == [("night", new_layer["config"])]

    refreshes.clear()
    assert (await stack.api.delete(f"/v1/groups/night/members/{two}")).status_code == 204
    assert refreshes == [{two}]
    assert (await stack.api.delete(f"/v1/groups/night/members/{two}")).status_code == 404
    assert await member_ids(stack, "night") == [one]

    refreshes.clear()
    assert (await stack.api.delete("/v1/groups/night")).status_code == 204
    assert refreshes == [{one}]
    assert await layers_of(stack, one, two) == {}

    actions = [r["action"] for r in reversed(await stack.control_plane.services.audit.records(limit=50))]
    assert [a for a in actions if a.startswith("group.")] == [
        "group.create",
        "group.add_members",
        "group.set_layer",
        "group.remove_member",
        "group.delete",
    ]


async def test_dynamic_membership_follows_tags_and_selector(stack: RunningControlPlane, tmp_path, refreshes):
    await stack.create_store("S1")
    await stack.create_store("S2")
    pos = (await enroll_agent(stack, "S1", tmp_path / "a1", role="pos")).device_id
    kiosk = (await enroll_agent(stack, "S1", tmp_path / "a2", role="kiosk")).device_id
    elsewhere = (await enroll_agent(stack, "S2", tmp_path / "a3", role="pos")).device_id
    created = await stack.api.post(
        "/v1/groups",
        json={"id": "beta", "name": "Beta", "kind": "dynamic", "selector": {"tag": ["beta"]}, "layer": LAYER},
    )
    assert created.json()["member_count"] == 0
    assert await member_ids(stack, "beta") == []

    refreshes.clear()
    await stack.api.put(f"/v1/devices/{kiosk}/tags", json={"tags": ["beta"]})
    assert refreshes == [{kiosk}]  # it may be in a dynamic group now
    assert await member_ids(stack, "beta") == [kiosk]
    assert (await stack.device(kiosk))["groups"] == ["beta"]
    assert await layers_of(stack, pos, kiosk) == {kiosk: [("beta", LAYER["config"])]}

    # Changing the selector re-evaluates exactly the devices that join or leave.
    refreshes.clear()
    response = await stack.api.put("/v1/groups/beta/selector", json={"store_id": ["S1"], "role": ["pos"]})
    assert response.status_code == 200
    assert response.json()["selector"] == {
        "store_id": ["S1"],
        "role": ["pos"],
    }
    assert refreshes == [{pos, kiosk}]
    assert await member_ids(stack, "beta") == [pos]
    bad = await stack.api.put("/v1/groups/beta/selector", json={"health_status": ["healthy"]})
    assert bad.status_code == 422
    assert bad.json()["error"]["fields"][0]["field"] == "health_status"

    # Member listing takes the inventory filters and pages with its own cursors.
    await stack.api.put("/v1/groups/beta/selector", json={})
    assert sorted(await member_ids(stack, "beta")) == sorted([pos, kiosk, elsewhere])
    assert await member_ids(stack, "beta", store_id="S2") == [elsewhere]
    page = (await stack.api.get("/v1/groups/beta/members", params={"limit": 1})).json()
    foreign = await stack.api.get("/v1/devices", params={"limit": 1, "cursor": page["next_cursor"]})
    assert foreign.status_code == 422  # a member-listing cursor is not a fleet-listing cursor

    static_only = await stack.api.post("/v1/groups/beta/members", json={"device_ids": [pos]})
    assert static_only.status_code == 409
    assert static_only.json()["error"]["code"] == "group_dynamic"
    await stack.api.post("/v1/groups", json={"id": "st", "name": "S", "kind": "static"})
    no_selector = await stack.api.put("/v1/groups/st/selector", json={"role": ["pos"]})
    assert no_selector.status_code == 409
    assert no_selector.json()["error"]["code"] == "group_static"


async def test_priority_orders_the_layers(stack: RunningControlPlane, tmp_path, refreshes):
    await stack.create_store("S1")
    device = (await enroll_agent(stack, "S1", tmp_path / "a1")).device_id
    for group_id, priority in (("zeta", 10), ("alpha", 20), ("beta", 20)):
        await stack.api.post(
            "/v1/groups",
            json={
                "id": group_id,
                "name": group_id,
                "kind": "dynamic",
                "selector": {},
                "priority": priority,
                "layer": {"config": {"from": group_id}},
            },
        )
    assert [g for g, _ in (await layers_of(stack, device))[device]] == ["zeta", "alpha", "beta"]
    refreshes.clear()
    response = await stack.api.patch("/v1/groups/zeta", json={"priority": 30}, headers={"If-Match": '"r1"'})
    assert response.status_code == 200
    assert response.headers["ETag"] == '"r2"'
    assert refreshes == [{device}]
    assert [g for g, _ in (await layers_of(stack, device))[device]] == ["alpha", "beta", "zeta"]
    assert (await stack.device(device))["groups"] == ["alpha", "beta", "zeta"]
    refreshes.clear()
    await stack.api.patch("/v1/groups/zeta", json={"name": "Zeta"})
    assert refreshes == []  # a rename changes no configuration
