"""A control-plane restart in the middle of provisioning, or of its compensation, loses nothing."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

import pytest

from control_plane.runtime import ControlPlane
from tests.conftest import start_stack
from tests.support.provisioning import (
    create_provisioned_store,
    create_template,
    provisioning,
    running_fleet,
    timeline,
    wait_for_state,
)

pytestmark = pytest.mark.integration


async def _wait_for_role(cp, store_id: str, role: str, step: str, count: int) -> None:
    for _ in range(150):
        if (await provisioning(cp, store_id))["roles"][role][step] >= count:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{role} never reached {count} {step}: {await provisioning(cp, store_id)}")


async def test_restart_mid_provisioning_completes(tmp_path):
    async with contextlib.AsyncExitStack() as outer:
        first = contextlib.AsyncExitStack()
        cp = await first.enter_async_context(start_stack("embedded-sqlite", tmp_path))
        ports = {"port": cp.settings.port, "mqtt_port": cp.settings.mqtt_port}
        await create_template(cp)
        created = await create_provisioned_store(cp, "DE-BER-0001")
        tokens = {token["role"]: token for token in created["enrollment_tokens"]}
        # The two POS terminals enroll and apply their configuration; then the control plane
        # goes down (the agents keep running and reconnecting, as real devices would).
        await outer.enter_async_context(running_fleet(cp, [tokens["pos"]]))
        await _wait_for_role(cp, "DE-BER-0001", "pos", "configured", 2)
        await first.aclose()

        cp = await outer.enter_async_context(start_stack("embedded-sqlite", tmp_path, **ports))
        view = await provisioning(cp, "DE-BER-0001")
        assert view["state"] == "waiting_enrollment"
        assert view["roles"]["pos"]["enrolled"] == 2
        # The tablet arrives after the restart, with the token issued before it.
        await outer.enter_async_context(running_fleet(cp, [tokens["tablet"]]))
        view = await wait_for_state(cp, "DE-BER-0001", "ready")
        assert view["roles"]["pos"]["ready"] == 2
        assert view["roles"]["tablet"]["ready"] == 1
        store = (await cp.api.get("/v1/stores/DE-BER-0001")).json()
        assert store["status"] == "ready"

        kinds = Counter(event["kind"] for event in await timeline(cp, "DE-BER-0001"))
        # Each milestone once, although two processes worked on the saga.
        assert kinds["device_enrolled"] == kinds["device_configured"] == kinds["device_healthy"] == 3
        assert kinds["ready"] == kinds["created"] == 1


async def test_compensation_interrupted_by_a_restart_finishes_after_it(tmp_path):
    async with start_stack("embedded-sqlite", tmp_path) as cp:
        settings = cp.settings
        await create_template(cp)
        created = await create_provisioned_store(cp, "DE-BER-0001")
        tokens = {token["role"]: token for token in created["enrollment_tokens"]}
        async with running_fleet(cp, [tokens["pos"]]) as fleet:
            await _wait_for_role(cp, "DE-BER-0001", "pos", "configured", 2)
            device_ids = [device.agent.device_id for device in fleet.devices]

    # A control plane that takes the cancel and gets half-way through compensating (tokens
    # revoked, devices decommissioned; its broker session never came up, so the retained
    # topics could not be cleared and the saga cannot finish), then dies.
    crashed = ControlPlane(settings)
    await crashed.open()
    try:
        await crashed.services.provisioning.cancel("DE-BER-0001", actor="operator")
        await crashed.services.provisioning_worker.run_once()
        await crashed.services.provisioning_worker.run_once()
        assert (await crashed.services.provisioning.get("DE-BER-0001")).state == "cancelling"
    finally:
        await crashed.close()

    ports = {"port": settings.port, "mqtt_port": settings.mqtt_port}
    async with start_stack("embedded-sqlite", tmp_path, **ports) as cp:
        view = await wait_for_state(cp, "DE-BER-0001", "cancelled")
        assert view["error"] is None
        for device_id in device_ids:
            assert (await cp.device(device_id))["state"] == "decommissioned"
        assert (await cp.api.get("/v1/stores/DE-BER-0001")).json()["status"] == "decommissioned"
        kinds = [event["kind"] for event in await timeline(cp, "DE-BER-0001")]
        # Every compensation step happened exactly once across the two processes.
        assert Counter(kinds)["tokens_revoked"] == 1
        assert Counter(kinds)["device_decommissioned"] == 2
        assert kinds[-3:] == ["retained_cleared", "cancelled", "decommissioned"]
