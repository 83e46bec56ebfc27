"""The path a real store device walks, on both stacks:
enroll with its own key → mTLS to the broker → signed desired state → apply → report → health."""

from __future__ import annotations

import json
import stat

import pytest

from tests.support.agents import enroll_agent, running
from tests.support.control_plane import RunningControlPlane

pytestmark = pytest.mark.integration

STORE_CONFIG = {
    "config": {"pos": {"currency": "EUR", "receipt_footer": "Danke"}},
    "policies": {"screen_lock_timeout_s": 300},
}


async def test_device_enrolls_applies_signed_config_and_reports_health(stack: RunningControlPlane, tmp_path):
    await stack.create_store("DE-BER-0001", timezone="Europe/Berlin", **STORE_CONFIG)
    enrolled = await enroll_agent(stack, "DE-BER-0001", tmp_path / "agent")

    key_file = tmp_path / "agent" / "device.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    async with running(enrolled.build()) as agent:
        await agent.wait_applied(1)
        view = await stack.wait_for_device(
            enrolled.device_id, lambda d: d["in_sync"] and d["health"] is not None and d["online"]
        )

    assert view["store_id"] == "DE-BER-0001"
    assert view["role"] == "pos"
    assert (view["desired_version"], view["applied_version"], view["apply_status"]) == (1, 1, "applied")
    assert 0 <= view["health"]["cpu_percent"] <= 100
    assert view["cert_not_after"] is not None
    assert json.loads(enrolled.config_file.read_text()) == STORE_CONFIG["config"]
    assert json.loads((enrolled.config_file.parent / "policies.json").read_text()) == STORE_CONFIG["policies"]


async def test_store_config_change_reaches_devices_and_unchanged_config_issues_no_version(
    stack: RunningControlPlane, tmp_path
):
    await stack.create_store("FR-PAR-0004", **STORE_CONFIG)
    enrolled = await enroll_agent(stack, "FR-PAR-0004", tmp_path / "agent")
    async with running(enrolled.build()) as agent:
        await agent.wait_applied(1)
        changed = {"config": {"pos": {"currency": "EUR", "receipt_footer": "Merci"}}, "policies": {}}
        response = await stack.api.put("/v1/stores/FR-PAR-0004/config", json=changed)
        assert response.status_code == 200, response.text
        assert response.json()["config_revision"] == 2
        await stack.wait_for_device(enrolled.device_id, lambda d: d["applied_version"] == 2)
        assert json.loads(enrolled.config_file.read_text())["pos"]["receipt_footer"] == "Merci"

        # Same content again: the revision moves, the device's version does not.
        response = await stack.api.put("/v1/stores/FR-PAR-0004/config", json=changed)
        assert response.json()["config_revision"] == 3
        view = await stack.device(enrolled.device_id)
        assert view["desired_version"] == 2


async def test_device_shown_offline_after_it_stops(stack: RunningControlPlane, tmp_path):
    await stack.create_store("DE-HAM-0003")
    enrolled = await enroll_agent(stack, "DE-HAM-0003", tmp_path / "agent")
    async with running(enrolled.build()):
        await stack.wait_for_device(enrolled.device_id, lambda d: d["online"])
    await stack.wait_for_device(enrolled.device_id, lambda d: not d["online"])


async def test_two_stores_keep_their_own_configuration(stack: RunningControlPlane, tmp_path):
    await stack.create_store("S1", config={"greeting": "one"})
    await stack.create_store("S2", config={"greeting": "two"})
    first = await enroll_agent(stack, "S1", tmp_path / "a1")
    second = await enroll_agent(stack, "S2", tmp_path / "a2")
    async with running(first.build()) as a1, running(second.build()) as a2:
        await a1.wait_applied(1)
        await a2.wait_applied(1)
    assert json.loads(first.config_file.read_text()) == {"greeting": "one"}
    assert json.loads(second.config_file.read_text()) == {"greeting": "two"}
    page = (await stack.api.get("/v1/devices", params={"store_id": "S2"})).json()
    assert [d["id"] for d in page["items"]] == [second.device_id]
