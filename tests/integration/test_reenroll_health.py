"""A device re-enrolled with its state wiped starts its health sequence again, and the
control plane takes its reports into the device row and the history (it would otherwise
ignore every seq below the old one, or take them for duplicates)."""

from __future__ import annotations

import pytest

from agent.enrollment import enroll
from agent.settings import AgentSettings
from agent.state import AgentState
from protocol.messages import DeviceInfo
from tests.support.agents import EnrolledAgent, enroll_agent, running
from tests.support.control_plane import RunningControlPlane

pytestmark = pytest.mark.integration


async def test_health_from_a_wiped_and_reenrolled_device_is_taken(embedded: RunningControlPlane, tmp_path):
    await embedded.create_store("DE-BER-0001")
    first = await enroll_agent(embedded, "DE-BER-0001", tmp_path / "before")
    async with running(first.build()):
        view = await embedded.wait_for_device(
            first.device_id, lambda d: (d["health"] or {}).get("seq", 0) >= 5
        )
    old_seq = view["health"]["seq"]
    first.state.close()

    token = (await embedded.api.post(f"/v1/devices/{first.device_id}/reenrollment-tokens", json={})).json()
    wiped = tmp_path / "after"  # a replaced disk: no state, a new key, the sequence from 0
    state = AgentState.open(wiped)
    response = await enroll(
        server_url=embedded.base_url,
        token=token["token"],
        state=state,
        ca_fingerprint=token["ca_fingerprint"],
        device=DeviceInfo(hostname="test-host", model="POS-T1", serial="SN-1", os="Debian 12", role="pos"),
        timeout_s=10,
    )
    assert response.device_id == first.device_id
    settings = AgentSettings(state_dir=wiped, health_interval_s=0.3, reconnect_min_s=0.1, reconnect_max_s=0.5)
    again = EnrolledAgent(settings=settings, state=state, device_id=response.device_id)
    async with running(again.build()):
        view = await embedded.wait_for_device(
            first.device_id, lambda d: 0 < (d["health"] or {}).get("seq", old_seq) < old_seq
        )
    assert view["health_at"] is not None
    # The history has the new reports too (not taken for re-sent copies of the old seqs).
    history = (await embedded.api.get(f"/v1/devices/{first.device_id}/health-history")).json()
    assert history[0]["seq"] == view["health"]["seq"] < old_seq
    state.close()
