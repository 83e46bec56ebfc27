"""The control plane is killed (SIGKILL) in the middle of a rollout and started again: the
rollout resumes where it was and finishes, with no duplicate and no lost versions."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.handlers import FileConfigHandler
from agent.health import SimulatedProbe
from agent.runtime import Agent
from tests.support.agents import enroll_agent
from tests.support.control_plane import ADMIN_KEY
from tests.support.ports import free_port

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


class _Server:
    """`storefleet serve` as a real process (embedded broker + SQLite), killable with -9."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port, self.mqtt_port = free_port(), free_port()
        self.process: subprocess.Popen[str] | None = None
        self.starts = 0

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start it and wait until it is ready. A first start whose port was taken meanwhile
        (the free port was handed to someone else between probe and bind) tries new ports;
        any other early exit fails with the server's own words."""
        for _ in range(3):
            log = self._spawn()
            if self._ready():
                return
            said = log.read_text(errors="replace")
            if self.starts > 1 or "address already in use" not in said.lower():
                raise AssertionError(f"server exited early:\n{said[-3000:]}")
            self.starts -= 1
            self.port, self.mqtt_port = free_port(), free_port()
        raise AssertionError("no free ports for the server")

    def _spawn(self) -> Path:
        self.starts += 1
        log = self.data_dir.parent / f"serve-{self.starts}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("STOREFLEET_")}
        env |= {
            "STOREFLEET_ADMIN_KEY": ADMIN_KEY,
            "STOREFLEET_ROLLOUT_TICK_S": "0.1",
            "STOREFLEET_ROLLOUT_LEASE_TTL_S": "2",
            "STOREFLEET_INGEST_FLUSH_INTERVAL_S": "0.1",
        }
        with log.open("w") as stderr:  # the child keeps its own copy of the descriptor
            self.process = self._popen(env, stderr)
        return log

    def _popen(self, env: dict[str, str], stderr: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [
                BIN / "storefleet",
                "serve",
                "--data-dir",
                str(self.data_dir),
                "--port",
                str(self.port),
                "--mqtt-port",
                str(self.mqtt_port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
            env=env,
        )

    def _ready(self) -> bool:
        """True once /readyz answers; False if the process exited first."""
        assert self.process is not None
        deadline = time.monotonic() + 30
        ca_file = self.data_dir / "pki" / "ca.pem"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            with contextlib.suppress(httpx.HTTPError, OSError):
                if (
                    ca_file.exists()
                    and httpx.get(f"{self.base_url}/readyz", verify=self._tls()).status_code == 200
                ):
                    return True
            time.sleep(0.2)
        raise AssertionError("server never became ready")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def _tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.data_dir / "pki" / "ca.pem"))

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base_url,
            verify=self._tls(),
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            timeout=30,
        )

    async def create_token(self, store_id: str) -> dict[str, Any]:
        async with self.client() as api:
            response = await api.post(f"/v1/stores/{store_id}/enrollment-tokens", json={})
            assert response.status_code == 201, response.text
            return dict(response.json())

    def versions(self) -> dict[str, list[int]]:
        with contextlib.closing(sqlite3.connect(self.data_dir / "storefleet.db")) as db:
            rows = db.execute(
                "SELECT device_id, version FROM desired_states ORDER BY device_id, version"
            ).fetchall()
        found: dict[str, list[int]] = {}
        for device_id, version in rows:
            found.setdefault(device_id, []).append(version)
        return found


async def _rollout(server: _Server) -> dict[str, Any]:
    async with server.client() as api:
        return dict((await api.get("/v1/rollouts/ro-restart")).json())


async def test_killed_mid_rollout_resumes_without_duplicate_or_lost_versions(tmp_path):
    server = _Server(tmp_path / "control-plane")
    server.start()
    tasks: list[asyncio.Task[None]] = []
    try:
        async with server.client() as api:
            response = await api.post(
                "/v1/stores", json={"id": "FR-PAR-0001", "name": "Paris", "config": {"v": 1}}
            )
            assert response.status_code == 201, response.text
        enrolled = [await enroll_agent(server, "FR-PAR-0001", tmp_path / f"agent-{i}") for i in range(3)]  # type: ignore[arg-type]
        agents = [
            Agent(e.settings, e.state, FileConfigHandler(e.settings.config_path), SimulatedProbe(i))
            for i, e in enumerate(enrolled)
        ]
        tasks = [asyncio.create_task(a.run()) for a in agents]
        for agent in agents:
            await asyncio.wait_for(agent.wait_applied(1), 15)
        async with server.client() as api:
            release = {"id": "v2", "name": "v2", "layer": {"config": {"v": 2}}}
            assert (await api.post("/v1/releases", json=release)).status_code == 201
            body = {
                "id": "ro-restart",
                "release_id": "v2",
                "selector": {"stores": ["FR-PAR-0001"]},
                "plan": {
                    "waves": [{"count": 1}, {"percent": 100}],
                    "bake_s": 3,
                    "apply_timeout_s": 30,
                    "heartbeat_grace_s": 20,
                    "window": "now",
                    "keep_known_good": False,
                },
            }
            assert (await api.post("/v1/rollouts", json=body)).status_code == 201
        # Kill it while the canary bakes: applied, not yet proven, wave 1 not sent.
        deadline = asyncio.get_running_loop().time() + 20
        while (await _rollout(server))["states"].get("applied") != 1:
            assert asyncio.get_running_loop().time() < deadline, await _rollout(server)
            await asyncio.sleep(0.05)
        server.kill()
        before = server.versions()
        assert sorted(len(v) for v in before.values()) == [1, 1, 2]  # only the canary moved

        server.start()  # same data dir and ports; agents reconnect on their own
        deadline = asyncio.get_running_loop().time() + 40
        while (view := await _rollout(server))["state"] not in ("completed", "rolled_back", "paused"):
            assert asyncio.get_running_loop().time() < deadline, view
            await asyncio.sleep(0.1)
        assert view["state"] == "completed", view
        assert view["states"] == {"healthy": 3}
        for agent in agents:
            await asyncio.wait_for(agent.wait_applied(2), 15)
        # Exactly one new version per device: nothing issued twice across the crash, nothing lost.
        assert server.versions() == {e.device_id: [1, 2] for e in enrolled}
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if server.process is not None and server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)
            try:
                server.process.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
