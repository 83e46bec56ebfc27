"""The scenarios of `storefleet-sim`, driven against a control plane through its public API.

Every scenario starts the same way (*provision*): S stores are created with an enrollment
token each, S x D real agents enroll (own key, CSR, token over HTTPS), connect with mTLS and
apply their first signed desired state. Then:

* ``steady``  — agents report health every ``--interval`` seconds for ``--duration``; the
  report compares what they sent with what the control plane accepted (its ingest
  counters) and with each device's last health ``seq`` in the database;
* ``rollout`` — a configuration change for every store (``PUT /v1/stores/{id}/config``;
  releases and staged rollouts are not built yet) and its propagation: per device, from the
  change to applied; and until the control plane has every report;
* ``storm``   — the broker restarts under everyone (embedded broker, or a Mosquitto the
  caller started and can restart); time until every agent is connected again;
* ``chaos``   — the seeded fault plan (`simulators.faults`): random disconnects, devices
  offline for a while, apply failures at a rate, slow devices; a configuration change in the
  middle of it; how it settles.

Figures are in the JSON report; `write_plots` draws the PNGs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import ssl
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from simulators.faults import ChaosRates, FaultPlan, no_faults, plan_faults
from simulators.pool import LocalPool, ProcessPool, ShardPool
from simulators.report import Recorder, rollout_progress, summary, write_plots
from simulators.shard import DeviceSpec, Event, ShardConfig

logger = logging.getLogger(__name__)

SCENARIOS = ("provision", "steady", "rollout", "storm", "chaos")
ROLES = ("pos", "tablet", "kiosk", "backoffice")
# chaos stores' time zones (trading hours are wall-clock times in them): whole, half and
# quarter-hour offsets, both hemispheres.
STORE_ZONES = ("Europe/Berlin", "America/New_York", "Asia/Kolkata", "Australia/Sydney", "Asia/Kathmandu")
POLL_S = 0.1
API_CONCURRENCY = 16
VIAS = ("release", "store-config")
_ACCEPTED = re.compile(r'^storefleet_ingest_accepted_total\{kind="(\w+)"\} (\S+)$', re.M)
_DUPLICATES = re.compile(
    r'^storefleet_health_history_rows_total\{outcome="duplicate_not_stored"\} (\S+)$', re.M
)


class ScenarioError(RuntimeError):
    """The scenario cannot run as asked (bad target, missing capability)."""


@dataclass(frozen=True)
class SimConfig:
    scenario: str = "provision"
    stores: int = 2
    devices_per_store: int = 10
    seed: int = 0
    procs: int = 1
    enroll_concurrency: int = 50
    timeout_s: float = 120.0
    duration_s: float = 10.0  # steady and chaos
    health_interval_s: float | None = None  # None: the control plane's (steady: 1 s)
    changes: int = 1  # rollout: configuration changes, one after the other
    # rollout: "release" (a release and a rollout of it per change, as operators ship) or
    # "store-config" (PUT /v1/stores/{id}/config for every store: the raw propagation path)
    via: str = "release"
    downtime_s: float = 1.0  # storm: how long the broker stays down
    chaos: ChaosRates = field(default_factory=ChaosRates)
    reconnect_min_s: float = 0.2
    reconnect_max_s: float = 5.0
    # With procs == 1: run the agents in a worker process anyway (to measure them alone).
    isolate_agents: bool = False
    quiet: bool = True
    plots_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ScenarioError(f"unknown scenario {self.scenario!r}: one of {', '.join(SCENARIOS)}")
        for name in ("stores", "devices_per_store", "procs", "enroll_concurrency", "changes"):
            if getattr(self, name) < 1:
                raise ScenarioError(f"{name.replace('_', '-')} must be at least 1")
        if self.duration_s <= 0 or self.timeout_s <= 0:
            raise ScenarioError("duration and timeout must be positive")
        if self.health_interval_s is not None and self.health_interval_s <= 0:
            raise ScenarioError("interval must be positive")
        if self.via not in VIAS:
            raise ScenarioError(f"unknown --via {self.via!r}: one of {', '.join(VIAS)}")

    @property
    def devices(self) -> int:
        return self.stores * self.devices_per_store


@dataclass
class Target:
    """The control plane (and broker) under test."""

    base_url: str
    admin_key: str
    ca_file: Path
    description: str
    # The storm: takes every listed device's connection away at once (restart the broker, down
    # for the given seconds, or drop the connections) and says what it did; None when the
    # simulator cannot.
    storm: Callable[[list[str], float], Awaitable[str]] | None = None
    # Local processes whose CPU and RSS count as the control plane's (and broker's).
    processes: dict[str, psutil.Process] = field(default_factory=dict)
    # The control plane runs in the simulator's own process (its CPU and RSS mix with ours).
    in_process: bool = False


@contextlib.asynccontextmanager
async def embedded_target(**overrides: Any) -> AsyncIterator[Target]:
    """A control plane (SQLite, built-in CA, embedded broker) in this process and event loop."""
    from control_plane.runtime import ControlPlane
    from control_plane.settings import ControlPlaneSettings
    from simulators.demo import free_port

    with tempfile.TemporaryDirectory(prefix="storefleet-sim-cp-") as tmp:
        settings = ControlPlaneSettings(
            **{
                "data_dir": Path(tmp),
                "port": free_port(),
                "mqtt_port": free_port(),
                "ingest_flush_interval_s": 0.2,
                "enroll_rate_per_source_s": 1_000_000.0,
                "enroll_burst_per_source": 1_000_000,
                **overrides,
            }
        )
        control_plane = ControlPlane(settings)
        await control_plane.open()
        task = asyncio.create_task(control_plane.run())

        async def storm(device_ids: list[str], _downtime_s: float) -> str:
            broker = control_plane.broker
            if broker is None:
                raise ScenarioError("this control plane has no embedded broker")
            # Not a restart: amqtt's shutdown leaves connections made during it hanging (the
            # control plane's own link can reconnect into the dying broker and wait there).
            dropped = await asyncio.gather(*(broker.disconnect(d) for d in device_ids))
            return f"the embedded broker dropped {sum(dropped)} device connections at once"

        try:
            await asyncio.wait_for(control_plane.ready.wait(), 30)
            key = settings.admin_key.get_secret_value() if settings.admin_key else control_plane.new_admin_key
            assert key is not None
            yield Target(
                control_plane.base_url,
                key,
                settings.pki_dir / "ca.pem",
                "embedded (SQLite, amqtt) in the simulator's process",
                storm=storm if settings.embedded_broker else None,
                processes={"control_plane_and_driver": psutil.Process(os.getpid())},
                in_process=True,
            )
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await control_plane.close()


class Driver:
    """Runs one scenario against a target; `run()` returns the report."""

    def __init__(self, config: SimConfig, target: Target, *, progress: Any = None) -> None:
        self.config = config
        self.target = target
        self.recorder = Recorder()
        self.progress = progress
        self.phases: dict[str, float] = {}
        self.series: dict[str, Any] = {"latencies": {}}
        self.baseline: dict[str, int] = {}  # applied versions before the current change

    # --- API helpers -------------------------------------------------------------------

    def _api(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.target.base_url,
            verify=ssl.create_default_context(cafile=str(self.target.ca_file)),
            timeout=60,
            headers={"Authorization": f"Bearer {self.target.admin_key}"},
            limits=httpx.Limits(max_connections=API_CONCURRENCY),
        )

    async def _devices(self, api: httpx.AsyncClient, store_ids: list[str]) -> list[dict[str, Any]]:
        """Every device of our stores as the control plane sees it."""
        gate = asyncio.Semaphore(API_CONCURRENCY)

        async def of_store(store_id: str) -> list[dict[str, Any]]:
            items: list[dict[str, Any]] = []
            cursor = None
            async with gate:
                while True:
                    params: dict[str, Any] = {"store_id": store_id, "limit": 1000}
                    if cursor:
                        params["cursor"] = cursor
                    page = (await api.get("/v1/devices", params=params)).raise_for_status().json()
                    items += page["items"]
                    cursor = page["next_cursor"]
                    if not cursor:
                        return items

        pages = await asyncio.gather(*(of_store(s) for s in store_ids))
        return [device for page in pages for device in page]

    async def _ingest_accepted(self, api: httpx.AsyncClient) -> dict[str, float]:
        text = (await api.get("/metrics")).raise_for_status().text
        counts = {kind: float(value) for kind, value in re.findall(_ACCEPTED, text)}
        duplicates = _DUPLICATES.search(text)
        counts["duplicates_not_stored"] = float(duplicates.group(1)) if duplicates else 0.0
        return counts

    async def _until(self, what: str, done: Callable[[], bool], limit_s: float | None = None) -> bool:
        deadline = time.monotonic() + (limit_s or self.config.timeout_s)
        while not done():
            if self.recorder.errors:
                raise ScenarioError(f"{what}: {self.recorder.errors[0]}")
            if time.monotonic() > deadline:
                logger.warning("timed out waiting for %s", what)
                return False
            await self._sleep(POLL_S)
        return True

    async def _sleep(self, seconds: float) -> None:
        """Sleep, keeping the live progress display moving."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 0.2))
            if self.progress is not None:
                self.progress.event(("tick",))

    def _on_event(self, event: Event) -> None:
        self.recorder.handle(event)
        if self.progress is not None:
            self.progress.event(event)

    # --- the run -----------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        config = self.config
        if config.scenario == "storm" and self.target.storm is None:
            raise ScenarioError(
                "storm restarts the broker: use the embedded control plane or a broker the caller can restart"
            )
        plan = (
            plan_faults(config.devices, config.chaos, config.seed, stores=config.stores)
            if config.scenario == "chaos"
            else None
        )
        report: dict[str, Any] = {
            "scenario": config.scenario,
            "seed": config.seed,
            "stores": config.stores,
            "devices_per_store": config.devices_per_store,
            "devices": config.devices,
            "procs": config.procs,
            "control_plane": self.target.description,
        }
        cp_start = _process_figures(self.target.processes)
        async with self._api() as api:
            store_ids, specs, fingerprint = await self._create_stores(api, plan or no_faults(config.devices))
            report["store_ids"] = store_ids
            pool = self._pool(specs, fingerprint, plan)
            try:
                report["provision"] = await self._provision(api, pool, store_ids)
                if config.scenario == "steady":
                    report["steady"] = await self._steady(pool)
                elif config.scenario == "rollout":
                    report["rollout"] = await self._rollouts(api, store_ids)
                elif config.scenario == "storm":
                    report["storm"] = await self._storm(api, store_ids)
                elif config.scenario == "chaos":
                    assert plan is not None
                    report["chaos"] = await self._chaos(api, pool, store_ids, plan)
            finally:
                await pool.stop()
            report["health"] = await self._health_accounting(api, store_ids)
        report["simulator"] = self._simulator_figures()
        report["control_plane_process"] = _process_delta(cp_start, _process_figures(self.target.processes))
        report["errors"] = self.recorder.errors
        report["ok"] = _verdict(report)
        if config.plots_dir is not None:
            report["plots"] = write_plots(config.plots_dir, report=report, series=self.series)
        return report

    def _pool(self, specs: list[DeviceSpec], fingerprint: str, plan: FaultPlan | None) -> ShardPool:
        config = self.config
        agent_settings: dict[str, Any] = {
            "state_dir": Path(tempfile.gettempdir()) / "storefleet-sim-unused",
            "reconnect_min_s": config.reconnect_min_s,
            "reconnect_max_s": config.reconnect_max_s,
        }
        interval = config.health_interval_s or _default_health_interval(config)
        if interval is not None:
            agent_settings["health_interval_s"] = interval
        shards = min(config.procs, len(specs))
        configs = [
            ShardConfig(
                shard=n,
                server_url=self.target.base_url,
                ca_fingerprint=fingerprint,
                specs=tuple(specs[n::shards]),
                seed=config.seed,
                agent_settings=agent_settings,
                enroll_concurrency=max(1, config.enroll_concurrency // shards),
                faults=tuple(f for f in plan.faults if f.device_index % shards == n) if plan else (),
            )
            for n in range(shards)
        ]
        if config.procs == 1 and not config.isolate_agents:
            return LocalPool(configs[0], self._on_event)
        return ProcessPool(configs, self._on_event)

    async def _create_stores(
        self, api: httpx.AsyncClient, plan: FaultPlan
    ) -> tuple[list[str], list[DeviceSpec], str]:
        config = self.config
        run_id = f"{config.seed:04d}{int(time.time() * 10) % 1_000_000:06d}"
        gate = asyncio.Semaphore(API_CONCURRENCY)

        trading = set(plan.trading_stores)

        async def store(index: int) -> tuple[str, str, str]:
            store_id = f"SIM-{run_id}-{index:05d}"
            body: dict[str, Any] = {
                "id": store_id,
                "name": f"Simulated store {index}",
                "config": {"store": {"number": index}},
                "policies": {"screen_lock_timeout_s": 300},
            }
            if config.scenario == "chaos":
                # Trading hours in the store's own time zone: open around the clock until the
                # simulation closes it, or closed (in its maintenance window) from the start.
                body["timezone"] = STORE_ZONES[index % len(STORE_ZONES)]
                body["trading_hours"] = {"daily": "00:00-24:00" if index in trading else "closed"}
            async with gate:
                (await api.post("/v1/stores", json=body)).raise_for_status()
                token = (
                    (
                        await api.post(
                            f"/v1/stores/{store_id}/enrollment-tokens",
                            json={"max_uses": config.devices_per_store},
                        )
                    )
                    .raise_for_status()
                    .json()
                )
            return store_id, token["token"], token["ca_fingerprint"]

        stores = await asyncio.gather(*(store(i) for i in range(config.stores)))
        specs = []
        for s, (_, token, _) in enumerate(stores):
            for d in range(config.devices_per_store):
                index = s * config.devices_per_store + d
                behaviour = plan.behaviours[index]
                specs.append(
                    DeviceSpec(
                        index=index,
                        token=token,
                        role=ROLES[d % len(ROLES)],
                        apply_failure_rate=behaviour.apply_failure_rate,
                        apply_delay_s=behaviour.apply_delay_s,
                    )
                )
        return [s[0] for s in stores], specs, stores[0][2]

    async def _provision(
        self, api: httpx.AsyncClient, pool: ShardPool, store_ids: list[str]
    ) -> dict[str, Any]:
        config = self.config
        before = await self._ingest_accepted(api)
        self.phases["health_accepted_before"] = before.get("health", 0.0)
        self.phases["duplicates_not_stored_before"] = before["duplicates_not_stored"]
        self._phase("enroll", config.devices)
        enroll_started = time.monotonic()
        await pool.enroll()
        enroll_elapsed = time.monotonic() - enroll_started
        self._phase("apply first configuration", config.devices)
        start = time.monotonic()
        self.phases["agents_started"] = start
        await pool.start()
        converged = await self._until(
            "every device to apply its first configuration",
            lambda: self.recorder.applied_count() == config.devices,
        )
        applied_s = [min(r.applied.values()) - start for r in self.recorder.devices.values() if r.applied]
        by_store: dict[str, list[float]] = {}
        for record in self.recorder.devices.values():
            if record.applied:
                by_store.setdefault(record.store_id, []).append(min(record.applied.values()) - start)
        store_ready = [max(t) for t in by_store.values() if len(t) == config.devices_per_store]
        reported = await self._until_reported(api, store_ids, self.recorder.versions())
        rss = psutil.Process().memory_info().rss
        enroll_latency = [r.enroll_s for r in self.recorder.devices.values()]
        self.series["latencies"]["enroll"] = enroll_latency
        self.series["latencies"]["first config applied"] = applied_s
        self.series["store_ready"] = store_ready
        return {
            "converged": converged,
            "devices_enrolled": len(self.recorder.devices),
            "devices_applied": len(applied_s),
            "enroll": {
                "seconds": round(enroll_elapsed, 3),
                "per_second": round(len(enroll_latency) / enroll_elapsed, 1) if enroll_elapsed else None,
                "latency": summary(enroll_latency, unit="ms", digits=1),
            },
            "first_config_applied": summary(applied_s),
            "store_ready": {
                **summary(store_ready),
                "stores_ready": len(store_ready),
                "what": "seconds from agent start until every device of the store applied its configuration",
            },
            "control_plane_reported_all_seconds": reported,
            "driver_rss_mb": round(rss / 2**20, 1),
        }

    async def _until_reported(
        self, api: httpx.AsyncClient, store_ids: list[str], versions: dict[str, int]
    ) -> float | None:
        """Seconds until the control plane's view shows every device at `versions` (or newer)."""
        start = time.monotonic()
        deadline = start + self.config.timeout_s
        while time.monotonic() < deadline:
            devices = await self._devices(api, store_ids)
            behind = [d for d in devices if d["applied_version"] < versions.get(d["id"], 0)]
            if len(devices) >= len(versions) and not behind:
                return round(time.monotonic() - start, 3)
            await asyncio.sleep(max(POLL_S, len(devices) / 20_000))
        return None

    async def _steady(self, pool: ShardPool) -> dict[str, Any]:
        config = self.config
        self._phase("steady", None, total_s=config.duration_s)
        await pool.mark_cpu("steady_start")
        await self._sleep(config.duration_s)
        await pool.mark_cpu("steady_end")
        return {"duration_s": config.duration_s, "health_interval_s": config.health_interval_s or 1.0}

    async def _change_config(
        self, api: httpx.AsyncClient, store_ids: list[str], change: int
    ) -> dict[str, float]:
        """One configuration change per store; returns when each store's change was made."""
        gate = asyncio.Semaphore(API_CONCURRENCY)
        made: dict[str, float] = {}

        async def one(index: int, store_id: str) -> None:
            async with gate:
                at = time.monotonic()
                (
                    await api.put(
                        f"/v1/stores/{store_id}/config",
                        json={
                            "config": {"store": {"number": index}, "simulation": {"change": change}},
                            "policies": {"screen_lock_timeout_s": 300 + change},
                        },
                    )
                ).raise_for_status()
                made[store_id] = at

        await asyncio.gather(*(one(i, s) for i, s in enumerate(store_ids)))
        return made

    async def _propagate(self, api: httpx.AsyncClient, store_ids: list[str], change: int) -> dict[str, Any]:
        baseline = self.recorder.versions()
        self._phase(f"change {change}: applied", self.config.devices)
        self.baseline = baseline
        started = time.monotonic()
        made = await self._change_config(api, store_ids, change)
        put_s = time.monotonic() - started
        settled = await self._until(
            f"change {change} to reach every device",
            lambda: self.recorder.settled_count(baseline) == self.config.devices,
        )
        return await self._change_figures(
            api,
            store_ids,
            change,
            baseline=baseline,
            made=made,
            started=started,
            settled=settled,
            api_s=put_s,
        )

    async def _change_figures(
        self,
        api: httpx.AsyncClient,
        store_ids: list[str],
        change: int,
        *,
        baseline: dict[str, int],
        made: dict[str, float],
        started: float,
        settled: bool,
        api_s: float,
    ) -> dict[str, Any]:
        """A change's figures once it settled (or timed out): per device, from its store's
        `made` time to its first apply of a newer version; failures; until the control plane
        has every report. Also the progress and latency series for the plots."""
        all_settled = time.monotonic() - started
        latencies: list[float] = []
        failed = 0
        for record in self.recorder.devices.values():
            outcome = record.settled_after(baseline.get(record.device_id, 0))
            if outcome is None:
                continue
            if outcome[2]:
                latencies.append(outcome[1] - made[record.store_id])
            else:
                failed += 1
        reported = await self._until_reported(api, store_ids, self.recorder.versions())
        self.series["rollout_progress"] = rollout_progress(self.recorder, baseline, started, time.monotonic())
        self.series["latencies"][f"change {change} applied"] = latencies
        return {
            "settled": settled,
            "applied": len(latencies),
            "failed": failed,
            "pending": self.config.devices - len(latencies) - failed,
            "api_seconds": round(api_s, 3),
            "all_applied_or_failed_seconds": round(all_settled, 3),
            "propagation": summary(latencies),
            "control_plane_reported_all_seconds": reported,
        }

    async def _rollouts(self, api: httpx.AsyncClient, store_ids: list[str]) -> dict[str, Any]:
        changes = []
        for change in range(1, self.config.changes + 1):
            if self.config.via == "release":
                changes.append(await self._ship_release(api, store_ids, change))
            else:
                changes.append(await self._propagate(api, store_ids, change))
        what = {
            "release": "per change a release and a rollout of it to every store (one 100 % wave); "
            "per device: rollout created → applied; the next change once the rollout finished",
            "store-config": "PUT /v1/stores/{id}/config for every store; "
            "per device: its store's change → applied",
        }
        return {"what": what[self.config.via], "via": self.config.via, "changes": changes}

    async def _storm(self, api: httpx.AsyncClient, store_ids: list[str]) -> dict[str, Any]:
        assert self.target.storm is not None
        self._phase("reconnected after the storm", self.config.devices)
        down = time.monotonic()
        what = await self.target.storm(list(self.recorder.devices), self.config.downtime_s)
        up = time.monotonic()

        def back(record: Any) -> float | None:
            later = [t for t in record.connected_at if t > down]
            return later[0] if later else None

        done = await self._until(
            "every agent to reconnect",
            lambda: all(back(r) is not None for r in self.recorder.devices.values()),
        )
        all_back = time.monotonic()
        times = [t - up for r in self.recorder.devices.values() if (t := back(r)) is not None]
        self.series["latencies"]["reconnect after the storm"] = [max(t, 1e-3) for t in times]
        online_at: float | None = None
        deadline = time.monotonic() + self.config.timeout_s
        while time.monotonic() < deadline:
            devices = await self._devices(api, store_ids)
            if devices and all(d["online"] for d in devices):
                online_at = round(time.monotonic() - up, 3)
                break
            await asyncio.sleep(0.25)
        # Does the fleet still take a change after the storm?
        after = await self._propagate(api, store_ids, 1)
        return {
            "what": what,
            "all_reconnected": done,
            "broker_down_seconds": round(up - down, 3),
            "reconnected": len(times),
            "all_reconnected_seconds": round(all_back - up, 3),
            "reconnect": summary(times),
            "control_plane_all_online_seconds": online_at,
            "change_after_storm": after,
        }

    async def _ship_release(
        self,
        api: httpx.AsyncClient,
        store_ids: list[str],
        change: int,
        *,
        trading: frozenset[str] = frozenset(),
        close_at: float | None = None,
    ) -> dict[str, Any]:
        """A change shipped as an operator would: a release and a rollout of it (one 100 % wave)
        that respects trading hours. Devices of `trading` stores are deferred; those stores
        close at `close_at` (their trading hours are changed to closed through the API), and
        then their devices move too. Figures: as for a store configuration change (latency
        counted from the rollout, or from the closing for trading stores), plus the rollout's
        final state and, with trading stores, what the deferral did."""
        config = self.config
        baseline = self.recorder.versions()
        self.baseline = baseline
        self._phase(f"change {change}: applied", config.devices)
        name = f"{store_ids[0].rsplit('-', 1)[0].lower()}-{config.scenario}-{change}"
        release = {
            "id": name,
            "name": f"simulated change {change} ({config.scenario})",
            "layer": {
                "config": {"simulation": {"change": change}},
                "policies": {"screen_lock_timeout_s": 300 + change},
            },
        }
        patience = config.timeout_s + (config.chaos.duration_s + config.chaos.offline_s if trading else 0)
        rollout = {
            "id": name,
            "release_id": name,
            "selector": {"stores": store_ids},
            "plan": {
                "waves": [{"percent": 100}],
                "window": "closed_hours",
                "bake_s": 0.5,
                # Apply failures are counted (simulated or chaos), never a reason to stop.
                "success_threshold": 0.0,
                "failure_ratio": None,
                "keep_known_good": False,
                "apply_timeout_s": config.timeout_s,
                "offline_skip_after_s": patience,
            },
        }
        started = time.monotonic()
        (await api.post("/v1/releases", json=release)).raise_for_status()
        (await api.post("/v1/rollouts", json=rollout)).raise_for_status()
        api_s = time.monotonic() - started
        records = list(self.recorder.devices.values())

        def moved(record: Any) -> bool:
            return record.settled_after(baseline.get(record.device_id, 0)) is not None

        open_settled = await self._until(
            "the change to reach every device of the closed stores",
            lambda: all(moved(r) for r in records if r.store_id not in trading),
            patience,
        )
        closed_at = started
        trading_figures: dict[str, Any] | None = None
        if trading:
            deferred_seen = (await self._rollout_states(api, name)).get("deferred", 0)
            await self._sleep(max(0.0, (close_at or 0.0) - time.monotonic()))
            changed_while_trading = sorted(r.device_id for r in records if r.store_id in trading and moved(r))
            closed_at = time.monotonic()
            for store_id in sorted(trading):
                closing = {"trading_hours": {"daily": "closed"}}
                (await api.patch(f"/v1/stores/{store_id}", json=closing)).raise_for_status()
            trading_figures = {
                "stores": len(trading),
                "devices": sum(1 for r in records if r.store_id in trading),
                "deferred_while_trading": deferred_seen,
                "changed_while_trading": len(changed_while_trading),
                "changed_while_trading_devices": changed_while_trading[:20],
            }
        settled = await self._until(
            f"change {change} to reach every device",
            lambda: self.recorder.settled_count(baseline) == config.devices,
        )
        # Latency counts from the rollout, or for a trading store's devices from its closing.
        made = {store_id: closed_at if store_id in trading else started for store_id in store_ids}
        figures = await self._change_figures(
            api,
            store_ids,
            change,
            baseline=baseline,
            made=made,
            started=started,
            settled=open_settled and settled,
            api_s=api_s,
        )
        figures["rollout"] = {"id": name, **await self._rollout_finished(api, name, started)}
        if trading_figures is not None:
            after_closing = [
                outcome[1] - closed_at
                for record in records
                if record.store_id in trading
                and (outcome := record.settled_after(baseline.get(record.device_id, 0))) is not None
                and outcome[2]
            ]
            figures["trading"] = {**trading_figures, "applied_after_closing": summary(after_closing)}
        return figures

    async def _rollout_states(self, api: httpx.AsyncClient, rollout_id: str) -> dict[str, int]:
        view = (await api.get(f"/v1/rollouts/{rollout_id}")).raise_for_status().json()
        return dict(view["states"])

    async def _rollout_finished(
        self, api: httpx.AsyncClient, rollout_id: str, started: float
    ) -> dict[str, Any]:
        """The rollout's state once it stopped moving (or at the timeout): state, counts and
        seconds since `started` (the health gate included: a report after each apply)."""
        deadline = time.monotonic() + self.config.timeout_s
        while True:
            view = (await api.get(f"/v1/rollouts/{rollout_id}")).raise_for_status().json()
            if view["state"] not in ("scheduled", "running") or time.monotonic() > deadline:
                elapsed = round(time.monotonic() - started, 3)
                why: Counter[str] = Counter()
                for state in ("failed", "timed_out", "skipped"):
                    if view["states"].get(state):
                        listed = await api.get(
                            f"/v1/rollouts/{rollout_id}/devices", params={"state": state, "limit": 1000}
                        )
                        why.update(f"{state}: {d['reason']}" for d in listed.raise_for_status().json())
                return {
                    "state": view["state"],
                    "reason": view.get("reason"),
                    "states": view["states"],
                    "why_not_healthy": dict(why.most_common()),
                    "finished_seconds": elapsed,
                }
            await self._sleep(POLL_S)

    async def _chaos(
        self, api: httpx.AsyncClient, pool: ShardPool, store_ids: list[str], plan: FaultPlan
    ) -> dict[str, Any]:
        config = self.config
        self._phase("chaos", None, total_s=config.chaos.duration_s)
        started = time.monotonic()
        await pool.start_faults(started)
        await self._sleep(config.chaos.duration_s / 3)
        change = await self._ship_release(
            api,
            store_ids,
            1,
            trading=frozenset(store_ids[i] for i in plan.trading_stores),
            close_at=started + config.chaos.duration_s,
        )
        # To the end of the plan (and a moment for its last faults to be reported).
        await self._sleep(max(0.0, started + config.chaos.duration_s - time.monotonic()) + 0.3)
        injected = sorted((index, kind) for index, kind, _ in self.recorder.faults)
        return {
            "plan_digest": plan.digest(),
            "planned": plan.counts(),
            "injected": len(self.recorder.faults),
            "injected_faults": [f"{index}:{kind}" for index, kind in injected],
            "rates": {k: getattr(config.chaos, k) for k in config.chaos.__dataclass_fields__},
            "change": change,
        }

    async def _health_accounting(self, api: httpx.AsyncClient, store_ids: list[str]) -> dict[str, Any]:
        """After the agents stopped: health reports they sent vs what the control plane accepted."""
        accepted_before = self.phases.get("health_accepted_before", 0.0)
        per_device = self.recorder.per_device_final()
        sent = sum(d["health_published"] for d in per_device.values())
        # The last reports may still be on their way: wait until all arrived, or the count
        # stood still for a second (some were lost), at most 10 s.
        accepted, previous, still_since = 0.0, -1.0, time.monotonic()
        counts: dict[str, float] = {}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            counts = await self._ingest_accepted(api)
            accepted = counts.get("health", 0.0) - accepted_before
            if accepted >= sent or time.monotonic() - still_since > 1.0:
                break
            if accepted != previous:
                previous, still_since = accepted, time.monotonic()
            await asyncio.sleep(0.2)
        # The device rows follow with the ingest's flushes (a large fleet: several of them):
        # compare until they all match, or the mismatches stop shrinking for a second (10 s at most).
        last_seq_mismatch: list[str] = []
        deadline, still_since = time.monotonic() + 10, time.monotonic()
        while True:
            await asyncio.sleep(0.5)
            devices = {d["id"]: d for d in await self._devices(api, store_ids)}
            mismatch = [
                device_id
                for device_id, figures in per_device.items()
                if figures["health_published"]
                and ((devices.get(device_id) or {}).get("health") or {}).get("seq")
                != figures["health_published"] - 1
            ]
            if len(mismatch) < len(last_seq_mismatch) or not last_seq_mismatch:
                still_since = time.monotonic()
            last_seq_mismatch = mismatch
            if not mismatch or time.monotonic() - still_since > 1.0 or time.monotonic() > deadline:
                break
        run_s = time.monotonic() - self.phases.get("agents_started", time.monotonic())
        figures: dict[str, Any] = {
            "sent": sent,
            "accepted_by_control_plane": int(accepted),
            "lost": max(0, int(sent - accepted)),
            # Delivered more often than sent: a publish that failed on our side (session lost
            # before its PUBACK) but reached the broker, and was sent again.
            "duplicated": max(0, int(accepted - sent)),
            # Copies the control plane recognised and did not store again.
            "duplicates_not_stored": int(
                counts.get("duplicates_not_stored", 0.0)
                - self.phases.get("duplicates_not_stored_before", 0.0)
            ),
            "devices_whose_last_report_is_not_in_the_database": len(last_seq_mismatch),
            "qos": 0,
        }
        steady = self._marks("steady_start", "steady_end")
        if steady is not None:
            seconds = steady["seconds"]
            figures["steady_sent_per_second"] = round(steady["health"] / seconds, 1)
        else:
            figures["sent_per_second_over_run"] = round(sent / run_s, 1) if run_s > 0 else None
        return figures

    def _marks(self, start: str, end: str) -> dict[str, float] | None:
        totals = {"cpu": 0.0, "seconds": 0.0, "health": 0.0}
        found = False
        for final in self.recorder.finals.values():
            marks = final["cpu_marks"]
            if start in marks and end in marks:
                found = True
                totals["cpu"] += marks[end] - marks[start]
                totals["seconds"] = max(totals["seconds"], marks[end + "@"] - marks[start + "@"])
                totals["health"] += marks.get(end + ":health", 0) - marks.get(start + ":health", 0)
        return totals if found else None

    def _simulator_figures(self) -> dict[str, Any]:
        finals = list(self.recorder.finals.values())
        agents = sum(f["devices"] for f in finals) or 1
        added = sum(f["rss_added_mb"] for f in finals)
        figures: dict[str, Any] = {
            "shards": len(finals),
            "rss_mb_per_shard": [f["rss_mb"] for f in finals],
            "rss_added_kb_per_agent": round(1024 * added / agents, 1),
            "includes_control_plane": self.target.in_process
            and self.config.procs == 1
            and not self.config.isolate_agents,
        }
        steady = self._marks("steady_start", "steady_end")
        if steady is not None and steady["seconds"] > 0:
            figures["steady_cpu_percent_of_a_core"] = round(100 * steady["cpu"] / steady["seconds"], 2)
            figures["steady_cpu_percent_per_agent"] = round(
                100 * steady["cpu"] / steady["seconds"] / agents, 4
            )
        return figures

    def _phase(self, name: str, total: int | None, *, total_s: float | None = None) -> None:
        logger.info("phase: %s", name)
        if self.progress is not None:
            self.progress.phase(name, total, total_s=total_s, driver=self)


def _process_figures(processes: dict[str, psutil.Process]) -> dict[str, tuple[float, float, float]]:
    figures: dict[str, tuple[float, float, float]] = {}
    for name, process in processes.items():
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            figures[name] = (times.user + times.system, float(process.memory_info().rss), time.monotonic())
    return figures


def _process_delta(
    before: dict[str, tuple[float, float, float]], after: dict[str, tuple[float, float, float]]
) -> dict[str, Any]:
    figures = {}
    for name, (cpu1, rss, t1) in after.items():
        if name in before:
            cpu0, _, t0 = before[name]
            figures[name] = {
                "cpu_seconds": round(cpu1 - cpu0, 2),
                "cpu_percent_of_a_core": round(100 * (cpu1 - cpu0) / (t1 - t0), 1) if t1 > t0 else None,
                "rss_mb": round(rss / 2**20, 1),
            }
    return figures


def _default_health_interval(config: SimConfig) -> float | None:
    """steady: 1 s; where a rollout's health gate waits for reports after each apply (chaos,
    rollout via release): 1 s and 2 s; otherwise the control plane's (30 s by default)."""
    if config.scenario in ("steady", "chaos"):
        return 1.0
    if config.scenario == "rollout" and config.via == "release":
        return 2.0
    return None


def _verdict(report: dict[str, Any]) -> bool:
    if report["errors"] or not report["provision"]["converged"]:
        return False
    if report["scenario"] == "steady":
        return bool(report["health"]["lost"] == 0 and report["health"]["duplicated"] == 0)
    if report["scenario"] == "rollout":
        # (a store configuration change has no rollout to complete)
        finished = ("completed", None)
        return all(
            c["settled"] and c["failed"] == 0 and c.get("rollout", {}).get("state") in finished
            for c in report["rollout"]["changes"]
        )
    if report["scenario"] == "storm":
        return bool(report["storm"]["all_reconnected"] and report["storm"]["change_after_storm"]["settled"])
    if report["scenario"] == "chaos":
        change = report["chaos"]["change"]
        return bool(
            change["settled"]
            and change.get("trading", {}).get("changed_while_trading", 0) == 0
            and change["rollout"]["state"] == "completed"
        )
    return True


async def run_scenario(
    config: SimConfig, target: Target | None = None, **embedded_overrides: Any
) -> dict[str, Any]:
    """Run `config` against `target`, or against an embedded control plane started for it."""
    from simulators.progress import LiveProgress

    progress = None if config.quiet or not sys.stderr.isatty() else LiveProgress()
    async with contextlib.AsyncExitStack() as stack:
        if target is None:
            target = await stack.enter_async_context(embedded_target(**embedded_overrides))
        if progress is not None:
            stack.enter_context(progress)
        return await Driver(config, target, progress=progress).run()
    raise AssertionError("unreachable")
