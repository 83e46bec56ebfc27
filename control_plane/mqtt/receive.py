"""A lean receive path for the control plane's broker session.

Every device message passes here, so its cost per message bounds ingest. aiomqtt over paho
spends most of it on plumbing: paho reads each packet with three or more small TLS reads,
builds an `MQTTMessage`, matches callbacks under locks; aiomqtt then wraps it again and
hands it to an async iterator (a queue and a task wake-up per message).

`FastReceiver`, installed on a connected aiomqtt client:

- reads the socket in large chunks when it is readable (one TLS read per record, not per
  field) and splits the bytes into MQTT packets itself;
- hands each QoS 0 PUBLISH (health reports: the bulk) straight to the handler;
- gives every other packet (CONNACK, SUBACK, PUBACK of our publishes, QoS 1 PUBLISH that
  needs a PUBACK, PINGRESP) to paho unchanged, through paho's own read function, so paho
  keeps all protocol state (acknowledgements, keep-alive, in-flight publishes);
- sets paho's `on_message` to the handler as well, so QoS 1 messages skip aiomqtt's queue
  and everything is handled in arrival order, synchronously.

It relies on two paho internals (`Client._sock_recv` and the socket from `Client.socket()`),
pinned by the paho-mqtt version range in pyproject.toml and covered by the integration
tests on both brokers. End of stream or a socket error is passed to paho, which reports
the disconnect to aiomqtt as before.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho

logger = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], None]

_READ_CHUNK = 256 * 1024
_PUBLISH = 0x30
_QOS_BITS = 0x06
_READS_PER_WAKEUP = 64  # TLS records (up to 16 KiB each) read before parsing


class FastReceiver:
    def __init__(self, client: paho.Client, handler: MessageHandler) -> None:
        self._paho = client
        self._handler = handler
        self._buffer = bytearray()
        self._for_paho = bytearray()
        self._eof = False
        self.fast = 0  # QoS 0 publishes parsed here
        self.slow = 0  # packets handed to paho

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        sock = self._paho.socket()
        if sock is None or not hasattr(self._paho, "_sock_recv"):
            raise RuntimeError("paho client is not connected (or its internals changed)")
        self._sock: Any = sock
        self._paho.on_message = self._paho_message
        self._paho._sock_recv = self._paho_recv  # type: ignore[method-assign,assignment]
        loop.remove_reader(sock.fileno())  # aiomqtt's reader: one paho packet per wake-up
        loop.add_reader(sock.fileno(), self._readable)

    def _paho_message(self, _client: paho.Client, _userdata: object, message: paho.MQTTMessage) -> None:
        self._dispatch(message.topic, bytes(message.payload))

    def _dispatch(self, topic: str, payload: bytes) -> None:
        try:
            self._handler(topic, payload)
        except Exception:
            # A bug in one message's handling must not end ingest for all.
            logger.exception("handling a message on %s failed", topic[:200])

    def _paho_recv(self, size: int) -> bytes:
        """paho's read function: serves the complete packets set aside for it."""
        if not self._for_paho:
            if self._eof:
                return b""
            raise BlockingIOError
        chunk = bytes(self._for_paho[:size])
        del self._for_paho[:size]
        return chunk

    def _readable(self) -> None:
        try:
            self._read()
        except Exception:
            # Whatever went wrong, the session is in an unknown state: end it, the link reconnects.
            logger.exception("broker session receive failed; disconnecting")
            self._paho.disconnect()

    def _read(self) -> None:
        sock = self._sock
        more = False
        try:
            for _ in range(_READS_PER_WAKEUP):
                chunk = sock.recv(_READ_CHUNK)
                if not chunk:
                    self._eof = True
                    break
                self._buffer += chunk
            else:
                # Bytes may wait inside the TLS object, where the selector cannot see them.
                more = True
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._eof = True
        self._split()
        if self._eof:
            self._paho.loop_read()  # paho reads b"": connection lost → aiomqtt sees the disconnect
        elif more:
            asyncio.get_running_loop().call_soon(self._readable)  # the selector cannot see those

    def _split(self) -> None:
        buffer = self._buffer
        size = len(buffer)
        pos = 0
        while size - pos >= 2:
            # Remaining length: 1-4 bytes of 7 bits (MQTT 3.1.1 section 2.2.3).
            index, length, shift, complete = pos + 1, 0, 0, False
            while index < size and index - pos <= 4:
                byte = buffer[index]
                index += 1
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    complete = True
                    break
            if not complete:
                if index - pos > 4:  # malformed: paho refuses it and drops the connection
                    self._for_paho += buffer[pos:]
                    pos = size
                    self._feed_paho()
                break
            end = index + length
            if end > size:
                break  # the rest of the packet is still on its way
            first = buffer[pos]
            if first & 0xF0 == _PUBLISH and not first & _QOS_BITS and length >= 2:
                topic_end = index + 2 + ((buffer[index] << 8) | buffer[index + 1])
                if topic_end <= end:
                    self.fast += 1
                    try:
                        topic = buffer[index + 2 : topic_end].decode()
                    except UnicodeDecodeError:
                        topic = ""  # refused by the handler's topic check, and counted
                    self._dispatch(topic, bytes(buffer[topic_end:end]))
                    pos = end
                    continue
            self._for_paho += buffer[pos:end]
            pos = end
            self._feed_paho()
        del buffer[:pos]

    def _feed_paho(self) -> None:
        while self._for_paho:
            before = len(self._for_paho)
            self.slow += 1
            self._paho.loop_read()
            if len(self._for_paho) == before:
                logger.error("paho did not take a packet of %d bytes; dropping it", before)
                self._for_paho.clear()
