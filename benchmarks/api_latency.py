"""Operator API latency under a fixed arrival rate, with 10,000 devices in the database.

    python -m benchmarks.api_latency --rate 500 --seconds 30
    python -m benchmarks.api_latency --rate 500 --seconds 30 --postgres --mosquitto
    python -m benchmarks.api_latency --rate 500 --seconds 30 --generator wrk   # apt-get install wrk

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

`--generator wrk` sends the same mix with wrk (C + LuaJIT: a fraction of httpx's CPU per
request, so the generator is no longer what limits the rate on this two-core machine).
wrk is closed-loop: each of `--connections` connections (default rate/8) waits a random
(exponential) pause with mean `connections / rate` between its requests, which offers about
`rate` while responses are fast against the pause (~125 ms); when the server slows down,
the achieved rate falls below the offered one (both are reported) and latency counts from
the send, not from a schedule. Aggregate figures only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import resource
import shutil
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
    server_backend,
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


WRK_SCRIPT = """
-- The api_latency mix (weights as in MIX), paced to offer `rate` over all connections.
local stores, empty, per_store, mean_pause_ms = %(stores)d, %(empty)d, %(per_store)d, %(pause_ms)f
local kinds = {%(kinds)s}
local counter = 0
wrk.headers["Authorization"] = "Bearer %(key)s"
wrk.headers["Content-Type"] = "application/json"

function init(args)
  math.randomseed(%(seed)d + (tonumber(args[1]) or 0))
end

