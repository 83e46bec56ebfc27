"""Certificate renewal over the device's own mTLS MQTT session.

::

    agent ── sf/v1/dev/<id>/renew ──▶ broker ──▶ Ingest.handle ──▶ RenewalService.submit
             (mTLS; the ACL confines a device      (sync, on the       (bounded queue;
              to its own topics, so <id> is         link's loop)        full → counted drop)
              the authenticated identity)                                     │
                                                                RenewalService.run (workers)
                answer cache (request_id) → device active, current certificate not revoked
                → CSR policy (`load_csr`) → rate limit → CA gateway (thread, timeout)
                → certificates row (issued_by "renew") + devices.cert_serial + audit, one txn
                                                                              │
    agent ◀── sf/v1/dev/<id>/renew/result (QoS 1, not retained) ◀── BrokerLink.publish

Every answer is published, refusals included, so the agent never waits for its timeout when
the control plane has decided. A request re-sent with the same `request_id` and CSR (the
agent lost the answer) gets the same answer again, never a second certificate; the same id
with another CSR is refused (``request_id_conflict``). Transient refusals (``rate_limited``,
``ca_unavailable``) are not remembered and carry `retry_after_s`.

The previous certificate is left alone: the agent keeps using it until it has connected
with the new one, and it expires soon anyway (renewal happens at about 2/3 of its life).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import weakref
from collections import Counter, OrderedDict
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import aiomqtt
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from control_plane.audit import AuditEvent, AuditLog, Outcome
from control_plane.clock import Clock, utc_now
from control_plane.db.schema import certificates, devices
from control_plane.errors import CAUnavailable, CSRRejected, StorefleetError
from control_plane.pki.ca import IssuedCertificate, load_csr
from control_plane.pki.gateway import CAGateway
from protocol.messages import RenewalRequest, RenewalResponse, RenewalStatus
from protocol.topics import TopicKind, device_topic

logger = logging.getLogger(__name__)

AUDIT_ACTION = "certificate.renew"
ISSUED_BY = "renew"
ACTIVE = "active"
# Answers remembered for re-sent requests; a re-send comes within the agent's timeout.
ANSWER_CACHE_SIZE = 10_000


class ResultPublisher(Protocol):
    """What the service needs from the broker session (`control_plane.mqtt.link.BrokerLink`)."""

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None: ...


class RenewalRefused(StorefleetError):
    """Why a renewal was refused; becomes a ``refused`` answer and an audit record.

    `transient` refusals are not remembered per request id: trying again later can succeed.
    """

    code = "renewal_refused"

    def __init__(
        self,
        message: str,
        *,
        code: str,
        retry_after_s: float | None = None,
        outcome: Outcome = Outcome.DENIED,
        transient: bool = False,
    ) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s
        self.outcome = outcome
        self.transient = transient


@dataclass(frozen=True, slots=True)
class _Answer:
    csr_digest: str
    response: RenewalResponse


class RenewalService:
    """Queue renewal requests from the ingest path; `await run()` answers them until cancelled."""

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        ca: CAGateway,
        audit: AuditLog,
        link: ResultPublisher,
        cert_validity: timedelta,
        min_interval: timedelta,
        ca_retry_after_s: float,
        queue_size: int = 1000,
        workers: int = 2,
        clock: Clock = utc_now,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self._engine = engine
        self._ca = ca
        self._audit = audit
        self._link = link
        self._cert_validity = cert_validity
        self._min_interval = min_interval
        self._ca_retry_after_s = ca_retry_after_s
        self._workers = workers
        self._clock = clock
        self._queue: asyncio.Queue[RenewalRequest] = asyncio.Queue(maxsize=queue_size)
        self._answers: OrderedDict[tuple[str, str], _Answer] = OrderedDict()
        self._device_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self.received = 0
        self.dropped = 0
        self.issued = 0
        self.replayed = 0
        self.unsent = 0
        self.refused: Counter[str] = Counter()

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def submit(self, request: RenewalRequest) -> None:
        """Queue one validated request (its device id is the topic's); never blocks, never raises."""
        self.received += 1
        try:
            self._queue.put_nowait(request)
        except asyncio.QueueFull:
            self.dropped += 1
            # The agent times out and sends the request again.
            logger.warning(
                "renewal queue full: dropped request %s of %s", request.request_id, request.device_id
            )

    async def run(self) -> None:
        workers = [
            asyncio.create_task(self._work(), name=f"renewal-worker-{index}")
            for index in range(self._workers)
        ]
        try:
            await asyncio.gather(*workers)
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _work(self) -> None:
        while True:
            request = await self._queue.get()
            try:
                await self.process(request)
            except Exception:
                logger.exception("renewal %s of %s failed", request.request_id, request.device_id)
            finally:
                self._queue.task_done()

    async def process(self, request: RenewalRequest) -> RenewalResponse:
        """Decide one request (or replay the answer already given to it) and publish the answer."""
        lock = self._device_locks.get(request.device_id)
        if lock is None:
            lock = self._device_locks[request.device_id] = asyncio.Lock()
        async with lock:  # one decision at a time per device: the rate limit and the cache hold
            response = await self._answer(request)
        await self._send(response)
        return response

    async def _answer(self, request: RenewalRequest) -> RenewalResponse:
        key = (request.device_id, request.request_id)
        digest = hashlib.sha256(request.csr_pem.encode()).hexdigest()
        cached = self._answers.get(key)
        if cached is not None and cached.csr_digest == digest:
            self._answers.move_to_end(key)
            self.replayed += 1
            logger.info("renewal %s of %s re-sent: same answer again", request.request_id, request.device_id)
            return cached.response
        try:
            if cached is not None:
                raise RenewalRefused(  # noqa: TRY301 - refusals of every step are handled below
                    "request id already used with another CSR", code="request_id_conflict"
                )
            issued = await self._renew(request)
        except RenewalRefused as refusal:
            return await self._refuse(request, refusal, digest)
        response = RenewalResponse(
            device_id=request.device_id,
            request_id=request.request_id,
            status=RenewalStatus.ISSUED,
            certificate_pem=issued.certificate_pem,
            ca_chain_pem=self._ca.ca_chain_pem(),
            not_after=issued.not_after,
        )
        self.issued += 1
        self._remember(key, _Answer(digest, response))
        return response

    async def _renew(self, request: RenewalRequest) -> IssuedCertificate:
        device_id = request.device_id
        async with self._engine.connect() as conn:
            device = (
                await conn.execute(
                    sa.select(devices.c.store_id, devices.c.state, devices.c.cert_serial).where(
                        devices.c.id == device_id
                    )
                )
            ).first()
            if device is None:
                raise RenewalRefused(f"device {device_id!r} is not known", code="device_unknown")
            if device.state != ACTIVE:
                raise RenewalRefused(f"device {device_id!r} is {device.state}", code="device_not_active")
            if device.cert_serial is not None:
                current = (
                    await conn.execute(
                        sa.select(certificates.c.status, certificates.c.revoked_at).where(
                            certificates.c.serial == device.cert_serial
                        )
                    )
                ).first()
                if current is not None and (current.status == "revoked" or current.revoked_at is not None):
                    raise RenewalRefused(
                        f"certificate {device.cert_serial} is revoked", code="certificate_revoked"
                    )
            last_renewed = await conn.scalar(
                sa.select(sa.func.max(certificates.c.created_at)).where(
                    certificates.c.device_id == device_id, certificates.c.issued_by == ISSUED_BY
                )
            )
        try:
            load_csr(request.csr_pem)
        except CSRRejected as exc:
            raise RenewalRefused(exc.message, code=exc.code) from exc
        now = self._clock()
        if last_renewed is not None and now - last_renewed < self._min_interval:
            wait = (last_renewed + self._min_interval - now).total_seconds()
            raise RenewalRefused(
                f"the last renewal was {(now - last_renewed).total_seconds():.0f}s ago",
                code="rate_limited",
                retry_after_s=round(max(wait, 0.0), 3),
                transient=True,
            )
        try:
            issued = await self._ca.sign_device_csr(
                request.csr_pem, device_id=device_id, store_id=device.store_id, validity=self._cert_validity
            )
        except CAUnavailable as exc:
            raise RenewalRefused(
                exc.message,
                code="ca_unavailable",
                retry_after_s=self._ca_retry_after_s,
                outcome=Outcome.FAILED,
                transient=True,
            ) from exc
        except CSRRejected as exc:
            raise RenewalRefused(exc.message, code=exc.code) from exc
        await self._record(request, issued, previous_serial=device.cert_serial)
        return issued

    async def _record(
        self, request: RenewalRequest, issued: IssuedCertificate, *, previous_serial: str | None
    ) -> None:
        """Certificate row, device pointer and audit record in one transaction."""
        now = self._clock()
        async with self._engine.begin() as conn:
            await conn.execute(
                certificates.insert().values(
                    serial=issued.serial,
                    device_id=request.device_id,
                    not_before=issued.not_before,
                    not_after=issued.not_after,
                    status="valid",
                    created_at=now,
                    issued_by=ISSUED_BY,
                )
            )
            updated = await conn.execute(
                sa.update(devices)
                .where(devices.c.id == request.device_id, devices.c.state == ACTIVE)
                .values(cert_serial=issued.serial, cert_not_after=issued.not_after)
            )
            if updated.rowcount == 0:
                # Revoked or decommissioned while the CA signed: keep a record of the certificate
                # (revoked, it was never handed out) and refuse.
                await conn.execute(
                    sa.update(certificates)
                    .where(certificates.c.serial == issued.serial)
                    .values(status="revoked", revoked_at=now, revocation_reason="device_not_active")
                )
            else:
                await self._audit.record(
                    AuditEvent(
                        action=AUDIT_ACTION,
                        outcome=Outcome.SUCCESS,
                        actor=request.device_id,
                        target=request.device_id,
                        detail={
                            "request_id": request.request_id,
                            "serial": issued.serial,
                            "previous_serial": previous_serial,
                            "not_after": issued.not_after.isoformat(),
                        },
                    ),
                    connection=conn,
                )
        if updated.rowcount == 0:
            raise RenewalRefused(
                f"device {request.device_id!r} stopped being active", code="device_not_active"
            )
        logger.info(
            "renewed the certificate of %s: serial %s, valid until %s",
            request.device_id,
            issued.serial,
            issued.not_after.isoformat(),
        )

    async def _refuse(self, request: RenewalRequest, refusal: RenewalRefused, digest: str) -> RenewalResponse:
        self.refused[refusal.code] += 1
        detail: dict[str, object] = {
            "request_id": request.request_id,
            "reason": refusal.code,
            "message": refusal.message[:300],
        }
        if refusal.retry_after_s is not None:
            detail["retry_after_s"] = refusal.retry_after_s
        await self._audit.record(
            AuditEvent(
                action=AUDIT_ACTION,
                outcome=refusal.outcome,
                actor=request.device_id,
                target=request.device_id,
                detail=detail,
            )
        )
        response = RenewalResponse(
            device_id=request.device_id,
            request_id=request.request_id,
            status=RenewalStatus.REFUSED,
            reason=refusal.code,
            retry_after_s=refusal.retry_after_s,
        )
        if not refusal.transient and refusal.code != "request_id_conflict":
            self._remember((request.device_id, request.request_id), _Answer(digest, response))
        return response

    def _remember(self, key: tuple[str, str], answer: _Answer) -> None:
        self._answers[key] = answer
        self._answers.move_to_end(key)
        while len(self._answers) > ANSWER_CACHE_SIZE:
            self._answers.popitem(last=False)

    async def _send(self, response: RenewalResponse) -> None:
        topic = device_topic(response.device_id, TopicKind.RENEW_RESULT)
        try:
            await self._link.publish(topic, response.to_json(), qos=1, retain=False)
        except (ConnectionError, aiomqtt.MqttError) as exc:
            # The agent times out and re-sends the same request; the cached answer goes out then.
            self.unsent += 1
            logger.warning("could not send the renewal answer to %s: %s", response.device_id, exc)
