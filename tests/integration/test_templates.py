"""Store templates over the API: versions, optimistic locking, archive, validation, stores made
from them."""

from __future__ import annotations

import pytest

from tests.support.control_plane import RunningControlPlane
from tests.support.provisioning import TEMPLATE, create_template

pytestmark = pytest.mark.integration


async def test_versions_etags_and_stale_if_match(stack: RunningControlPlane):
    created = await stack.api.post("/v1/templates", json=TEMPLATE)
    assert created.status_code == 201, created.text
    assert created.headers["ETag"] == '"r1"'
    body = created.json()
    assert (body["id"], body["version"], body["device_count"]) == ("compact", 1, 3)
    assert body["trading_hours"]["mon"] == [["08:00", "20:00"]]
    assert body["roles"]["pos"]["config"] == {"printer": "receipt"}
    assert body["layer"]["config"] == {"chain": "ACME"}
    assert (await stack.api.post("/v1/templates", json=TEMPLATE)).status_code == 409

    change = {k: v for k, v in TEMPLATE.items() if k != "id"} | {"manifest": {"pos": 3, "tablet": 1}}
    updated = await stack.api.put("/v1/templates/compact", json=change, headers={"If-Match": '"r1"'})
    assert updated.status_code == 200, updated.text
    assert updated.headers["ETag"] == '"r2"'
    assert updated.json()["version"] == 2
    assert updated.json()["device_count"] == 4

    # Someone still holding r1 loses, and is told the current ETag.
    stale = await stack.api.put(
        "/v1/templates/compact", json=change | {"description": "late"}, headers={"If-Match": '"r1"'}
    )
    assert stale.status_code == 412
    assert stale.headers["ETag"] == '"r2"'
    assert stale.json()["error"]["code"] == "precondition_failed"
    # The same content again makes no new version.
    again = await stack.api.put("/v1/templates/compact", json=change, headers={"If-Match": '"r2"'})
    assert again.json()["version"] == 2

    old = (await stack.api.get("/v1/templates/compact/versions/1")).json()
    assert old["manifest"] == {"pos": 2, "tablet": 1}
    assert [v["version"] for v in (await stack.api.get("/v1/templates/compact/versions")).json()] == [1, 2]
    current = await stack.api.get("/v1/templates/compact")
    assert (current.headers["ETag"], current.json()["manifest"]) == ('"r2"', {"pos": 3, "tablet": 1})
    assert (await stack.api.get("/v1/templates/compact/versions/3")).status_code == 404
    assert (await stack.api.get("/v1/templates/nope")).status_code == 404

    # A store may pin an older version; by default it gets the current one.
    pinned = await stack.api.post(
        "/v1/stores",
        json={"id": "DE-BER-0001", "name": "Berlin", "template_id": "compact", "template_version": 1},
    )
    assert pinned.status_code == 201, pinned.text
    assert pinned.json()["provisioning"]["expected"] == {"pos": 2, "tablet": 1}
    latest = await stack.api.post(
        "/v1/stores", json={"id": "DE-BER-0002", "name": "B2", "template_id": "compact"}
    )
    assert latest.json()["template_version"] == 2
    assert latest.json()["provisioning"]["expected"] == {"pos": 3, "tablet": 1}

    # Archived: no new stores from it; stores made from it keep their version.
    assert (await stack.api.delete("/v1/templates/compact")).status_code == 204
    assert [t["id"] for t in (await stack.api.get("/v1/templates")).json()] == []
    listed = (await stack.api.get("/v1/templates", params={"include_archived": "true"})).json()
    assert listed[0]["archived_at"] is not None
    refused = await stack.api.post(
        "/v1/stores", json={"id": "DE-BER-0003", "name": "B3", "template_id": "compact"}
    )
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "template_archived"
    assert (await stack.api.put("/v1/templates/compact", json=change)).status_code == 409
    store = (await stack.api.get("/v1/stores/DE-BER-0001")).json()
    assert (store["template_id"], store["template_version"]) == ("compact", 1)


