"""The control plane's mTLS session with the broker (embedded amqtt or an external one).

One long-lived aiomqtt client: subscribes to what devices publish, hands each message to a
callback, and publishes desired state. Reconnects with backoff and jitter; after every
(re)connect it calls `on_connected` (the publisher refills retained desired state).

With `shared_group` (several replicas on one broker) it subscribes through MQTT shared
subscriptions, ``$share/<group>/sf/v1/dev/+/<kind>``: the broker hands each device message to
one member of the group. The session is then clean: a persistent session of a dead replica
would stay in the group and Mosquitto would keep queueing its share of the messages for it
(tested: half of them), instead of giving them to the replicas still alive. The group name is
a secret (`share_group`): Mosquitto 2.0 lets any client subscribe to any filter and checks read
access only at delivery, so a device that joined the group would swallow its share of every
device's messages (tested).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import random
import ssl
from collections.abc import Awaitable, Callable

import aiomqtt

from control_plane.aio import raise_if_cancelled
from control_plane.mqtt.receive import FastReceiver
from protocol.topics import TopicKind, fleet_filter

logger = logging.getLogger(__name__)

INGEST_KINDS = (
    TopicKind.REPORTED,
    TopicKind.HEALTH,
    TopicKind.STATUS,
    TopicKind.COMMAND_RESULT,
    TopicKind.RENEW,
)

MessageHandler = Callable[[str, bytes], None]

# CONNACK, SUBACK and PUBACK waits.
_ACK_TIMEOUT_S = 30.0


def share_group(secret: bytes) -> str:
    """The replicas' shared-subscription group, derived from a secret every replica holds
    (the upload key in the `pki/` they share), so no other client can join it."""
    return "sf-" + hmac.new(secret, b"storefleet mqtt share group", hashlib.sha256).hexdigest()[:24]


class BrokerLink:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        tls_context: Callable[[], ssl.SSLContext],
        client_id: str,
        on_message: MessageHandler,
        on_connected: Callable[[], Awaitable[object]] | None = None,
        reconnect_min_s: float = 0.2,
        reconnect_max_s: float = 10.0,
        keepalive_s: int = 30,
        shared_group: str | None = None,
    ) -> None:
        self._host, self._port = host, port
        self.tls_context = tls_context  # asked before every connect (certificates rotate)
        self._client_id = client_id
        self._on_message = on_message
        self._on_connected = on_connected
        self._reconnect_min_s, self._reconnect_max_s = reconnect_min_s, reconnect_max_s
        self._keepalive_s = keepalive_s
        self._shared_group = shared_group
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self.connects = 0

    @property
    def subscriptions(self) -> list[str]:
        filters = [fleet_filter(kind) for kind in INGEST_KINDS]
        if self._shared_group is None:
            return filters
        return [f"$share/{self._shared_group}/{topic_filter}" for topic_filter in filters]

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        client = self._client
        if client is None or not self._connected.is_set():
            raise ConnectionError("not connected to the broker")
        # aiomqtt's own timeout is asyncio.wait_for, which can swallow a cancellation (aio.py).
        try:
            async with asyncio.timeout(_ACK_TIMEOUT_S):
                await client.publish(topic, payload, qos=qos, retain=retain, timeout=math.inf)
        except TimeoutError:
            raise aiomqtt.MqttError(f"no PUBACK from the broker within {_ACK_TIMEOUT_S:g}s") from None

    async def run(self) -> None:
        delay = self._reconnect_min_s
        while True:
            try:
                async with aiomqtt.Client(
                    self._host,
                    self._port,
                    identifier=self._client_id,
                    tls_context=self.tls_context(),
                    clean_session=self._shared_group is not None,
                    keepalive=self._keepalive_s,
                    max_inflight_messages=1000,
                    timeout=_ACK_TIMEOUT_S,
                ) as client:
                    # The publisher keeps hundreds of publishes in flight on purpose (refills,
                    # store-wide changes); aiomqtt would warn from 10 on.
                    client.pending_calls_threshold = 2000
                    self._client = client
                    # Before subscribing: every device message takes the lean path (receive.py).
                    FastReceiver(client._client, self._on_message).install(asyncio.get_running_loop())
                    await self._subscribe(client)
                    raise_if_cancelled()  # the CONNACK wait is aiomqtt's wait_for
                    self._connected.set()
                    self.connects += 1
                    delay = self._reconnect_min_s
                    logger.info("connected to broker %s:%d", self._host, self._port)
                    refill = asyncio.create_task(self._after_connect())
                    try:
                        # Only a message that arrived before the receiver was installed comes
                        # this way; the loop ends when the session does.
                        async for message in client.messages:
                            try:
                                self._on_message(str(message.topic), _payload_bytes(message.payload))
                            except Exception:
                                # A bug in one message's handling must not end ingest for all.
                                logger.exception("handling a message on %s failed", str(message.topic)[:200])
                    finally:
                        refill.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await refill
            except aiomqtt.MqttError as exc:
                logger.warning("broker connection lost (%s); retrying in %.1fs", exc, delay)
            finally:
                self._connected.clear()
                self._client = None
            await asyncio.sleep(random.uniform(0, delay))  # noqa: S311 - jitter, not crypto
            delay = min(delay * 2, self._reconnect_max_s)

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        try:
            async with asyncio.timeout(_ACK_TIMEOUT_S):  # ours, not aiomqtt's wait_for (aio.py)
                for topic_filter in self.subscriptions:
                    await client.subscribe(topic_filter, qos=1, timeout=math.inf)
        except TimeoutError:
            raise aiomqtt.MqttError(f"no SUBACK from the broker within {_ACK_TIMEOUT_S:g}s") from None

    async def _after_connect(self) -> None:
        if self._on_connected is None:
            return
        try:
            await self._on_connected()
        except Exception:
            logger.exception("post-connect refill failed")


def _payload_bytes(payload: object) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode()
    return str(payload).encode()
