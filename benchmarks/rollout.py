"""A release to N simulated devices in one 100 % wave, then a rollback of all of them.

    python -m benchmarks.rollout --devices 2000 [--mosquitto] [--postgres] [--json out.json]

The control plane runs in this process (as the tests run it; `--mosquitto` an external
Mosquitto configured by the product's own generator, `--postgres` a fresh database on the
local PostgreSQL). The fleet is real agent code (`simulators.fleet`: enrollment over HTTPS,
one mTLS MQTT session per device, the reconciler, an in-memory apply handler) in a second
process, so the control plane's CPU is measured apart from the devices'.

Measured, from the rollout's POST:
* `all_applied_s`: every agent has applied the new version (agent-side timestamps);
* `all_reported_s`: the control plane knows it (every rollout device applied or healthy);
* `completed_s`: the health gate passed (a health report after the apply; one health
  interval of the agents at most) and the rollout is `completed`;
and from the rollback's POST: `rollback_applied_s` (every agent runs the new version with the
old content) and `rollback_reported_s`. CPU seconds and peak RSS of this process (the
control plane) over each phase. Goal (issue 5): 10,000 devices applied and reported < 5 s,
rollback < 10 s, on Mosquitto.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil

from benchmarks.common import benchmark_control_plane, emit_report, measuring_lock_async

STORE_ID = "BENCH-ROLLOUT"


# --- the fleet (child process) ----------------------------------------------------------------


def fleet_process(
    conn: Connection, base_url: str, fingerprint: str, token: str, count: int, health_s: float
) -> None:
    asyncio.run(_fleet(conn, base_url, fingerprint, token, count, health_s))


async def _fleet(
    conn: Connection, base_url: str, fingerprint: str, token: str, count: int, health_s: float
) -> None:
    from simulators.fleet import DeviceSpec, enroll_fleet, simulator_settings

    applied: dict[str, tuple[int, float]] = {}

    def on_applied(device_id: str, version: int) -> None:
        applied[device_id] = (version, time.time())

    with simulator_settings(
        health_interval_s=health_s, reconnect_min_s=0.5, reconnect_max_s=5, http_timeout_s=120
    ) as settings:
        started = time.perf_counter()
        fleet = await enroll_fleet(
            [DeviceSpec(token=token, role="pos") for _ in range(count)],
            server_url=base_url,
            ca_fingerprint=fingerprint,
            settings=settings,
            concurrency=32,
            on_applied=on_applied,
        )
        enrolled_s = time.perf_counter() - started
        fleet.start()
        try:
            await _all_at(applied, count, 1, within_s=300)
            conn.send({"enroll_seconds": enrolled_s, "ready_seconds": time.perf_counter() - started})
            while True:
                command = await asyncio.to_thread(conn.recv)
                if command == "stop":
                    return
                last = await _all_at(applied, count, int(command), within_s=300)
                conn.send(last)
        finally:
            await fleet.stop()


async def _all_at(
    applied: dict[str, tuple[int, float]], count: int, version: int, *, within_s: float
) -> float:
    """Wall-clock time at which the last device applied `version` (or later)."""
    deadline = time.monotonic() + within_s
    while True:
        done = [at for v, at in applied.values() if v >= version]
        if len(done) == count:
            return max(done)
        if time.monotonic() > deadline:
            return float("nan")
        await asyncio.sleep(0.05)


# --- the control plane (this process) ---------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:

    async with contextlib.AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="storefleet-bench-")))
        cp, _ = await benchmark_control_plane(
            stack, tmp, postgres=args.postgres, mosquitto=args.mosquitto, rollout_tick_s=args.tick
        )
        await cp.create_store(STORE_ID, config={"pos": {"currency": "EUR"}})
        token = await cp.create_token(STORE_ID, max_uses=args.devices)

        ctx = multiprocessing.get_context("spawn")
        parent, child_end = ctx.Pipe()
        child = ctx.Process(
            target=fleet_process,
            args=(
                child_end,
                cp.base_url,
                token["ca_fingerprint"],
                token["token"],
                args.devices,
                args.health_interval,
            ),
        )
        child.start()
        try:
            ready = await _receive(parent, child)
            me = psutil.Process()
            response = await cp.api.post(
                "/v1/releases",
                json={"id": "bench", "name": "bench", "layer": {"config": {"pos": {"tax": 21}}}},
            )
            response.raise_for_status()
            body = {
                "id": "ro-bench",
                "release_id": "bench",
                "selector": {"stores": [STORE_ID]},
                "plan": {
                    "waves": [{"percent": 100}],
                    "bake_s": 0,
                    "apply_timeout_s": 120,
                    "heartbeat_grace_s": 120,
                    "window": "now",
                    "keep_known_good": False,
                },
            }
            async with measuring_lock_async():
                cpu0, started = _cpu(me), time.time()
                (await cp.api.post("/v1/rollouts", json=body)).raise_for_status()
                parent.send("2")
                issued = await _wait_issued(cp, args.devices, started)
                reported = await _wait_states(cp, {"applied", "healthy"}, args.devices, started)
                completed = await _wait_rollout(cp, "completed", started)
                applied_at = await _receive(parent, child)
                rollout_cpu, rollout_rss = _cpu(me) - cpu0, me.memory_info().rss / 2**20

                cpu1, rb_started = _cpu(me), time.time()
                (await cp.api.post("/v1/rollouts/ro-bench/rollback")).raise_for_status()
                parent.send("3")
                rolled = await _wait_rollout(cp, "rolled_back", rb_started)
                rb_reported = await _wait_applied_version(cp, 3, args.devices, rb_started)
                rb_applied_at = await _receive(parent, child)
                rollback_cpu, rollback_rss = _cpu(me) - cpu1, me.memory_info().rss / 2**20
            parent.send("stop")
        finally:
            child.join(timeout=60)
            if child.is_alive():
                child.terminate()
    return {
        "benchmark": "rollout",
        "backend": ", ".join(
            ["PostgreSQL" if args.postgres else "SQLite", "Mosquitto" if args.mosquitto else "embedded amqtt"]
        ),
        "devices": args.devices,
        "rollout_tick_s": args.tick,
        "agent_health_interval_s": args.health_interval,
        "enroll_seconds": round(ready["enroll_seconds"], 1),
        "all_issued_s": round(issued, 2),
        "all_applied_s": round(applied_at - started, 2),
        "all_reported_s": round(reported, 2),
        "completed_s": round(completed, 2),
        "rollout_cpu_s": round(rollout_cpu, 2),
        "rollout_rss_mb": round(rollout_rss),
        "rollback_issued_s": round(rolled, 2),
        "rollback_applied_s": round(rb_applied_at - rb_started, 2),
        "rollback_reported_s": round(rb_reported, 2),
        "rollback_cpu_s": round(rollback_cpu, 2),
        "rollback_rss_mb": round(rollback_rss),
        "goal": "10000 devices: applied and reported < 5 s, rollback < 10 s (Mosquitto)",
    }


async def _receive(parent: Connection, child: Any) -> Any:
    """The fleet's next message; fails instead of waiting forever if the fleet died."""
    while not await asyncio.to_thread(parent.poll, 1.0):
        if not child.is_alive():
            raise RuntimeError(f"the fleet process exited ({child.exitcode})")
    return parent.recv()


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def _wait_states(cp: Any, states: set[str], count: int, started: float) -> float:
    while True:
        view = (await cp.api.get("/v1/rollouts/ro-bench")).json()
        if sum(n for state, n in view["states"].items() if state in states) >= count:
            return time.time() - started
        await asyncio.sleep(0.05)


