"""Broker refusals are loud on both brokers: each bad connection leaves an audit record.

The embedded broker reports its refusals directly; for Mosquitto the control plane follows
its log (`--broker-log-file`).
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

import aiomqtt
import pytest

from control_plane.pki.ca import BuiltinCA
from tests.support.certs import ClientCredentials, make_device_credentials, make_foreign_ca
from tests.support.control_plane import RunningControlPlane

pytestmark = pytest.mark.integration


async def _attempt(stack: RunningControlPlane, credentials: ClientCredentials, client_id: str) -> bool:
    host, port = stack.settings.broker_endpoint
    with contextlib.suppress(aiomqtt.MqttError, OSError, TimeoutError):
        async with aiomqtt.Client(
            host, port, identifier=client_id, tls_context=credentials.ssl_context(), timeout=3
        ):
            return True
    return False


async def test_bad_certificates_are_refused_and_audited(stack: RunningControlPlane, tmp_path):
    trust = stack.settings.pki_dir / "ca.pem"
    ca = BuiltinCA.load_or_create(stack.settings.pki_dir, trust_domain=stack.settings.trust_domain)
    foreign_ca = make_foreign_ca(tmp_path / "foreign-ca", trust_domain=stack.settings.trust_domain)
    attempts = {
        "no certificate": ClientCredentials(server_ca_file=trust),
        "foreign CA": make_device_credentials(
            foreign_ca, tmp_path / "foreign", "dev-0000000000000001", server_ca_file=trust
        ),
        "expired": make_device_credentials(
            ca,
            tmp_path / "expired",
            "dev-0000000000000002",
            server_ca_file=trust,
            validity=timedelta(minutes=-1),
        ),
    }
    for name, credentials in attempts.items():
        assert not await _attempt(stack, credentials, "dev-0000000000000001"), f"{name} was accepted"

    audit = stack.control_plane.services.audit
    for _ in range(50):
        refused = await audit.records(action="broker.connection_refused")
        if len(refused) >= len(attempts):
            break
        await asyncio.sleep(0.1)
    broker_log = stack.mosquitto.log() if stack.mosquitto is not None else ""
    assert len(refused) >= len(attempts), (refused, broker_log)
    assert all(record["outcome"] == "denied" for record in refused)
    assert all(record["detail"].get("reason") for record in refused)

    # A good certificate still gets in, and is not audited as a refusal.
    good = make_device_credentials(ca, tmp_path / "good", "dev-0000000000000003", server_ca_file=trust)
    assert await _attempt(stack, good, "dev-0000000000000003")
