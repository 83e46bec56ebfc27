"""Enrollment throughput: token check + CSR verify + sign + database, end to end over HTTPS.

    python -m benchmarks.enroll --enrollments 2000 --concurrency 64 [--postgres] [--openbao] [--json out.json]

The control plane runs in its own process on embedded defaults (SQLite, built-in CA); this
process is the load generator (CSRs made beforehand, so only the server's work is timed).
Per-source rate limiting is raised for the run: all requests come from 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import (
    ServerProcess,
    control_plane_process,
    emit_report,
    fresh_postgres_database,
    make_keys_and_csrs,
    percentile,
)


async def fire(
    server: ServerProcess, token: str, csrs: list[str], concurrency: int
) -> tuple[list[float], int, float]:
    latencies: list[float] = []
    failures = 0
    queue: asyncio.Queue[str] = asyncio.Queue()
    for csr in csrs:
        queue.put_nowait(csr)
    tls = ssl.create_default_context(cafile=str(server.ca_file))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=server.url, verify=tls, limits=limits, timeout=60) as client:

        async def worker() -> None:
            nonlocal failures
            while not queue.empty():
                csr = queue.get_nowait()
                started = time.perf_counter()
                response = await client.post(
                    "/v1/enroll",
                    json={"schema": 1, "token": token, "csr_pem": csr, "device": {"role": "pos"}},
                )
                latencies.append(time.perf_counter() - started)
                if response.status_code != 200:
                    failures += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, failures, time.perf_counter() - started


def run(
    enrollments: int,
    concurrency: int,
    warmup: int,
    database_url: str | None = None,
    vault_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    csrs = [csr for _key, csr in make_keys_and_csrs(enrollments + warmup)]
    extra = ("--database-url", database_url) if database_url else ()
    env = {"STOREFLEET_ENROLL_RATE_PER_SOURCE_S": "1000000", "STOREFLEET_ENROLL_BURST_PER_SOURCE": "1000000"}
    with control_plane_process(
        *extra,
        env={**env, **(vault_env or {})},
    ) as server:
        with server.client() as api:
            api.post("/v1/stores", json={"id": "BENCH-0001", "name": "bench"}).raise_for_status()
            token = (
                api.post("/v1/stores/BENCH-0001/enrollment-tokens", json={"max_uses": enrollments + warmup})
                .raise_for_status()
                .json()["token"]
            )
        asyncio.run(fire(server, token, csrs[:warmup], min(concurrency, warmup)))
        cpu_before = server.cpu_seconds()
        latencies, failures, elapsed = asyncio.run(fire(server, token, csrs[warmup:], concurrency))
        cpu_used = server.cpu_seconds() - cpu_before
        rss = server.rss_mb()
    return {
        "benchmark": "enroll",
        "backend": f"{'PostgreSQL' if database_url else 'SQLite'}, "
        f"{'OpenBao PKI' if vault_env else 'built-in CA'}, embedded broker",
        "enrollments": enrollments,
        "concurrency": concurrency,
        "failures": failures,
        "seconds": round(elapsed, 3),
        "per_second": round((enrollments - failures) / elapsed, 1),
        "latency_ms": {
            "p50": round(1000 * percentile(latencies, 0.50), 1),
            "p95": round(1000 * percentile(latencies, 0.95), 1),
            "p99": round(1000 * percentile(latencies, 0.99), 1),
            "max": round(1000 * max(latencies), 1),
        },
        "server_cpu_seconds": round(cpu_used, 2),
        "server_cpu_ms_per_enrollment": round(1000 * cpu_used / enrollments, 2),
        "server_rss_mb": round(rss, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--enrollments", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--postgres", action="store_true", help="use a fresh database on the local PostgreSQL"
    )
    parser.add_argument(
        "--openbao", action="store_true", help="sign with Vault PKI on a local OpenBao dev server"
    )
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(fresh_postgres_database()) if args.postgres else None
        vault_env = None
        if args.openbao:
            from tests.support.openbao import OpenBaoServer  # the harness the Vault tests use

            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="storefleet-bench-bao-")))
            bao = stack.enter_context(OpenBaoServer(tmp))
            vault_env = {
                "STOREFLEET_CA_BACKEND": "vault",
                "STOREFLEET_VAULT_URL": bao.url,
                "STOREFLEET_VAULT_TOKEN": bao.create_token(ttl="4h"),
            }
        report = run(args.enrollments, args.concurrency, args.warmup, url, vault_env)
    emit_report(report, args.json)


if __name__ == "__main__":
    main()