async def _wait_issued(cp: Any, count: int, started: float) -> float:
    """Every device has its new version issued (signed, stored; publishing follows)."""
    import sqlalchemy as sa

    from control_plane.db.schema import rollout_devices

    while True:
        async with cp.control_plane.services.engine.connect() as conn:
            done = await conn.scalar(
                sa.select(sa.func.count()).where(rollout_devices.c.target_version.is_not(None))
            )
        if (done or 0) >= count:
            return time.time() - started
        await asyncio.sleep(0.02)


async def _wait_rollout(cp: Any, state: str, started: float) -> float:
    while True:
        view = (await cp.api.get("/v1/rollouts/ro-bench")).json()
        if view["state"] == state:
            return time.time() - started
        if view["state"] in ("paused", "rolled_back") and view["state"] != state:
            raise RuntimeError(f"rollout ended {view['state']}: {view['reason']}")
        await asyncio.sleep(0.05)


async def _wait_applied_version(cp: Any, version: int, count: int, started: float) -> float:
    import sqlalchemy as sa

    from control_plane.db.schema import devices

    while True:
        async with cp.control_plane.services.engine.connect() as conn:
            done = await conn.scalar(sa.select(sa.func.count()).where(devices.c.applied_version >= version))
        if (done or 0) >= count:
            return time.time() - started
        await asyncio.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--mosquitto", action="store_true", help="an external Mosquitto broker")
    parser.add_argument("--postgres", action="store_true", help="a fresh database on the local PostgreSQL")
    parser.add_argument("--tick", type=float, default=0.25, help="rollout_tick_s of the control plane")
    parser.add_argument("--health-interval", type=float, default=5.0, help="agents' health interval (s)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    emit_report(asyncio.run(run(args)), args.json)


if __name__ == "__main__":
    main()
