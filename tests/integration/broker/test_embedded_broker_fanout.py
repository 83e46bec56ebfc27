"""Fan-out keeps every message while other clients subscribe and leave (amqtt flaw 7)."""

from __future__ import annotations

import asyncio

import pytest

from protocol.topics import TopicKind
from tests.integration.broker.conftest import DEVICE_A, TIMEOUT_S, BrokerUnderTest, topic
from tests.support.certs import make_device_credentials

pytestmark = pytest.mark.integration

MESSAGES = 200
CHURNING_DEVICES = 30


async def test_no_message_lost_while_other_devices_subscribe_and_leave(
    embedded_broker: BrokerUnderTest, ca, tmp_path
):
    churners = [
        make_device_credentials(
            ca, tmp_path / "churn", f"dev-churn-{i:02d}", server_ca_file=embedded_broker.identities.ca_file
        )
        for i in range(CHURNING_DEVICES)
    ]
    desired_a = topic(DEVICE_A, TopicKind.DESIRED)
    received: dict[str, list[int]] = {"device": [], "observer": []}

    async def churn(index: int) -> None:
        device_id = f"dev-churn-{index:02d}"
        for _ in range(3):
            async with embedded_broker.client(churners[index], device_id) as client:
                await client.subscribe(topic(device_id, TopicKind.DESIRED), qos=1)
                await client.subscribe(topic(device_id, TopicKind.COMMAND), qos=1)

    async with (
        embedded_broker.device_a() as device,
        embedded_broker.control_plane("observer") as observer,
        embedded_broker.control_plane() as control_plane,
    ):
        # Two subscriptions match each message: the device's own, then a fleet-wide one
        # (amqtt lost the message for the second when the table changed under the first).
        await device.subscribe(desired_a, qos=1)
        await observer.subscribe("sf/v1/dev/+/desired", qos=1)

        async def collect(name: str, client) -> None:
            async for message in client.messages:
                received[name].append(int(bytes(message.payload)))  # type: ignore[arg-type]
                if len(received[name]) == MESSAGES:
                    return

        collectors = [
            asyncio.create_task(collect("device", device)),
            asyncio.create_task(collect("observer", observer)),
        ]

        async def publish() -> None:
            for n in range(MESSAGES):
                await control_plane.publish(desired_a, f"{n}".encode(), qos=1)
                await asyncio.sleep(0)

        await asyncio.gather(publish(), *(churn(i) for i in range(CHURNING_DEVICES)))
        await asyncio.wait_for(asyncio.gather(*collectors), TIMEOUT_S * 2)

    assert sorted(received["device"]) == list(range(MESSAGES))
    assert sorted(received["observer"]) == list(range(MESSAGES))