async def test_store_defaults_come_from_the_template_unless_given(embedded: RunningControlPlane):
    await create_template(embedded)
    response = await embedded.api.post(
        "/v1/stores",
        json={
            "id": "NP-KTM-0001",
            "name": "Kathmandu",
            "template_id": "compact",
            "timezone": "Asia/Kathmandu",
            "trading_hours": {"sat-thu": "10:00-22:00", "fri": "closed"},
            "provision": False,
        },
    )
    assert response.status_code == 201, response.text
    store = response.json()
    assert store["timezone"] == "Asia/Kathmandu"
    assert store["trading_hours"]["fri"] == []
    assert store["trading_hours"]["sat"] == [["10:00", "22:00"]]
    # provision: false: the store records its template but nothing is provisioned.
    assert store["status"] == "ready"
    assert (store["provisioning"], store["enrollment_tokens"]) == (None, [])
    assert (await embedded.api.get("/v1/stores/NP-KTM-0001/provisioning")).status_code == 404


async def test_a_store_without_template_works_as_before(embedded: RunningControlPlane):
    store = await embedded.create_store("DE-BER-0009", config={"v": 1})
    assert store["status"] == "ready"
    assert store["timezone"] == "UTC"
    assert (store["template_id"], store["trading_hours"], store["ready_at"]) == (None, None, None)
    assert store["enrollment_tokens"] == []


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"roles": {"kiosk": {"config": {}}}}, "roles", "'kiosk' not in the manifest (pos, tablet)"),
        ({"manifest": {"pos": 0}}, "manifest.pos", "greater than or equal to 1"),
        ({"manifest": {"pos": 1001}}, "manifest.pos", "less than or equal to 1000"),
        ({"manifest": {}}, "manifest", "at least 1 item"),
        ({"manifest": {"POS!": 1}}, "manifest.POS!.[key]", "should match pattern"),
        ({"trading_hours": {"mon-fri": "08:00-20:00"}}, "trading_hours", "no hours for sat, sun"),
        ({"trading_hours": {"mon-sun": "8am-8pm"}}, "trading_hours", "'mon-sun': '8am' is not a time"),
        ({"timezone": "Mars/Olympus"}, "timezone", "unknown IANA time zone"),
        ({"roles": {"pos": {"config": {}, "colour": "red"}}}, "roles.pos.colour", "Extra inputs"),
        ({"layer": {"checks": {"pos-app": {"kind": "tcp"}}}}, "layer.checks.pos-app.target", "required"),
    ],
)
async def test_invalid_templates_are_refused_with_the_field(
    embedded: RunningControlPlane, change, field, message
):
    response = await embedded.api.post("/v1/templates", json=TEMPLATE | change)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert any(f["field"].startswith(field) and message in f["message"] for f in error["fields"]), error
    assert (await embedded.api.get("/v1/templates/compact")).status_code == 404


async def test_invalid_stores_from_templates_are_refused(embedded: RunningControlPlane):
    await create_template(embedded)
    cases = [
        ({"template_id": "nope"}, "template_id"),
        ({"template_id": "compact", "template_version": 9}, "template_version"),
        ({"template_version": 1}, "template_version"),
        ({"provision": True}, "provision"),
        ({"template_id": "compact", "trading_hours": {"mon-sun": "20:00-20:00"}}, "trading_hours"),
        ({"template_id": "compact", "trading_hours": {"weekdays": "09:00-17:00"}}, "trading_hours"),
    ]
    for extra, field in cases:
        response = await embedded.api.post("/v1/stores", json={"id": "DE-BER-0001", "name": "x"} | extra)
        assert response.status_code == 422, (extra, response.text)
        assert field in response.json()["error"]["message"], (extra, response.text)
    # Nothing was half-made by the refusals.
    assert (await embedded.api.get("/v1/stores/DE-BER-0001")).status_code == 404
