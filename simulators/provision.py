"""The `provision` scenario: S stores x D devices enroll, connect with mTLS and apply config.

Figures: enrollment rate and latency percentiles, time until every device applied its
first desired state, time per store to all-applied, process RSS and RSS per agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from simulators.fleet import DeviceSpec, enroll_fleet, simulator_settings

ROLES = ("pos", "tablet", "kiosk", "backoffice")


@dataclass(frozen=True)
class ProvisionScenario:
    stores: int
    devices_per_store: int
    seed: int = 0
    enroll_concurrency: int = 50
    timeout_s: float = 120.0
    server_url: str | None = None
    admin_key: str | None = None
    ca_file: Path | None = None


@dataclass
class _Target:
    base_url: str
    admin_key: str
    ca_file: Path


@contextlib.asynccontextmanager
async def _control_plane(scenario: ProvisionScenario) -> AsyncIterator[_Target]:
    if scenario.server_url:
        assert scenario.admin_key is not None
        assert scenario.ca_file is not None
        yield _Target(scenario.server_url, scenario.admin_key, scenario.ca_file)
        return
    from control_plane.runtime import ControlPlane
    from control_plane.settings import ControlPlaneSettings
    from simulators.demo import free_port

    with tempfile.TemporaryDirectory(prefix="storefleet-sim-cp-") as tmp:
        settings = ControlPlaneSettings(data_dir=Path(tmp), port=free_port(), mqtt_port=free_port())
        control_plane = ControlPlane(settings)
        await control_plane.open()
        task = asyncio.create_task(control_plane.run())
        try:
            await asyncio.wait_for(control_plane.ready.wait(), 30)
            assert control_plane.new_admin_key is not None
            yield _Target(control_plane.base_url, control_plane.new_admin_key, settings.pki_dir / "ca.pem")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await control_plane.close()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


async def run_provision(scenario: ProvisionScenario) -> dict[str, Any]:
    process = psutil.Process(os.getpid())
    rss_before = process.memory_info().rss
    async with _control_plane(scenario) as target:
        tls = ssl.create_default_context(cafile=str(target.ca_file))
        async with httpx.AsyncClient(
            base_url=target.base_url,
            verify=tls,
            timeout=60,
            headers={"Authorization": f"Bearer {target.admin_key}"},
        ) as api:
            run_id = f"{scenario.seed:04d}{int(time.time()) % 100000:05d}"
            specs: list[DeviceSpec] = []
            store_ids: list[str] = []
            fingerprint = ""
            for index in range(scenario.stores):
                store_id = f"SIM-{run_id}-{index:05d}"
                store_ids.append(store_id)
                (
                    await api.post(
                        "/v1/stores",
                        json={
                            "id": store_id,
                            "name": f"Simulated store {index}",
                            "config": {"store": {"number": index}},
                            "policies": {"screen_lock_timeout_s": 300},
                        },
                    )
                ).raise_for_status()
                token = (
                    (
                        await api.post(
                            f"/v1/stores/{store_id}/enrollment-tokens",
                            json={"max_uses": scenario.devices_per_store},
                        )
                    )
                    .raise_for_status()
                    .json()
                )
                fingerprint = token["ca_fingerprint"]
                specs += [
                    DeviceSpec(token=token["token"], role=ROLES[d % len(ROLES)])
                    for d in range(scenario.devices_per_store)
                ]

            with simulator_settings(reconnect_min_s=0.2, reconnect_max_s=5.0) as agent_settings:
                applied_at: dict[str, float] = {}
                run_started = 0.0

                all_applied = asyncio.Event()

                def note_applied(device_id: str, _version: int) -> None:
                    applied_at.setdefault(device_id, time.monotonic() - run_started)
                    if len(applied_at) == len(specs):
                        all_applied.set()

                enroll_started = time.monotonic()
                fleet = await enroll_fleet(
                    specs,
                    server_url=target.base_url,
                    ca_fingerprint=fingerprint,
                    settings=agent_settings,
                    seed=scenario.seed,
                    concurrency=scenario.enroll_concurrency,
                    on_applied=note_applied,
                )
                enroll_elapsed = time.monotonic() - enroll_started
                run_started = time.monotonic()
                fleet.start()
                try:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(all_applied.wait(), scenario.timeout_s)
                    converged = len(applied_at) == len(specs)
                    rss_after = process.memory_info().rss
                    by_store: dict[str, list[float]] = {}
                    for device in fleet.devices:
                        if device.agent.device_id in applied_at:
                            by_store.setdefault(device.agent.store_id, []).append(
                                applied_at[device.agent.device_id]
                            )
                finally:
                    await fleet.stop()

    enroll_latencies = [d.enroll_seconds for d in fleet.devices]
    store_ready = [max(times) for times in by_store.values() if len(times) == scenario.devices_per_store]
    agents = len(specs)
    return {
        "scenario": "provision",
        "stores": scenario.stores,
        "devices": agents,
        "converged": converged,
        "devices_applied": len(applied_at),
        "enroll": {
            "seconds": round(enroll_elapsed, 3),
            "per_second": round(agents / enroll_elapsed, 1) if enroll_elapsed else None,
            "latency_p50_ms": round(1000 * statistics.median(enroll_latencies), 1),
            "latency_p99_ms": round(1000 * percentile(enroll_latencies, 0.99), 1),
        },
        "first_config_applied": {
            "all_seconds": round(max(applied_at.values()), 3) if applied_at else None,
            "p50_seconds": round(percentile(list(applied_at.values()), 0.5), 3),
            "p99_seconds": round(percentile(list(applied_at.values()), 0.99), 3),
        },
        "store_ready_seconds": {
            "p50": round(percentile(store_ready, 0.5), 3),
            "max": round(max(store_ready), 3) if store_ready else None,
        },
        "process_rss_mb": round(rss_after / 2**20, 1),
        "rss_per_agent_kb": round((rss_after - rss_before) / agents / 1024, 1),
        "control_plane": "embedded (in this process)" if not scenario.server_url else scenario.server_url,
    }
