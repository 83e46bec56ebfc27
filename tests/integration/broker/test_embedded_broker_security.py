"""Attacks on the embedded (amqtt) broker with real clients and real certificates.

Each test shows what a client would notice: a refused connection, a message that never
arrives, a legitimate client that stays connected and keeps receiving.
"""

from __future__ import annotations

from pathlib import Path

import aiomqtt
import pytest

from control_plane.broker.embedded import BrokerStartFailed, EmbeddedBroker
from control_plane.pki.ca import BuiltinCA
from protocol.messages import MAX_MESSAGE_BYTES
from protocol.topics import TopicKind, fleet_filter
from tests.integration.broker.conftest import (
    DEVICE_A,
    DEVICE_B,
    TRUST_DOMAIN,
    BrokerUnderTest,
    expect_disconnected,
    received_until,
    topic,
)
from tests.support.certs import make_server_identity

pytestmark = pytest.mark.integration

NOT_AUTHORIZED = "refused: Not authorized"


async def test_client_without_certificate_is_refused(embedded_broker: BrokerUnderTest) -> None:
    outcome = await embedded_broker.attempt(embedded_broker.identities.no_certificate, DEVICE_A)

    assert outcome == "closed"
    assert _refusals(embedded_broker) == ["TLS handshake failed: peer did not return a certificate"]
    async with embedded_broker.device_a():
        pass  # the same broker accepts a client with a certificate


async def test_certificate_from_a_foreign_ca_is_refused(embedded_broker: BrokerUnderTest) -> None:
    outcome = await embedded_broker.attempt(embedded_broker.identities.foreign_device_a, DEVICE_A)

    assert outcome == "closed"
    assert _refusals(embedded_broker) == ["TLS handshake failed: unable to get local issuer certificate"]


async def test_expired_certificate_is_refused(embedded_broker: BrokerUnderTest) -> None:
    outcome = await embedded_broker.attempt(embedded_broker.identities.expired_device_a, DEVICE_A)

    assert outcome == "closed"
    assert _refusals(embedded_broker) == ["TLS handshake failed: certificate has expired"]


async def test_tls_older_than_1_2_is_refused(embedded_broker: BrokerUnderTest) -> None:
    outcome = await embedded_broker.attempt(embedded_broker.identities.device_a, DEVICE_A, legacy_tls=True)

    assert outcome == "closed"
    assert _refusals(embedded_broker) == ["TLS handshake failed: unsupported protocol"]


def _refusals(broker: BrokerUnderTest) -> list[object]:
    assert broker.embedded is not None
    assert broker.embedded.counters["connections_refused"] == len(broker.events)
    return [details["reason"] for event, details in broker.events if event == "connection_refused"]


async def test_client_id_other_than_the_certificate_identity_is_refused(
    embedded_broker: BrokerUnderTest,
) -> None:
    outcome = await embedded_broker.attempt(embedded_broker.identities.device_a, "dev-someone-else")

    assert outcome == NOT_AUTHORIZED
    assert embedded_broker.embedded is not None
    assert embedded_broker.embedded.counters["connections_refused"] == 1
    assert [event for event, _ in embedded_broker.events] == ["connection_refused"]


async def test_control_plane_publishes_desired_state_a_device_receives(
    embedded_broker: BrokerUnderTest,
) -> None:
    desired = topic(DEVICE_A, TopicKind.DESIRED)
    async with embedded_broker.device_a() as device, embedded_broker.control_plane() as control_plane:
        await device.subscribe(desired, qos=1)
        await control_plane.publish(desired, b'{"version": 1}', qos=1)

        assert await received_until(device, desired, b'{"version": 1}') == [(desired, b'{"version": 1}')]


async def test_device_cannot_publish_to_another_devices_topics(embedded_broker: BrokerUnderTest) -> None:
    async with (
        embedded_broker.device_a() as device_a,
        embedded_broker.device_b() as device_b,
        embedded_broker.control_plane() as control_plane,
    ):
        await device_b.subscribe(topic(DEVICE_B, TopicKind.DESIRED), qos=1)
        await device_b.subscribe(topic(DEVICE_B, TopicKind.COMMAND), qos=1)

        await device_a.publish(topic(DEVICE_B, TopicKind.DESIRED), b"forged desired", qos=1)
        await device_a.publish(topic(DEVICE_B, TopicKind.COMMAND), b"forged command", qos=1)
        await control_plane.publish(topic(DEVICE_B, TopicKind.DESIRED), b"genuine", qos=1)

        received = await received_until(device_b, topic(DEVICE_B, TopicKind.DESIRED), b"genuine")

    assert received == [(topic(DEVICE_B, TopicKind.DESIRED), b"genuine")]
    assert embedded_broker.embedded is not None
    assert embedded_broker.embedded.counters["publishes_denied"] == 2


