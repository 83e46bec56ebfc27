"""Reading Mosquitto 2.0's log into security events (lines as Mosquitto 2.0.11 writes them)."""

import asyncio

from control_plane.broker.mosquitto_log import MosquittoLogWatcher

LOG = """\
1796308897: Note: It is recommended to replace `message_size_limit` with `max_packet_size`.
1796308897: New connection from 127.0.0.1:53936 on port 35667.
1796308897: OpenSSL Error[0]: error:0A000126:SSL routines::unexpected eof while reading
1796308897: Client <unknown> disconnected: Protocol error.
1796308897: New connection from 10.1.2.3:53831 on port 35667.
1796308897: OpenSSL Error[0]: error:0A000086:SSL routines::certificate verify failed
1796308897: Client <unknown> disconnected: Protocol error.
1796308903: New connection from 10.1.2.4:60177 on port 35667.
1796308903: OpenSSL Error[0]: error:0A0000C7:SSL routines::peer did not return a certificate
1796308903: Client <unknown> disconnected: Protocol error.
1796308906: New connection from 127.0.0.1:40651 on port 35667.
1796308906: New client connected from 127.0.0.1:40651 as dev-b (p2, c1, k60, u'dev-b').
1796309313: Client connection from 10.1.2.5 failed: error:0A000086:SSL routines::certificate verify failed.
"""


def test_refused_handshakes_become_events_and_probes_do_not():
    events = []
    watcher = MosquittoLogWatcher(__file__, lambda name, details: events.append((name, details)))  # type: ignore[arg-type]
    for line in LOG.splitlines():
        watcher.feed(line)
    assert events == [
        (
            "connection_refused",
            {"source": "10.1.2.3:53831", "reason": "TLS: certificate verify failed", "broker": "mosquitto"},
        ),
        (
            "connection_refused",
            {
                "source": "10.1.2.4:60177",
                "reason": "TLS: peer did not return a certificate",
                "broker": "mosquitto",
            },
        ),
        (
            "connection_refused",
            {"source": "10.1.2.5", "reason": "TLS: certificate verify failed", "broker": "mosquitto"},
        ),
    ]


async def test_follows_appends_and_survives_truncation(tmp_path):
    log = tmp_path / "mosquitto.log"
    log.write_text(
        "1: OpenSSL Error[0]: error:0A000086:SSL routines::certificate verify failed\n"
    )  # before start
    events = []
    watcher = MosquittoLogWatcher(log, lambda name, details: events.append(details), poll_interval_s=0.01)
    task = asyncio.create_task(watcher.run())
    await asyncio.sleep(0.05)
    with log.open("a") as handle:
        handle.write(
            "2: New connection from 10.0.0.9:1 on port 8883.\n2: OpenSSL Error[0]: error:0A0000C7:SSL "
        )
    await asyncio.sleep(0.05)
    with log.open("a") as handle:  # the rest of a half-written line
        handle.write("routines::peer did not return a certificate\n")
    await asyncio.sleep(0.05)
    log.write_text(
        "3: New connection from 10.0.0.10:1 on port 8883.\n"
        "3: OpenSSL Error[0]: error:0A000086:SSL routines::certificate verify failed\n"
    )  # truncated
    await asyncio.sleep(0.05)
    task.cancel()
    assert [e["source"] for e in events] == ["10.0.0.9:1", "10.0.0.10:1"]
