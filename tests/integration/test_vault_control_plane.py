"""A real control plane on the Vault PKI backend (real OpenBao): enroll, re-issue, revoke, outages.

Degradation: with OpenBao paused (SIGSTOP: connections hang) or killed (refused), ``POST
/v1/enroll`` answers 503 + Retry-After within the CA timeout, then at once while the circuit is
open; the rest of the API keeps answering; when OpenBao is back the control plane recovers by
itself, and the token refused meanwhile still works (a CA failure does not consume it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity import build_csr
from tests.support.agents import enroll_agent, running
from tests.support.control_plane import RunningControlPlane, running_control_plane
from tests.support.openbao import OpenBaoServer

pytestmark = [pytest.mark.integration, pytest.mark.vault]

CA_TIMEOUT_S = 1.0
BREAKER_RESET_S = 1.0


@pytest.fixture
def bao(tmp_path: Path) -> Iterator[OpenBaoServer]:
    with OpenBaoServer(tmp_path / "openbao") as server:
        yield server


def vault_settings(bao: OpenBaoServer, *, auth: str = "approle") -> dict[str, Any]:
    credentials: dict[str, Any] = (
        {"vault_role_id": bao.role_id, "vault_secret_id": bao.secret_id}
        if auth == "approle"
        else {"vault_token": bao.create_token(ttl="2h")}
    )
    return {
        "ca_backend": "vault",
        "vault_url": bao.url,
        "ca_timeout_s": CA_TIMEOUT_S,
        "ca_breaker_failures": 2,
        "ca_breaker_reset_s": BREAKER_RESET_S,
        **credentials,
    }


@pytest.fixture
async def cp(tmp_path: Path, bao: OpenBaoServer) -> AsyncIterator[RunningControlPlane]:
    async with running_control_plane(tmp_path / "cp", **vault_settings(bao)) as running:
        await running.create_store("store-1")
        yield running


async def post_enroll(cp: RunningControlPlane, token: str) -> httpx.Response:
    body = {
        "schema": 1,
        "token": token,
        "csr_pem": build_csr(ec.generate_private_key(ec.SECP256R1())),
        "device": {"hostname": "pos-9"},
    }
    return await cp.anonymous.post("/v1/enroll", json=body)


def vault_issued(bao: OpenBaoServer, certificate_pem: str) -> bool:
    cert = x509.load_pem_x509_certificate(certificate_pem.encode())
    try:
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(bao.ca_pem.encode()))
    except Exception:
        return False
    return True


def vault_crl_serials(bao: OpenBaoServer) -> set[str]:
    crl = x509.load_pem_x509_crl(str(bao.admin().secrets.pki.read_crl(mount_point="pki")).encode())
    return {format(entry.serial_number, "x") for entry in crl}


async def test_agent_enrolls_with_a_vault_certificate_and_connects(cp, bao, tmp_path):
    enrolled = await enroll_agent(cp, "store-1", tmp_path / "agent")
    certificate_pem = enrolled.state.certificate_pem()
    assert certificate_pem is not None
    assert vault_issued(bao, certificate_pem)
    # The trust bundle: the built-in root first (what the token's fingerprint pins), Vault's CA too.
    bundle = (await cp.anonymous.get("/v1/pki/ca")).text
    assert bundle.startswith(cp.ca_file.read_text())
    assert bao.ca_pem.strip() in bundle

    async with running(enrolled.build()):
        view = await cp.wait_for_device(enrolled.device_id, lambda d: d["online"])
    assert view["store_id"] == "store-1"


async def test_reissue_and_revoke_land_in_the_vault_crl(tmp_path, bao):
    async with running_control_plane(tmp_path / "cp", **vault_settings(bao, auth="token")) as cp:
        await cp.create_store("store-1")
        enrolled = await enroll_agent(cp, "store-1", tmp_path / "agent")
        device_id = enrolled.device_id
        [first] = [c["serial"] for c in (await cp.api.get(f"/v1/certificates?device_id={device_id}")).json()]

        # Re-issue the same identity (operator re-enrollment token, new key): the old one is superseded.
        token = (await cp.api.post(f"/v1/devices/{device_id}/reenrollment-tokens", json={})).json()
        response = await post_enroll(cp, token["token"])
        assert response.status_code == 200, response.text
        assert response.json()["device_id"] == device_id
        assert vault_issued(bao, response.json()["certificate_pem"])
        second = format(
            x509.load_pem_x509_certificate(response.json()["certificate_pem"].encode()).serial_number, "x"
        )
        assert second != first
        assert first in vault_crl_serials(bao)

        revoked = await cp.api.post(f"/v1/devices/{device_id}/revoke", json={})
        assert revoked.status_code == 200, revoked.text
        assert {first, second} <= vault_crl_serials(bao)
        # The published CRL: Vault's first, then the built-in CA's (for Mosquitto's crlfile).
        published = (await cp.anonymous.get("/v1/pki/crl")).text
        assert published.count("BEGIN X509 CRL") == 2
        crl = x509.load_pem_x509_crl(published.encode())
        assert crl.get_revoked_certificate_by_serial_number(int(second, 16)) is not None


async def assert_rest_of_api_works(cp: RunningControlPlane) -> None:
    started = time.monotonic()
    assert (await cp.anonymous.get("/healthz")).status_code == 200
    assert (await cp.api.get("/v1/devices")).status_code == 200
    assert (await cp.api.get("/v1/stores/store-1")).status_code == 200
    assert time.monotonic() - started < 1.0


async def assert_unavailable(cp: RunningControlPlane, token: str, *, within: float) -> None:
    started = time.monotonic()
    response = await post_enroll(cp, token)
    elapsed = time.monotonic() - started
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "ca_unavailable"
    assert int(response.headers["Retry-After"]) > 0
    assert elapsed < within, f"503 took {elapsed:.2f}s"


async def enroll_when_back(cp: RunningControlPlane, token: str, *, timeout: float) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        response = await post_enroll(cp, token)
        if response.status_code != 503 or time.monotonic() > deadline:
            return response
        await asyncio.sleep(0.2)


async def test_vault_hung_gives_503_in_bounded_time_and_recovers_by_itself(cp, bao):
    token = (await cp.create_token("store-1"))["token"]
    bao.pause()
    try:
        # Calls wait for the CA timeout, then the circuit opens and refusals are immediate.
        await assert_unavailable(cp, token, within=CA_TIMEOUT_S + 1.0)
        await assert_unavailable(cp, token, within=CA_TIMEOUT_S + 1.0)
        await assert_unavailable(cp, token, within=0.5)
        await assert_rest_of_api_works(cp)
    finally:
        bao.resume()
    response = await enroll_when_back(cp, token, timeout=BREAKER_RESET_S + 10)
    assert response.status_code == 200, response.text  # the refused attempts did not use the token up
    assert vault_issued(bao, response.json()["certificate_pem"])


async def test_vault_down_gives_503_and_a_restarted_vault_is_used_again(cp, bao, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="control_plane.pki.vault")
    await enroll_agent(cp, "store-1", tmp_path / "before")  # logged in to Vault with AppRole
    token = (await cp.create_token("store-1"))["token"]
    bao.kill()
    await assert_unavailable(cp, token, within=CA_TIMEOUT_S)
    await assert_unavailable(cp, token, within=CA_TIMEOUT_S)
    await assert_unavailable(cp, token, within=0.5)
    await assert_rest_of_api_works(cp)

    # Same CA and AppRole, but the control plane's token died with the old process: it logs in again.
    bao.restart()
    response = await enroll_when_back(cp, token, timeout=BREAKER_RESET_S + 10)
    assert response.status_code == 200, response.text
    assert vault_issued(bao, response.json()["certificate_pem"])
    logins = [r for r in caplog.records if r.getMessage().startswith("logged in to Vault with AppRole")]
    assert len(logins) == 2