async def test_device_cannot_forge_another_devices_reports(embedded_broker: BrokerUnderTest) -> None:
    async with embedded_broker.device_a() as device_a, embedded_broker.control_plane() as control_plane:
        await control_plane.subscribe(fleet_filter(TopicKind.REPORTED), qos=1)

        await device_a.publish(topic(DEVICE_B, TopicKind.REPORTED), b"forged", qos=1)
        await device_a.publish(topic(DEVICE_A, TopicKind.REPORTED), b"own", qos=1)

        received = await received_until(control_plane, topic(DEVICE_A, TopicKind.REPORTED), b"own")

    assert received == [(topic(DEVICE_A, TopicKind.REPORTED), b"own")]


async def test_device_cannot_subscribe_to_or_receive_another_devices_topics(
    embedded_broker: BrokerUnderTest,
) -> None:
    async with (
        embedded_broker.device_a() as device_a,
        embedded_broker.device_b() as device_b,
        embedded_broker.control_plane() as control_plane,
    ):
        await device_b.subscribe(topic(DEVICE_B, TopicKind.DESIRED), qos=1)
        await device_a.subscribe(topic(DEVICE_A, TopicKind.DESIRED), qos=1)
        for stolen in (topic(DEVICE_B, TopicKind.DESIRED), fleet_filter(TopicKind.DESIRED), "sf/v1/#", "#"):
            await device_a.subscribe(stolen, qos=1)

        await control_plane.publish(topic(DEVICE_B, TopicKind.DESIRED), b"for b", qos=1)
        assert await received_until(device_b, topic(DEVICE_B, TopicKind.DESIRED), b"for b") == [
            (topic(DEVICE_B, TopicKind.DESIRED), b"for b")
        ]
        await control_plane.publish(topic(DEVICE_A, TopicKind.DESIRED), b"for a", qos=1)
        received = await received_until(device_a, topic(DEVICE_A, TopicKind.DESIRED), b"for a")

    assert received == [(topic(DEVICE_A, TopicKind.DESIRED), b"for a")]
    assert embedded_broker.embedded is not None
    assert embedded_broker.embedded.counters["subscriptions_denied"] == 4


async def test_device_does_not_get_another_devices_retained_state_on_connect(
    embedded_broker: BrokerUnderTest,
) -> None:
    desired_b, desired_a = topic(DEVICE_B, TopicKind.DESIRED), topic(DEVICE_A, TopicKind.DESIRED)
    async with embedded_broker.device_b() as device_b, embedded_broker.control_plane() as control_plane:
        await device_b.subscribe(desired_b, qos=1)
        await control_plane.publish(desired_b, b"b's retained state", qos=1, retain=True)
        assert await received_until(device_b, desired_b, b"b's retained state") == [
            (desired_b, b"b's retained state")
        ]

        async with embedded_broker.device_a() as device_a:
            await device_a.subscribe(desired_a, qos=1)
            await control_plane.publish(desired_a, b"for a", qos=1)
            received = await received_until(device_a, desired_a, b"for a")

    assert received == [(desired_a, b"for a")]


@pytest.mark.parametrize("clean_session", [False, True], ids=["persistent", "clean"])
async def test_client_id_takeover_is_refused_and_the_victim_stays_connected(
    embedded_broker: BrokerUnderTest, clean_session: bool
) -> None:
    desired = topic(DEVICE_A, TopicKind.DESIRED)
    async with (
        embedded_broker.device_a(clean_session=False) as device_a,
        embedded_broker.control_plane() as control_plane,
    ):
        await device_a.subscribe(desired, qos=1)

        outcome = await embedded_broker.attempt(
            embedded_broker.identities.device_b, DEVICE_A, clean_session=clean_session
        )
        await control_plane.publish(desired, b"still here", qos=1)
        received = await received_until(device_a, desired, b"still here")

    assert outcome == NOT_AUTHORIZED
    assert received == [(desired, b"still here")]


