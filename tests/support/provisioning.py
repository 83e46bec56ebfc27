"""Provisioning in tests: templates, stores made from them, and real agents enrolled with the
saga's tokens (the simulator's in-process agents: real enrollment, mTLS session, reconciler)."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aiomqtt

from control_plane.pki.ca import BuiltinCA
from control_plane.pki.identity import CONTROL_PLANE_SERVICE
from simulators.fleet import DeviceSpec, Fleet, enroll_fleet, simulator_settings
from tests.support.certs import make_service_credentials
from tests.support.control_plane import RunningControlPlane

# A control-plane identity of its own for test probes (tests/conftest.py lists it on Mosquitto).
PROBE_REPLICA = "probe"
PROBE_IDENTITY = f"{CONTROL_PLANE_SERVICE}-{PROBE_REPLICA}"

TEMPLATE: dict[str, Any] = {
    "id": "compact",
    "name": "Compact store",
    "manifest": {"pos": 2, "tablet": 1},
    "layer": {"config": {"chain": "ACME"}},
    "roles": {"pos": {"config": {"printer": "receipt"}}},
    "timezone": "Europe/Berlin",
    "trading_hours": {"mon-sat": "08:00-20:00", "sun": "closed"},
}


async def create_template(cp: RunningControlPlane, **fields: Any) -> dict[str, Any]:
    response = await cp.api.post("/v1/templates", json={**TEMPLATE, **fields})
    assert response.status_code == 201, response.text
    return dict(response.json())


async def create_provisioned_store(
    cp: RunningControlPlane, store_id: str, template_id: str = "compact", **fields: Any
) -> dict[str, Any]:
    response = await cp.api.post(
        "/v1/stores", json={"id": store_id, "name": store_id, "template_id": template_id, **fields}
    )
    assert response.status_code == 201, response.text
    created = dict(response.json())
    assert created["status"] == "provisioning"
    return created


async def provisioning(cp: RunningControlPlane, store_id: str) -> dict[str, Any]:
    response = await cp.api.get(f"/v1/stores/{store_id}/provisioning")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def wait_for_state(
    cp: RunningControlPlane, store_id: str, state: str, timeout: float = 30.0
) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        view = await provisioning(cp, store_id)
        if view["state"] == state:
            return view
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"store {store_id} never reached {state!r}: {view}")
        await asyncio.sleep(0.1)


async def timeline(cp: RunningControlPlane, store_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 50, **({"cursor": cursor} if cursor else {})}
        page = (await cp.api.get(f"/v1/stores/{store_id}/events", params=params)).json()
        events += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return events


def specs(tokens: Iterable[dict[str, Any]], uses: dict[str, int] | None = None) -> list[DeviceSpec]:
    """One device per use of each token (or `uses[role]` of them)."""
    return [
        DeviceSpec(token=token["token"], role=token["role"], model=f"{token['role']}-model")
        for token in tokens
        for _ in range((uses or {}).get(token["role"], token["max_uses"]))
    ]


@contextlib.asynccontextmanager
async def running_fleet(
    cp: RunningControlPlane, tokens: list[dict[str, Any]], uses: dict[str, int] | None = None
) -> AsyncIterator[Fleet]:
    """Enroll one device per token use (or `uses[role]`) over HTTPS and run their agents."""
    with simulator_settings(reconnect_min_s=0.1, reconnect_max_s=0.5, health_interval_s=0.5) as settings:
        fleet = await enroll_fleet(
            specs(tokens, uses),
            server_url=cp.base_url,
            ca_fingerprint=tokens[0]["ca_fingerprint"],
            settings=settings,
        )
        fleet.start()
        try:
            yield fleet
        finally:
            await fleet.stop()


async def retained_messages(
    cp: RunningControlPlane, topics: list[str], wait_s: float = 1.0
) -> dict[str, bytes]:
    """What the broker has retained on `topics`, read by a probe with its own control-plane
    identity (`storefleet-control-plane-probe`; the test Mosquitto lists it as a replica), so
    it never takes over the control plane's session and an empty answer means nothing is there."""
    host, port = cp.settings.broker_endpoint
    ca = BuiltinCA.load_or_create(cp.settings.pki_dir, trust_domain=cp.settings.trust_domain)
    with tempfile.TemporaryDirectory(prefix="probe-") as directory:
        credentials = make_service_credentials(
            ca, Path(directory), name=PROBE_IDENTITY, server_ca_file=cp.ca_file
        )
        context = credentials.ssl_context()
    received: dict[str, bytes] = {}
    async with aiomqtt.Client(host, port, identifier=PROBE_IDENTITY, tls_context=context) as probe:
        await probe.subscribe([(topic, 1) for topic in topics])
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                async for message in probe.messages:
                    if message.payload:
                        received[str(message.topic)] = bytes(message.payload)  # type: ignore[arg-type]
    return received
