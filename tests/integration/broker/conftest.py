"""Fixtures for the broker security tests: one CA, real client certificates, brokers to attack."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import aiomqtt
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from control_plane.broker.embedded import EmbeddedBroker
from control_plane.pki.ca import BuiltinCA
from protocol.topics import TopicKind, device_topic
from tests.support.certs import (
    ClientCredentials,
    make_device_credentials,
    make_foreign_ca,
    make_server_identity,
    make_service_credentials,
    write_ca_certificate,
)
from tests.support.mosquitto import MosquittoProcess

TRUST_DOMAIN = "test.storefleet.example"
DEVICE_A = "dev-a"
DEVICE_B = "dev-b"
# After the last expected message, how long a test keeps listening for a forbidden one.
GRACE_S = 0.3
TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Identities:
    ca_file: Path
    device_a: ClientCredentials
    device_b: ClientCredentials
    control_plane: ClientCredentials
    foreign_device_a: ClientCredentials  # same device id and trust domain, another CA
    expired_device_a: ClientCredentials  # our CA, expired a minute ago
    no_certificate: ClientCredentials


@dataclass
class BrokerUnderTest:
    """Where a broker listens, who may talk to it, and helpers to talk to it with real clients."""

    host: str
    port: int
    identities: Identities
    events: list[tuple[str, dict[str, object]]] = field(default_factory=list)
    embedded: EmbeddedBroker | None = None

    def client(
        self,
        credentials: ClientCredentials,
        client_id: str,
        *,
        clean_session: bool = True,
        will: aiomqtt.Will | None = None,
    ) -> aiomqtt.Client:
        return aiomqtt.Client(
            self.host,
            self.port,
            identifier=client_id,
            clean_session=clean_session,
            will=will,
            tls_context=credentials.ssl_context(),
            timeout=TIMEOUT_S,
            keepalive=30,
        )

    async def attempt(
        self,
        credentials: ClientCredentials,
        client_id: str,
        *,
        clean_session: bool = True,
        will_topic: str | None = None,
        vanish: bool = False,
        legacy_tls: bool = False,
    ) -> str:
        """Try to connect and say how it ended: "accepted", "refused: <reason>" or "closed".

        "closed" is a connection the broker ended without any CONNACK (TLS refusal). (aiomqtt
        cannot tell that apart from a slow broker and just times out, so this uses paho.)
        An accepted client disconnects cleanly, or with `vanish` drops the socket without
        DISCONNECT, which makes the broker publish its will.
        """
        return await asyncio.to_thread(
            _attempt,
            self.host,
            self.port,
            credentials.ssl_context(legacy_tls=legacy_tls),
            client_id,
            clean_session,
            will_topic,
            vanish,
        )

    def device_a(self, *, clean_session: bool = True, will: aiomqtt.Will | None = None) -> aiomqtt.Client:
        return self.client(self.identities.device_a, DEVICE_A, clean_session=clean_session, will=will)

    def device_b(self, *, clean_session: bool = True, will: aiomqtt.Will | None = None) -> aiomqtt.Client:
        return self.client(self.identities.device_b, DEVICE_B, clean_session=clean_session, will=will)

    def control_plane(self, suffix: str = "test") -> aiomqtt.Client:
        return self.client(self.identities.control_plane, f"storefleet-control-plane-{suffix}")


def _attempt(
    host: str,
    port: int,
    tls_context: ssl.SSLContext,
    client_id: str,
    clean_session: bool,
    will_topic: str | None,
    vanish: bool,
) -> str:
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=clean_session,
        protocol=paho.MQTTv311,
        reconnect_on_failure=False,
    )
    client.tls_set_context(tls_context)
    if will_topic is not None:
        client.will_set(will_topic, b"will", qos=1)
    outcome: list[str] = []
    client.on_connect = lambda _c, _u, _f, rc, _p: outcome.append("accepted" if rc == 0 else f"refused: {rc}")
    client.on_disconnect = lambda _c, _u, _f, _rc, _p: outcome.append("closed")
    try:
        client.connect(host, port, keepalive=30)
    except OSError:  # ssl.SSLError included: the handshake itself failed
        return "closed"
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not outcome and time.monotonic() < deadline:
            if client.loop(timeout=0.05) != paho.MQTT_ERR_SUCCESS and not outcome:
                outcome.append("closed")
    except OSError:
        outcome.append("closed")
    finally:
        if outcome[:1] == ["accepted"] and not vanish:
            client.disconnect()
        sock = client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
    return outcome[0] if outcome else "timeout"


def topic(device_id: str, kind: TopicKind) -> str:
    return device_topic(device_id, kind)


async def received_until(
    client: aiomqtt.Client, last_topic: str, last_payload: bytes, *, grace: float = GRACE_S
) -> list[tuple[str, bytes]]:
    """Everything `client` receives up to the message (`last_topic`, `last_payload`), then `grace` more.

    The last message is one the client is allowed to get, sent after the forbidden ones: once
    it is here, anything forbidden that the broker let through would be here too.
    """
    received: list[tuple[str, bytes]] = []

    async def collect(until_last: bool) -> None:
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
            received.append((str(message.topic), payload))
            if until_last and (str(message.topic), payload) == (last_topic, last_payload):
                return

    async with asyncio.timeout(TIMEOUT_S):
        await collect(until_last=True)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(grace):
            await collect(until_last=False)
    return received


async def expect_disconnected(client: aiomqtt.Client) -> None:
    """Wait until the broker has closed `client`'s connection (no message arrives meanwhile)."""

    async def next_message() -> aiomqtt.Message:
        return await anext(client.messages)

    async with asyncio.timeout(TIMEOUT_S):
        with pytest.raises(aiomqtt.MqttError):
            await next_message()


