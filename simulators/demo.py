"""`storefleet demo`: the product end to end on embedded defaults, in under a minute.

Starts the control plane (SQLite, built-in CA, embedded mTLS broker) in a temporary data
dir, creates a store template (4 POS, 4 tablets, a kiosk, a back-office PC), provisions 2
stores from it (the saga issues one enrollment token per role), enrolls 20 real agents (own
keys, CSRs, tokens over HTTPS) that connect with mTLS and apply their signed, layered
configuration until both stores are ready, changes one store's configuration, shows its
devices converge, and prints what an operator would see.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from control_plane.runtime import ControlPlane
from control_plane.settings import ControlPlaneSettings
from simulators.fleet import DeviceSpec, enroll_fleet, simulator_settings

STORES: list[dict[str, Any]] = [
    {
        "id": "DE-BER-0001",
        "name": "Berlin #1",
        "timezone": "Europe/Berlin",
        "region": "EMEA",
        "config": {"pos": {"currency": "EUR", "receipt_footer": "Danke für Ihren Einkauf"}},
        "policies": {"screen_lock_timeout_s": 300, "allowed_apps": ["pos", "inventory"]},
    },
    {
        "id": "IN-BLR-0002",
        "name": "Bengaluru #1",
        "timezone": "Asia/Kolkata",
        "region": "APAC",
        "config": {"pos": {"currency": "INR", "receipt_footer": "Thank you"}},
        "policies": {"screen_lock_timeout_s": 600, "allowed_apps": ["pos"]},
    },
]
TEMPLATE: dict[str, Any] = {
    "id": "standard-demo",
    "name": "Standard store",
    "description": "tills, floor tablets, a self-checkout kiosk and the back office",
    "manifest": {"pos": 4, "tablet": 4, "kiosk": 1, "backoffice": 1},
    "layer": {"config": {"chain": "ACME Retail"}},
    "roles": {
        "pos": {
            "config": {"pos": {"printer": "receipt-80mm"}},
            "checks": {"till-app": {"kind": "process", "target": "till"}},
        },
        "kiosk": {"config": {"kiosk": {"app": "self-checkout"}}},
    },
}
DEVICES_PER_STORE = sum(TEMPLATE["manifest"].values())
STEP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _until(what: str, check: Callable[[], Any], limit_s: float = STEP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + limit_s
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def run_demo(console: Console | None = None) -> int:
    console = console or Console()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="storefleet-demo-") as tmp:
        settings = ControlPlaneSettings(
            data_dir=Path(tmp) / "data",
            port=free_port(),
            mqtt_port=free_port(),
            health_interval_s=2.0,
            ingest_flush_interval_s=0.2,
        )
        control_plane = ControlPlane(settings)
        await control_plane.open()
        server = asyncio.create_task(control_plane.run())
        try:
            await asyncio.wait_for(control_plane.ready.wait(), STEP_TIMEOUT_S)
            console.print(
                f"[bold]control plane[/] {control_plane.base_url}  broker mqtts://127.0.0.1:"
                f"{settings.mqtt_port}  (SQLite, built-in CA, embedded amqtt with mTLS)"
            )
            return await _scenario(control_plane, console, started)
        except Exception as exc:
            console.print(f"[bold red]demo failed:[/] {exc}")
            return 1
        finally:
            server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await server
            await control_plane.close()


async def _scenario(control_plane: ControlPlane, console: Console, started: float) -> int:
    assert control_plane.new_admin_key is not None
    tls = ssl.create_default_context(cafile=str(control_plane.settings.pki_dir / "ca.pem"))
    async with httpx.AsyncClient(
        base_url=control_plane.base_url,
        verify=tls,
        timeout=30,
        headers={"Authorization": f"Bearer {control_plane.new_admin_key}"},
    ) as api:
        (await api.post("/v1/templates", json=TEMPLATE)).raise_for_status()
        specs: list[DeviceSpec] = []
        fingerprint = ""
        for store in STORES:
            created = (
                (await api.post("/v1/stores", json={**store, "template_id": TEMPLATE["id"]}))
                .raise_for_status()
                .json()
            )
            # The provisioning saga issued one token per role of the template (uses = its count).
            for token in created["enrollment_tokens"]:
                fingerprint = token["ca_fingerprint"]
                specs += [DeviceSpec(token=token["token"], role=token["role"])] * token["max_uses"]
        console.print(
            f"created template {TEMPLATE['id']!r} and {len(STORES)} stores from it; "
            "provisioning issued their enrollment tokens"
        )

        with simulator_settings(reconnect_min_s=0.2, reconnect_max_s=2.0) as agent_settings:
            t0 = time.monotonic()
            fleet = await enroll_fleet(
                specs, server_url=control_plane.base_url, ca_fingerprint=fingerprint, settings=agent_settings
            )
            console.print(
                f"{len(fleet.devices)} agents enrolled (own P-256 keys, CSR + token over HTTPS) "
                f"in {time.monotonic() - t0:.2f}s"
            )
            fleet.start()
            try:

                async def devices() -> list[dict[str, Any]]:
                    page = (await api.get("/v1/devices", params={"limit": 1000})).raise_for_status().json()
                    return list(page["items"])

                async def all_in_sync() -> bool:
                    items = await devices()
                    return len(items) == len(specs) and all(d["in_sync"] for d in items)

                t0 = time.monotonic()
                await _until("every device to apply its first configuration", all_in_sync)
                console.print(
                    f"all {len(specs)} devices connected with mTLS and applied version 1 "
                    f"in {time.monotonic() - t0:.2f}s"
                )

                async def stores_ready() -> bool:
                    stores = (await api.get("/v1/stores")).raise_for_status().json()
                    return all(store["status"] == "ready" for store in stores)

                await _until("both stores to be provisioned (devices configured and healthy)", stores_ready)
                for store in STORES:
                    saga = (await api.get(f"/v1/stores/{store['id']}/provisioning")).raise_for_status().json()
                    console.print(f"{store['id']} is ready: {saga['seconds_to_ready']:.1f}s from creation")

                changed = STORES[0]
                new_layer = {
                    "config": {
                        **changed["config"],
                        "pos": {**changed["config"]["pos"], "receipt_footer": "Frohe Festtage!"},
                    },
                    "policies": {**changed["policies"], "screen_lock_timeout_s": 120},
                }
                t0 = time.monotonic()
                (await api.put(f"/v1/stores/{changed['id']}/config", json=new_layer)).raise_for_status()

                async def converged() -> bool:
                    items = await devices()
                    return all(
                        d["in_sync"] and d["applied_version"] == (2 if d["store_id"] == changed["id"] else 1)
                        for d in items
                    )

                await _until(f"{changed['id']} to converge on version 2", converged)
                console.print(
                    f"changed {changed['id']}'s configuration: its {DEVICES_PER_STORE} devices "
                    f"applied version 2 in {time.monotonic() - t0:.2f}s; the other store stayed on 1"
                )

                async def all_healthy() -> bool:
                    return all(d["online"] and d["health"] for d in await devices())

                await _until("health reports from every device", all_healthy)
                _print_summary(console, (await api.get("/v1/stores")).json(), await devices())
            finally:
                await fleet.stop()
    console.print(f"[bold green]demo complete[/] in {time.monotonic() - started:.1f}s")
    return 0


def _print_summary(console: Console, stores: list[dict[str, Any]], devices: list[dict[str, Any]]) -> None:
    table = Table(title="Stores")
    for column in ("store", "name", "time zone", "status", "devices", "in sync", "online", "config revision"):
        table.add_column(column)
    for store in stores:
        mine = [d for d in devices if d["store_id"] == store["id"]]
        table.add_row(
            store["id"],
            store["name"],
            store["timezone"],
            store["status"],
            str(len(mine)),
            f"{sum(d['in_sync'] for d in mine)}/{len(mine)}",
            f"{sum(d['online'] for d in mine)}/{len(mine)}",
            str(store["config_revision"]),
        )
    console.print(table)

    table = Table(title="Devices")
    for column in (
        "device",
        "store",
        "role",
        "desired",
        "applied",
        "status",
        "online",
        "cpu %",
        "mem %",
        "disk %",
    ):
        table.add_column(column)
    for d in sorted(devices, key=lambda d: (d["store_id"], d["role"] or "", d["id"])):
        health = d["health"] or {}
        table.add_row(
            d["id"],
            d["store_id"],
            d["role"] or "-",
            str(d["desired_version"]),
            str(d["applied_version"]),
            d["apply_status"] or "-",
            "yes" if d["online"] else "no",
            str(health.get("cpu_percent", "-")),
            str(health.get("memory_percent", "-")),
            str(health.get("disk_percent", "-")),
        )
    console.print(table)
