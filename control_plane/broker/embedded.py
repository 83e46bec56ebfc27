"""The embedded MQTT broker (amqtt) for the one-machine default mode, hardened for mTLS.

`EmbeddedBroker` runs an amqtt broker on one TLS listener. Every client presents a certificate
from our CA; its identity (`control_plane.pki.identity`) is the only credential, and
`control_plane.broker.acl.is_allowed` decides every publish, subscribe and delivery.

amqtt 0.12.1 as shipped is not safe for this, and `HardenedBroker` closes what we found:

1. its TLS listener asks for a client certificate but does not require one (``CERT_OPTIONAL``):
   ours requires one (``CERT_REQUIRED``), TLS 1.2 or newer, verified against our CA only;
2. a client that reuses another client's id with ``clean_session=False`` inherits that
   client's stored session, and with it the subscriptions and the TLS object of the first
   connection, which is where a plugin would look for the identity;
3. a CONNECT that is then refused has already done damage: with ``clean_session=True`` the
   old session is deleted before authentication, and the live connection of the legitimate
   client is taken over and the session re-registered before ``authenticated`` is checked;
4. on every CONNECT it replays the retained messages of *every* subscription in the broker
   (not only the connecting client's), without the receive check: a device would get other
   devices' retained desired state;
5. a will message is published without any topic check, so a device could name another
   device's topic as its will;
6. it reads a whole packet into memory whatever its size (MQTT allows 256 MiB);
7. its fan-out iterates the live subscription table across awaits, so a client subscribing or
   leaving during a broadcast raises "dictionary changed size during iteration" and the
   message is lost for every remaining subscriber (`HardenedBroker._run_broadcast`).

The identity check therefore runs right after the CONNECT packet is read and before amqtt
looks at any stored session: the certificate must prove an identity, the client id must be
that identity's name (the control-plane service may also use ``<name>-<suffix>``), the will
(if any) must be a topic the identity may publish and fit the size limit, and a stored session
under that client id must belong to the same identity. A refused CONNECT gets CONNACK
"not authorized" (5) and is closed; existing sessions and connections are left untouched.

TLS is started per connection by the broker (the listener socket is plain TCP), so a refused
handshake (no certificate, unknown CA, expired certificate, TLS < 1.2) is reported like any
other refusal; a connection closed before any TLS byte (a port probe) is not.

Publish payloads larger than ``max_message_bytes`` are dropped (the QoS flow completes) and
reported; a packet larger than that plus a small allowance for headers closes the connection
before it is buffered. Every refusal is counted, logged as a warning (names and reasons only,
never key material) and passed to ``on_security_event(event, details)``; events are
``connection_refused``, ``publish_denied``, ``subscription_denied``, ``delivery_denied`` and
``oversized_dropped``.

Revocation: `EmbeddedBroker.disconnect` drops a live client, and `set_revoked_serials` makes
every later CONNECT with a revoked certificate fail (the control plane keeps the set current).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from amqtt.adapters import ReaderAdapter, StreamReaderAdapter, StreamWriterAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action, ListenerType
from amqtt.errors import AMQTTError, BrokerError, MQTTError, NoDataError, PluginError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from amqtt.utils import format_client_message, gen_client_id
from cryptography import x509

from control_plane.broker import acl
from control_plane.errors import StorefleetError
from control_plane.pki.identity import CertificateIdentity, identity_of
from protocol.messages import MAX_MESSAGE_BYTES

logger = logging.getLogger(__name__)

SecurityEventHandler = Callable[[str, dict[str, object]], None]

# Room for the fixed and variable headers (topic, packet id) of a PUBLISH, and for the client
# id and will topic of a CONNECT, on top of the largest payload we accept.
PACKET_HEADER_ALLOWANCE: Final = 4096

_LISTENER = "default"
_COUNTERS = ("connections_refused", "publishes_denied", "subscriptions_denied", "oversized_dropped")
_ACTIONS: Final[dict[Action, acl.Action]] = {
    Action.PUBLISH: "publish",
    Action.SUBSCRIBE: "subscribe",
    Action.RECEIVE: "receive",
}


class BrokerStartFailed(StorefleetError):
    """The embedded broker could not start: port in use, unreadable certificate or key, bad config."""

    code = "broker_start_failed"


class _Refused(MQTTError):  # type: ignore[misc]  # amqtt is untyped
    """A CONNECT we answered with "not authorized"; amqtt's caller logs it and releases the slot."""


