"""Store provisioning end to end: S stores x D devices from "store created" to "ready".

    python -m benchmarks.provision_ready --stores 100 [--arrival all|staggered] [--postgres] [--mosquitto]
        [--json out.json]

The control plane runs in this process (as the tests run it: embedded amqtt broker and SQLite
by default; `--postgres` a fresh database on the local PostgreSQL; `--mosquitto` an external
Mosquitto configured by the product's own generator), with the product's default ingest and
provisioning intervals. A template with 10 devices per store (2 pos, 6 tablet, 1 kiosk,
1 backoffice) is created, then every store is created from it through the API, all at once:
the stress case of a chain opening S stores at the same moment. Each answer carries the
saga's role-scoped tokens. With `--arrival staggered` the fleet process creates each store
itself just before its devices enroll, so a store's time to ready is the saga's own latency
(enroll, connect, apply, report, verify) under the same load, without the queue of stores.

A second process is the fleet: the simulator's real agents (own key, CSR, HTTPS enrollment
with the saga's tokens, mTLS MQTT session, reconciler, health reports). Stores enroll
`--store-concurrency` at a time (10 enrollments in flight each); each device's agent starts
as soon as its store's devices are enrolled. The saga takes each store to ready on its own.

Measured: per-store time to ready as the control plane records it (`seconds_to_ready`,
store created → ready: p50, p95, max), and the total from the first store created to the last
ready; the time to create the stores; enrollment rate; control-plane CPU; saga worker passes.
The measuring phase holds /tmp/storefleet-bench.lock (other benchmarks share the two cores).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil
import sqlalchemy as sa

from benchmarks.common import benchmark_control_plane, emit_report, measuring_lock_async, percentile
from control_plane.db.schema import store_provisioning

MANIFEST = {"pos": 2, "tablet": 6, "kiosk": 1, "backoffice": 1}
GOAL_SECONDS = 30.0


# --- the fleet (child process) ---------------------------------------------------------------


def fleet_process(
    conn: Connection, server_url: str, stores: list[Any], concurrency: int, creator: dict[str, str] | None
) -> None:
    """Enroll and run every store's devices; report; keep them running until told to stop.

    `stores`: each store's tokens (stores made by the parent), or, with `creator` (admin key
    and CA file), store ids this process creates itself just before enrolling their devices."""
    asyncio.run(_fleet(conn, server_url, stores, concurrency, creator))


async def _create_store(server_url: str, creator: dict[str, str], store_id: str) -> list[dict[str, Any]]:
    import ssl

    import httpx

    async with httpx.AsyncClient(
        base_url=server_url,
        verify=ssl.create_default_context(cafile=creator["ca_file"]),
        headers={"Authorization": f"Bearer {creator['admin_key']}"},
        timeout=60,
    ) as api:
        response = await api.post(
            "/v1/stores", json={"id": store_id, "name": store_id, "template_id": "bench"}
        )
        response.raise_for_status()
        tokens: list[dict[str, Any]] = response.json()["enrollment_tokens"]
        return tokens


async def _fleet(
    conn: Connection, server_url: str, stores: list[Any], concurrency: int, creator: dict[str, str] | None
) -> None:
    from simulators.fleet import DeviceSpec, Fleet, enroll_fleet, simulator_settings

    fleets: list[Fleet] = []
    failures: list[str] = []
    gate = asyncio.Semaphore(concurrency)
    with simulator_settings(reconnect_min_s=0.2, reconnect_max_s=5.0) as settings:
        started = time.perf_counter()

        async def one_store(index: int, store: Any) -> None:
            try:
                async with gate:
                    tokens = await _create_store(server_url, creator, store) if creator else store
                    specs = [
                        DeviceSpec(token=token["token"], role=token["role"], model=f"{token['role']}-sim")
                        for token in tokens
                        for _ in range(token["max_uses"])
                    ]
                    fleet = await enroll_fleet(
                        specs,
                        server_url=server_url,
                        ca_fingerprint=tokens[0]["ca_fingerprint"],
                        settings=settings,
                        seed=index,
                        concurrency=len(specs),
                    )
            except Exception as exc:  # reported, not hidden: the store then never gets ready
                failures.append(f"store {index}: {exc!r}"[:300])
                return
            fleet.start()
            fleets.append(fleet)

        await asyncio.gather(*(one_store(i, store) for i, store in enumerate(stores)))
        enrolled_at = time.perf_counter()
        enroll = [device.enroll_seconds for fleet in fleets for device in fleet.devices]
        conn.send(
            {
                "enroll_seconds": enrolled_at - started,
                "devices": len(enroll),
                "enroll_p50_ms": 1000 * percentile(enroll, 0.5),
                "enroll_p99_ms": 1000 * percentile(enroll, 0.99),
                "failures": failures,
            }
        )
        await asyncio.to_thread(conn.recv)  # "stop"
        for fleet in fleets:
            await fleet.stop()


# --- the run --------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from tests.support.control_plane import ADMIN_KEY

    async with contextlib.AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="storefleet-bench-")))
        cp, _ = await benchmark_control_plane(stack, tmp, postgres=args.postgres, mosquitto=args.mosquitto)
        services = cp.control_plane.services
        template = {
            "id": "bench",
            "name": "Benchmark store",
            "manifest": MANIFEST,
            "timezone": "Europe/Berlin",
        }
        (await cp.api.post("/v1/templates", json=template)).raise_for_status()
        devices_per_store = sum(MANIFEST.values())

        async with measuring_lock_async():
            own = psutil.Process()
            cpu_before = sum(own.cpu_times()[:2])
            passes0, pass_seconds0 = (
                services.provisioning_worker.passes,
                services.provisioning_worker.pass_seconds,
            )
            run_id = f"{int(time.time()) % 100000:05d}"
            store_ids = [f"BENCH-{run_id}-{i:04d}" for i in range(args.stores)]
            created_started = time.perf_counter()
            stores: list[Any] = store_ids
            creator = None
            if args.arrival == "staggered":
                creator = {"admin_key": ADMIN_KEY, "ca_file": str(cp.ca_file)}
            else:
                stores = []
                for store_id in store_ids:
                    response = await cp.api.post(
                        "/v1/stores", json={"id": store_id, "name": store_id, "template_id": "bench"}
                    )
                    response.raise_for_status()
                    stores.append(response.json()["enrollment_tokens"])
            create_seconds = time.perf_counter() - created_started

            ctx = multiprocessing.get_context("spawn")
            parent_end, child_end = ctx.Pipe()
            child = ctx.Process(
                target=fleet_process,
                args=(child_end, cp.base_url, stores, args.store_concurrency, creator),
            )
            child.start()
            try:
                enrolled: dict[str, Any] = {}
                states: dict[str, int] = {}
                deadline = time.monotonic() + args.timeout
                while time.monotonic() < deadline:
                    if not enrolled and parent_end.poll():
                        enrolled = parent_end.recv()
                    async with services.engine.connect() as db:
                        states = dict(
                            (
                                await db.execute(
                                    sa.select(store_provisioning.c.state, sa.func.count()).group_by(
                                        store_provisioning.c.state
                                    )
                                )
                            ).all()
                        )
                    if states.get("ready", 0) == args.stores and sum(states.values()) == args.stores:
                        break
                    if not child.is_alive() and not enrolled:
                        raise RuntimeError("the fleet process exited without a report")
                    await asyncio.sleep(0.5)
                cpu_seconds = sum(own.cpu_times()[:2]) - cpu_before
                fleet_cpu_seconds = sum(psutil.Process(child.pid).cpu_times()[:2]) if child.pid else 0.0
                if not enrolled:
                    enrolled = await asyncio.to_thread(parent_end.recv)
            finally:
                with contextlib.suppress(OSError):
                    parent_end.send("stop")
                await asyncio.to_thread(child.join, 60)  # not on the loop: the control plane runs on it
                if child.is_alive():
                    child.terminate()

        async with services.engine.connect() as db:
            rows = (
                await db.execute(
                    sa.select(
                        store_provisioning.c.started_at,
                        store_provisioning.c.ready_at,
                        store_provisioning.c.seconds_to_ready,
                    )
                )
            ).all()
        ready = [row.seconds_to_ready for row in rows if row.seconds_to_ready is not None]
        first_created = min(row.started_at for row in rows)
        last_ready = max((row.ready_at for row in rows if row.ready_at is not None), default=None)
        total = (
            (last_ready - first_created).total_seconds() if last_ready and len(ready) == args.stores else None
        )
        backend = "PostgreSQL" if args.postgres else "SQLite"
        broker = "Mosquitto" if args.mosquitto else "embedded amqtt broker"
        worker = services.provisioning_worker
        return {
            "benchmark": "provision_ready",
            "backend": f"{backend}, {broker}",
            "stores": args.stores,
            "devices_per_store": devices_per_store,
            "manifest": MANIFEST,
            "stores_ready": len(ready),
            "states": states,
            "store_seconds_to_ready": {
                "p50": round(percentile(ready, 0.5), 2),
                "p95": round(percentile(ready, 0.95), 2),
                "max": round(max(ready), 2) if ready else None,
                "min": round(min(ready), 2) if ready else None,
            },
            "total_seconds_first_created_to_last_ready": round(total, 2) if total is not None else None,
            "arrival": args.arrival,
            "create_stores_seconds": round(create_seconds, 2) if args.arrival == "all" else None,
            "enroll": {
                "devices": enrolled.get("devices"),
                "seconds": round(enrolled.get("enroll_seconds", 0.0), 2),
                "per_second": round(enrolled["devices"] / enrolled["enroll_seconds"], 1)
                if enrolled.get("enroll_seconds")
                else None,
                "latency_p50_ms": round(enrolled.get("enroll_p50_ms", 0.0), 1),
                "latency_p99_ms": round(enrolled.get("enroll_p99_ms", 0.0), 1),
                "failures": enrolled.get("failures", []),
                "store_concurrency": args.store_concurrency,
            },
            "control_plane_cpu_seconds": round(cpu_seconds, 2),
            "fleet_process_cpu_seconds": round(fleet_cpu_seconds, 2),
            "saga_worker": {
                "passes": worker.passes - passes0,
                "seconds_in_passes": round(worker.pass_seconds - pass_seconds0, 2),
                "interval_s": cp.settings.provisioning_interval_s,
            },
            "ingest_flush_interval_s": cp.settings.ingest_flush_interval_s,
            "goal": f"all {args.stores} stores ready < {GOAL_SECONDS:.0f} s after creation",
            "goal_met": total is not None and total < GOAL_SECONDS,
        }
    raise AssertionError("unreachable")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stores", type=int, default=100)
    parser.add_argument(
        "--store-concurrency", type=int, default=2, help="stores enrolling at once (10 devices each)"
    )
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument(
        "--arrival",
        choices=("all", "staggered"),
        default="all",
        help="all: every store created at once, then the devices come; staggered: each store is created "
        "just before its devices enroll (the saga's own latency under the same load)",
    )
    parser.add_argument("--postgres", action="store_true", help="a fresh database on the local PostgreSQL")
    parser.add_argument("--mosquitto", action="store_true", help="an external Mosquitto broker")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("STOREFLEET_LOG_LEVEL", "WARNING")
    import logging

    logging.basicConfig(level=logging.WARNING)
    report = asyncio.run(run(args))
    emit_report(report, args.json)


if __name__ == "__main__":
    main()
