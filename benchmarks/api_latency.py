"""Operator API latency under a fixed arrival rate, with 10,000 devices in the database.

    python -m benchmarks.api_latency --rate 500 --seconds 30
    python -m benchmarks.api_latency --rate 500 --seconds 30 --postgres --mosquitto

`storefleet serve` runs in its own process; 100 stores x 100 devices are written straight
into its database (enrolling 10,000 devices is the enrollment benchmark's job), plus 20
stores without devices for the writes. The load generator is open-loop: request i is sent at
t0 + i/rate whatever happened to the earlier ones, so a slow server builds a queue and the
latency counts from the *scheduled* time (no coordinated omission). Mix (weights):

    GET  /v1/devices/{id}                          40   one device
    GET  /v1/devices?store_id=…&limit=100          20   one store's devices (a page of 100)
    GET  /v1/stores/{id}                           15
    GET  /v1/stores                                 5   all 120 stores
    POST /v1/stores/{id}/enrollment-tokens         10   write
    PUT  /v1/stores/{id}/config                    10   write (stores without devices: no fan-out)

Figures per endpoint: count, errors, p50/p95/p99 from the scheduled time (and p95 service
time from the send). At most 64 requests are on the wire at once; the rest wait (and the
wait counts). Goal: p95 < 50 ms at 500 requests/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import ssl
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import create_async_engine

from benchmarks.common import (
    ServerProcess,
    control_plane_process,
    emit_report,
    measuring_lock_async,
    percentile,
)
from control_plane.db.schema import devices, stores

RESULTS = Path(__file__).parent / "results"
STORES = 100
EMPTY_STORES = 20
IN_FLIGHT = 64
MIX = [
    ("GET /v1/devices/{id}", 40),
    ("GET /v1/devices?store_id", 20),
    ("GET /v1/stores/{id}", 15),
    ("GET /v1/stores", 5),
    ("POST /v1/stores/{id}/enrollment-tokens", 10),
    ("PUT /v1/stores/{id}/config", 10),
]


async def seed(database_url: str, devices_per_store: int) -> list[str]:
    """Stores and devices straight into the control plane's database; returns the device ids."""
    engine = create_async_engine(database_url)
    now = datetime.now(UTC)
    device_ids: list[str] = []
    try:
        async with engine.begin() as conn:
            await conn.execute(
                stores.insert(),
                [
                    {
                        "id": f"API-{n:04d}",
                        "name": f"API store {n}",
                        "timezone": "Europe/Berlin",
                        "region": "EMEA",
                        "config": {"config": {"store": {"number": n}}, "policies": {}},
                        "created_at": now,
                        "updated_at": now,
                    }
                    for n in range(STORES + EMPTY_STORES)
                ],
            )
            rows = []
            for n in range(STORES):
                for d in range(devices_per_store):
                    device_id = f"dev-api-{n:04d}-{d:05d}"
                    device_ids.append(device_id)
                    rows.append(
                        {
                            "id": device_id,
                            "store_id": f"API-{n:04d}",
                            "role": "pos",
                            "model": "seeded",
                            "serial": f"S{n:04d}{d:05d}",
                            "os": "seeded",
                            "hostname": f"h{n}-{d}",
                            "agent_version": "0.1.0",
                            "enrolled_at": now,
                            "last_seen_at": now,
                            "online": d % 10 != 0,
                            "desired_version": 1,
                            "applied_version": 1,
                            "apply_status": "applied",
                            "health": {"seq": 1, "cpu_percent": 12.5, "healthy": True},
                            "health_at": now,
                            "health_seq": 1,
                        }
                    )
            for start in range(0, len(rows), 1000):
                await conn.execute(devices.insert(), rows[start : start + 1000])
    finally:
        await engine.dispose()
    return device_ids


def request_for(kind: str, rng: random.Random, device_ids: list[str], n: int) -> tuple[str, str, Any]:
    store = f"API-{rng.randrange(STORES):04d}"
    empty = f"API-{STORES + rng.randrange(EMPTY_STORES):04d}"
    if kind == "GET /v1/devices/{id}":
        return "GET", f"/v1/devices/{rng.choice(device_ids)}", None
    if kind == "GET /v1/devices?store_id":
        return "GET", f"/v1/devices?store_id={store}&limit=100", None
    if kind == "GET /v1/stores/{id}":
        return "GET", f"/v1/stores/{store}", None
    if kind == "GET /v1/stores":
        return "GET", "/v1/stores", None
    if kind == "POST /v1/stores/{id}/enrollment-tokens":
        return "POST", f"/v1/stores/{empty}/enrollment-tokens", {"max_uses": 1}
    return "PUT", f"/v1/stores/{empty}/config", {"config": {"bench": {"n": n}}, "policies": {}}