class _PacketTooLarge(Exception):
    """Raised from the reader: amqtt's reader loop ends (and closes) on exceptions it does not know."""


@functools.lru_cache(maxsize=4096)
def _identity_from_der(der: bytes, trust_domain: str) -> CertificateIdentity | None:
    try:
        certificate = x509.load_der_x509_certificate(der)
    except ValueError:
        return None
    return identity_of(certificate, trust_domain)


def _describe(identity: CertificateIdentity | None) -> str | None:
    return None if identity is None else f"{identity.kind.value}:{identity.name}"


def client_id_matches(identity: CertificateIdentity, client_id: str) -> bool:
    """The client id a certificate identity may connect with."""
    if identity.is_control_plane:
        # Its own name, or its name plus a suffix (extra sessions of the same replica).
        return client_id == identity.name or client_id.startswith(identity.name + "-")
    return client_id == identity.name


class BrokerGuard:
    """The security state shared by `HardenedBroker` and its plugins: identities, limits, counters."""

    def __init__(
        self,
        *,
        trust_domain: str,
        max_message_bytes: int,
        tls_handshake_timeout: float,
        on_security_event: SecurityEventHandler | None = None,
    ) -> None:
        self.trust_domain = trust_domain
        self.max_message_bytes = max_message_bytes
        self.tls_handshake_timeout = tls_handshake_timeout
        self.max_packet_bytes = max_message_bytes + PACKET_HEADER_ALLOWANCE
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self._on_security_event = on_security_event
        # client id -> the identity that owns the session stored under it
        self._owners: dict[str, CertificateIdentity] = {}
        # Serials (lower-case hex) of revoked certificates: refused at CONNECT, like a CRL check.
        self.revoked_serials: frozenset[str] = frozenset()

    def is_revoked(self, ssl_object: ssl.SSLObject | None) -> bool:
        if ssl_object is None or not self.revoked_serials:
            return False
        der = ssl_object.getpeercert(binary_form=True)
        if not der:
            return False
        try:
            serial = format(x509.load_der_x509_certificate(der).serial_number, "x")
        except ValueError:
            return False
        return serial in self.revoked_serials

    def peer_identity(self, ssl_object: ssl.SSLObject | None) -> CertificateIdentity | None:
        if ssl_object is None:
            return None
        der = ssl_object.getpeercert(binary_form=True)
        if not der:
            return None
        return _identity_from_der(der, self.trust_domain)

    def owner_of(self, client_id: str | None) -> CertificateIdentity | None:
        return None if client_id is None else self._owners.get(client_id)

    def check_connect(self, session: Session, *, has_stored_session: bool) -> CertificateIdentity:
        """The identity of a new connection, or `_Refused` (reported) if it may not connect as it asks."""
        client_id = session.client_id
        identity = self.peer_identity(session.ssl_object)
        reason: str | None = None
        if identity is None:
            reason = "no client certificate proving an identity"
        elif self.is_revoked(session.ssl_object):
            reason = "certificate is revoked"
        elif not isinstance(client_id, str) or not client_id_matches(identity, client_id):
            reason = "client id does not match the certificate identity"
        elif has_stored_session and self._owners.get(client_id) != identity:
            reason = "client id is bound to a session of another identity"
        elif session.will_flag and not (
            isinstance(session.will_topic, str) and acl.is_allowed(identity, "publish", session.will_topic)
        ):
            reason = "will topic not allowed"
        elif session.will_flag and len(session.will_message or b"") > self.max_message_bytes:
            reason = "will message exceeds the size limit"
        if reason is not None or identity is None:
            self.report(
                "connection_refused",
                "connections_refused",
                client_id=client_id,
                identity=_describe(identity),
                topic=session.will_topic if session.will_flag else None,
                reason=reason,
            )
            raise _Refused(reason)
        assert isinstance(client_id, str)
        self._owners[client_id] = identity
        return identity

    def authenticate(self, session: Session) -> bool:
        """Second look at CONNECT, from the auth plugin: same rule, on the session amqtt will use."""
        identity = self.peer_identity(session.ssl_object)
        client_id = session.client_id
        return (
            identity is not None
            and isinstance(client_id, str)
            and client_id_matches(identity, client_id)
            and self._owners.get(client_id) == identity
        )

    def allows(self, session: Session | None, topic: str | None, action: Action | None) -> bool:
        client_id = None if session is None else session.client_id
        identity = self.owner_of(client_id)
        acl_action = None if action is None else _ACTIONS.get(action)
        if (
            identity is not None
            and topic is not None
            and acl_action is not None
            and acl.is_allowed(identity, acl_action, topic)
        ):
            return True
        event, counter = {
            "publish": ("publish_denied", "publishes_denied"),
            "subscribe": ("subscription_denied", "subscriptions_denied"),
        }.get(acl_action or "", ("delivery_denied", None))
        self.report(
            event,
            counter,
            client_id=client_id,
            identity=_describe(identity),
            topic=topic,
            reason="not allowed",
        )
        return False

    def report(self, event: str, counter: str | None, **details: object) -> None:
        if counter is not None:
            self.counters[counter] += 1
        logger.warning("mqtt %s: %s", event, " ".join(f"{key}={value!r}" for key, value in details.items()))
        if self._on_security_event is not None:
            try:
                self._on_security_event(event, dict(details))
            except Exception:
                # A faulty hook must not stop the broker from refusing what it refuses.
                logger.exception("on_security_event handler failed for %s", event)


class CertificateAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt is untyped
    """amqtt auth plugin: the client id must match the TLS peer certificate's identity."""

    @dataclass
    class Config:
        guard: BrokerGuard

    async def authenticate(self, *, session: Session) -> bool | None:
        guard: BrokerGuard = self.config.guard
        return guard.authenticate(session)


class TopicACLPlugin(BaseTopicPlugin):  # type: ignore[misc]  # amqtt is untyped
    """amqtt topic plugin: `acl.is_allowed` for the identity that owns the session."""

    @dataclass
    class Config:
        guard: BrokerGuard

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        guard: BrokerGuard = self.config.guard
        return guard.allows(session, topic, action)


class _PacketSizeLimit(ReaderAdapter):  # type: ignore[misc]  # amqtt is untyped
    """Follows MQTT framing on the byte stream and fails once a packet announces more than `limit`.

    It sits under amqtt's reader, so an oversized packet is refused from its length header,
    before its body is read into memory.
    """

    def __init__(
        self, inner: ReaderAdapter, limit: int, on_exceeded: Callable[[str | None, int], None]
    ) -> None:
        self._inner = inner
        self._limit = limit
        self._on_exceeded = on_exceeded
        self.client_id: str | None = None  # known once CONNECT is accepted
        self._remaining = 0  # body bytes left in the current packet
        self._in_length = False  # between the packet type byte and the end of the length
        self._length = 0
        self._multiplier = 1
        self._exceeded = False

    async def read(self, n: int = -1) -> bytes:
        if self._exceeded:
            raise _PacketTooLarge
        data: bytes = await self._inner.read(n)
        self._follow(data)
        return data

    def feed_eof(self) -> None:
        self._inner.feed_eof()

    def _follow(self, data: bytes) -> None:
        index = 0
        while index < len(data):
            if self._remaining:
                step = min(self._remaining, len(data) - index)
                self._remaining -= step
                index += step
            elif not self._in_length:  # packet type byte
                self._in_length, self._length, self._multiplier = True, 0, 1
                index += 1
            else:
                byte = data[index]
                index += 1
                self._length += (byte & 0x7F) * self._multiplier
                self._multiplier *= 128
                if byte & 0x80 and self._multiplier <= 128**3:
                    continue
                self._in_length = False
                if self._length > self._limit:
                    self._exceeded = True
                    self._on_exceeded(self.client_id, self._length)
                    raise _PacketTooLarge
                self._remaining = self._length


def _is_silent_hangup(exc: BaseException) -> bool:
    if isinstance(
        exc, ssl.SSLEOFError | ConnectionResetError | BrokenPipeError | asyncio.IncompleteReadError
    ):
        return True
    return isinstance(exc, ssl.SSLError) and exc.reason == "UNEXPECTED_EOF_WHILE_READING"


