"""`RenewalService` on a real (SQLite) database and the built-in CA behind the gateway: the
rules, the CA outage path, the queue, idempotency, and what is recorded and published."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy.ext.asyncio import AsyncEngine

from control_plane.audit import AuditLog
from control_plane.certificates.renewal import RenewalService
from control_plane.db.engine import create_engine, migrate
from control_plane.db.schema import certificates, devices, stores
from control_plane.errors import CAUnavailable
from control_plane.pki.ca import BuiltinCA, IssuedCertificate, RevokedCertificate
from control_plane.pki.gateway import CAGateway
from protocol.messages import RenewalRequest, RenewalResponse, RenewalStatus, decode
from protocol.topics import TopicKind, device_topic

TRUST_DOMAIN = "test.storefleet.example"
DEVICE = "dev-0123456789abcdef"
NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


class FlakyCA:
    """The built-in CA, unless `down`: then every call fails the way an unreachable Vault does."""

    def __init__(self, ca: BuiltinCA) -> None:
        self.ca = ca
        self.down = False
        self.signed = 0

    def ca_chain_pem(self) -> str:
        return self.ca.ca_chain_pem()

    def sign_device_csr(
        self, csr_pem: str, *, device_id: str, store_id: str, validity: timedelta
    ) -> IssuedCertificate:
        if self.down:
            raise CAUnavailable("vault is down")
        self.signed += 1
        return self.ca.sign_device_csr(csr_pem, device_id=device_id, store_id=store_id, validity=validity)

    def revoke(self, serial: str) -> None:
        return None

    def crl_pem(self, revoked: list[RevokedCertificate]) -> str:
        return self.ca.crl_pem(revoked)


class Link:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, int, bool]] = []
        self.up = True

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        if not self.up:
            raise ConnectionError("not connected to the broker")
        self.published.append((topic, payload, qos, retain))

    def answers(self) -> list[RenewalResponse]:
        return [decode(RenewalResponse, payload) for _, payload, _, _ in self.published]


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'cp.db'}")
    await migrate(engine)
    async with engine.begin() as conn:
        await conn.execute(
            stores.insert().values(
                id="S1", name="S1", timezone="UTC", config={}, created_at=NOW, updated_at=NOW
            )
        )
        await conn.execute(
            devices.insert().values(id=DEVICE, store_id="S1", enrolled_at=NOW, cert_serial="abc1")
        )
        await conn.execute(
            certificates.insert().values(
                serial="abc1",
                device_id=DEVICE,
                not_before=NOW,
                not_after=NOW + timedelta(days=3),
                status="valid",
                created_at=NOW,
            )
        )
    yield engine
    await engine.dispose()


@pytest.fixture
def flaky(tmp_path: Path) -> FlakyCA:
    return FlakyCA(BuiltinCA.load_or_create(tmp_path / "ca", trust_domain=TRUST_DOMAIN))


@pytest.fixture
def link() -> Link:
    return Link()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def service(engine, flaky, link, clock) -> RenewalService:
    return RenewalService(
        engine=engine,
        ca=CAGateway(flaky, local=flaky.ca),
        audit=AuditLog(engine, clock=clock),
        link=link,
        cert_validity=timedelta(hours=72),
        min_interval=timedelta(minutes=5),
        ca_retry_after_s=42.0,
        queue_size=2,
        workers=1,
        clock=clock,
    )


def csr(curve: ec.EllipticCurve | None = None) -> str:
    key = ec.generate_private_key(curve or ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone-else")]))
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM).decode()


def renewal(
    request_id: str = "req-00000001", device_id: str = DEVICE, csr_pem: str | None = None
) -> RenewalRequest:
    return RenewalRequest(device_id=device_id, request_id=request_id, csr_pem=csr_pem or csr())


async def audit_rows(engine: AsyncEngine) -> list[tuple[str, str, str | None]]:
    records = await AuditLog(engine).records(action="certificate.renew")
    return [(r["outcome"], r["actor"], r["detail"].get("reason")) for r in reversed(records)]


async def test_a_renewal_is_signed_recorded_audited_and_answered(service, engine, link):
    answer = await service.process(renewal())

    assert answer.status is RenewalStatus.ISSUED
    cert = x509.load_pem_x509_certificate((answer.certificate_pem or "").encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == DEVICE  # not the CSR's
    serial = format(cert.serial_number, "x")
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(certificates).where(certificates.c.serial == serial))).one()
        device = (await conn.execute(sa.select(devices).where(devices.c.id == DEVICE))).one()
    assert (row.issued_by, row.status, row.device_id) == ("renew", "valid", DEVICE)
    assert (device.cert_serial, device.cert_not_after) == (serial, row.not_after)
    assert await audit_rows(engine) == [("success", DEVICE, None)]
    [(topic, _, qos, retain)] = link.published
    assert (topic, qos, retain) == (device_topic(DEVICE, TopicKind.RENEW_RESULT), 1, False)
    assert link.answers() == [answer]


async def test_ca_outage_is_a_transient_refusal_with_a_retry_hint(service, engine, flaky, link):
    flaky.down = True
    refused = await service.process(renewal())
    assert (refused.status, refused.reason, refused.retry_after_s) == (
        RenewalStatus.REFUSED,
        "ca_unavailable",
        42.0,
    )
    assert await audit_rows(engine) == [("failed", DEVICE, "ca_unavailable")]

    flaky.down = False  # the same request, once the CA is back, is decided afresh
    issued = await service.process(renewal())
    assert issued.status is RenewalStatus.ISSUED


async def test_a_resent_request_gets_the_same_answer_and_no_second_certificate(service, flaky, link):
    request = renewal()
    first = await service.process(request)
    link.up = False  # the answer is lost on the way…
    assert (await service.process(request)) == first
    assert service.unsent == 1
    link.up = True  # …and the agent sends the same request again
    assert (await service.process(request)) == first
    assert flaky.signed == 1
    assert service.replayed == 2


async def test_rate_limit_and_request_id_reuse(service, engine, clock):
    await service.process(renewal("req-00000001"))
    clock.now += timedelta(minutes=1)
    too_soon = await service.process(renewal("req-00000002"))
    assert (too_soon.reason, too_soon.retry_after_s) == ("rate_limited", 240.0)
    reused = await service.process(renewal("req-00000001"))  # same id, another CSR
    assert reused.reason == "request_id_conflict"
    clock.now += timedelta(minutes=5)
    assert (await service.process(renewal("req-00000003"))).status is RenewalStatus.ISSUED


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (devices.update().values(state="revoked"), "device_not_active"),
        (devices.update().values(state="decommissioned"), "device_not_active"),
        (certificates.update().values(status="revoked", revoked_at=NOW), "certificate_revoked"),
        (devices.delete().where(devices.c.id == "nobody"), None),
    ],
)
async def test_only_an_active_device_with_a_valid_certificate_renews(service, engine, flaky, change, reason):
    async with engine.begin() as conn:
        await conn.execute(change)
    answer = await service.process(renewal())
    if reason is None:
        assert answer.status is RenewalStatus.ISSUED
        return
    assert (answer.status, answer.reason) == (RenewalStatus.REFUSED, reason)
    assert flaky.signed == 0
    assert await audit_rows(engine) == [("denied", DEVICE, reason)]


async def test_unknown_device_and_bad_csrs_are_refused(service, engine):
    unknown = await service.process(renewal(device_id="dev-ffffffffffffffff"))
    assert unknown.reason == "device_unknown"
    weak = await service.process(renewal("req-00000002", csr_pem=csr(ec.SECP256K1())))
    assert weak.reason == "csr_weak_key"
    garbage = "-----BEGIN CERTIFICATE REQUEST-----\n" + "A" * 80 + "\n-----END CERTIFICATE REQUEST-----\n"
    assert (await service.process(renewal("req-00000003", csr_pem=garbage))).reason == "csr_rejected"
    reasons = [reason for _, _, reason in await audit_rows(engine)]
    assert reasons == ["device_unknown", "csr_weak_key", "csr_rejected"]


async def test_the_queue_is_bounded_and_the_worker_answers_off_the_ingest_path(service, link):
    for index in range(3):
        service.submit(renewal(f"req-0000000{index}"))  # sync, as from the MQTT message loop
    assert (service.received, service.dropped, service.pending) == (3, 1, 2)

    worker = asyncio.create_task(service.run())
    try:
        async with asyncio.timeout(10):
            while len(link.published) < 2:
                await asyncio.sleep(0.01)
    finally:
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker
    statuses = [answer.status for answer in link.answers()]
    assert statuses == [RenewalStatus.ISSUED, RenewalStatus.REFUSED]  # the second one: rate limit