@pytest.mark.parametrize("clean_session", [False, True], ids=["persistent", "clean"])
async def test_refused_takeover_leaves_a_disconnected_session_intact(
    embedded_broker: BrokerUnderTest, clean_session: bool
) -> None:
    desired = topic(DEVICE_A, TopicKind.DESIRED)
    async with embedded_broker.device_a(clean_session=False) as device_a:
        await device_a.subscribe(desired, qos=1)

    outcome = await embedded_broker.attempt(
        embedded_broker.identities.device_b, DEVICE_A, clean_session=clean_session
    )
    assert outcome == NOT_AUTHORIZED
    async with embedded_broker.control_plane() as control_plane:
        await control_plane.publish(desired, b"queued while offline", qos=1)
    async with embedded_broker.device_a(clean_session=False) as device_a:
        received = await received_until(device_a, desired, b"queued while offline")

    assert received == [(desired, b"queued while offline")]


async def test_will_on_another_devices_topic_is_refused_and_never_delivered(
    embedded_broker: BrokerUnderTest,
) -> None:
    identities = embedded_broker.identities
    desired_b, status_a = topic(DEVICE_B, TopicKind.DESIRED), topic(DEVICE_A, TopicKind.STATUS)
    async with embedded_broker.device_b() as device_b, embedded_broker.control_plane() as control_plane:
        await device_b.subscribe(desired_b, qos=1)
        await control_plane.subscribe(fleet_filter(TopicKind.STATUS), qos=1)

        forged = await embedded_broker.attempt(
            identities.device_a, DEVICE_A, will_topic=desired_b, vanish=True
        )
        own = await embedded_broker.attempt(identities.device_a, DEVICE_A, will_topic=status_a, vanish=True)
        assert await received_until(control_plane, status_a, b"will") == [(status_a, b"will")]
        await control_plane.publish(desired_b, b"genuine", qos=1)
        received_by_b = await received_until(device_b, desired_b, b"genuine")

    assert (forged, own) == (NOT_AUTHORIZED, "accepted")
    assert received_by_b == [(desired_b, b"genuine")]


async def test_oversized_message_is_dropped_and_the_sender_stays_connected(
    embedded_broker: BrokerUnderTest,
) -> None:
    reported = topic(DEVICE_A, TopicKind.REPORTED)
    async with embedded_broker.device_a() as device_a, embedded_broker.control_plane() as control_plane:
        await control_plane.subscribe(fleet_filter(TopicKind.REPORTED), qos=1)

        await device_a.publish(reported, b"x" * (MAX_MESSAGE_BYTES + 1), qos=1)
        await device_a.publish(reported, b"small", qos=1)
        received = await received_until(control_plane, reported, b"small")

    assert received == [(reported, b"small")]
    assert embedded_broker.embedded is not None
    assert embedded_broker.embedded.counters["oversized_dropped"] == 1
    assert [(event, details["topic"]) for event, details in embedded_broker.events] == [
        ("oversized_dropped", reported)
    ]


async def test_huge_packet_closes_the_connection_before_delivery(embedded_broker: BrokerUnderTest) -> None:
    reported = topic(DEVICE_A, TopicKind.REPORTED)
    async with embedded_broker.control_plane() as control_plane:
        await control_plane.subscribe(fleet_filter(TopicKind.REPORTED), qos=1)
        async with embedded_broker.device_a() as device_a:
            await device_a.publish(reported, b"x" * (8 * MAX_MESSAGE_BYTES), qos=0)
            await expect_disconnected(device_a)
        async with embedded_broker.device_a() as device_a:
            await device_a.publish(reported, b"small", qos=1)
        received = await received_until(control_plane, reported, b"small")

    assert received == [(reported, b"small")]
    assert embedded_broker.embedded is not None
    assert embedded_broker.embedded.counters["oversized_dropped"] == 1


async def test_disconnect_drops_a_connected_client(embedded_broker: BrokerUnderTest) -> None:
    assert embedded_broker.embedded is not None
    async with embedded_broker.device_a() as device_a:
        assert await embedded_broker.embedded.disconnect(DEVICE_A) is True
        await expect_disconnected(device_a)
        with pytest.raises(aiomqtt.MqttError):
            await device_a.publish(topic(DEVICE_A, TopicKind.HEALTH), b"after", qos=1)
    assert await embedded_broker.embedded.disconnect(DEVICE_B) is False


async def test_a_broker_that_cannot_listen_says_so(
    embedded_broker: BrokerUnderTest, ca: BuiltinCA, tmp_path: Path
) -> None:
    identities = embedded_broker.identities
    cert_file, key_file = make_server_identity(ca, tmp_path / "second", ["localhost"])
    second = EmbeddedBroker(
        host=embedded_broker.host,
        port=embedded_broker.port,
        ca_file=identities.ca_file,
        cert_file=cert_file,
        key_file=key_file,
        trust_domain=TRUST_DOMAIN,
    )

    with pytest.raises(BrokerStartFailed, match="address already in use"):
        await second.start()
