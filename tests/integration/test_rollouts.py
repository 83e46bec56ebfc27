"""Releases and staged rollouts with real agents, on both stacks: a good release reaches
every device; a bad one stops at the canary and rolls back (new versions, old content);
dry-run plan, progress, events and control over the API."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa

from agent.handlers import FileConfigHandler
from agent.health import SimulatedProbe
from agent.runtime import Agent
from control_plane.db.schema import desired_states
from tests.conftest import start_stack
from tests.support.agents import EnrolledAgent, enroll_agent
from tests.support.control_plane import RunningControlPlane

pytestmark = pytest.mark.integration

FAST = {"rollout_tick_s": 0.1}
PLAN = {
    "waves": [{"count": 1}, {"percent": 100}],
    "bake_s": 1.0,
    "apply_timeout_s": 15,
    "heartbeat_grace_s": 10,
    "window": "now",
    "keep_known_good": False,
}


@pytest.fixture(
    params=[
        pytest.param("embedded-sqlite", marks=pytest.mark.integration),
        pytest.param(
            "mosquitto-postgres",
            marks=[pytest.mark.integration, pytest.mark.mosquitto, pytest.mark.postgres],
        ),
    ]
)
async def fast_stack(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[RunningControlPlane]:
    async with start_stack(request.param, tmp_path, **FAST) as cp:
        yield cp


async def _fleet(
    cp: RunningControlPlane, tmp_path, count: int, store: str = "NL-AMS-0001"
) -> list[EnrolledAgent]:
    await cp.create_store(store, config={"pos": {"currency": "EUR"}})
    return [await enroll_agent(cp, store, tmp_path / f"agent-{i}") for i in range(count)]


@contextlib.asynccontextmanager
async def _run(agents: list[Agent]) -> AsyncIterator[list[Agent]]:
    tasks = [asyncio.create_task(a.run()) for a in agents]
    try:
        for agent in agents:
            await asyncio.wait_for(agent.wait_connected(), 15)
        for agent in agents:
            await asyncio.wait_for(agent.wait_applied(1), 15)
        yield agents
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _agent(enrolled: EnrolledAgent, *, handler: Any = None, probe: SimulatedProbe | None = None) -> Agent:
    return Agent(
        enrolled.settings,
        enrolled.state,
        handler or FileConfigHandler(enrolled.settings.config_path),
        probe or SimulatedProbe(1),
    )


async def _release(cp: RunningControlPlane, release_id: str, layer: dict[str, Any]) -> None:
    response = await cp.api.post("/v1/releases", json={"id": release_id, "name": release_id, "layer": layer})
    assert response.status_code == 201, response.text


async def _wait_rollout(
    cp: RunningControlPlane, rollout_id: str, states: set[str], timeout: float = 30
) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        view = (await cp.api.get(f"/v1/rollouts/{rollout_id}")).json()
        if view["state"] in states:
            return dict(view)
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"rollout never reached {states}: {view}")
        await asyncio.sleep(0.1)


async def _versions(cp: RunningControlPlane, device_id: str) -> list[int]:
    async with cp.control_plane.services.engine.connect() as conn:
        rows = await conn.scalars(
            sa.select(desired_states.c.version)
            .where(desired_states.c.device_id == device_id)
            .order_by(desired_states.c.version)
        )
        return list(rows)


async def test_a_good_release_reaches_every_device_in_waves(fast_stack: RunningControlPlane, tmp_path):
    cp = fast_stack
    fleet = await _fleet(cp, tmp_path, 4)
    await _release(cp, "tax-2027", {"config": {"pos": {"tax": 21}}, "policies": {"usb": False}})
    body = {"id": "ro-good", "release_id": "tax-2027", "selector": {"stores": ["NL-AMS-0001"]}, "plan": PLAN}

    plan = (await cp.api.post("/v1/rollouts/plan", json=body)).json()
    assert [len(w["devices"]) for w in plan["waves"]] == [1, 3]
    assert plan["unchanged"] == 0
    [group] = plan["changes"]
    assert group["devices"] == 4
    assert {(d["path"], d["before"], d["after"]) for d in group["diff"]} == {
        ("/config/pos/tax", None, 21),
        ("/policies/usb", None, False),
    }

    async with _run([_agent(e) for e in fleet]) as agents:
        response = await cp.api.post("/v1/rollouts", json=body)
        assert response.status_code == 201, response.text
        view = await _wait_rollout(cp, "ro-good", {"completed", "rolled_back", "paused"})
        assert view["state"] == "completed", view
        assert view["states"] == {"healthy": 4}
        assert [w["states"] for w in view["waves"]] == [{"healthy": 1}, {"healthy": 3}]
        for agent, enrolled in zip(agents, fleet, strict=True):
            assert agent.applied_version == 2
            config = json.loads(enrolled.config_file.read_text())
            assert config["pos"] == {"currency": "EUR", "tax": 21}
            assert await _versions(cp, enrolled.device_id) == [1, 2]

    effective = (await cp.api.get(f"/v1/devices/{fleet[0].device_id}/effective-config")).json()
    assert effective["provenance"]["/config/pos/tax"] == {"layer": "release", "id": "tax-2027"}
    events = (await cp.api.get("/v1/rollouts/ro-good/events")).json()
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "created"
    assert {"started", "wave_passed", "wave_started", "completed"} <= set(kinds)
    assert kinds.index("wave_passed") < kinds.index("completed")
    # A completed rollout cannot be resumed, and the release it carried stays immutable.
    assert (await cp.api.post("/v1/rollouts/ro-good/resume")).status_code == 409
    duplicate = await cp.api.post(
        "/v1/releases", json={"id": "tax-2027", "name": "x", "layer": {"config": {"a": 1}}}
    )
    assert duplicate.status_code == 409


async def test_a_failing_canary_stops_the_rollout_and_rolls_it_back(
    fast_stack: RunningControlPlane, tmp_path
):
    from agent.handlers import MemoryHandler

    cp = fast_stack
    fleet = await _fleet(cp, tmp_path, 4)
    await _release(cp, "bad-printer", {"config": {"pos": {"printer": "broken"}}})
    body = {
        "id": "ro-bad",
        "release_id": "bad-printer",
        "selector": {"stores": ["NL-AMS-0001"]},
        "plan": PLAN,
    }
    plan = (await cp.api.post("/v1/rollouts/plan", json=body)).json()
    [canary] = plan["waves"][0]["devices"]
    # Half the fleet cannot apply the release (version 2), the canary among them.
    failing = {canary, *[e.device_id for e in fleet if e.device_id != canary][:1]}
    handlers = {
        e.device_id: MemoryHandler(fail_versions={2} if e.device_id in failing else set()) for e in fleet
    }

    async with _run([_agent(e, handler=handlers[e.device_id]) for e in fleet]) as agents:
        assert (await cp.api.post("/v1/rollouts", json=body)).status_code == 201
        view = await _wait_rollout(cp, "ro-bad", {"completed", "rolled_back", "paused"})
        assert view["state"] == "rolled_back", view
        assert "failure threshold" in view["reason"]
        assert view["waves"][0]["states"] == {"rolled_back": 1}
        assert view["waves"][1]["states"] == {"queued": 3}  # never sent
        by_id = {a.device_id: a for a in agents}
        # The canary gets a new version (3) with its previous content; nobody else moved.
        await asyncio.wait_for(by_id[canary].wait_applied(3), 15)
        assert handlers[canary].applied is not None
        assert handlers[canary].applied.config == {"pos": {"currency": "EUR"}}
        assert await _versions(cp, canary) == [1, 2, 3]
        for enrolled in fleet:
            if enrolled.device_id != canary:
                assert await _versions(cp, enrolled.device_id) == [1]
                assert by_id[enrolled.device_id].applied_version == 1
        devices = (await cp.api.get("/v1/rollouts/ro-bad/devices", params={"state": "rolled_back"})).json()
        assert [d["device_id"] for d in devices] == [canary]
        assert (devices[0]["previous_version"], devices[0]["target_version"]) == (1, 2)

    events = (await cp.api.get("/v1/rollouts/ro-bad/events")).json()
    failed = next(e for e in events if e["kind"] == "devices" and "failed" in e["detail"]["counts"])
    assert failed["detail"]["devices"][0] == {
        "device_id": canary,
        "state": "failed",
        "reason": "apply failed",
    }
    assert [e["kind"] for e in events][-2:] == ["aborted", "rolled_back"]
