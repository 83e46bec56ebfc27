"""Mosquitto's refusals, read from its log into our audit log.

Mosquitto refuses a bad client certificate during the TLS handshake and says so only in its
log (``connection_messages true``)::

    1796308897: New connection from 127.0.0.1:53831 on port 8883.
    1796308897: OpenSSL Error[0]: error:0A000086:SSL routines::certificate verify failed
    1796308897: Client <unknown> disconnected: Protocol error.
    …: Client connection from 10.0.0.7 failed: error:0A000086:SSL routines::certificate verify failed.

`MosquittoLogWatcher` follows that file (surviving rotation and truncation) and reports each
refused handshake as a ``connection_refused`` security event with the peer address and
OpenSSL's reason, the same event the embedded broker raises. A connection that closes before
saying anything ("unexpected eof": port probes, load-balancer health checks) is not a refusal.

What the log cannot tell: which certificate a refused client presented (an expired and a
foreign one both read "certificate verify failed"), and ACL denials, which Mosquitto 2.0 logs
only at debug level. Forged device ids in payloads are caught by the control plane's ingest.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

SecurityEventHandler = Callable[[str, dict[str, object]], None]

_NEW_CONNECTION = re.compile(r"New connection from (?P<address>\S+?) on port (?P<port>\d+)")
_OPENSSL_ERROR = re.compile(r"OpenSSL Error\[\d+\]: error:[0-9A-Fa-f]+:[^:]*::?(?P<reason>.+)$")
# The same refusal, when OpenSSL reports it while Mosquitto accepts the socket.
_CONNECTION_FAILED = re.compile(
    r"Client connection from (?P<address>\S+) failed: error:[0-9A-Fa-f]+:[^:]*::?(?P<reason>.+?)\.?$"
)
_NOT_REFUSALS = ("unexpected eof while reading",)


class MosquittoLogWatcher:
    def __init__(
        self, path: Path, on_security_event: SecurityEventHandler, *, poll_interval_s: float = 0.5
    ) -> None:
        self._path = path
        self._on_event = on_security_event
        self._poll_interval_s = poll_interval_s
        self._last_peer: str | None = None
        self.refusals = 0

    def feed(self, line: str) -> None:
        """Read one log line (public for tests and for replaying a log)."""
        if match := _NEW_CONNECTION.search(line):
            self._last_peer = match.group("address")
            return
        if match := _CONNECTION_FAILED.search(line):
            self._last_peer = match.group("address")
        else:
            match = _OPENSSL_ERROR.search(line)
        if match is None:
            return
        reason = match.group("reason").strip()
        if reason in _NOT_REFUSALS:
            return
        self.refusals += 1
        self._on_event(
            "connection_refused",
            {"source": self._last_peer or "unknown", "reason": f"TLS: {reason}", "broker": "mosquitto"},
        )

    async def run(self) -> None:
        """Follow the file from its current end until cancelled."""
        position, inode = self._end_of_file()
        buffer = ""
        while True:
            await asyncio.sleep(self._poll_interval_s)
            try:
                stat = self._path.stat()
            except FileNotFoundError:
                continue
            if stat.st_ino != inode or stat.st_size < position:  # rotated or truncated
                position, inode, buffer = 0, stat.st_ino, ""
            if stat.st_size == position:
                continue
            with self._path.open("r", encoding="utf-8", errors="replace") as log:
                log.seek(position)
                buffer += log.read()
                position = log.tell()
            *lines, buffer = buffer.split("\n")
            for line in lines:
                self.feed(line)

    def _end_of_file(self) -> tuple[int, int]:
        try:
            stat = self._path.stat()
        except FileNotFoundError:
            logger.warning("Mosquitto log %s does not exist yet; waiting for it", self._path)
            return 0, -1
        return stat.st_size, stat.st_ino
