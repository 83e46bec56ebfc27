"""Two full control-plane replicas on ONE Mosquitto and ONE PostgreSQL, with a real agent.

Each replica has its own MQTT identity (`--replica-id`), so neither kicks the other off the
broker; device messages are split between them by a shared subscription (each handled by
exactly one: health counts add up, one renewal request makes one certificate); a change made
through either reaches the device; when the replica driving rollouts crashes, the other takes
the lease within seconds and drives a rollout to the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import sqlalchemy as sa

from control_plane.db.engine import create_engine, migrate
from control_plane.db.schema import desired_states, devices, stores
from control_plane.desired.publisher import DesiredStatePublisher
from control_plane.mqtt.link import share_group
from control_plane.pki.ca import BuiltinCA
from control_plane.pki.files import write_public
from control_plane.pki.identity import CONTROL_PLANE_SERVICE
from control_plane.pki.signing_keys import SigningKeyring
from protocol.topics import TopicKind, device_topic, fleet_filter
from tests.support.agents import enroll_agent, running
from tests.support.certs import ClientCredentials, make_device_credentials, make_service_credentials
from tests.support.control_plane import RunningControlPlane, running_control_plane
from tests.support.mosquitto import MosquittoProcess
from tests.support.postgres import fresh_database
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto, pytest.mark.postgres]

TRUST_DOMAIN = "storefleet.local"
LEASE_TTL_S = 2.0
FAST: dict[str, Any] = {
    "rollout_tick_s": 0.2,
    "rollout_lease_ttl_s": LEASE_TTL_S,
    # No per-device renewal rate limit: a renewal request handled twice would make two certificates.
    "renewal_min_interval_s": 0,
}
STORE = "NL-AMS-0001"


def _client(host: str, port: int, credentials: ClientCredentials, client_id: str) -> aiomqtt.Client:
    return aiomqtt.Client(
        host, port, identifier=client_id, tls_context=credentials.ssl_context(), clean_session=True, timeout=5
    )


async def _renewed_certificates(cp: RunningControlPlane, device_id: str) -> int:
    response = await cp.api.get("/v1/certificates", params={"device_id": device_id})
    assert response.status_code == 200, response.text
    return sum(1 for c in response.json() if c["issued_by"] == "renew")


async def _lease_kept() -> None:
    """A crashed replica never gets to release its lease."""


async def test_two_replicas_split_the_work_and_fail_over(tmp_path: Path) -> None:
    a_dir, b_dir = tmp_path / "replica-a", tmp_path / "replica-b"
    # The CA, as an operator makes it before configuring the broker (`storefleet ca init`).
    ca = BuiltinCA.load_or_create(a_dir / "pki", trust_domain=TRUST_DOMAIN)
    crl_file = a_dir / "pki" / "crl.pem"
    write_public(crl_file, ca.crl_pem([]).encode())
    # What `storefleet broker-config mosquitto --control-plane-replica a --control-plane-replica b` writes.
    mosquitto = MosquittoProcess(
        ca,
        tmp_path / "mosquitto",
        client_id_from_certificate=True,
        control_plane_replicas=("a", "b"),
        crl_file=crl_file,
    )
    async with (
        fresh_database() as database_url,
        mosquitto as (host, port),
        contextlib.AsyncExitStack() as b_ctx,
    ):
        common = {"database_url": database_url, "broker_url": f"mqtts://{host}:{port}", **FAST}
        a_ctx = contextlib.AsyncExitStack()
        try:
            a = await a_ctx.enter_async_context(running_control_plane(a_dir, replica_id="a", **common))
            a_services = a.control_plane.services
            await wait_until(lambda: a_services.rollout_driver.is_leader, 10, "replica a to lead rollouts")
            # Replica b gets a copy of a's pki/ (CA, config-signing keys, upload key): both sign
            # what the devices pin. Its own certificates are made at start, under its own name.
            shutil.copytree(a_dir / "pki", b_dir / "pki")
            b = await b_ctx.enter_async_context(running_control_plane(b_dir, replica_id="b", **common))
            b_services = b.control_plane.services
            assert sorted(p.name for p in (b_dir / "pki").glob("control-plane*.pem")) == [
                "control-plane-a.pem",  # copied, unused
                "control-plane-b.pem",
            ]
            # One secret share group: derived from the upload key both hold.
            [group] = {f.split("/")[1] for f in a_services.link.subscriptions + b_services.link.subscriptions}
            assert group.startswith("sf-")
            assert b_services.link.subscriptions == [
                f"$share/{group}/{fleet_filter(kind)}"
                for kind in (
                    TopicKind.REPORTED,
                    TopicKind.HEALTH,
                    TopicKind.STATUS,
                    TopicKind.COMMAND_RESULT,
                    TopicKind.RENEW,
                )
            ]

            # A device enrolls through replica a; an observer with the (unsuffixed) control-plane
            # identity counts every health report the device sends, with a plain subscription.
            await a.create_store(STORE, config={"pos": {"currency": "EUR"}})
            enrolled = await enroll_agent(a, STORE, tmp_path / "agent")
            observer_credentials = make_service_credentials(
                ca, tmp_path / "observer", name=CONTROL_PLANE_SERVICE, server_ca_file=a.ca_file
            )
            sent_health = 0
            async with _client(host, port, observer_credentials, CONTROL_PLANE_SERVICE) as observer:
                await observer.subscribe(device_topic(enrolled.device_id, TopicKind.HEALTH), qos=1)

                async def count() -> None:
                    nonlocal sent_health
                    async for _ in observer.messages:
                        sent_health += 1

                counting = asyncio.create_task(count())
                try:
                    async with running(enrolled.build()) as agent:
                        await asyncio.wait_for(agent.wait_applied(1), 15)
                        # A change made through replica b reaches the device.
                        response = await b.api.put(
                            f"/v1/devices/{enrolled.device_id}/overrides",
                            json={"config": {"pos": {"printer": "lp-from-b"}}},
                        )
                        assert response.status_code == 200, response.text
                        await asyncio.wait_for(agent.wait_applied(2), 15)
                        applied = json.loads(enrolled.config_file.read_text())
                        assert applied["pos"] == {"currency": "EUR", "printer": "lp-from-b"}
                        await b.wait_for_device(
                            enrolled.device_id, lambda v: v["applied_version"] == 2 and v["online"]
                        )

                        # One renewal request, handled by one replica: one certificate.
                        agent.renewer.renew_now()
                        await wait_until(lambda: agent.renewer.renewals == 1, 15, "the renewal")
                        await wait_until(lambda: sent_health >= 6, 15, "a few health reports")
                    await asyncio.sleep(0.5)  # the last reports reach a replica
                finally:
                    counting.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await counting
            assert await _renewed_certificates(b, enrolled.device_id) == 1
            assert a_services.renewals.issued + b_services.renewals.issued == 1
            # Every health report was handled exactly once, and both replicas took a share.
            handled = [a_services.ingest.accepted["health"], b_services.ingest.accepted["health"]]
            assert sum(handled) == sent_health, (handled, sent_health)
            assert min(handled) > 0, handled
            # Neither replica was kicked off the broker by the other.
            assert (a_services.link.connects, b_services.link.connects) == (1, 1)

            # Replica a, which drives rollouts, crashes (its lease is not released).
            assert not b_services.rollout_driver.is_leader
            a_services.rollout_driver.lease.release = _lease_kept  # type: ignore[method-assign]
            crashed_at = time.monotonic()
            await a_ctx.aclose()
        finally:
            await a_ctx.aclose()

        # Replica b takes over within the lease's time to live (plus a tick or two)...
        await wait_until(lambda: b_services.rollout_driver.is_leader, 10, "replica b to take over")
        takeover_s = time.monotonic() - crashed_at
        assert takeover_s < LEASE_TTL_S + 2, takeover_s
        # ...and handles every device message alone: the device keeps its session and b sees it.
        async with running(enrolled.build()) as agent:
            before = b_services.ingest.accepted["health"]
            response = await b.api.post(
                "/v1/releases",
                json={"id": "tax-2027", "name": "tax-2027", "layer": {"config": {"pos": {"tax": 21}}}},
            )
            assert response.status_code == 201, response.text
            plan = {"waves": [{"percent": 100}], "bake_s": 0.5, "window": "now", "keep_known_good": False}
            response = await b.api.post(
                "/v1/rollouts",
                json={"id": "ro-ha", "release_id": "tax-2027", "selector": {"stores": [STORE]}, "plan": plan},
            )
            assert response.status_code == 201, response.text
            deadline = asyncio.get_running_loop().time() + 30
            while (view := (await b.api.get("/v1/rollouts/ro-ha")).json())["state"] not in {
                "completed",
                "paused",
                "rolled_back",
            }:
                assert asyncio.get_running_loop().time() < deadline, view
                await asyncio.sleep(0.1)
            assert view["state"] == "completed", view
            assert view["states"] == {"healthy": 1}
            assert json.loads(enrolled.config_file.read_text())["pos"]["tax"] == 21
            assert b_services.ingest.accepted["health"] > before
        enrolled.state.close()


async def test_only_the_replicas_get_the_device_messages_they_share(tmp_path: Path) -> None:
    """Mosquitto checks a ``$share/<group>/…`` subscription's deliveries against the ACL like a
    plain one: a listed replica gets the fleet's messages, a device or an unlisted replica none.
    It grants any subscription, though, so a client that knows the group name swallows its
    share of the messages: hence a secret group name."""
    ca = BuiltinCA.load_or_create(tmp_path / "pki", trust_domain=TRUST_DOMAIN)
    async with MosquittoProcess(
        ca, tmp_path / "mosquitto", client_id_from_certificate=True, control_plane_replicas=("a",)
    ) as (host, port):
        ca_file = tmp_path / "mosquitto" / "ca.pem"
        name_a = f"{CONTROL_PLANE_SERVICE}-a"
        replica_a = make_service_credentials(ca, tmp_path, name=name_a, server_ca_file=ca_file)
        unlisted = make_service_credentials(
            ca, tmp_path, name=f"{CONTROL_PLANE_SERVICE}-z", server_ca_file=ca_file
        )
        thief = make_device_credentials(ca, tmp_path, "dev-thief", server_ca_file=ca_file)
        victim = make_device_credentials(ca, tmp_path, "dev-victim", server_ca_file=ca_file)
        health = fleet_filter(TopicKind.HEALTH)
        group = share_group(b"a secret the replicas share")

        async def deliveries(filters: dict[str, str]) -> dict[str, int]:
            """Subscribe each client to its filter; count what each gets of six reports."""
            got = dict.fromkeys(filters, 0)
            credentials = {"a": replica_a, "z": unlisted, "thief": thief}
            async with contextlib.AsyncExitStack() as stack:
                clients = {
                    name: await stack.enter_async_context(_client(host, port, credentials[name], name))
                    for name in filters
                }
                for name, client in clients.items():
                    await client.subscribe(filters[name], qos=1)

                async def listen(name: str, client: aiomqtt.Client) -> None:
                    async for _ in client.messages:
                        got[name] += 1

                listeners = [asyncio.create_task(listen(n, c)) for n, c in clients.items()]
                try:
                    async with _client(host, port, victim, "dev-victim") as device:
                        for _ in range(6):
                            await device.publish(device_topic("dev-victim", TopicKind.HEALTH), b"{}", qos=1)
                    await asyncio.sleep(0.5)
                finally:
                    for task in listeners:
                        task.cancel()
                    await asyncio.gather(*listeners, return_exceptions=True)
            return got

        # Outsiders subscribe to the same filter (plain, or in a group of their own): nothing.
        assert await deliveries(
            {"a": f"$share/{group}/{health}", "z": f"$share/{group}-guess/{health}", "thief": health}
        ) == {"a": 6, "z": 0, "thief": 0}
        # An outsider in the replicas' group receives nothing either, but takes its turns.
        got = await deliveries({"a": f"$share/{group}/{health}", "thief": f"$share/{group}/{health}"})
        assert got["thief"] == 0
        assert got["a"] < 6


class _Offline:
    """A replica's broker link, down: versions are issued and committed, published later."""

    is_connected = False

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        raise AssertionError("not connected")


