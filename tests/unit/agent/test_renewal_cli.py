"""`storefleet-agent reenroll` (and `enroll --reenroll`) against a real HTTPS enrollment
endpoint, and what `status` says about renewal and expiry."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import timedelta

import pytest

from agent.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main
from agent.identity import certificate_pem, fingerprint, generate_key, private_key_pem
from agent.state import AgentState
from tests.unit.agent.enrollment_server import TOKEN
from tests.unit.agent.factories import enroll_directly, signed_desired


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("STOREFLEET_AGENT_"):
            monkeypatch.delenv(name)


def enroll_args(command: str, server, state_dir, ca) -> list[str]:
    return [
        command,
        "--server",
        server.url,
        "--token",
        TOKEN,
        "--state-dir",
        str(state_dir),
        "--ca-fingerprint",
        fingerprint(ca.cert),
    ]


@pytest.mark.parametrize("command", [["reenroll"], ["enroll", "--reenroll"]])
async def test_reenroll_keeps_the_device_and_its_applied_state_and_replaces_the_key(
    tmp_path, server, ca, signing_key, capsys, command
):
    state_dir = tmp_path / "state"
    assert await asyncio.to_thread(main, enroll_args("enroll", server, state_dir, ca)) == EXIT_OK
    state = AgentState.open(state_dir)
    state.record_applied(4, signed_desired(4, signing_key, device_id="dev-0042"))
    old_key = state.private_key_pem()
    state.close()
    capsys.readouterr()

    args = enroll_args(command[0], server, state_dir, ca)[1:]
    assert await asyncio.to_thread(main, [*command, *args]) == EXIT_OK
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert (result["reenrolled"], result["device_id"]) == (True, "dev-0042")
    assert TOKEN not in out + err

    state = AgentState.open(state_dir)
    assert state.applied().version == 4
    assert state.private_key_pem() != old_key
    assert state.pending_private_key_pem() is None
    state.close()


async def test_reenroll_refuses_a_token_that_enrolls_another_device(
    tmp_path, server, ca, signing_key, capsys
):
    state_dir = tmp_path / "state"
    state = AgentState.open(state_dir)
    enroll_directly(state, ca=ca, signing_keys=[signing_key], device_id="dev-0001")
    before = (state.private_key_pem(), state.certificate_pem())
    state.close()

    code = await asyncio.to_thread(main, enroll_args("reenroll", server, state_dir, ca))
    assert code == EXIT_FAILURE
    assert "not this device's re-enrollment token" in capsys.readouterr().err

    state = AgentState.open(state_dir)
    assert (state.private_key_pem(), state.certificate_pem()) == before
    assert state.require_enrollment().device_id == "dev-0001"
    state.close()


def test_reenroll_needs_an_enrolled_device(tmp_path, capsys):
    args = [
        "reenroll",
        "--server",
        "https://cp.example",
        "--token",
        TOKEN,
        "--ca-fingerprint",
        "sha256:" + "a" * 64,
    ]
    assert main([*args, "--state-dir", str(tmp_path / "nothing")]) == EXIT_USAGE
    assert "use `enroll`" in capsys.readouterr().err


def test_enroll_over_an_enrolled_device_points_to_reenroll(tmp_path, ca, signing_key, capsys):
    state = AgentState.open(tmp_path)
    enroll_directly(state, ca=ca, signing_keys=[signing_key])
    state.close()
    args = [
        "enroll",
        "--server",
        "https://cp.example",
        "--token",
        TOKEN,
        "--ca-fingerprint",
        "sha256:" + "a" * 64,
    ]
    assert main([*args, "--state-dir", str(tmp_path)]) == EXIT_USAGE
    assert "reenroll" in capsys.readouterr().err


def test_status_reports_renewal_and_an_expired_certificate(tmp_path, ca, signing_key, capsys):
    state = AgentState.open(tmp_path)
    response = enroll_directly(state, ca=ca, signing_keys=[signing_key])
    assert main(["status", "--state-dir", str(tmp_path)]) == EXIT_OK
    status = json.loads(capsys.readouterr().out)
    assert (status["certificate_expired"], status["needs_reenrollment"]) == (False, False)
    assert status["renewal"]["renewals"] == 0

    key = generate_key()
    state.save_private_key(private_key_pem(key))
    expired = certificate_pem(ca.issue(key.public_key(), response.device_id, validity=timedelta(seconds=-1)))
    state.save_enrollment(response.model_copy(update={"certificate_pem": expired}))
    state.close()
    assert main(["status", "--state-dir", str(tmp_path)]) == EXIT_OK
    captured = capsys.readouterr()
    status = json.loads(captured.out)
    assert (status["certificate_expired"], status["needs_reenrollment"]) == (True, True)
    assert status["renewal"]["status"] == "expired"
    assert "reenrollment-tokens" in captured.err