@pytest.fixture
def ca(tmp_path: Path) -> BuiltinCA:
    return BuiltinCA.load_or_create(tmp_path / "ca", trust_domain=TRUST_DOMAIN)


@pytest.fixture
def identities(tmp_path: Path, ca: BuiltinCA) -> Identities:
    foreign = make_foreign_ca(tmp_path / "foreign-ca", trust_domain=TRUST_DOMAIN)
    ca_file = write_ca_certificate(ca, tmp_path / "clients" / "ca.pem")
    clients = tmp_path / "clients"
    return Identities(
        ca_file=ca_file,
        device_a=make_device_credentials(ca, clients, DEVICE_A, server_ca_file=ca_file),
        device_b=make_device_credentials(ca, clients, DEVICE_B, server_ca_file=ca_file),
        control_plane=make_service_credentials(ca, clients, server_ca_file=ca_file),
        foreign_device_a=make_device_credentials(
            foreign, tmp_path / "foreign-clients", DEVICE_A, server_ca_file=ca_file
        ),
        expired_device_a=make_device_credentials(
            ca, tmp_path / "expired-clients", DEVICE_A, server_ca_file=ca_file, validity=timedelta(minutes=-1)
        ),
        no_certificate=ClientCredentials(server_ca_file=ca_file),
    )


@pytest.fixture
async def embedded_broker(
    tmp_path: Path, ca: BuiltinCA, identities: Identities
) -> AsyncIterator[BrokerUnderTest]:
    cert_file, key_file = make_server_identity(ca, tmp_path / "embedded", ["localhost", "127.0.0.1"])
    target = BrokerUnderTest(host="127.0.0.1", port=0, identities=identities)
    broker = EmbeddedBroker(
        host="127.0.0.1",
        port=0,
        ca_file=identities.ca_file,
        cert_file=cert_file,
        key_file=key_file,
        trust_domain=TRUST_DOMAIN,
        on_security_event=lambda event, details: target.events.append((event, details)),
    )
    await broker.start()
    target.port, target.embedded = broker.port, broker
    try:
        yield target
    finally:
        await broker.stop()


@pytest.fixture
async def mosquitto_broker(
    tmp_path: Path, ca: BuiltinCA, identities: Identities
) -> AsyncIterator[BrokerUnderTest]:
    async with MosquittoProcess(ca, tmp_path / "mosquitto") as (host, port):
        yield BrokerUnderTest(host=host, port=port, identities=identities)
