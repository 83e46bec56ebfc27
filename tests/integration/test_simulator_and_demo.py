"""The simulator and the demo run the real agent code and agree with what the control plane recorded."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from simulators.demo import run_demo
from simulators.provision import ProvisionScenario, run_provision
from tests.support.control_plane import ADMIN_KEY, RunningControlPlane

pytestmark = pytest.mark.integration


async def test_provision_scenario_report_matches_the_control_plane(stack: RunningControlPlane):
    report = await run_provision(
        ProvisionScenario(
            stores=3,
            devices_per_store=4,
            server_url=stack.base_url,
            admin_key=ADMIN_KEY,
            ca_file=stack.ca_file,
            timeout_s=60,
        )
    )
    assert report["converged"] is True
    assert report["devices"] == report["devices_applied"] == 12
    devices = (await stack.api.get("/v1/devices", params={"limit": 100})).json()["items"]
    assert len(devices) == 12
    for device in devices:  # the last reports reach the database on the next ingest flush
        await stack.wait_for_device(device["id"], lambda d: d["applied_version"] == 1, timeout=5)
    stores = (await stack.api.get("/v1/stores")).json()
    assert sorted(s["device_count"] for s in stores) == [4, 4, 4]
    assert report["enroll"]["per_second"] > 0


async def test_demo_runs_end_to_end_and_prints_the_summary():
    output = io.StringIO()
    assert await run_demo(Console(file=output, width=200)) == 0
    text = output.getvalue()
    assert "demo complete" in text
    assert "applied version 2" in text
    assert text.count("DE-BER-0001") >= 11  # the store row and its 10 devices
