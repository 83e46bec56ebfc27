"""What the benchmarks share: a control plane process, keys and CSRs, the measuring lock, reports."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from simulators.report import percentile  # noqa: F401 (one percentile for the simulator and benchmarks)
from tests.support.ports import free_port


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
def control_plane_process(
    *extra_args: str, env: dict[str, str] | None = None, data_dir: Path | None = None
) -> Iterator[ServerProcess]:
    """`storefleet serve` in `data_dir` (default: a temporary one), in its own process; stopped
    with SIGTERM."""
    with tempfile.TemporaryDirectory(prefix="storefleet-bench-") as tmp:
        data = data_dir or Path(tmp) / "data"
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


def mosquitto_for(tmp: Path, data_dir: Path) -> Any:
    """A `MosquittoProcess` (enter it) trusting the control plane's built-in CA in `data_dir`
    (made now if missing, with an empty CRL), configured as the product generates it."""
    from control_plane.pki.ca import BuiltinCA
    from control_plane.pki.files import write_public
    from tests.support.mosquitto import MosquittoProcess

    ca = BuiltinCA.load_or_create(data_dir / "pki", trust_domain="storefleet.local")
    crl_file = data_dir / "pki" / "crl.pem"
    write_public(crl_file, ca.crl_pem([]).encode())
    return MosquittoProcess(ca, tmp / "mosquitto", client_id_from_certificate=True, crl_file=crl_file)


@contextlib.asynccontextmanager
async def server_backend(tmp: Path, data_dir: Path, *, postgres: bool, mosquitto: bool) -> AsyncIterator[Any]:
    """For a `storefleet serve` process in `data_dir`: a fresh PostgreSQL database and/or a
    Mosquitto with the product's mTLS + ACL config. Yields (extra `serve` arguments, database
    URL, backend description); stops and drops them on exit."""
    from tests.support.postgres import fresh_database

    async with contextlib.AsyncExitStack() as stack:
        extra: list[str] = []
        database_url = f"sqlite+aiosqlite:///{data_dir / 'storefleet.db'}"
        if postgres:
            database_url = await stack.enter_async_context(fresh_database())
            extra += ["--database-url", database_url]
        if mosquitto:
            host, port = await stack.enter_async_context(mosquitto_for(tmp, data_dir))
            extra += ["--broker-url", f"mqtts://{host}:{port}"]
        backend = ("PostgreSQL" if postgres else "SQLite") + (
            ", Mosquitto" if mosquitto else ", embedded amqtt"
        )
        yield extra, database_url, backend


@contextlib.contextmanager
def fresh_postgres_database(
    admin_dsn: str = "postgresql://postgres@127.0.0.1:5432/postgres",
) -> Iterator[str]:
    """A new database on the local PostgreSQL for one run, dropped afterwards."""
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


def emit_report(report: dict[str, Any], json_path: Path | None) -> None:
    """Print the JSON report, and write it to `json_path` when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if json_path is not None:
        json_path.write_text(text + "\n")


# Benchmarks measure one at a time on this 2-core machine: each holds this lock while measuring.
LOCK_FILE = Path("/tmp/storefleet-bench.lock")  # noqa: S108 - shared by design between benchmark runs


@contextlib.contextmanager
def measuring_lock() -> Iterator[float]:
    """Exclusive flock for the measuring phase; yields the seconds spent waiting for it."""
    started = time.monotonic()
    with LOCK_FILE.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield time.monotonic() - started
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.asynccontextmanager
async def measuring_lock_async() -> AsyncIterator[None]:
    """`measuring_lock` for a process whose event loop must keep running while it waits."""
    fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def make_keys_and_csrs(count: int) -> list[tuple[str, str]]:
    """(private key PEM, CSR PEM) pairs made beforehand, so only the server's work is timed."""
    pairs = []
    for _ in range(count):
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")]))
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        pairs.append((key_pem, csr.public_bytes(serialization.Encoding.PEM).decode()))
    return pairs


async def benchmark_control_plane(
    stack: contextlib.AsyncExitStack, tmp: Path, *, postgres: bool, mosquitto: bool, **overrides: Any
) -> tuple[Any, Any]:
    """A control plane in this process for a benchmark, on SQLite + amqtt or PostgreSQL and/or
    Mosquitto (configured as `storefleet broker-config mosquitto` would), with the product's
    flush interval and no per-source enrollment limit (every agent comes from 127.0.0.1).
    Returns (RunningControlPlane, MosquittoProcess or None); `stack` closes them."""
    from control_plane.settings import ControlPlaneSettings
    from tests.support.control_plane import running_control_plane
    from tests.support.postgres import fresh_database

    data_dir = tmp / "control-plane"
    defaults = ControlPlaneSettings.model_fields
    settings: dict[str, Any] = {
        # running_control_plane shortens the flush interval for tests; benchmarks use the product's.
        "ingest_flush_interval_s": defaults["ingest_flush_interval_s"].default,
        "enroll_rate_per_source_s": 1_000_000.0,
        "enroll_burst_per_source": 1_000_000,
        **overrides,
    }
    broker: Any = None
    if postgres:
        settings["database_url"] = await stack.enter_async_context(fresh_database())
    if mosquitto:
        broker = mosquitto_for(tmp, data_dir)
        host, port = await stack.enter_async_context(broker)
        settings["broker_url"] = f"mqtts://{host}:{port}"
        settings["broker_log_file"] = broker.log_file
    cp = await stack.enter_async_context(running_control_plane(data_dir, **settings))
    return cp, broker


@contextlib.asynccontextmanager
async def simulator_target(*, postgres: bool, mosquitto: bool, **overrides: Any) -> AsyncIterator[Any]:
    """A control plane in this process (its event loop is the simulator driver's; the agents run
    in `--procs` worker processes) on SQLite + amqtt, or PostgreSQL and/or Mosquitto; yields
    a `simulators.scenarios.Target` whose storm restarts Mosquitto or drops device connections."""
    from simulators.scenarios import Target
    from tests.support.control_plane import ADMIN_KEY

    async with contextlib.AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="storefleet-bench-")))
        cp, broker = await benchmark_control_plane(
            stack, tmp, postgres=postgres, mosquitto=mosquitto, **overrides
        )
        processes = {"control_plane_and_driver": psutil.Process()}
        if broker is not None:
            processes["mosquitto"] = psutil.Process(broker._process.pid)

        async def storm(device_ids: list[str], downtime_s: float) -> str:
            if broker is not None:
                await broker._stop()
                await asyncio.sleep(downtime_s)
                await broker._spawn(append_log=True)
                processes["mosquitto"] = psutil.Process(broker._process.pid)
                return f"Mosquitto restarted after {downtime_s} s down"
            embedded = cp.control_plane.broker
            assert embedded is not None
            dropped = await asyncio.gather(*(embedded.disconnect(d) for d in device_ids))
            return f"the embedded broker dropped {sum(dropped)} device connections at once"

        backend = ("PostgreSQL" if postgres else "SQLite") + (
            ", Mosquitto" if mosquitto else ", embedded amqtt"
        )
        yield Target(
            cp.base_url,
            ADMIN_KEY,
            cp.ca_file,
            f"in the driver process ({backend})",
            storm=storm,
            processes=processes,
            in_process=True,
        )
