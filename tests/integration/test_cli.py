"""The commands as an operator and a device run them: real processes, real ports."""

from __future__ import annotations

import json
import os
import signal
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.control_plane import free_port

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def _wait_ready(url: str, ca_file: Path, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited early: {process.stdout.read() if process.stdout else ''}")
        if ca_file.exists():
            try:
                if (
                    httpx.get(
                        f"{url}/readyz", verify=ssl.create_default_context(cafile=str(ca_file))
                    ).status_code
                    == 200
                ):
                    return
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    raise AssertionError("server never became ready")


def _start_server(data_dir: Path, port: int, mqtt_port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOREFLEET_")}
    return subprocess.Popen(
        [
            BIN / "storefleet",
            "serve",
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
            "--mqtt-port",
            str(mqtt_port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _stop(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGTERM)
    try:  # graceful: API, broker, ingest and audit writer all stop
        output, _ = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"server did not stop on SIGTERM within 20 s:\n{output}") from None
    assert process.returncode == 0, output
    return output


def test_serve_enroll_run_as_real_processes(tmp_path):
    data_dir, port, mqtt_port = tmp_path / "data", free_port(), free_port()
    url, ca_file = f"https://127.0.0.1:{port}", data_dir / "pki" / "ca.pem"
    server = _start_server(data_dir, port, mqtt_port)
    agent = None
    try:
        _wait_ready(url, ca_file, server)
        admin_key = (data_dir / "admin.key").read_text().strip()
        assert stat.S_IMODE((data_dir / "admin.key").stat().st_mode) == 0o600
        assert stat.S_IMODE((data_dir / "pki" / "ca.key").stat().st_mode) == 0o600
        api = httpx.Client(
            base_url=url,
            verify=ssl.create_default_context(cafile=str(ca_file)),
            headers={"Authorization": f"Bearer {admin_key}"},
        )
        api.post(
            "/v1/stores", json={"id": "DE-BER-0001", "name": "Berlin", "config": {"pos": {"currency": "EUR"}}}
        ).raise_for_status()
        token = api.post("/v1/stores/DE-BER-0001/enrollment-tokens", json={}).raise_for_status().json()

        state_dir = tmp_path / "agent"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("STOREFLEET_")},
            "STOREFLEET_AGENT_TOKEN": token["token"],
            "STOREFLEET_AGENT_HEALTH_INTERVAL_S": "0.5",
        }
        enrolled = subprocess.run(
            [
                BIN / "storefleet-agent",
                "enroll",
                "--server",
                url,
                "--state-dir",
                str(state_dir),
                "--ca-fingerprint",
                token["ca_fingerprint"],
                "--role",
                "pos",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert enrolled.returncode == 0, enrolled.stderr
        assert token["token"] not in enrolled.stdout + enrolled.stderr

        replay = subprocess.run(
            [
                BIN / "storefleet-agent",
                "enroll",
                "--server",
                url,
                "--state-dir",
                str(tmp_path / "agent2"),
                "--ca-fingerprint",
                token["ca_fingerprint"],
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert replay.returncode != 0
        assert "token_used" in replay.stderr

        agent = subprocess.Popen(
            [BIN / "storefleet-agent", "run", "--state-dir", str(state_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            devices = api.get("/v1/devices").json()["items"]
            if devices and devices[0]["in_sync"] and devices[0]["health"]:
                break
            time.sleep(0.3)
        assert devices[0]["applied_version"] == 1, devices
        assert json.loads((state_dir / "config" / "config.json").read_text()) == {"pos": {"currency": "EUR"}}

        status = subprocess.run(
            [BIN / "storefleet-agent", "status", "--state-dir", str(state_dir)],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
            check=True,
        )
        assert devices[0]["id"] in status.stdout

        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=20) == 0
        agent = None
    finally:
        if agent is not None:
            agent.kill()
        output = _stop(server)
    # The admin key is printed on the first start only, and never logged afterwards.
    assert output.count(admin_key) == 1

    server = _start_server(data_dir, port, mqtt_port)
    try:
        _wait_ready(url, ca_file, server)
    finally:
        output = _stop(server)
    assert admin_key not in output
    assert "Admin API key" not in output


def test_serve_refuses_bad_settings(tmp_path):
    result = subprocess.run(
        [BIN / "storefleet", "serve", "--data-dir", str(tmp_path), "--broker-url", "mqtt://plain:1883"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "broker_url" in result.stderr
