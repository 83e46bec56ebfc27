"""A group's layer reaches its members and only them, on both stacks: joining by tag, a layer
change under If-Match, and deleting the group each issue exactly one new version."""

from __future__ import annotations

import json

import pytest

from tests.support.agents import enroll_agent, running
from tests.support.control_plane import RunningControlPlane

pytestmark = pytest.mark.integration


async def test_dynamic_group_layer_follows_tags_and_changes(stack: RunningControlPlane, tmp_path):
    await stack.create_store("DE-BER-0001", config={"pos": {"printer": "none", "currency": "EUR"}})
    member = await enroll_agent(stack, "DE-BER-0001", tmp_path / "member")
    bystander = await enroll_agent(stack, "DE-BER-0001", tmp_path / "bystander")
    created = await stack.api.post(
        "/v1/groups",
        json={
            "id": "printers",
            "name": "Tills with a printer",
            "kind": "dynamic",
            "selector": {"tag": ["printer"]},
            "layer": {"config": {"pos": {"printer": "epson"}}},
        },
    )
    assert created.status_code == 201, created.text

    async with running(member.build()) as agent:
        await agent.wait_applied(1)
        tagged = await stack.api.put(f"/v1/devices/{member.device_id}/tags", json={"tags": ["printer"]})
        assert tagged.status_code == 200, tagged.text
        await agent.wait_applied(2)
        assert json.loads(member.config_file.read_text()) == {"pos": {"printer": "epson", "currency": "EUR"}}

        changed = await stack.api.put(
            "/v1/groups/printers/layer",
            json={"config": {"pos": {"printer": "star"}}},
            headers={"If-Match": '"r1"'},
        )
        assert changed.status_code == 200, changed.text
        await agent.wait_applied(3)
        assert json.loads(member.config_file.read_text())["pos"]["printer"] == "star"

        assert (await stack.api.delete("/v1/groups/printers")).status_code == 204
        await agent.wait_applied(4)
        assert json.loads(member.config_file.read_text())["pos"]["printer"] == "none"

    assert (await stack.device(bystander.device_id))["desired_version"] == 1
