"""Run a real control plane in the test's event loop, on free ports, in a temp data dir."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from control_plane.runtime import ControlPlane
from control_plane.settings import ControlPlaneSettings
from tests.support.ports import free_port
from tests.support.waiting import finish_within

ADMIN_KEY = "sfk_test-admin-key-0123456789abcdef0123456789"


@dataclass
class RunningControlPlane:
    control_plane: ControlPlane
    settings: ControlPlaneSettings
    api: httpx.AsyncClient  # authenticated as admin
    anonymous: httpx.AsyncClient
    mosquitto: Any = None  # the MosquittoProcess when the stack uses one

    @property
    def base_url(self) -> str:
        return self.control_plane.base_url

    @property
    def ca_file(self) -> Path:
        return self.settings.pki_dir / "ca.pem"

    async def create_store(self, store_id: str, **fields: Any) -> dict[str, Any]:
        body = {"id": store_id, "name": fields.pop("name", store_id), **fields}
        response = await self.api.post("/v1/stores", json=body)
        assert response.status_code == 201, response.text
        return dict(response.json())

    async def create_token(self, store_id: str, **fields: Any) -> dict[str, Any]:
        response = await self.api.post(f"/v1/stores/{store_id}/enrollment-tokens", json=fields)
        assert response.status_code == 201, response.text
        return dict(response.json())

    async def device(self, device_id: str) -> dict[str, Any]:
        response = await self.api.get(f"/v1/devices/{device_id}")
        assert response.status_code == 200, response.text
        return dict(response.json())

    async def wait_for_device(self, device_id: str, predicate: Any, timeout: float = 15.0) -> dict[str, Any]:
        """Poll the API until the device view satisfies `predicate` (what an operator would see)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            view = await self.device(device_id)
            if predicate(view):
                return view
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"device {device_id} never reached the expected state: {view}")
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def running_control_plane(data_dir: Path, **overrides: Any) -> AsyncIterator[RunningControlPlane]:
    defaults: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": free_port(),
        "mqtt_port": free_port(),
        "admin_key": ADMIN_KEY,
        "ingest_flush_interval_s": 0.1,
        "mqtt_reconnect_max_s": 1.0,
    }
    settings = ControlPlaneSettings(data_dir=data_dir, **{**defaults, **overrides})
    control_plane = ControlPlane(settings)
    await control_plane.open()
    task = asyncio.create_task(control_plane.run())
    try:
        await asyncio.wait_for(_ready_or_crash(control_plane, task), timeout=30)
        tls = ssl.create_default_context(cafile=str(settings.pki_dir / "ca.pem"))
        async with (
            httpx.AsyncClient(
                base_url=control_plane.base_url,
                verify=tls,
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                timeout=30,
            ) as api,
            httpx.AsyncClient(base_url=control_plane.base_url, verify=tls, timeout=30) as anonymous,
        ):
            yield RunningControlPlane(control_plane, settings, api, anonymous)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await finish_within(task, 60, "control plane shutdown")
        await finish_within(control_plane.close(), 30, "closing the control plane")


async def _ready_or_crash(control_plane: ControlPlane, task: asyncio.Task[None]) -> None:
    ready = asyncio.create_task(control_plane.ready.wait())
    done, _ = await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        ready.cancel()
        task.result()  # raises what crashed it
        raise RuntimeError("control plane stopped before it was ready")
