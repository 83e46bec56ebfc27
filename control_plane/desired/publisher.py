"""Issue, sign, persist and publish desired-state versions.

A device's version is monotonic and moves only when its effective content changes. Issuing
is a database transaction (one writer at a time in this process); publishing happens after
the commit, in `run()`, so no caller waits for the broker and the broker can always be
refilled from the database: `republish_all` runs on every (re)connect.

Enrollment uses `request_refresh`: the device ids of concurrent enrollments are coalesced
into one transaction, so a burst of enrollments costs one issue-and-publish round, not one
per device.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from control_plane.clock import Clock, utc_now
from control_plane.db.schema import desired_states, devices
from control_plane.desired.assembly import assemble
from control_plane.desired.layers import content_hash, effective_state
from control_plane.pki.signing_keys import SigningKeyring
from protocol.signing import canonical_json, sign_document
from protocol.topics import TopicKind, device_topic
from protocol.versions import SCHEMA_VERSION

logger = logging.getLogger(__name__)

PUBLISH_CONCURRENCY = 500
REFRESH_CHUNK = 2000
ISSUE_LOCK_KEY = 0x5F_1550E  # PostgreSQL advisory lock key of version issuing ("sf issue")


class Publisher(Protocol):
    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None: ...

    @property
    def is_connected(self) -> bool: ...


class DesiredStatePublisher:
    def __init__(
        self, engine: AsyncEngine, keyring: SigningKeyring, link: Publisher, *, clock: Clock = utc_now
    ) -> None:
        self._engine = engine
        self._keyring = keyring
        self._link = link
        self._clock = clock
        # Versions are read-modify-written; one issuer at a time within this process.
        self._lock = asyncio.Lock()
        self._outbox: list[dict[str, Any]] = []
        self._requested: set[str] = set()
        self._requested_stores: set[str] = set()
        self._refill = False
        self._refresh_everyone = False
        self._wakeup = asyncio.Event()
        self.published = 0

    async def refresh_store(self, store_id: str) -> int:
        """Issue new versions to the store's devices whose content changed; published shortly after."""
        return await self._refresh(devices.c.store_id == store_id)

    async def refresh_devices(self, device_ids: Iterable[str]) -> int:
        # Chunked: a group change may touch more devices than a statement may bind parameters.
        ids = list(dict.fromkeys(device_ids))
        issued = 0
        for start in range(0, len(ids), REFRESH_CHUNK):
            issued += await self._refresh(devices.c.id.in_(ids[start : start + REFRESH_CHUNK]))
        return issued

    async def refresh_all(self) -> int:
        """Every active device (a platform-wide change such as a signing-key rotation)."""
        return await self._refresh(sa.true())

    def request_refresh(
        self, device_ids: Iterable[str] = (), *, stores: Iterable[str] = (), everyone: bool = False
    ) -> None:
        """Ask for a refresh without waiting: `run()` coalesces requests into one transaction."""
        self._requested.update(device_ids)
        self._requested_stores.update(stores)
        self._refresh_everyone |= everyone
        self._wakeup.set()

    async def run(self) -> None:
        """Issue what was requested and publish what was issued, until cancelled."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self._refresh_everyone:
                self._refresh_everyone = False
                try:
                    await self.refresh_all()
                except Exception:
                    logger.exception("refresh of every device failed; retrying on the next request")
                    self._refresh_everyone = True
            if self._requested_stores:
                stores_due, self._requested_stores = self._requested_stores, set()
                for store_id in stores_due:
                    try:
                        await self.refresh_store(store_id)
                    except Exception:
                        logger.exception("refresh of store %s failed; retrying on the next request", store_id)
                        self._requested_stores.add(store_id)
            if self._requested:
                requested, self._requested = self._requested, set()
                try:
                    await self.refresh_devices(requested)
                except Exception:
                    logger.exception(
                        "refresh of %d devices failed; retrying on the next request", len(requested)
                    )
                    self._requested |= requested
            if self._refill:
                # Read, then publish, in this one worker: anything issued after the read is in
                # the outbox and goes out after it, so an older version never lands last.
                self._refill = False
                await self._publish(await self._latest_documents())
            if self._outbox:
                documents, self._outbox = self._outbox, []
                await self._publish(documents)

    async def _refresh(self, which: sa.ColumnElement[bool]) -> int:
        async with self._lock, self._engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Other replicas issue too: one issuer at a time across them (held to commit),
                # or two would both write version N+1 of a device.
                await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(ISSUE_LOCK_KEY)))
            assembled = await assemble(conn, which)
            trusted = self._keyring.trusted()
            issued: list[dict[str, Any]] = []
            now = self._clock()
            for item in assembled:
                state = effective_state(*(layer for _, layer in item.layers))
                # The trusted keys are content too: a rotation must reach every device.
                digest = content_hash({**state, "signing_keys": trusted})
                if digest == item.desired_hash:
                    continue
                document = sign_document(
                    {
                        "schema": SCHEMA_VERSION,
                        "device_id": item.device_id,
                        "store_id": item.store_id,
                        "version": item.desired_version + 1,
                        "issued_at": now.isoformat().replace("+00:00", "Z"),
                        "config": state["config"],
                        "policies": state["policies"],
                        "checks": state["checks"],
                        "signing_keys": trusted,
                    },
                    self._keyring.active,
                )
                issued.append({"id": item.device_id, "hash": digest, "document": document})
            if not issued:
                return 0
            await conn.execute(
                sa.update(devices)
                .where(devices.c.id == sa.bindparam("b_id"))
                .values(desired_version=sa.bindparam("b_version"), desired_hash=sa.bindparam("b_hash")),
                [
                    {"b_id": d["id"], "b_version": d["document"]["version"], "b_hash": d["hash"]}
                    for d in issued
                ],
            )
            await conn.execute(
                desired_states.insert(),
                [
                    {
                        "device_id": d["id"],
                        "version": d["document"]["version"],
                        "document": d["document"],
                        "created_at": now,
                    }
                    for d in issued
                ],
            )
        # Committed: from here on the broker can always be refilled from the database.
        self._outbox.extend(d["document"] for d in issued)
        self._wakeup.set()
        logger.info("issued %d desired-state versions", len(issued))
        return len(issued)

    async def republish_all(self) -> None:
        """Have `run()` publish every active device's newest document again (after each broker
        (re)connect: a broker without persistence lost them). Idempotent for agents."""
        self._refill = True
        self._wakeup.set()

    async def _latest_documents(self) -> list[dict[str, Any]]:
        latest = sa.select(desired_states.c.document).join(
            devices,
            sa.and_(
                devices.c.id == desired_states.c.device_id,
                devices.c.desired_version == desired_states.c.version,
                # A decommissioned device's retained state was cleared on purpose.
                devices.c.state == "active",
            ),
        )
        async with self._engine.connect() as conn:
            return [row.document for row in await conn.execute(latest)]

    async def _publish(self, documents: list[dict[str, Any]]) -> None:
        if not self._link.is_connected:
            # Committed already; the next (re)connect republishes everything.
            logger.warning("broker not connected: %d documents wait for the reconnect", len(documents))
            return
        for start in range(0, len(documents), PUBLISH_CONCURRENCY):
            chunk = documents[start : start + PUBLISH_CONCURRENCY]
            results = await asyncio.gather(
                *(
                    self._link.publish(
                        device_topic(doc["device_id"], TopicKind.DESIRED),
                        canonical_json(doc),
                        qos=1,
                        retain=True,
                    )
                    for doc in chunk
                ),
                return_exceptions=True,
            )
            failures = [r for r in results if isinstance(r, BaseException)]
            self.published += len(chunk) - len(failures)
            if failures:
                logger.warning(
                    "%d of %d publishes failed (%s); they go again on reconnect",
                    len(failures),
                    len(chunk),
                    failures[0],
                )
