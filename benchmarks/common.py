"""What the benchmarks share: a control plane in its own process, and percentiles."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


@dataclass
class ServerProcess:
    url: str
    admin_key: str
    ca_file: Path
    process: subprocess.Popen[bytes]

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            verify=ssl.create_default_context(cafile=str(self.ca_file)),
            headers={"Authorization": f"Bearer {self.admin_key}"},
            timeout=60,
            **kwargs,  # type: ignore[arg-type]
        )

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.process.pid).cpu_times()
        return float(times.user + times.system)

    def rss_mb(self) -> float:
        return float(psutil.Process(self.process.pid).memory_info().rss) / 2**20


@contextlib.contextmanager
def control_plane_process(*extra_args: str, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """`storefleet serve` in a temporary data dir, in its own process; stopped with SIGTERM."""
    with tempfile.TemporaryDirectory(prefix="storefleet-bench-") as tmp:
        data = Path(tmp) / "data"
        port, mqtt_port = free_port(), free_port()
        admin_key = "sfk_benchmark-" + os.urandom(16).hex()
        process = subprocess.Popen(  # noqa: S603 - our own console script, fixed arguments
            [
                str(Path(sys.executable).parent / "storefleet"),
                "--log-level",
                "WARNING",
                "serve",
                "--data-dir",
                str(data),
                "--port",
                str(port),
                "--mqtt-port",
                str(mqtt_port),
                *extra_args,
            ],
            env={**os.environ, "STOREFLEET_ADMIN_KEY": admin_key, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        server = ServerProcess(f"https://127.0.0.1:{port}", admin_key, data / "pki" / "ca.pem", process)
        try:
            deadline = time.monotonic() + 60
            while True:
                if process.poll() is not None:
                    raise RuntimeError("storefleet serve exited while starting")
                with contextlib.suppress(httpx.HTTPError, FileNotFoundError, ssl.SSLError):
                    if server.client().get("/readyz").status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("storefleet serve did not become ready")
                time.sleep(0.2)
            yield server
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


@contextlib.contextmanager
def fresh_postgres_database(
    admin_dsn: str = "postgresql://postgres@127.0.0.1:5432/postgres",
) -> Iterator[str]:
    """A new database on the local PostgreSQL for one run, dropped afterwards."""
    import asyncio

    import asyncpg

    name = "sf_bench_" + os.urandom(6).hex()

    async def execute(sql: str) -> None:
        connection = await asyncpg.connect(admin_dsn)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(execute(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+asyncpg://{admin_dsn.split('://', 1)[1].rsplit('/', 1)[0]}/{name}"
    finally:
        asyncio.run(execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
