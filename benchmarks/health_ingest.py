"""Health-report ingest throughput: devices publish over mTLS, ingest validates, coalesces, writes.

    python -m benchmarks.health_ingest --devices 1000 --reports-per-device 20 \
        [--postgres] [--mosquitto] [--qos 0|1] [--json out.json]

The control plane runs in this process (as the tests run it: embedded amqtt broker and SQLite
by default; `--postgres` a fresh database on the local PostgreSQL; `--mosquitto` an external
Mosquitto configured by the product's own generator). Devices enroll over HTTPS with
pre-made CSRs and keep their key and certificate; a second process is the load generator:
one aiomqtt (paho) mTLS session per device, client id = device id, each device publishing
`--reports-per-device` HealthReports with increasing seq, all devices at once, as fast as
the broker takes them. QoS defaults to 0, what agents use for health.

Measured: reports/s offered (publish side), reports/s accepted by ingest (its in-process
counters), reports/s written (accepted / time until the last one is in the database),
device-row updates (ingest coalesces: only the newest report per device per flush updates
the device row) and history rows (every report is one), rejections, and the losses:
`lost` counts devices whose final `health_seq` in the database is not the last seq they
sent, `history_reports_missing` the reports (device, seq) absent from `health_history`.
The measuring phase holds an exclusive lock on /tmp/storefleet-bench.lock (other
benchmarks may share the machine's two cores).

At QoS 0 the generator writes pre-encoded PUBLISH packets straight to each device's TLS
socket (what an agent sends, byte for byte): paho's client-side cost would otherwise take
most of the two cores the server needs. `--checks N` adds N app-check results per report.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import ssl
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import psutil
import sqlalchemy as sa

from benchmarks.common import benchmark_control_plane, emit_report, make_keys_and_csrs, measuring_lock_async
from control_plane.db.schema import devices as devices_table
from control_plane.db.schema import health_history
from protocol.messages import CheckResult, HealthReport
from protocol.topics import TopicKind, device_topic

STORE_ID = "BENCH-HEALTH"


@dataclass
class Credentials:
    device_id: str
    certificate_pem: str
    key_pem: str


# --- enrollment (this process) ----------------------------------------------------------------


async def enroll_all(
    base_url: str, ca_file: Path, token: str, pairs: list[tuple[str, str]], concurrency: int
) -> tuple[list[Credentials], dict[str, Any]]:
    queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    for pair in pairs:
        queue.put_nowait(pair)
    enrolled: list[Credentials] = []
    first: dict[str, Any] = {}
    tls = ssl.create_default_context(cafile=str(ca_file))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, verify=tls, limits=limits, timeout=60) as client:

        async def worker() -> None:
            while not queue.empty():
                key_pem, csr = queue.get_nowait()
                response = await client.post(
                    "/v1/enroll",
                    json={"schema": 1, "token": token, "csr_pem": csr, "device": {"role": "pos"}},
                )
                response.raise_for_status()
                body = response.json()
                first.setdefault("body", body)
                enrolled.append(Credentials(body["device_id"], body["certificate_pem"], key_pem))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return enrolled, first["body"]


# --- load generator (child process) -------------------------------------------------------------


def _client_context(ca_pem: str, creds: Credentials, directory: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cadata=ca_pem)
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    cert, key = directory / f"{creds.device_id}.crt", directory / f"{creds.device_id}.key"
    cert.write_text(creds.certificate_pem)
    key.write_text(creds.key_pem)
    context.load_cert_chain(cert, key)
    return context


def load_generator(
    conn: Connection,
    creds: list[Credentials],
    ca_pem: str,
    host: str,
    port: int,
    reports: int,
    qos: int,
    checks: int,
) -> None:
    """Connect every device, report readiness, wait for 'go', publish, report what was offered,
    stay connected until 'stop'."""
    asyncio.run(_generate(conn, creds, ca_pem, host, port, reports, qos, checks))


async def _generate(
    conn: Connection,
    creds: list[Credentials],
    ca_pem: str,
    host: str,
    port: int,
    reports: int,
    qos: int,
    checks: int,
) -> dict[str, Any]:
    import aiomqtt

    # Payloads made beforehand: only publishing is timed.
    payloads = {
        c.device_id: [
            HealthReport(
                device_id=c.device_id,
                seq=seq,
                cpu_percent=12.5,
                memory_percent=40.0,
                disk_percent=55.0,
                uptime_s=3600.0 + seq,
                checks=[CheckResult(name=f"app-{n}", ok=True, detail="200 OK") for n in range(checks)],
            ).to_json()
            for seq in range(1, reports + 1)
        ]
        for c in creds
    }
    packets = {
        device_id: [_publish_packet(device_topic(device_id, TopicKind.HEALTH), p) for p in reports_of]
        for device_id, reports_of in payloads.items()
    }
    with tempfile.TemporaryDirectory(prefix="storefleet-bench-health-") as tmp:
        contexts = {c.device_id: _client_context(ca_pem, c, Path(tmp)) for c in creds}
    async with contextlib.AsyncExitStack() as stack:
        clients: dict[str, aiomqtt.Client] = {}
        gate = asyncio.Semaphore(32)
        connect_started = time.perf_counter()

        async def connect(device_id: str) -> None:
            client = aiomqtt.Client(
                host,
                port,
                identifier=device_id,
                clean_session=True,
                keepalive=120,
                tls_context=contexts[device_id],
                max_inflight_messages=reports,
                max_queued_outgoing_messages=0,
                timeout=120,
            )
            async with gate:
                await stack.enter_async_context(client)
            clients[device_id] = client

        await asyncio.gather(*(connect(device_id) for device_id in contexts))
        connect_seconds = time.perf_counter() - connect_started
        conn.send({"connected": len(clients), "connect_seconds": connect_seconds})
        await asyncio.to_thread(conn.recv)  # "go"
        cpu_before = psutil.Process().cpu_times()
        started = time.time()
        errors = 0

        async def publish(device_id: str) -> None:
            nonlocal errors
            topic = device_topic(device_id, TopicKind.HEALTH)
            client = clients[device_id]
            for payload in payloads[device_id]:
                try:
                    await client.publish(topic, payload, qos=qos, timeout=120)
                except aiomqtt.MqttError:
                    errors += 1

        if qos == 0:
            # Pre-encoded QoS 0 PUBLISH packets written straight to each device's TLS socket:
            # the broker and the control plane see exactly what agents send, and the
            # generator spends ~15 us per report instead of paho's ~100 us (on the same 2 cores
            # as the server, the generator's cost would otherwise cap the figure).
            sockets = {device_id: client._client.socket() for device_id, client in clients.items()}
            backlog: dict[str, list[bytes]] = {device_id: [] for device_id in clients}
            for seq in range(reports):
                for n, (device_id, sock) in enumerate(sockets.items()):
                    packet = packets[device_id][seq]
                    if backlog[device_id] or not _send(sock, packet):
                        backlog[device_id].append(packet)
                    if n % 100 == 99:
                        await asyncio.sleep(0)  # let the clients' keep-alive and reads run
            while any(backlog.values()):
                for device_id, queued in backlog.items():
                    while queued and _send(sockets[device_id], queued[0]):
                        queued.pop(0)
                await asyncio.sleep(0.001)
        else:
            await asyncio.gather(*(publish(device_id) for device_id in clients))
        finished = time.time()
        cpu_after = psutil.Process().cpu_times()
        conn.send(
            {
                "started": started,
                "finished": finished,
                "offered": len(clients) * reports - errors,
                "publish_errors": errors,
                "cpu_seconds": (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system),
            }
        )
        # Stay connected until the ingest has seen everything (a device does not hang up either).
        await asyncio.to_thread(conn.recv)  # "stop"
    return {"stopped": True}


def _publish_packet(topic: str, payload: bytes) -> bytes:
    """An MQTT 3.1.1 PUBLISH, QoS 0, not retained."""
    body = len(topic).to_bytes(2, "big") + topic.encode() + payload
    length, remaining = bytearray(), len(body)
    while True:
        byte, remaining = remaining % 128, remaining // 128
        length.append(byte | (0x80 if remaining else 0))
        if not remaining:
            break
    return bytes([0x30]) + bytes(length) + body


def _send(sock: Any, packet: bytes) -> bool:
    """One packet to a non-blocking TLS socket: all of it (one TLS record) or nothing."""
    try:
        sent = sock.send(packet)
    except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
        return False
    if sent != len(packet):
        raise RuntimeError(f"partial TLS write ({sent} of {len(packet)} bytes)")
    return True


# --- the run -----------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:

    async with contextlib.AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="storefleet-bench-")))
        cp, mosquitto = await benchmark_control_plane(
            stack, tmp, postgres=args.postgres, mosquitto=args.mosquitto
        )
        services = cp.control_plane.services

        # Enrollment: a few tokens with max_uses, pre-made CSRs over the HTTP API.
        pairs = make_keys_and_csrs(args.devices)
        await cp.create_store(STORE_ID)
        credentials: list[Credentials] = []
        enroll_started = time.perf_counter()
        response: dict[str, Any] = {}
        for start in range(0, args.devices, 10_000):
            chunk = pairs[start : start + 10_000]
            token = (await cp.create_token(STORE_ID, max_uses=len(chunk)))["token"]
            enrolled, response = await enroll_all(cp.base_url, cp.ca_file, token, chunk, args.concurrency)
            credentials.extend(enrolled)
        enroll_seconds = time.perf_counter() - enroll_started
        broker_host, broker_port = response["broker"]["host"], response["broker"]["port"]

        # Load generator in its own process: connect every device with its own certificate.
        ctx = multiprocessing.get_context("spawn")
        parent_end, child_end = ctx.Pipe()
        child = ctx.Process(
            target=load_generator,
            args=(
                child_end,
                credentials,
                response["ca_chain_pem"],
                broker_host,
                broker_port,
                args.reports_per_device,
                args.qos,
                args.checks,
            ),
        )
        child.start()
        try:
            connected = await asyncio.to_thread(parent_end.recv)
            await asyncio.sleep(2 * services.ingest._flush_interval_s)
            expected = len(credentials) * args.reports_per_device
            ingest = services.ingest
            async with measuring_lock_async():
                measured = await measure(parent_end, child, ingest, expected, mosquitto)
        finally:
            with contextlib.suppress(OSError):
                parent_end.send("stop")
            child.join(timeout=30)
            if child.is_alive():
                child.terminate()

        # Every device's final health_seq must be the last seq it sent.
        async with services.engine.connect() as db:
            rows = (await db.execute(sa.select(devices_table.c.id, devices_table.c.health_seq))).all()
            h = health_history.c
            per_device = (
                await db.execute(
                    sa.select(h.device_id, sa.func.count(sa.distinct(h.seq)), sa.func.count()).group_by(
                        h.device_id
                    )
                )
            ).all()
        final = dict(rows)
        lost = [c.device_id for c in credentials if final.get(c.device_id) != args.reports_per_device]
        # Every report of every device must be in the history: distinct seqs = reports sent.
        history = {device_id: (distinct, total) for device_id, distinct, total in per_device}
        history_lost = sum(args.reports_per_device - history.get(c.device_id, (0, 0))[0] for c in credentials)
        history_rows = sum(total for _, total in history.values())
        never = sum(1 for c in credentials if final.get(c.device_id) is None)
        backend = "PostgreSQL" if args.postgres else "SQLite"
        broker = "Mosquitto" if args.mosquitto else "embedded amqtt broker"
        return {
            "benchmark": "health_ingest",
            "backend": f"{backend}, {broker}",
            "devices": len(credentials),
            "reports_per_device": args.reports_per_device,
            "qos": args.qos,
            "ingest_flush_interval_s": cp.settings.ingest_flush_interval_s,
            "ingest_batch_size": cp.settings.ingest_batch_size,
            "enroll_seconds": round(enroll_seconds, 2),
            "connect_seconds": round(connected["connect_seconds"], 2),
            **measured,
            # Mosquitto drops QoS 0 messages for a subscriber that falls behind and logs it.
            "broker_drop_warnings": mosquitto.log().count("being dropped") if mosquitto is not None else None,
            "history_rows": history_rows,
            "history_reports_missing": history_lost,
            "lost": len(lost),
            "lost_without_any_report": never,
            "lost_examples": [f"{d}: {final.get(d)}" for d in lost[:5]],
            "checks_per_report": args.checks,
            "goal": ">= 10000 reports/s accepted, 0 lost (newest state and every report in history)",
            "goal_met": measured["accepted_per_second"] >= 10_000 and not lost and history_lost == 0,
        }
    raise AssertionError("unreachable")


async def measure(conn: Connection, child: Any, ingest: Any, expected: int, mosquitto: Any) -> dict[str, Any]:
    own = psutil.Process()
    broker_proc = psutil.Process(mosquitto._process.pid) if mosquitto is not None else None

    def cpu(proc: psutil.Process | None) -> float:
        if proc is None:
            return 0.0
        times = proc.cpu_times()
        return float(times.user + times.system)

    accepted0, rejected0 = ingest.accepted["health"], sum(ingest.rejected.values())
    flushes0, coalesced0 = ingest.flushes, ingest.coalesced
    cpu0, broker_cpu0 = cpu(own), cpu(broker_proc)
    result: dict[str, Any] = {}
    started = time.time()
    conn.send("go")
    receiver = asyncio.create_task(asyncio.to_thread(conn.recv))
    last_progress, last_seen, last_accept_at = time.monotonic(), -1, started
    while True:
        seen = ingest.accepted["health"] - accepted0 + sum(ingest.rejected.values()) - rejected0
        if seen != last_seen:
            last_seen, last_progress, last_accept_at = seen, time.monotonic(), time.time()
        if receiver.done() and not result:
            result = receiver.result()
        if result and (seen >= expected or time.monotonic() - last_progress > 10):
            break
        if not result and not child.is_alive():
            raise RuntimeError("the load generator exited without a result")
        await asyncio.sleep(0.02)
    # Drain: let the ingest write what it buffered.
    while ingest.pending:  # noqa: ASYNC110 - the ingest's own buffer, polled
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.05)
    drained = time.time()
    accepted = ingest.accepted["health"] - accepted0
    offered_seconds = result["finished"] - result["started"]
    accept_seconds = last_accept_at - started
    return {
        "offered": result["offered"],
        "publish_errors": result["publish_errors"],
        "offered_seconds": round(offered_seconds, 3),
        "offered_per_second": round(result["offered"] / offered_seconds, 1),
        "accepted": accepted,
        "accepted_seconds": round(accept_seconds, 3),
        "accepted_per_second": round(accepted / accept_seconds, 1) if accept_seconds > 0 else 0.0,
        "not_received_by_ingest": expected - accepted - (sum(ingest.rejected.values()) - rejected0),
        "rejected": dict(ingest.rejected),
        "coalesced": ingest.coalesced - coalesced0,
        "device_row_updates": accepted - (ingest.coalesced - coalesced0),
        "flushes_db_batches": ingest.flushes - flushes0,
        "flush_seconds_max": round(ingest.flush_seconds_max, 3),
        "seconds_to_written": round(drained - started, 3),
        "written_per_second": round(accepted / (drained - started), 1),
        "control_plane_cpu_seconds": round(cpu(own) - cpu0, 2),
        "load_generator_cpu_seconds": round(result["cpu_seconds"], 2),
        "mosquitto_cpu_seconds": round(cpu(broker_proc) - broker_cpu0, 2) if broker_proc else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--reports-per-device", type=int, default=20)
    parser.add_argument("--qos", type=int, choices=(0, 1), default=0)
    parser.add_argument("--checks", type=int, default=0, help="app check results in each report")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent enrollments")
    parser.add_argument("--postgres", action="store_true", help="a fresh database on the local PostgreSQL")
    parser.add_argument("--mosquitto", action="store_true", help="an external Mosquitto broker")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("STOREFLEET_LOG_LEVEL", "WARNING")
    report = asyncio.run(run(args))
    emit_report(report, args.json)


if __name__ == "__main__":
    main()
