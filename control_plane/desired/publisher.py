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
import base64
import functools
import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import sqlalchemy as sa
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.ext.asyncio import AsyncEngine

from control_plane.clock import Clock, utc_now
from control_plane.db.schema import desired_states, devices
from control_plane.desired.assembly import Layer, assemble
from control_plane.desired.layers import SECTIONS, effective_state, merge_patch
from control_plane.pki.signing_keys import SigningKeyring
from protocol.signing import KEY_ID_FIELD, SIGNATURE_FIELD, canonical_json, key_id
from protocol.topics import TopicKind, device_topic
from protocol.versions import SCHEMA_VERSION

logger = logging.getLogger(__name__)

PUBLISH_CONCURRENCY = 500
REFRESH_CHUNK = 2000
ISSUE_LOCK_KEY = 0x5F_1550E  # PostgreSQL advisory lock key of version issuing ("sf issue")


def _fragment(value: Any) -> bytes:
    """`value` as protocol.signing.canonical_json encodes it inside a document."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def _splice(fields: dict[str, bytes]) -> bytes:
    """The canonical JSON of a document from its fields' fragments: keys sorted, no white space.

    Equal to canonical_json of the document (a unit test holds it to that), at the cost of
    encoding only what differs per device: ten thousand documents share their content.
    """
    return b"{" + b",".join(_key(key) + fields[key] for key in sorted(fields)) + b"}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@functools.cache
def _key(name: str) -> bytes:
    return _fragment(name) + b":"


class _StackMerger:
    """`effective_state` of layer stacks, memoised per stack prefix (within one refresh).

    Stacks share their lower layers (every device of a store: template, role, store), so a
    new stack usually costs one merge on top of a known prefix. Merges never mutate their
    input, so states may share nested objects.
    """

    def __init__(self) -> None:
        self._states: dict[tuple[str, ...], dict[str, dict[str, Any]]] = {(): effective_state()}

    def state(self, layers: Sequence[tuple[str, Layer]]) -> dict[str, dict[str, Any]]:
        stack = tuple(source for source, _ in layers)
        found = self._states.get(stack)
        if found is None:
            below = self.state(layers[:-1])
            layer = layers[-1][1]
            found = {section: merge_patch(below[section], layer.get(section) or {}) for section in SECTIONS}
            self._states[stack] = found
        return found


@dataclass(frozen=True, slots=True)
class _Content:
    state: dict[str, dict[str, Any]]  # merged layers (shared by the documents of one stack)
    digest: str
    fragments: dict[str, bytes]  # canonical JSON of each section


@dataclass(frozen=True, slots=True)
class _Issued:
    device_id: str
    digest: str
    document: dict[str, Any]
    payload: bytes  # canonical JSON of the signed document, as published


class _EncodedJSON(sa.types.TypeDecorator[str]):
    """A JSON column's value handed over already encoded: the document's published JSON is
    stored as it is, not encoded a second time."""

    impl = sa.JSON
    cache_ok = True

    def bind_processor(self, dialect: sa.Dialect) -> None:
        return None


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
        self._outbox: list[tuple[str, bytes]] = []  # (device id, signed document's JSON)
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

    async def refresh_now_or_later(
        self, device_ids: Iterable[str] = (), *, stores: Iterable[str] = (), everyone: bool = False
    ) -> None:
        """Issue what an operator's committed change calls for now (its answer then shows the
        new versions); if that fails, leave it to `run()`: the change must not look failed."""
        ids, store_ids = list(device_ids), list(stores)
        try:
            if everyone:
                await self.refresh_all()
            for store_id in store_ids:
                await self.refresh_store(store_id)
            if ids:
                await self.refresh_devices(ids)
        except Exception:
            logger.exception("issuing desired state failed; the publisher's worker retries")
            self.request_refresh(ids, stores=store_ids, everyone=everyone)

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
                latest = await self._latest_documents()
                await self._publish([(doc["device_id"], canonical_json(doc)) for doc in latest])
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
            private_key = self._keyring.active
            kid = key_id(private_key.public_key())
            now = self._clock()
            issued_at = now.isoformat().replace("+00:00", "Z")
            # Fields every document of this refresh shares, as canonical JSON fragments.
            shared = {
                "schema": _fragment(SCHEMA_VERSION),
                "issued_at": _fragment(issued_at),
                KEY_ID_FIELD: _fragment(kid),
                "signing_keys": _fragment(trusted),
            }
            # Devices with the same layer stack (a source names one layer's content within this
            # read) share their merged content: merge, hash and encode it once per stack.
            contents: dict[tuple[str, ...], _Content] = {}
            merger = _StackMerger()
            issued: list[_Issued] = []
            for item in assembled:
                stack = tuple(source for source, _ in item.layers)
                content = contents.get(stack)
                if content is None:
                    state = merger.state(item.layers)
                    fragments = {section: _fragment(state[section]) for section in SECTIONS}
                    # content_hash({**state, "signing_keys": trusted}), from the same fragments.
                    # The trusted keys are content too: a rotation must reach every device.
                    digest = _sha256(_splice({**fragments, "signing_keys": shared["signing_keys"]}))
                    content = contents[stack] = _Content(state, digest, fragments)
                if content.digest == item.desired_hash:
                    continue
                version = item.desired_version + 1
                fields = {
                    **shared,
                    **content.fragments,
                    "device_id": _fragment(item.device_id),
                    "store_id": _fragment(item.store_id),
                    "version": str(version).encode(),  # an int's canonical JSON
                }
                # Byte for byte what sign_document signs (canonical JSON without `sig`).
                signature = private_key.sign(_splice(fields), ec.ECDSA(hashes.SHA256()))
                sig = base64.urlsafe_b64encode(signature).rstrip(b"=").decode()
                document = {
                    "schema": SCHEMA_VERSION,
                    "device_id": item.device_id,
                    "store_id": item.store_id,
                    "version": version,
                    "issued_at": issued_at,
                    "config": content.state["config"],
                    "policies": content.state["policies"],
                    "checks": content.state["checks"],
                    "signing_keys": trusted,
                    KEY_ID_FIELD: kid,
                    SIGNATURE_FIELD: sig,
                }
                payload = _splice({**fields, SIGNATURE_FIELD: _fragment(sig)})
                issued.append(_Issued(item.device_id, content.digest, document, payload))
            if not issued:
                return 0
            await conn.execute(
                sa.update(devices)
                .where(devices.c.id == sa.bindparam("b_id"))
                .values(desired_version=sa.bindparam("b_version"), desired_hash=sa.bindparam("b_hash")),
                [
                    {"b_id": d.device_id, "b_version": d.document["version"], "b_hash": d.digest}
                    for d in issued
                ],
            )
            await conn.execute(
                desired_states.insert().values(document=sa.bindparam("encoded", type_=_EncodedJSON())),
                [
                    {
                        "device_id": d.device_id,
                        "version": d.document["version"],
                        "encoded": d.payload.decode(),
                        "created_at": now,
                    }
                    for d in issued
                ],
            )
        # Committed: from here on the broker can always be refilled from the database.
        self._outbox.extend((d.device_id, d.payload) for d in issued)
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

    async def _publish(self, documents: list[tuple[str, bytes]]) -> None:
        """Publish (device id, canonical JSON of its signed document) pairs, retained."""
        if not self._link.is_connected:
            # Committed already; the next (re)connect republishes everything.
            logger.warning("broker not connected: %d documents wait for the reconnect", len(documents))
            return
        for start in range(0, len(documents), PUBLISH_CONCURRENCY):
            chunk = documents[start : start + PUBLISH_CONCURRENCY]
            results = await asyncio.gather(
                *(
                    self._link.publish(
                        device_topic(device_id, TopicKind.DESIRED), payload, qos=1, retain=True
                    )
                    for device_id, payload in chunk
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