async def generate(
    server: ServerProcess, device_ids: list[str], *, rate: float, seconds: float, warmup_s: float, seed: int
) -> dict[str, Any]:
    # Load generation, not security: a seeded PRNG makes the request sequence reproducible.
    rng = random.Random(seed)  # noqa: S311
    kinds = [kind for kind, weight in MIX for _ in range(weight)]
    results: dict[str, list[tuple[float, float, bool]]] = defaultdict(list)
    errors: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    async with httpx.AsyncClient(
        base_url=server.url,
        verify=ssl.create_default_context(cafile=str(server.ca_file)),
        headers={"Authorization": f"Bearer {server.admin_key}"},
        timeout=30,
        limits=httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT),
    ) as client:
        # At most IN_FLIGHT requests on the wire (httpx's pool slows down badly with thousands
        # queued); a request waiting for a slot still counts its latency from its scheduled time.
        slots = asyncio.Semaphore(IN_FLIGHT)

        async def one(n: int, scheduled: float, measured: bool) -> None:
            kind = rng.choice(kinds)
            method, url, body = request_for(kind, rng, device_ids, n)
            async with slots:
                sent = time.monotonic()
                ok = await send(kind, method, url, body)
            done = time.monotonic()
            if measured:
                results[kind].append((done - scheduled, done - sent, ok))

        async def send(kind: str, method: str, url: str, body: Any) -> bool:
            try:
                response = await client.request(method, url, json=body)
                ok = response.status_code < 400
                if not ok:
                    errors[kind][str(response.status_code)] += 1
            except httpx.HTTPError as exc:
                errors[kind][type(exc).__name__] += 1
                return False
            return ok

        tasks: set[asyncio.Task[None]] = set()
        start = time.monotonic() + 0.1
        total = int(rate * (warmup_s + seconds))
        warm = int(rate * warmup_s)
        lag_max = 0.0
        for n in range(total):
            scheduled = start + n / rate
            delay = scheduled - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                lag_max = max(lag_max, -delay)
            task = asyncio.create_task(one(n, scheduled, n >= warm))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        sent_all = time.monotonic()
        await asyncio.gather(*tasks)
    per_endpoint = {}
    everything: list[float] = []
    for kind, _ in MIX:
        samples = results.get(kind, [])
        latencies = [s[0] for s in samples]
        everything += latencies
        per_endpoint[kind] = {
            "count": len(samples),
            "errors": sum(1 for s in samples if not s[2]),
            "error_kinds": dict(errors.get(kind, {})),
            "p50_ms": round(1000 * percentile(latencies, 0.5), 1),
            "p95_ms": round(1000 * percentile(latencies, 0.95), 1),
            "p99_ms": round(1000 * percentile(latencies, 0.99), 1),
            "p95_service_ms": round(1000 * percentile([s[1] for s in samples], 0.95), 1),
        }
    measured_n = sum(len(v) for v in results.values())
    return {
        "rate_offered": rate,
        "seconds": seconds,
        "requests_measured": measured_n,
        "achieved_per_second": round(measured_n / max(1e-9, sent_all - (start + warmup_s)), 1),
        "generator_max_lag_ms": round(1000 * lag_max, 1),
        "all": {
            "p50_ms": round(1000 * percentile(everything, 0.5), 1),
            "p95_ms": round(1000 * percentile(everything, 0.95), 1),
            "p99_ms": round(1000 * percentile(everything, 0.99), 1),
            "errors": sum(v["errors"] for v in per_endpoint.values()),
        },
        "per_endpoint": per_endpoint,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    async with contextlib.AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="storefleet-api-")))
        data_dir = tmp / "data"
        extra: list[str] = []
        database_url = f"sqlite+aiosqlite:///{data_dir / 'storefleet.db'}"
        if args.postgres:
            from tests.support.postgres import fresh_database

            database_url = await stack.enter_async_context(fresh_database())
            extra += ["--database-url", database_url]
        if args.mosquitto:
            from control_plane.pki.ca import BuiltinCA
            from control_plane.pki.files import write_public
            from tests.support.mosquitto import MosquittoProcess

            ca = BuiltinCA.load_or_create(data_dir / "pki", trust_domain="storefleet.local")
            crl_file = data_dir / "pki" / "crl.pem"
            write_public(crl_file, ca.crl_pem([]).encode())
            broker = MosquittoProcess(
                ca, tmp / "mosquitto", client_id_from_certificate=True, crl_file=crl_file
            )
            host, port = await stack.enter_async_context(broker)
            extra += ["--broker-url", f"mqtts://{host}:{port}"]
        server = stack.enter_context(control_plane_process(*extra, data_dir=data_dir))
        device_ids = await seed(database_url, args.devices // STORES)
        async with measuring_lock_async():
            cpu0, started, own0 = server.cpu_seconds(), time.monotonic(), time.process_time()
            figures = await generate(
                server, device_ids, rate=args.rate, seconds=args.seconds, warmup_s=args.warmup, seed=args.seed
            )
            cpu, elapsed = server.cpu_seconds() - cpu0, time.monotonic() - started
            own = time.process_time() - own0
        requests = int(args.rate * (args.seconds + args.warmup))
        return {
            "benchmark": "api_latency",
            "backend": ("PostgreSQL" if args.postgres else "SQLite")
            + (", Mosquitto" if args.mosquitto else ", embedded amqtt"),
            "devices_in_database": len(device_ids),
            "stores_in_database": STORES + EMPTY_STORES,
            "mix": dict(MIX),
            **figures,
            "elapsed_seconds": round(elapsed, 1),
            "control_plane_cpu_percent_of_a_core": round(100 * cpu / elapsed, 1),
            "control_plane_cpu_ms_per_request": round(1000 * cpu / requests, 2),
            "control_plane_rss_mb": round(server.rss_mb(), 1),
            # The load generator (httpx, TLS) shares the machine: what it costs limits the rate.
            "load_generator_cpu_ms_per_request": round(1000 * own / requests, 2),
            "goal": "p95 < 50 ms at 500 requests/s, no errors",
            "goal_met": figures["all"]["p95_ms"] < 50 and figures["all"]["errors"] == 0,
        }
    raise AssertionError("unreachable")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.api_latency", description=__doc__)
    parser.add_argument("--rate", type=float, default=500.0, help="requests per second (open loop)")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--postgres", action="store_true")
    parser.add_argument("--mosquitto", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = asyncio.run(run(args))
    name = (
        "api-latency-"
        + ("postgres" if args.postgres else "sqlite")
        + ("-mosquitto" if args.mosquitto else "")
    )
    emit_report(report, args.json or RESULTS / f"{name}.json")


if __name__ == "__main__":
    main()