function request()
  counter = counter + 1
  local kind = kinds[math.random(#kinds)]
  local store = string.format("API-%%04d", math.random(0, stores - 1))
  local empty_store = string.format("API-%%04d", stores + math.random(0, empty - 1))
  if kind == 1 then
    local id = string.format("dev-api-%%04d-%%05d", math.random(0, stores - 1), math.random(0, per_store - 1))
    return wrk.format("GET", "/v1/devices/" .. id)
  elseif kind == 2 then
    return wrk.format("GET", "/v1/devices?store_id=" .. store .. "&limit=100")
  elseif kind == 3 then
    return wrk.format("GET", "/v1/stores/" .. store)
  elseif kind == 4 then
    return wrk.format("GET", "/v1/stores")
  elseif kind == 5 then
    return wrk.format("POST", "/v1/stores/" .. empty_store .. "/enrollment-tokens", nil, '{"max_uses": 1}')
  end
  local body = '{"config": {"bench": {"n": ' .. counter .. '}}, "policies": {}}'
  return wrk.format("PUT", "/v1/stores/" .. empty_store .. "/config", nil, body)
end

function delay()
  return -math.log(1 - math.random()) * mean_pause_ms
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %%d, "duration_us": %%d, "connect": %%d, "read": %%d, "write": %%d, "status": %%d, ' ..
    '"timeout": %%d, "p50_us": %%d, "p95_us": %%d, "p99_us": %%d, "max_us": %%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max))
end
"""


async def generate_with_wrk(
    server: ServerProcess,
    *,
    devices_per_store: int,
    rate: float,
    seconds: float,
    seed: int,
    connections: int,
    workdir: Path,
) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("benchmarks.api_latency: --generator wrk needs wrk (apt-get install -y wrk)")
    kinds = ", ".join(str(index + 1) for index, (_, weight) in enumerate(MIX) for _ in range(weight))
    script = workdir / "mix.lua"
    script.write_text(
        WRK_SCRIPT
        % {
            "stores": STORES,
            "empty": EMPTY_STORES,
            "per_store": devices_per_store,
            "pause_ms": 1000.0 * connections / rate,
            "kinds": kinds,
            "key": server.admin_key,
            "seed": seed,
        }
    )

    command = [wrk, "-t2", f"-c{connections}", f"-d{max(1, round(seconds))}s", "-s", str(script), server.url]
    own0 = _children_cpu()
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    generator_cpu = _children_cpu() - own0  # counted once wrk has been waited for
    if process.returncode != 0:
        raise SystemExit(f"wrk failed ({process.returncode}): {err.decode()[-2000:]}")
    figures = json.loads(out.decode().strip().splitlines()[-1])
    kinds = ("connect", "read", "write", "status", "timeout")
    errors = sum(figures[k] for k in kinds)
    duration_s = figures["duration_us"] / 1e6
    return {
        "generator": f"wrk, 2 threads, {connections} connections, paced (closed loop)",
        "rate_offered": rate,
        "seconds": seconds,
        "requests_measured": figures["requests"],
        "achieved_per_second": round(figures["requests"] / duration_s, 1),
        "all": {
            "p50_ms": round(figures["p50_us"] / 1000, 1),
            "p95_ms": round(figures["p95_us"] / 1000, 1),
            "p99_ms": round(figures["p99_us"] / 1000, 1),
            "max_ms": round(figures["max_us"] / 1000, 1),
            "errors": errors,
            "error_kinds": {k: figures[k] for k in kinds if figures[k]},
        },
        "load_generator_cpu_ms_per_request": round(1000 * generator_cpu / max(1, figures["requests"]), 3),
    }


def _children_cpu() -> float:
    """CPU seconds of this process's waited-for children (wrk), user + system."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def run(args: argparse.Namespace) -> dict[str, Any]:
    async with contextlib.AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="storefleet-api-")))
        data_dir = tmp / "data"
        extra, database_url, backend = await stack.enter_async_context(
            server_backend(tmp, data_dir, postgres=args.postgres, mosquitto=args.mosquitto)
        )
        server = stack.enter_context(control_plane_process(*extra, data_dir=data_dir))
        device_ids = await seed(database_url, args.devices // STORES)
        async with measuring_lock_async():
            if args.generator == "wrk":
                if args.warmup > 0:  # warm up outside the measured window
                    await generate_with_wrk(
                        server,
                        devices_per_store=args.devices // STORES,
                        rate=args.rate,
                        seconds=args.warmup,
                        seed=args.seed + 1,
                        connections=args.connections,
                        workdir=tmp,
                    )
                cpu0, started = server.cpu_seconds(), time.monotonic()
                figures = await generate_with_wrk(
                    server,
                    devices_per_store=args.devices // STORES,
                    rate=args.rate,
                    seconds=args.seconds,
                    seed=args.seed,
                    connections=args.connections,
                    workdir=tmp,
                )
                cpu, elapsed = server.cpu_seconds() - cpu0, time.monotonic() - started
                requests = figures["requests_measured"]
            else:
                cpu0, started, own0 = server.cpu_seconds(), time.monotonic(), time.process_time()
                figures = await generate(
                    server,
                    device_ids,
                    rate=args.rate,
                    seconds=args.seconds,
                    warmup_s=args.warmup,
                    seed=args.seed,
                )
                cpu, elapsed = server.cpu_seconds() - cpu0, time.monotonic() - started
                requests = int(args.rate * (args.seconds + args.warmup))
                # The load generator (httpx, TLS) shares the machine: what it costs limits the rate.
                figures["load_generator_cpu_ms_per_request"] = round(
                    1000 * (time.process_time() - own0) / requests, 2
                )
        return {
            "benchmark": "api_latency",
            "backend": backend,
            "devices_in_database": len(device_ids),
            "stores_in_database": STORES + EMPTY_STORES,
            "mix": dict(MIX),
            **figures,
            "elapsed_seconds": round(elapsed, 1),
            "control_plane_cpu_percent_of_a_core": round(100 * cpu / elapsed, 1),
            "control_plane_cpu_ms_per_request": round(1000 * cpu / requests, 2),
            "control_plane_rss_mb": round(server.rss_mb(), 1),
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
    parser.add_argument("--generator", choices=("httpx", "wrk"), default="httpx", help="load generator")
    parser.add_argument(
        "--connections",
        type=int,
        help="wrk: connections (default rate/8, at least 4: a mean pause of ~125 ms per connection, "
        "well inside the server's keep-alive timeout)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.connections is None:
        args.connections = max(4, round(args.rate / 8))
    report = asyncio.run(run(args))
    name = (
        "api-latency-"
        + ("postgres" if args.postgres else "sqlite")
        + ("-mosquitto" if args.mosquitto else "")
        + ("-wrk" if args.generator == "wrk" else "")
    )
    emit_report(report, args.json or RESULTS / f"{name}.json")


if __name__ == "__main__":
    main()
