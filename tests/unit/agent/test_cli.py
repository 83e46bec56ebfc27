"""The `storefleet-agent` command: real state directories, a real HTTPS enrollment endpoint
and, for `run`, a real process against a real Mosquitto, stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from agent.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main
from agent.identity import fingerprint
from agent.state import AgentState
from protocol.topics import TopicKind
from tests.unit.agent.broker_support import TIMEOUT_S
from tests.unit.agent.enrollment_server import TOKEN
from tests.unit.agent.factories import signed_desired

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("STOREFLEET_AGENT_"):
            monkeypatch.delenv(name)


def output(capsys) -> tuple[str, str]:
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_status_of_a_device_that_is_not_enrolled(tmp_path, capsys):
    assert main(["status", "--state-dir", str(tmp_path / "nothing")]) == EXIT_FAILURE
    out, _ = output(capsys)
    assert json.loads(out)["enrolled"] is False
    assert not (tmp_path / "nothing").exists()  # status does not create state


def test_enroll_without_a_token_says_how_to_give_one(tmp_path, ca_file, capsys):
    code = main(
        ["enroll", "--server", "https://cp.example", "--state-dir", str(tmp_path), "--ca-file", str(ca_file)]
    )
    assert code == EXIT_USAGE
    assert "STOREFLEET_AGENT_TOKEN" in output(capsys)[1]


def test_enroll_refuses_plain_http(tmp_path, ca_file, capsys, monkeypatch):
    monkeypatch.setenv("STOREFLEET_AGENT_TOKEN", TOKEN)
    code = main(
        ["enroll", "--server", "http://cp.example", "--state-dir", str(tmp_path), "--ca-file", str(ca_file)]
    )
    assert code == EXIT_USAGE
    assert "https" in output(capsys)[1]


def test_enroll_needs_a_ca_pin(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STOREFLEET_AGENT_TOKEN", TOKEN)
    assert main(["enroll", "--server", "https://cp.example", "--state-dir", str(tmp_path)]) == EXIT_USAGE
    assert "--ca-fingerprint" in output(capsys)[1]


def test_both_pins_are_a_usage_error(tmp_path, ca_file):
    with pytest.raises(SystemExit) as caught:
        main(["enroll", "--ca-file", str(ca_file), "--ca-fingerprint", "sha256:" + "a" * 64])
    assert caught.value.code == EXIT_USAGE


async def test_enroll_then_status_then_refuse_to_enroll_twice(tmp_path, server, ca, capsys, monkeypatch):
    monkeypatch.setenv("STOREFLEET_AGENT_TOKEN", TOKEN)
    state_dir = tmp_path / "state"
    args = [
        "enroll",
        "--server",
        server.url,
        "--state-dir",
        str(state_dir),
        "--ca-fingerprint",
        fingerprint(ca.cert),
    ]

    assert await asyncio.to_thread(main, [*args, "--role", "pos", "--serial", "SN-9"]) == EXIT_OK
    out, err = output(capsys)
    enrolled = json.loads(out)
    assert enrolled["device_id"] == "dev-0042"
    assert enrolled["store_id"] == "store-7"
    assert TOKEN not in out + err
    assert server.requests[0]["device"]["role"] == "pos"

    assert main(["status", "--state-dir", str(state_dir)]) == EXIT_OK
    status = json.loads(output(capsys)[0])
    assert status["enrolled"] is True
    assert (status["device_id"], status["applied_version"]) == ("dev-0042", 0)
    assert status["certificate_expired"] is False
    assert (status["interrupted_apply"], status["health_reports_queued"]) == (None, 0)
    assert status["certificate_not_after"] == enrolled["certificate_not_after"]

    assert await asyncio.to_thread(main, args) == EXIT_USAGE
    assert "already enrolled as device dev-0042" in output(capsys)[1]


async def test_refused_enrollment_exits_non_zero_with_the_server_reason(tmp_path, server, ca_file, capsys):
    wrong = "tok-wrong-0000000000"
    code = await asyncio.to_thread(
        main,
        [
            "enroll",
            "--server",
            server.url,
            "--token",
            wrong,
            "--state-dir",
            str(tmp_path),
            "--ca-file",
            str(ca_file),
        ],
    )
    assert code == EXIT_FAILURE
    out, err = output(capsys)
    assert "enrollment token is not valid" in err
    assert "HTTP 401" in err
    assert "token_unknown" in err
    assert wrong not in out + err


def test_run_without_enrollment_fails_clearly(tmp_path, capsys):
    assert main(["run", "--state-dir", str(tmp_path)]) == EXIT_FAILURE
    assert "not enrolled" in output(capsys)[1]


@pytest.mark.integration
@pytest.mark.mosquitto
async def test_run_applies_config_and_shuts_down_cleanly_on_sigterm(tmp_path, broker, signing_key):
    state_dir, config_dir = tmp_path / "state", tmp_path / "etc"
    state = AgentState.open(state_dir)
    broker.enroll(state, "dev-0007", signing_key)
    state.close()
    env = {
        **os.environ,
        "STOREFLEET_AGENT_HEALTH_INTERVAL_S": "0.2",
        "STOREFLEET_AGENT_LOG_FORMAT": "json",
    }

    async with broker.control_plane() as cp:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent",
            "run",
            "--state-dir",
            str(state_dir),
            "--config-dir",
            str(config_dir),
            cwd=ROOT,
            env=env,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            await cp.expect("dev-0007", TopicKind.STATUS, lambda body: body["state"] == "online")
            await cp.publish_desired(
                "dev-0007", signed_desired(1, signing_key, device_id="dev-0007", config={"pos": {"lane": 3}})
            )
            report = await cp.expect("dev-0007", TopicKind.REPORTED)
            assert report["status"] == "applied"
            assert json.loads((config_dir / "config.json").read_text()) == {"pos": {"lane": 3}}

            process.send_signal(signal.SIGTERM)
            await cp.expect("dev-0007", TopicKind.STATUS, lambda body: body["state"] == "offline")
            async with asyncio.timeout(TIMEOUT_S):
                _, stderr = await process.communicate()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()

    assert process.returncode == 0
    lines = [json.loads(line) for line in stderr.decode().splitlines()]
    assert any(line.get("device_id") == "dev-0007" and "applied" in line["msg"] for line in lines)
    assert "PRIVATE KEY" not in stderr.decode()

    reopened = AgentState.open(state_dir)
    assert reopened.applied().version == 1
    reopened.close()
