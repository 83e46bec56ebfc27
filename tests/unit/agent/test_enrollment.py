"""Enrollment against a real HTTPS server (aiohttp) with real certificates; no mocks."""

from __future__ import annotations

import socket
import stat

import pytest

from agent.enrollment import enroll
from agent.errors import CAPinMismatch, ConfigurationError, EnrollmentError, ServerUnreachable
from agent.identity import fingerprint, load_certificate, load_private_key, matches_key
from agent.state import KEY_FILE, AgentState
from protocol.signing import key_id
from tests.unit.agent.enrollment_server import DEVICE, TOKEN
from tests.unit.agent.factories import LocalCA


async def enroll_with(server, state, **kwargs):
    options = {"token": TOKEN, "device": DEVICE, "timeout_s": 5.0, **kwargs}
    return await enroll(server_url=server.url, state=state, **options)


async def test_enrollment_with_a_ca_file_persists_the_identity(tmp_path, server, ca_file, signing_key):
    state = AgentState.open(tmp_path / "state")
    response = await enroll_with(server, state, ca_file=ca_file)

    assert response.device_id == "dev-0042"
    enrollment = state.require_enrollment()
    assert (enrollment.device_id, enrollment.store_id) == ("dev-0042", "store-7")
    assert (enrollment.broker_host, enrollment.broker_port) == ("broker.store.example", 8883)
    assert enrollment.health_interval_s == 15.0
    assert state.ca_chain_pem() == server.ca.pem
    assert list(state.signing_keys()) == [key_id(signing_key.public_key())]

    # The key was made here, never sent, and the certificate is for it.
    key = load_private_key(state.private_key_pem())
    assert matches_key(load_certificate(state.certificate_pem()), key)
    assert stat.S_IMODE((tmp_path / "state" / KEY_FILE).stat().st_mode) == 0o600
    (sent,) = server.requests
    assert "PRIVATE KEY" not in str(sent)
    assert sent["token"] == TOKEN
    assert sent["schema"] == 1
    assert sent["device"]["role"] == "pos"
    assert sent["device"]["serial"] == "SN-1"
    assert server.ca_fetches == 0
    state.close()


async def test_enrollment_with_a_ca_fingerprint_fetches_and_pins_the_ca(server, ca):
    state = AgentState.in_memory()
    await enroll_with(server, state, ca_fingerprint=fingerprint(ca.cert))
    assert server.ca_fetches == 1
    assert state.require_enrollment().device_id == "dev-0042"


async def test_fingerprint_mismatch_stops_before_the_token_is_sent(server):
    state = AgentState.in_memory()
    with pytest.raises(CAPinMismatch) as caught:
        await enroll_with(server, state, ca_fingerprint="sha256:" + "ab" * 32)
    assert caught.value.code == "ca_fingerprint_mismatch"
    assert server.requests == []
    assert state.enrollment() is None


async def test_server_not_signed_by_the_pinned_ca_is_refused_before_the_token_is_sent(tmp_path, server):
    other = tmp_path / "other-ca.pem"
    other.write_text(LocalCA.create("impostor CA").pem)
    state = AgentState.in_memory()
    with pytest.raises(ServerUnreachable, match="certificate verify failed"):
        await enroll_with(server, state, ca_file=other)
    assert server.requests == []


async def test_refused_token_surfaces_the_server_code_and_message(server, ca_file):
    state = AgentState.in_memory()
    with pytest.raises(EnrollmentError) as caught:
        await enroll_with(server, state, ca_file=ca_file, token="tok-wrong-000000000")
    error = caught.value
    assert (error.status, error.code) == (401, "token_unknown")
    assert error.message == "enrollment token is not valid"
    assert "HTTP 401" in str(error)
    assert "token_unknown" in str(error)
    assert state.enrollment() is None


async def test_non_json_server_error_still_gives_a_clear_error(server, ca_file):
    server.behaviour = "server_error"
    with pytest.raises(EnrollmentError) as caught:
        await enroll_with(server, AgentState.in_memory(), ca_file=ca_file)
    assert (caught.value.status, caught.value.code) == (503, "http_503")


async def test_malformed_success_response_is_refused(server, ca_file):
    server.behaviour = "garbage"
    state = AgentState.in_memory()
    with pytest.raises(EnrollmentError) as caught:
        await enroll_with(server, state, ca_file=ca_file)
    assert caught.value.code == "invalid_message"
    assert state.enrollment() is None


async def test_certificate_for_another_key_is_refused(server, ca_file):
    server.behaviour = "cert_for_other_key"
    state = AgentState.in_memory()
    with pytest.raises(EnrollmentError, match="not for this device's key"):
        await enroll_with(server, state, ca_file=ca_file)
    assert state.enrollment() is None


async def test_unreachable_server(ca_file):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ServerUnreachable) as caught:
        await enroll(
            server_url=f"https://127.0.0.1:{port}",
            token=TOKEN,
            state=AgentState.in_memory(),
            ca_file=ca_file,
            device=DEVICE,
            timeout_s=2.0,
        )
    assert caught.value.code == "unreachable"
    assert caught.value.status is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one"),
        ({"ca_file": "X", "ca_fingerprint": "sha256:" + "a" * 64}, "exactly one"),
        ({"ca_fingerprint": "md5:abc"}, "sha256"),
        ({"ca_fingerprint": "sha256:" + "a" * 64, "token": "short"}, "token"),
    ],
)
async def test_bad_arguments_are_configuration_errors(server, kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        await enroll_with(server, AgentState.in_memory(), **kwargs)
    assert server.requests == []


async def test_plain_http_is_refused(ca_file):
    with pytest.raises(ConfigurationError, match="https"):
        await enroll(
            server_url="http://cp.example",
            token=TOKEN,
            state=AgentState.in_memory(),
            ca_file=ca_file,
            device=DEVICE,
            timeout_s=1.0,
        )


async def test_missing_ca_file_is_a_configuration_error(tmp_path, server):
    with pytest.raises(ConfigurationError, match="cannot read the CA file"):
        await enroll_with(server, AgentState.in_memory(), ca_file=tmp_path / "missing.pem")
