"""GET /v1/devices: filters, search, tags, stable sort and cursor pagination, on both stacks.

Tags and filters run against devices enrolled by real agents over HTTPS; paging needs many
devices with equal sort keys and never-seen devices, so those are inserted as rows
(tests.support.inventory) into the running control plane's database.
"""

from __future__ import annotations

import base64
from datetime import timedelta

import pytest

from tests.support.agents import enroll_agent
from tests.support.control_plane import RunningControlPlane
from tests.support.inventory import T0, device_row, insert_devices

pytestmark = pytest.mark.integration


async def list_ids(cp: RunningControlPlane, **params) -> list[str]:
    response = await cp.api.get("/v1/devices", params=params)
    assert response.status_code == 200, response.text
    return [d["id"] for d in response.json()["items"]]


async def test_tags_filters_and_search_on_enrolled_devices(stack: RunningControlPlane, tmp_path):
    await stack.create_store("DE-BER-0001")
    await stack.create_store("FR-PAR-0002")
    pos = (await enroll_agent(stack, "DE-BER-0001", tmp_path / "a1", role="pos")).device_id
    kiosk = (await enroll_agent(stack, "DE-BER-0001", tmp_path / "a2", role="kiosk")).device_id
    paris = (await enroll_agent(stack, "FR-PAR-0002", tmp_path / "a3", role="pos")).device_id

    response = await stack.api.put(f"/v1/devices/{pos}/tags", json={"tags": ["eu", "beta", "eu"]})
    assert response.status_code == 200, response.text
    view = response.json()
    assert view["tags"] == ["beta", "eu"]
    assert (view["health_status"], view["first_seen_at"], view["groups"]) == ("unknown", None, [])
    response = await stack.api.patch(f"/v1/devices/{paris}/tags", json={"add": ["eu", "night"]})
    assert response.json()["tags"] == ["eu", "night"]
    response = await stack.api.patch(f"/v1/devices/{paris}/tags", json={"remove": ["night"], "add": ["late"]})
    assert response.json()["tags"] == ["eu", "late"]

    assert sorted(await list_ids(stack, tag="eu")) == sorted([pos, paris])
    assert await list_ids(stack, tag=["eu", "beta"]) == [pos]  # all given tags
    assert sorted(await list_ids(stack, role=["pos", "kiosk"], store_id="DE-BER-0001")) == sorted(
        [pos, kiosk]
    )
    assert await list_ids(stack, store_id="FR-PAR-0002") == [paris]
    assert await list_ids(stack, q=kiosk.upper()[2:]) == [kiosk]  # search: any case, substring of the id
    assert sorted(await list_ids(stack, q="sn-1")) == sorted([pos, kiosk, paris])  # serial SN-1
    assert await list_ids(stack, in_sync=True, tag="eu") == []  # no agent ran: nothing applied
    assert await list_ids(stack, model="POS*", role="kiosk") == [kiosk]

    page = (await stack.api.get("/v1/devices", params={"tag": "eu", "count": "true", "limit": 1})).json()
    assert page["total"] == 2
    assert len(page["items"]) == 1
    assert page["next_cursor"]

    records = await stack.control_plane.services.audit.records(action="device.tags")
    assert {(r["target"], tuple(r["detail"]["added"]), tuple(r["detail"]["removed"])) for r in records} == {
        (pos, ("beta", "eu"), ()),
        (paris, ("eu", "night"), ()),
        (paris, ("late",), ("night",)),
    }


async def test_bad_filters_and_tags_are_refused_with_the_field(stack: RunningControlPlane, tmp_path):
    await stack.create_store("S1")
    device = (await enroll_agent(stack, "S1", tmp_path / "a")).device_id

    for params, field in [
        ({"rol": "pos"}, "query.rol"),  # unknown filter: refused, not ignored
        ({"tag": "EU"}, "query.tag.0"),
        ({"sort": "serial"}, "query.sort"),
        ({"limit": 5000}, "query.limit"),
        ({"online": "maybe"}, "query.online"),
        ({"health_status": "great"}, "query.health_status.0"),
    ]:
        response = await stack.api.get("/v1/devices", params=params)
        assert response.status_code == 422, (params, response.text)
        assert response.json()["error"]["fields"][0]["field"] == field

    bad_tag = await stack.api.put(f"/v1/devices/{device}/tags", json={"tags": ["ok", "Not Ok"]})
    assert bad_tag.status_code == 422
    assert bad_tag.json()["error"]["fields"][0]["field"] == "tags.1"
    too_many = await stack.api.put(f"/v1/devices/{device}/tags", json={"tags": [f"t{i}" for i in range(33)]})
    assert too_many.status_code == 422
    await stack.api.put(f"/v1/devices/{device}/tags", json={"tags": [f"t{i}" for i in range(30)]})
    over = await stack.api.patch(f"/v1/devices/{device}/tags", json={"add": ["x1", "x2", "x3"]})
    assert over.status_code == 422
    assert "at most 32" in over.json()["error"]["message"]
    assert len((await stack.device(device))["tags"]) == 30  # nothing half-applied
    missing = await stack.api.put("/v1/devices/dev-nope/tags", json={"tags": ["eu"]})
    assert missing.status_code == 404


