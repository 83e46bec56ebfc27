"""The simulator's scenarios run the real agent code, and their reports agree with what the
control plane recorded (small scale: each scenario takes seconds)."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest
from rich.console import Console

from simulators.demo import run_demo
from simulators.faults import ChaosRates
from simulators.scenarios import SimConfig, Target, run_scenario
from tests.support.control_plane import ADMIN_KEY, RunningControlPlane

pytestmark = pytest.mark.integration

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def target_of(stack: RunningControlPlane) -> Target:
    async def storm(device_ids: list[str], downtime_s: float) -> str:
        if stack.mosquitto is not None:
            await stack.mosquitto._stop()
            await asyncio.sleep(downtime_s)
            await stack.mosquitto._spawn(append_log=True)
            return "Mosquitto restarted"
        broker = stack.control_plane.broker
        assert broker is not None
        dropped = await asyncio.gather(*(broker.disconnect(d) for d in device_ids))
        return f"embedded broker dropped {sum(dropped)} connections"

    return Target(stack.base_url, ADMIN_KEY, stack.ca_file, "test stack", storm=storm)


async def our_devices(stack: RunningControlPlane, report_devices: int) -> list[dict[str, Any]]:
    items = (await stack.api.get("/v1/devices", params={"limit": 1000})).json()["items"]
    assert len(items) == report_devices
    return list(items)


async def accepted_health(stack: RunningControlPlane) -> float:
    text = (await stack.api.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith('storefleet_ingest_accepted_total{kind="health"}'):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize("via", ["release", "store-config"])
async def test_rollout_report_matches_the_control_plane_and_draws_plots(
    stack: RunningControlPlane, tmp_path: Path, via: str
):
    config = SimConfig(
        scenario="rollout", stores=4, devices_per_store=5, changes=2, via=via, plots_dir=tmp_path / "plots"
    )
    report = await run_scenario(config, target_of(stack))

    assert report["ok"] is True, report
    provision = report["provision"]
    assert provision["converged"] is True
    assert provision["devices_enrolled"] == provision["devices_applied"] == 20
    assert provision["store_ready"]["stores_ready"] == 4
    assert provision["enroll"]["latency"]["count"] == 20
    for change in report["rollout"]["changes"]:
        assert (change["applied"], change["failed"], change["pending"]) == (20, 0, 0)
        assert change["propagation"]["count"] == 20
        propagation = change["propagation"]
        assert 0 < propagation["p50"] <= propagation["p99"] <= propagation["max"]
        assert change["control_plane_reported_all_seconds"] is not None
        if via == "release":
            assert change["rollout"]["state"] == "completed"
            assert change["rollout"]["states"] == {"healthy": 20}
    assert report["rollout"]["via"] == via
    # What the control plane recorded: 20 devices, each on its third version (first + 2 changes).
    for device in await our_devices(stack, 20):
        assert device["in_sync"] is True
        assert device["applied_version"] == device["desired_version"] >= 3
    stores = (await stack.api.get("/v1/stores")).json()
    assert sorted(s["device_count"] for s in stores) == [5, 5, 5, 5]

    assert sorted(Path(p).name for p in report["plots"]) == [
        "latency_cdf.png",
        "rollout_progress.png",
        "store_ready_hist.png",
    ]
    for path in report["plots"]:
        data = Path(path).read_bytes()
        assert data.startswith(PNG_MAGIC)
        height, width, _ = matplotlib.image.imread(path).shape  # decodes: a valid PNG
        assert height > 100
        assert width > 100


async def test_steady_health_in_two_processes_loses_nothing(stack: RunningControlPlane):
    before = await accepted_health(stack)
    config = SimConfig(
        scenario="steady", stores=2, devices_per_store=10, procs=2, health_interval_s=0.5, duration_s=3
    )
    report = await run_scenario(config, target_of(stack))

    assert report["ok"] is True, json.dumps({k: report.get(k) for k in ("errors", "provision", "health")})
    health = report["health"]
    assert health["lost"] == health["duplicated"] == health["duplicates_not_stored"] == 0
    assert health["devices_whose_last_report_is_not_in_the_database"] == 0
    # At least 20 devices x 3 s / 0.5 s during the steady phase, all counted by the control plane.
    assert health["sent"] >= 20 * 5
    assert health["sent"] == health["accepted_by_control_plane"] == await accepted_health(stack) - before
    assert 25 <= health["steady_sent_per_second"] <= 50
    simulator = report["simulator"]
    assert simulator["shards"] == 2
    assert simulator["includes_control_plane"] is False
    assert simulator["steady_cpu_percent_per_agent"] > 0
    assert simulator["rss_added_kb_per_agent"] > 0


async def test_storm_everyone_reconnects_and_still_takes_changes(stack: RunningControlPlane):
    report = await run_scenario(
        SimConfig(scenario="storm", stores=2, devices_per_store=10, timeout_s=15), target_of(stack)
    )

    storm = report["storm"]
    assert report["ok"] is True, json.dumps(storm)
    assert storm["what"] in ("Mosquitto restarted", "embedded broker dropped 20 connections")
    assert storm["all_reconnected"] is True
    assert storm["reconnected"] == storm["reconnect"]["count"] == 20
    assert storm["reconnect"]["max"] <= storm["all_reconnected_seconds"] + 0.2
    assert storm["control_plane_all_online_seconds"] is not None
    assert storm["change_after_storm"]["applied"] == 20
    for device in await our_devices(stack, 20):  # (offline now: the run is over)
        assert device["in_sync"] is True
        assert device["online"] is False


CHAOS = ChaosRates(
    duration_s=4.0,
    disconnects_per_device_minute=6.0,
    offline_fraction=0.3,
    offline_s=1.0,
    apply_failure_rate=0.2,
    slow_fraction=0.3,
    slow_apply_s=0.3,
)


async def test_chaos_is_deterministic_per_seed(embedded: RunningControlPlane):
    async def chaos(seed: int) -> dict[str, Any]:
        config = SimConfig(scenario="chaos", stores=3, devices_per_store=5, seed=seed, chaos=CHAOS)
        return await run_scenario(config, target_of(embedded))

    first, again = await chaos(11), await chaos(11)
    for report in (first, again):
        assert report["ok"] is True, report
        change = report["chaos"]["change"]
        assert change["applied"] + change["failed"] == 15
        assert change["pending"] == 0
        planned = report["chaos"]["planned"]
        assert planned["offline_periods"] > 0
        assert planned["disconnects"] > 0
        assert planned["slow_devices"] > 0
        assert report["chaos"]["injected"] == planned["disconnects"] + planned["offline_periods"]
        # Every device took the change or failed it (after its outage), as the control plane saw.
        devices = (await embedded.api.get("/v1/devices", params={"limit": 1000})).json()["items"]
        statuses = {d["id"]: d["apply_status"] for d in devices if d["store_id"] in report["store_ids"]}
        assert len(statuses) == 15
        assert set(statuses.values()) <= {"applied", "failed"}
        # One store in four (of three: one) trades through the plan: its devices waited for it
        # to close, then took the change; the rollout completed.
        trading = change["trading"]
        assert (trading["stores"], trading["devices"]) == (1, 5)
        assert trading["deferred_while_trading"] == 5
        assert trading["changed_while_trading"] == 0
        assert trading["applied_after_closing"]["count"] > 0
        assert change["rollout"]["state"] == "completed"
        rollout = (await embedded.api.get(f"/v1/rollouts/{change['rollout']['id']}")).json()
        assert rollout["state"] == "completed"
        assert sum(rollout["states"].values()) == 15
        assert set(rollout["states"]) <= {"healthy", "failed"}
        store = (await embedded.api.get(f"/v1/stores/{report['store_ids'][0]}")).json()
        assert store["trading_hours"] is not None
    assert first["chaos"]["plan_digest"] == again["chaos"]["plan_digest"]
    assert first["chaos"]["injected_faults"] == again["chaos"]["injected_faults"]
    other = await chaos(12)
    assert other["chaos"]["plan_digest"] != first["chaos"]["plan_digest"]


def test_cli_runs_a_scenario_from_a_toml_file(tmp_path: Path):
    (tmp_path / "scenario.toml").write_text("[provision]\nstores = 2\ndevices-per-store = 3\nseed = 5\n")
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "storefleet-sim"),
            "provision",
            "--config",
            str(tmp_path / "scenario.toml"),
            "--report",
            str(tmp_path / "report.json"),
            "--plots",
            str(tmp_path / "plots"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report == json.loads(result.stdout)
    assert (report["devices"], report["seed"], report["provision"]["devices_applied"]) == (6, 5, 6)
    assert (tmp_path / "plots" / "latency_cdf.png").read_bytes().startswith(PNG_MAGIC)


async def test_demo_runs_end_to_end_and_prints_the_summary():
    output = io.StringIO()
    assert await run_demo(Console(file=output, width=200)) == 0
    text = output.getvalue()
    assert "demo complete" in text
    assert "applied version 2" in text
    assert "DE-BER-0001 is ready" in text
    assert "IN-BLR-0002 is ready" in text
    assert text.count("DE-BER-0001") >= 11  # the store row and its 10 devices
