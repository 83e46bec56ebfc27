"""The lean receive path splits a byte stream into MQTT packets the way the broker sent them.

Every integration test runs through it on both brokers; this one pins the framing cases a
short test run rarely hits: packets cut anywhere by TLS records, multi-byte lengths, and
non-QoS-0 packets passed to paho unchanged and in order.
"""

from __future__ import annotations

import random
from typing import Any

from control_plane.mqtt.receive import FastReceiver


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish(topic: str, payload: bytes, qos: int = 0) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic.encode() + (b"\x00\x07" if qos else b"") + payload
    return bytes([0x30 | qos << 1]) + _length(len(body)) + body


class PahoStandIn:
    """Reads packets through the receiver's `_sock_recv`, as paho's `_packet_read` does."""

    def __init__(self) -> None:
        self.on_message: Any = None
        self.packets: list[bytes] = []

    def loop_read(self) -> None:
        first = self._sock_recv(1)
        header = bytearray(first)
        while True:
            byte = self._sock_recv(1)
            header += byte
            if not byte[0] & 0x80:
                break
        length, shift = 0, 0
        for byte in header[1:]:
            length |= (byte & 0x7F) << shift
            shift += 7
        body = b""
        while len(body) < length:
            body += self._sock_recv(length - len(body))
        self.packets.append(bytes(header) + body)

    def _sock_recv(self, size: int) -> bytes:  # replaced by the receiver
        raise AssertionError("not installed")


def test_stream_cut_anywhere_gives_the_same_packets():
    big = b"x" * 20_000  # a three-byte remaining length
    qos1 = publish("sf/v1/dev/dev-b/status", b'{"state":"online"}', qos=1)
    pingresp = b"\xd0\x00"
    stream = [
        publish("sf/v1/dev/dev-a/health", b"{}"),
        qos1,
        publish("sf/v1/dev/dev-a/health", big),
        pingresp,
        publish("sf/v1/dev/dev-c/health", b'{"seq":1}'),
    ]
    data = b"".join(stream)
    rng = random.Random(7)
    for _ in range(50):
        received: list[tuple[str, bytes]] = []
        paho = PahoStandIn()
        receiver = FastReceiver(paho, lambda t, p, into=received: into.append((t, p)))  # type: ignore[arg-type,misc]
        paho._sock_recv = receiver._paho_recv  # type: ignore[method-assign]
        pos = 0
        while pos < len(data):
            step = rng.randint(1, 3000)
            receiver._buffer += data[pos : pos + step]
            receiver._split()
            pos += step
        assert received == [
            ("sf/v1/dev/dev-a/health", b"{}"),
            ("sf/v1/dev/dev-a/health", big),
            ("sf/v1/dev/dev-c/health", b'{"seq":1}'),
        ]
        assert paho.packets == [qos1, pingresp]
        assert not receiver._buffer
        assert (receiver.fast, receiver.slow) == (3, 2)


def test_a_handler_error_does_not_stop_the_next_message():
    received: list[str] = []

    def handler(topic: str, payload: bytes) -> None:
        if payload == b"boom":
            raise ValueError("bug")
        received.append(topic)

    receiver = FastReceiver(PahoStandIn(), handler)  # type: ignore[arg-type]
    receiver._buffer += publish("a/b", b"boom") + publish("c/d", b"{}")
    receiver._split()
    assert received == ["c/d"]
