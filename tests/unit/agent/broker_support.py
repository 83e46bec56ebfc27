"""A real Mosquitto (the product's mTLS + ACL configuration, certificates from the built-in CA)
and the control plane's side of the conversation, for the agent tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiomqtt
from cryptography.hazmat.primitives.asymmetric import ec

from agent.enrollment import ensure_key
from agent.identity import build_csr
from agent.settings import AgentSettings
from agent.state import AgentState
from control_plane.pki.ca import BuiltinCA
from protocol.messages import BrokerEndpoint, EnrollmentResponse
from protocol.topics import TopicKind, device_topic
from tests.support.certs import make_service_credentials, write_ca_certificate
from tests.unit.agent.factories import signing_key_entry

TRUST_DOMAIN = "agent-test.storefleet.example"
STORE_ID = "store-1"
TIMEOUT_S = 10.0


def fast_settings(tmp_path: Path, **overrides: Any) -> AgentSettings:
    values: dict[str, Any] = {
        "state_dir": tmp_path,
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.5,
        "health_interval_s": 0.2,
        "keepalive_s": 5,
        "connect_timeout_s": 5.0,
        "mqtt_timeout_s": 5.0,
        **overrides,
    }
    return AgentSettings(**values)


@dataclass
class Broker:
    ca: BuiltinCA
    host: str
    port: int
    directory: Path

    def enroll(self, state: AgentState, device_id: str, signing_key: ec.EllipticCurvePrivateKey) -> None:
        """What the control plane would hand out: a certificate from the device's own CSR."""
        issued = self.ca.sign_device_csr(
            build_csr(ensure_key(state)), device_id=device_id, store_id=STORE_ID, validity=timedelta(hours=1)
        )
        state.save_enrollment(
            EnrollmentResponse(
                device_id=device_id,
                store_id=STORE_ID,
                certificate_pem=issued.certificate_pem,
                ca_chain_pem=self.ca.ca_chain_pem(),
                broker=BrokerEndpoint(host=self.host, port=self.port),
                signing_keys=[signing_key_entry(signing_key)],
                health_interval_s=30.0,
            )
        )

    @contextlib.asynccontextmanager
    async def control_plane(self) -> AsyncIterator[ControlPlane]:
        ca_file = write_ca_certificate(self.ca, self.directory / "cp" / "ca.pem")
        credentials = make_service_credentials(self.ca, self.directory / "cp", server_ca_file=ca_file)
        client = aiomqtt.Client(
            self.host,
            self.port,
            identifier="storefleet-control-plane-agent-test",
            tls_context=credentials.ssl_context(),
            timeout=TIMEOUT_S,
        )
        async with client:
            await client.subscribe("sf/v1/dev/+/reported", qos=1)
            await client.subscribe("sf/v1/dev/+/status", qos=1)
            await client.subscribe("sf/v1/dev/+/health", qos=0)
            yield ControlPlane(client)


@dataclass
class ControlPlane:
    client: aiomqtt.Client

    async def publish_desired(self, device_id: str, document: dict[str, Any]) -> None:
        await self.client.publish(
            device_topic(device_id, TopicKind.DESIRED), json.dumps(document), qos=1, retain=True
        )

    async def expect(
        self, device_id: str, kind: TopicKind, match: Callable[[dict[str, Any]], bool] = lambda _: True
    ) -> dict[str, Any]:
        """The next message of `kind` from `device_id` that satisfies `match`."""
        topic = device_topic(device_id, kind)
        async with asyncio.timeout(TIMEOUT_S):
            async for message in self.client.messages:
                if message.topic.matches(topic):
                    body = json.loads(message.payload)
                    if match(body):
                        return body
        raise AssertionError("unreachable")