@pytest.fixture
async def fleet(stack: RunningControlPlane):
    """43 devices in 3 stores with many equal enrolment and last-seen times, some never seen."""
    for store in ("S-A", "S-B", "S-C"):
        await stack.create_store(store)
    rows = []
    for i in range(43):
        seen = None if i % 5 == 0 else T0 + timedelta(minutes=i % 4)
        rows.append(
            device_row(
                f"dev-{(i * 17) % 43:03d}",  # ids not in insertion order
                ("S-A", "S-B", "S-C")[i % 3],
                enrolled_at=T0 + timedelta(seconds=i % 3),
                last_seen_at=seen,
                first_seen_at=seen,
            )
        )
    rows.append(device_row("dev-gone", "S-A", state="decommissioned"))
    await insert_devices(stack.control_plane.services.engine, rows)
    return [r for r in rows if r["state"] == "active"]


def expected_order(rows, sort, order):
    descending = order == "desc"

    def key(row):
        value = row[sort]
        return (value is None, value if value is not None else "", row["id"])

    present = sorted((r for r in rows if r[sort] is not None), key=key, reverse=descending)
    never = sorted((r for r in rows if r[sort] is None), key=lambda r: r["id"], reverse=descending)
    return [r["id"] for r in present + never]  # empty keys last in both directions


async def walk(cp: RunningControlPlane, **params) -> list[str]:
    ids, cursor, pages = [], None, 0
    while True:
        response = await cp.api.get(
            "/v1/devices", params={**params, **({"cursor": cursor} if cursor else {})}
        )
        assert response.status_code == 200, response.text
        page = response.json()
        ids += [d["id"] for d in page["items"]]
        cursor, pages = page["next_cursor"], pages + 1
        if cursor is None:
            return ids
        assert pages < 100


async def test_pages_follow_a_stable_order_without_repeats_or_gaps(stack: RunningControlPlane, fleet):
    in_b = [r for r in fleet if r["store_id"] == "S-B"]
    for sort in ("id", "enrolled_at", "last_seen_at", "store_id"):
        for order in ("asc", "desc"):
            ids = await walk(stack, sort=sort, order=order, limit=4)
            assert ids == expected_order(fleet, sort, order), (sort, order)
        # With a filter, the walk is the filtered order.
        filtered = await walk(stack, sort=sort, order="desc", limit=3, store_id="S-B")
        assert filtered == expected_order(in_b, sort, "desc"), sort


async def test_cursor_is_refused_when_tampered_or_reused_elsewhere(stack: RunningControlPlane, fleet):
    first = (await stack.api.get("/v1/devices", params={"sort": "enrolled_at", "limit": 5})).json()
    cursor = first["next_cursor"]
    raw = bytearray(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    raw[-5] ^= 0x01  # one bit in the JSON (e.g. the id): checksum no longer matches
    flipped = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()

    for params in [
        {"sort": "enrolled_at", "cursor": flipped},
        {"sort": "enrolled_at", "cursor": cursor[:-3]},
        {"sort": "enrolled_at", "cursor": "not-a-cursor"},
        {"sort": "enrolled_at", "cursor": "dev-010"},  # the old id-cursor format
        {"sort": "last_seen_at", "cursor": cursor},  # another sort
        {"sort": "enrolled_at", "order": "desc", "cursor": cursor},  # another order
        {"sort": "enrolled_at", "store_id": "S-A", "cursor": cursor},  # another filter
    ]:
        response = await stack.api.get("/v1/devices", params={"limit": 5, **params})
        assert response.status_code == 422, (params, response.text)
        assert response.json()["error"]["code"] == "invalid_cursor"
        assert "cursor" in response.json()["error"]["message"]

    same = await stack.api.get("/v1/devices", params={"sort": "enrolled_at", "limit": 5, "cursor": cursor})
    assert same.status_code == 200
    assert [d["id"] for d in same.json()["items"]] == expected_order(fleet, "enrolled_at", "asc")[5:10]


async def test_state_filter_and_default(stack: RunningControlPlane, fleet):
    assert "dev-gone" not in await walk(stack, limit=1000)
    assert await list_ids(stack, state="decommissioned") == ["dev-gone"]
    page = (await stack.api.get("/v1/devices", params={"state": "any", "count": "true", "limit": 1})).json()
    assert page["total"] == len(fleet) + 1
