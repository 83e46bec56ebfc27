"""A real `storefleet-agent run` process killed with SIGKILL in the middle of applying a new
desired state, against a real control plane: after the restart the configuration files are one
whole version, and the device converges to the new one."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.handlers import CONFIG_FILE, ENFORCED_POLICY_FILE, ENV_FILE, POLICIES_FILE
from tests.support.agents import enroll_agent
from tests.support.control_plane import RunningControlPlane
from tests.support.ports import free_port

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
FILES = (CONFIG_FILE, POLICIES_FILE, ENV_FILE, ENFORCED_POLICY_FILE)


def layer(version: int) -> dict[str, Any]:
    """A store configuration whose every output file says which version it came from."""
    return {
        "config": {"pos": {"mark": version}, "env": {"SF_MARK": str(version)}},
        "policies": {"screen_lock_timeout_s": 100 + version, "usb_storage": False},
    }


def marks(config_dir: Path) -> dict[str, int | None]:
    """The store-config version each output file reflects (None: missing)."""
    found: dict[str, int | None] = {}
    for name in FILES:
        path = config_dir / name
        if not path.exists():
            found[name] = None
        elif name == CONFIG_FILE:
            found[name] = json.loads(path.read_text())["pos"]["mark"]
        elif name == POLICIES_FILE:
            found[name] = json.loads(path.read_text())["screen_lock_timeout_s"] - 100
        elif name == ENV_FILE:
            [line] = [line for line in path.read_text().splitlines() if line.startswith("SF_MARK=")]
            found[name] = int(line.split("=", 1)[1].strip('"'))
        else:
            found[name] = json.loads(path.read_text())["policies"]["screen_lock_timeout_s"] - 100
    return found


def whole(version: int) -> dict[str, int]:
    return dict.fromkeys(FILES, version)


def staged_leftovers(config_dir: Path) -> list[str]:
    return sorted(p.name for p in config_dir.iterdir() if p.name.startswith("."))


def journal_rows(state_dir: Path) -> int:
    with sqlite3.connect(state_dir / "agent.db", timeout=5) as db:
        return int(db.execute("SELECT count(*) FROM apply_journal").fetchone()[0])


def outbox_rows(state_dir: Path) -> int:
    with sqlite3.connect(state_dir / "agent.db", timeout=5) as db:
        return int(db.execute("SELECT count(*) FROM health_outbox").fetchone()[0])


class AgentProcess:
    """`storefleet-agent run` as a device runs it; output goes to a file (no pipe to fill)."""

    def __init__(self, state_dir: Path, log: Path, **settings: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STOREFLEET_")}
        env.update({f"STOREFLEET_AGENT_{name.upper()}": value for name, value in settings.items()})
        env.setdefault("STOREFLEET_AGENT_HEALTH_INTERVAL_S", "0.3")
        env.setdefault("STOREFLEET_AGENT_RECONNECT_MAX_S", "1")
        self.log = log
        with log.open("a") as out:
            self.process = subprocess.Popen(
                [BIN / "storefleet-agent", "run", "--state-dir", str(state_dir)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def output(self) -> str:
        return self.log.read_text()

    async def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(self.process.wait, 10)

    async def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(self.process.wait, 20)
        assert code == 0, self.output()[-3000:]

    def ensure_dead(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


async def until(predicate: Callable[[], bool], *, timeout: float = 20.0, every: float = 0.05) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(every)


async def set_store_layer(cp: RunningControlPlane, store_id: str, version: int) -> None:
    response = await cp.api.put(f"/v1/stores/{store_id}/config", json=layer(version))
    assert response.status_code == 200, response.text


async def test_agent_killed_mid_apply_recovers_one_whole_version_and_converges(embedded, tmp_path):
    cp = embedded
    await cp.create_store("DE-CRASH-1", **layer(1))
    enrolled = await enroll_agent(cp, "DE-CRASH-1", tmp_path / "agent")
    enrolled.state.close()
    state_dir, config_dir, log = tmp_path / "agent", tmp_path / "agent" / "config", tmp_path / "agent.log"
    device = enrolled.device_id

    # Each file step of an apply pauses 0.15 s, so the renames are far enough apart to kill
    # the process between two of them.
    agent = AgentProcess(state_dir, log, apply_step_delay_s="0.15")
    try:
        await cp.wait_for_device(device, lambda view: view["applied_version"] == 1, timeout=30)
        assert marks(config_dir) == whole(1)

        await set_store_layer(cp, "DE-CRASH-1", 2)
        await until(lambda: marks(config_dir)[CONFIG_FILE] == 2, every=0.01)
        await agent.kill()
    finally:
        agent.ensure_dead()
    killed = marks(config_dir)
    assert killed[CONFIG_FILE] == 2
    assert 1 in killed.values(), f"not killed mid-apply: {killed}"  # a mix on disk right now
    assert journal_rows(state_dir) == 1
    status = await asyncio.to_thread(
        subprocess.run,
        [BIN / "storefleet-agent", "status", "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert json.loads(status.stdout)["interrupted_apply"] == 2

    # Restart where the broker is unreachable: only the start-up recovery can act.
    agent = AgentProcess(state_dir, log, broker_port=str(free_port()))
    try:
        await until(lambda: "rolled back the interrupted apply of version 2" in agent.output())
        assert marks(config_dir) == whole(1)  # the whole previous version
        assert staged_leftovers(config_dir) == []
        assert journal_rows(state_dir) == 0
        await agent.stop()
    finally:
        agent.ensure_dead()

    # Back online: the retained desired state brings version 2 again, and it lands whole.
    agent = AgentProcess(state_dir, log)
    try:
        view = await cp.wait_for_device(
            device, lambda view: view["applied_version"] == 2 and view["in_sync"], timeout=30
        )
        assert view["apply_status"] == "applied"
        assert marks(config_dir) == whole(2)
        assert staged_leftovers(config_dir) == []
        await agent.stop()
    finally:
        agent.ensure_dead()