def _tls_failure(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return str(exc.verify_message)
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    if isinstance(exc, TimeoutError):
        return "timed out"
    return type(exc).__name__


async def _refuse(writer: WriterAdapter) -> None:
    with suppress(OSError, ConnectionError, AMQTTError):
        await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
    with suppress(OSError, ConnectionError, AMQTTError):
        await writer.close()


class HardenedBroker(Broker):  # type: ignore[misc]  # amqtt is untyped
    """amqtt's `Broker` with the identity check before any session handling (see module docstring)."""

    def __init__(self, config: dict[str, Any], *, guard: BrokerGuard) -> None:
        self.guard = guard
        self._tls_contexts: dict[str, ssl.SSLContext] = {}
        super().__init__(config)

    @staticmethod
    def _create_ssl_context(listener: Any) -> ssl.SSLContext:
        # amqtt sets CERT_OPTIONAL: a client without a certificate would complete the handshake.
        try:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=str(listener["cafile"]))
            context.load_cert_chain(str(listener["certfile"]), str(listener["keyfile"]))
        except (KeyError, TypeError, OSError, ssl.SSLError) as exc:
            raise BrokerError(f"TLS listener configuration: {exc}") from exc
        return context

    async def _create_server_instance(
        self,
        listener_name: str,
        listener_type: Any,
        address: str | None,
        port: int,
        ssl_context: ssl.SSLContext | None,
    ) -> Any:
        # The listener accepts plain TCP and `stream_connected` starts TLS on each connection, so
        # that a refused handshake (no certificate, unknown CA, expired) is ours to report.
        if listener_type != ListenerType.TCP or ssl_context is None:
            raise BrokerError(f"listener {listener_name!r} must be TCP with TLS")
        self._tls_contexts[listener_name] = ssl_context
        return await super()._create_server_instance(listener_name, listener_type, address, port, None)

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        peer = writer.get_extra_info("peername")
        try:
            await writer.start_tls(
                self._tls_contexts[listener_name], ssl_handshake_timeout=self.guard.tls_handshake_timeout
            )
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            writer.close()
            if _is_silent_hangup(exc):  # a port probe, not an attempt to authenticate
                logger.debug("TLS connection from %s closed before the handshake", peer)
                return
            self.guard.report(
                "connection_refused",
                "connections_refused",
                client_id=None,
                identity=None,
                remote=str(peer[0]) if peer else None,
                reason=f"TLS handshake failed: {_tls_failure(exc)}",
            )
            return
        limited = _PacketSizeLimit(
            StreamReaderAdapter(reader), self.guard.max_packet_bytes, self._report_oversized
        )
        await self._client_connected(listener_name, limited, StreamWriterAdapter(writer))

    async def _initialize_client_session(
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        remote_address: str,
        remote_port: int,
    ) -> tuple[BrokerProtocolHandler, Session]:
        # Copied from amqtt 0.12.1 `Broker._initialize_client_session` because the identity check
        # must sit between reading CONNECT and the session lookup/deletion in the same method;
        # there is no hook in between. Marked `# storefleet:` where it differs.
        try:
            handler, client_session = await BrokerProtocolHandler.init_from_connect(
                reader, writer, self.plugins_manager
            )
        except _PacketTooLarge as exc:  # storefleet: an oversized CONNECT
            await writer.close()
            raise AMQTTError("CONNECT packet too large") from exc
        except AMQTTError as exc:
            self.logger.warning(
                f"[MQTT-3.1.0-1] {format_client_message(address=remote_address, port=remote_port)}:"
                f" Can't read first packet as CONNECT: {exc}",
            )
            raise AMQTTError(exc) from exc
        except MQTTError as exc:
            self.logger.warning(
                f"Invalid connection from {format_client_message(address=remote_address, port=remote_port)}",
            )
            await writer.close()
            raise MQTTError(exc) from exc
        except NoDataError as exc:
            self.logger.warning(  # storefleet: amqtt logs this as an error, it is a client's doing
                f"No data from {format_client_message(address=remote_address, port=remote_port)} : {exc}",
            )
            raise AMQTTError(exc) from exc

        # storefleet: who is this, and may they connect as they ask? Before any session is touched.
        stored = client_session.client_id in self._sessions
        try:
            self.guard.check_connect(client_session, has_stored_session=stored)
        except _Refused:
            await _refuse(writer)
            raise

        if client_session.clean_session:
            # Delete existing session and create a new one
            if client_session.client_id is not None and client_session.client_id != "":
                await self._delete_session(client_session.client_id)
            else:
                client_session.client_id = gen_client_id()

            client_session.parent = 0
        # Get session from cache
        elif client_session.client_id in self._sessions:
            self.logger.debug(f"Found old session {self._sessions[client_session.client_id]!r}")

            existing_client_session, _ = self._sessions[client_session.client_id]
            existing_client_session.will_flag = client_session.will_flag
            existing_client_session.will_message = client_session.will_message
            existing_client_session.will_topic = client_session.will_topic
            existing_client_session.will_qos = client_session.will_qos
            existing_client_session.will_retain = client_session.will_retain  # storefleet
            existing_client_session.keep_alive = client_session.keep_alive
            existing_client_session.username = client_session.username
            existing_client_session.password = client_session.password
            # storefleet: the resumed session describes this connection, not the previous one
            existing_client_session.ssl_object = client_session.ssl_object
            existing_client_session.remote_address = client_session.remote_address
            existing_client_session.remote_port = client_session.remote_port
            client_session = existing_client_session
            client_session.parent = 1
        else:
            client_session.parent = 0

        timeout_disconnect_delay = self.config.get("timeout-disconnect-delay", 0)
        if client_session.keep_alive > 0 and isinstance(timeout_disconnect_delay, int):
            client_session.keep_alive += timeout_disconnect_delay

        if isinstance(reader, _PacketSizeLimit):  # storefleet: name the client in size reports
            reader.client_id = client_session.client_id
        return handler, client_session

    def _report_oversized(self, client_id: str | None, length: int) -> None:
        self.guard.report(
            "oversized_dropped",
            "oversized_dropped",
            client_id=client_id,
            identity=_describe(self.guard.owner_of(client_id)),
            reason=f"packet of {length} bytes exceeds {self.guard.max_packet_bytes}; connection closed",
        )

    async def _handle_client_session(
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        client_session: Session,
        handler: BrokerProtocolHandler,
        server: Any,
        listener_name: str,
    ) -> None:
        # amqtt takes over the live connection and registers the session before it checks
        # `authenticated`; authenticate first so that a refusal changes nothing.
        if not await self._authenticate(client_session, self.listeners_config[listener_name]):
            self.guard.report(
                "connection_refused",
                "connections_refused",
                client_id=client_session.client_id,
                identity=_describe(self.guard.peer_identity(client_session.ssl_object)),
                reason="authentication plugin refused",
            )
            await _refuse(writer)
            return
        await super()._handle_client_session(reader, writer, client_session, handler, server, listener_name)

    async def _handle_message_delivery(
        self,
        client_session: Session,
        handler: BrokerProtocolHandler,
        wait_deliver: asyncio.Future[Any],
    ) -> bool:
        app_message = wait_deliver.result()
        if app_message is not None and len(app_message.data or b"") > self.guard.max_message_bytes:
            self.guard.report(
                "oversized_dropped",
                "oversized_dropped",
                client_id=client_session.client_id,
                identity=_describe(self.guard.owner_of(client_session.client_id)),
                topic=app_message.topic,
                reason=f"payload of {len(app_message.data)} bytes exceeds {self.guard.max_message_bytes}",
            )
            return True  # dropped; the client stays connected
        result: bool = await super()._handle_message_delivery(client_session, handler, wait_deliver)
        return result

    async def _run_broadcast(self, running_tasks: Any) -> None:
        """amqtt's fan-out with one fix: iterate over snapshots.

        The original walks ``self._subscriptions`` (and each subscriber list) live while awaiting
        the topic filter; a client subscribing or leaving meanwhile raises "dictionary changed
        size during iteration" and the message is lost for every remaining subscriber (seen with
        20 agents connecting while desired state was being published).
        """
        broadcast = await self._broadcast_queue.get()
        for k_filter, subscriptions in list(self._subscriptions.items()):  # storefleet: snapshot
            if not self._matches(broadcast["topic"], k_filter):
                continue
            for target_session, sub_qos in list(subscriptions):  # storefleet: snapshot
                qos = broadcast.get("qos", sub_qos)
                if not await self._topic_filtering(
                    target_session, topic=broadcast["topic"], action=Action.RECEIVE
                ):
                    continue
                if (
                    target_session.transitions.state != "connected"
                    and not target_session.clean_session
                    and qos in (1, 2)
                    and not target_session.is_anonymous
                ):
                    await self._retain_broadcast_message(broadcast, qos, target_session)
                    continue
                if target_session.transitions.state != "connected":
                    continue
                handler = self._get_handler(target_session)
                if handler:
                    running_tasks.append(
                        asyncio.ensure_future(
                            handler.mqtt_publish(broadcast["topic"], broadcast["data"], qos, retain=False)
                        )
                    )

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        # amqtt calls this on CONNECT for every subscription of every client, and never checks
        # whether the session may receive the retained topic. Only the session's own filters,
        # and only topics it may receive.
        topic_filter, qos = subscription
        subscribers = self._subscriptions.get(topic_filter, [])
        if not any(subscriber.client_id == session.client_id for subscriber, _ in subscribers):
            return
        handler = self._get_handler(session)
        if handler is None:
            return
        publishing = []
        for topic, retained in list(self._retained_messages.items()):
            if not self._matches(topic, topic_filter):
                continue
            if not await self._topic_filtering(session, topic=topic, action=Action.RECEIVE):
                continue
            publishing.append(
                asyncio.ensure_future(
                    handler.mqtt_publish(
                        retained.topic, retained.data, min(qos, retained.qos or qos), retain=True
                    )
                )
            )
        if publishing:
            await asyncio.wait(publishing)