async def test_replicas_issuing_versions_at_once_never_issue_one_twice(tmp_path: Path) -> None:
    """Two replicas' publishers change the same devices at the same moment (an operator on one,
    the rollout driver on the other): every version is issued once, in order, none refused."""
    keyring = SigningKeyring.load_or_create(tmp_path / "signing")
    async with fresh_database() as url:
        engines = [create_engine(url), create_engine(url)]
        try:
            await migrate(engines[0])
            now = datetime.now(UTC)
            async with engines[0].begin() as conn:
                await conn.execute(
                    stores.insert().values(
                        id="S1", name="S1", timezone="UTC", config={}, created_at=now, updated_at=now
                    )
                )
                await conn.execute(
                    devices.insert(),
                    [{"id": f"dev-{i}", "store_id": "S1", "enrolled_at": now} for i in range(20)],
                )
            publishers = [DesiredStatePublisher(engine, keyring, _Offline()) for engine in engines]
            ids = [f"dev-{i}" for i in range(20)]
            for round_ in range(1, 11):
                async with engines[0].begin() as conn:
                    await conn.execute(stores.update().values(config={"config": {"round": round_}}))
                issued = await asyncio.gather(*(p.refresh_devices(ids) for p in publishers))
                assert sorted(issued) == [0, 20], issued  # one of them issued, the other found nothing new
            async with engines[0].connect() as conn:
                rows = (
                    await conn.execute(
                        sa.select(
                            desired_states.c.device_id, desired_states.c.version, desired_states.c.document
                        )
                    )
                ).all()
            for device_id in ids:
                mine = sorted(
                    (r.version, r.document["config"]["round"]) for r in rows if r.device_id == device_id
                )
                assert mine == [(n, n) for n in range(1, 11)], mine
        finally:
            for engine in engines:
                await engine.dispose()
