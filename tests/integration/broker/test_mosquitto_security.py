"""Attacks on a real Mosquitto 2.0 started with the configuration `write_mosquitto_config` writes.

The same attack matrix as the embedded broker, minus what Mosquitto cannot enforce (a client id
that differs from the certificate CN; see `control_plane.broker.mosquitto`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from control_plane.pki.ca import BuiltinCA
from protocol.messages import MAX_MESSAGE_BYTES
from protocol.topics import TopicKind, fleet_filter
from tests.integration.broker.conftest import (
    DEVICE_A,
    DEVICE_B,
    BrokerUnderTest,
    Identities,
    received_until,
    topic,
)
from tests.support.mosquitto import MosquittoProcess

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto]


async def test_client_without_certificate_is_refused(mosquitto_broker: BrokerUnderTest) -> None:
    outcome = await mosquitto_broker.attempt(mosquitto_broker.identities.no_certificate, DEVICE_A)

    assert outcome == "closed"
    async with mosquitto_broker.device_a():
        pass  # the same broker accepts a client with a certificate


async def test_certificate_from_a_foreign_ca_is_refused(mosquitto_broker: BrokerUnderTest) -> None:
    outcome = await mosquitto_broker.attempt(mosquitto_broker.identities.foreign_device_a, DEVICE_A)

    assert outcome == "closed"


async def test_expired_certificate_is_refused(mosquitto_broker: BrokerUnderTest) -> None:
    outcome = await mosquitto_broker.attempt(mosquitto_broker.identities.expired_device_a, DEVICE_A)

    assert outcome == "closed"


async def test_tls_older_than_1_2_is_refused(mosquitto_broker: BrokerUnderTest) -> None:
    outcome = await mosquitto_broker.attempt(mosquitto_broker.identities.device_a, DEVICE_A, legacy_tls=True)

    assert outcome == "closed"


async def test_control_plane_publishes_desired_state_a_device_receives(
    mosquitto_broker: BrokerUnderTest,
) -> None:
    desired = topic(DEVICE_A, TopicKind.DESIRED)
    async with mosquitto_broker.device_a() as device, mosquitto_broker.control_plane() as control_plane:
        await device.subscribe(desired, qos=1)
        await control_plane.publish(desired, b'{"version": 1}', qos=1)

        assert await received_until(device, desired, b'{"version": 1}') == [(desired, b'{"version": 1}')]


async def test_device_cannot_publish_to_another_devices_topics(mosquitto_broker: BrokerUnderTest) -> None:
    async with (
        mosquitto_broker.device_a() as device_a,
        mosquitto_broker.device_b() as device_b,
        mosquitto_broker.control_plane() as control_plane,
    ):
        await device_b.subscribe(topic(DEVICE_B, TopicKind.DESIRED), qos=1)
        await device_b.subscribe(topic(DEVICE_B, TopicKind.COMMAND), qos=1)

        await device_a.publish(topic(DEVICE_B, TopicKind.DESIRED), b"forged desired", qos=1)
        await device_a.publish(topic(DEVICE_B, TopicKind.COMMAND), b"forged command", qos=1)
        await control_plane.publish(topic(DEVICE_B, TopicKind.DESIRED), b"genuine", qos=1)

        received = await received_until(device_b, topic(DEVICE_B, TopicKind.DESIRED), b"genuine")

    assert received == [(topic(DEVICE_B, TopicKind.DESIRED), b"genuine")]


async def test_device_cannot_forge_another_devices_reports(mosquitto_broker: BrokerUnderTest) -> None:
    async with mosquitto_broker.device_a() as device_a, mosquitto_broker.control_plane() as control_plane:
        await control_plane.subscribe(fleet_filter(TopicKind.REPORTED), qos=1)

        await device_a.publish(topic(DEVICE_B, TopicKind.REPORTED), b"forged", qos=1)
        await device_a.publish(topic(DEVICE_A, TopicKind.REPORTED), b"own", qos=1)

        received = await received_until(control_plane, topic(DEVICE_A, TopicKind.REPORTED), b"own")

    assert received == [(topic(DEVICE_A, TopicKind.REPORTED), b"own")]


async def test_device_cannot_subscribe_to_or_receive_another_devices_topics(
    mosquitto_broker: BrokerUnderTest,
) -> None:
    async with (
        mosquitto_broker.device_a() as device_a,
        mosquitto_broker.device_b() as device_b,
        mosquitto_broker.control_plane() as control_plane,
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


async def test_device_does_not_get_another_devices_retained_state(mosquitto_broker: BrokerUnderTest) -> None:
    desired_b, desired_a = topic(DEVICE_B, TopicKind.DESIRED), topic(DEVICE_A, TopicKind.DESIRED)
    async with mosquitto_broker.device_b() as device_b, mosquitto_broker.control_plane() as control_plane:
        await device_b.subscribe(desired_b, qos=1)
        await control_plane.publish(desired_b, b"b's retained state", qos=1, retain=True)
        assert await received_until(device_b, desired_b, b"b's retained state") == [
            (desired_b, b"b's retained state")
        ]

        async with mosquitto_broker.device_a() as device_a:
            await device_a.subscribe(desired_a, qos=1)
            await device_a.subscribe(fleet_filter(TopicKind.DESIRED), qos=1)
            await control_plane.publish(desired_a, b"for a", qos=1)
            received = await received_until(device_a, desired_a, b"for a")

    assert received == [(desired_a, b"for a")]


async def test_will_on_another_devices_topic_is_never_delivered(mosquitto_broker: BrokerUnderTest) -> None:
    identities = mosquitto_broker.identities
    desired_b, status_a = topic(DEVICE_B, TopicKind.DESIRED), topic(DEVICE_A, TopicKind.STATUS)
    async with mosquitto_broker.device_b() as device_b, mosquitto_broker.control_plane() as control_plane:
        await device_b.subscribe(desired_b, qos=1)
        await control_plane.subscribe(fleet_filter(TopicKind.STATUS), qos=1)

        # Mosquitto accepts the CONNECT and checks the will's topic when it publishes it.
        await mosquitto_broker.attempt(identities.device_a, DEVICE_A, will_topic=desired_b, vanish=True)
        await mosquitto_broker.attempt(identities.device_a, DEVICE_A, will_topic=status_a, vanish=True)
        assert await received_until(control_plane, status_a, b"will") == [(status_a, b"will")]
        await control_plane.publish(desired_b, b"genuine", qos=1)
        received_by_b = await received_until(device_b, desired_b, b"genuine")

    assert received_by_b == [(desired_b, b"genuine")]


async def test_oversized_message_is_dropped(mosquitto_broker: BrokerUnderTest) -> None:
    reported = topic(DEVICE_A, TopicKind.REPORTED)
    async with mosquitto_broker.device_a() as device_a, mosquitto_broker.control_plane() as control_plane:
        await control_plane.subscribe(fleet_filter(TopicKind.REPORTED), qos=1)

        await device_a.publish(reported, b"x" * (MAX_MESSAGE_BYTES + 1), qos=1)
        await device_a.publish(reported, b"small", qos=1)
        received = await received_until(control_plane, reported, b"small")

    assert received == [(reported, b"small")]


async def test_client_id_from_certificate_stops_takeover(
    tmp_path: Path, ca: BuiltinCA, identities: Identities
) -> None:
    async with MosquittoProcess(ca, tmp_path / "mosquitto", client_id_from_certificate=True) as (host, port):
        broker = BrokerUnderTest(host=host, port=port, identities=identities)
        desired = topic(DEVICE_A, TopicKind.DESIRED)
        async with broker.device_a(clean_session=False) as device_a, broker.control_plane() as control_plane:
            await device_a.subscribe(desired, qos=1)

            # Mosquitto accepts the connection but under B's own CN as client id: A is not kicked off.
            await broker.attempt(identities.device_b, DEVICE_A, clean_session=False)
            await control_plane.publish(desired, b"still here", qos=1)
            received = await received_until(device_a, desired, b"still here")

    assert received == [(desired, b"still here")]