class EmbeddedBroker:
    """An amqtt broker on one mTLS listener with per-device topic ACLs."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        ca_file: Path,
        cert_file: Path,
        key_file: Path,
        trust_domain: str,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        on_security_event: SecurityEventHandler | None = None,
        tls_handshake_timeout: float = 10.0,
    ) -> None:
        self._host = host
        self._port = port
        self._ca_file = ca_file
        self._cert_file = cert_file
        self._key_file = key_file
        self._guard = BrokerGuard(
            trust_domain=trust_domain,
            max_message_bytes=max_message_bytes,
            tls_handshake_timeout=tls_handshake_timeout,
            on_security_event=on_security_event,
        )
        self._broker: HardenedBroker | None = None

    @property
    def counters(self) -> dict[str, int]:
        """connections_refused, publishes_denied, subscriptions_denied, oversized_dropped."""
        return self._guard.counters

    @property
    def port(self) -> int:
        """The bound port (useful when constructed with ``port=0``)."""
        broker = self._require_started()
        server = broker._servers[_LISTENER].instance
        sockets = server.sockets if server is not None else ()
        return int(sockets[0].getsockname()[1]) if sockets else self._port

    def _config(self) -> dict[str, Any]:
        host = f"[{self._host}]" if ":" in self._host else self._host
        guard = {"guard": self._guard}
        return {
            "listeners": {
                _LISTENER: {
                    "type": "tcp",
                    "bind": f"{host}:{self._port}",
                    "ssl": True,
                    "cafile": str(self._ca_file),
                    "certfile": str(self._cert_file),
                    "keyfile": str(self._key_file),
                }
            },
            # No anonymous auth, no $SYS plugin, no packet/event logging: only ours.
            "plugins": {
                f"{__name__}.CertificateAuthPlugin": guard,
                f"{__name__}.TopicACLPlugin": guard,
            },
        }

    async def start(self) -> None:
        if self._broker is not None:
            raise RuntimeError("the embedded broker is already started")
        for noisy in ("amqtt", "transitions"):
            if logging.getLogger(noisy).getEffectiveLevel() < logging.WARNING:
                logging.getLogger(noisy).setLevel(logging.WARNING)
        try:
            broker = HardenedBroker(self._config(), guard=self._guard)
            await broker.start()
        except (BrokerError, PluginError, OSError, ValueError) as exc:
            raise BrokerStartFailed(f"embedded MQTT broker on {self._host}:{self._port}: {exc}") from exc
        self._broker = broker
        logger.info("embedded MQTT broker listening on %s:%d (mTLS)", self._host, self.port)

    async def stop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()

    def set_revoked_serials(self, serials: set[str]) -> None:
        """Refuse these certificate serials (hex) from the next CONNECT on."""
        self._guard.revoked_serials = frozenset(s.lower() for s in serials)

    async def disconnect(self, client_id: str) -> bool:
        """Drop the live connection of `client_id` now; False if it is not connected."""
        broker = self._require_started()
        session, handler = broker.sessions.get(client_id, (None, None))
        if session is None or handler is None or session.transitions.state != "connected":
            return False
        logger.info("mqtt disconnecting client_id=%r on request", client_id)
        # What amqtt itself does on a take-over: wake the client loop as if the socket closed, stop.
        await handler.handle_connection_closed()
        await handler.stop()
        return True

    def _require_started(self) -> HardenedBroker:
        if self._broker is None:
            raise RuntimeError("the embedded broker is not started")
        return self._broker
