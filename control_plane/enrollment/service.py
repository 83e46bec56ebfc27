"""Enrollment rules.

A token is consumed with one conditional UPDATE (not expired, not revoked, uses left), so two
devices racing for a single-use token cannot both win. The CSR is checked before the token
is consumed: a malformed CSR does not burn a token. The certificate's identity is decided
here, never taken from the CSR.
"""

from __future__ import annotations

import secrets
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from control_plane.audit import AuditEvent, AuditLog, Outcome
from control_plane.auth.api_keys import hash_secret, new_secret
from control_plane.clock import Clock, utc_now
from control_plane.db.schema import certificates, devices, enrollment_tokens, stores
from control_plane.desired.publisher import DesiredStatePublisher
from control_plane.enrollment.models import TokenCreate, TokenCreated, TokenView
from control_plane.errors import CSRRejected, EnrollmentRefused, NotFound
from control_plane.pki.ca import load_csr
from control_plane.pki.gateway import CAGateway
from control_plane.pki.signing_keys import SigningKeyring
from protocol.messages import BrokerEndpoint, EnrollmentRequest, EnrollmentResponse

TOKEN_PREFIX = "sfe_"  # noqa: S105 - a prefix that makes leaked tokens greppable, not a secret


class EnrollmentService:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        ca: CAGateway,
        ca_fingerprint: str,
        keyring: SigningKeyring,
        publisher: DesiredStatePublisher,
        audit: AuditLog,
        broker: BrokerEndpoint,
        cert_validity: timedelta,
        default_token_ttl: timedelta,
        health_interval_s: float,
        clock: Clock = utc_now,
    ) -> None:
        self._engine = engine
        self._ca = ca
        self._ca_fingerprint = ca_fingerprint
        self._keyring = keyring
        self._publisher = publisher
        self._audit = audit
        self._broker = broker
        self._cert_validity = cert_validity
        self._default_token_ttl = default_token_ttl
        self._health_interval_s = health_interval_s
        self._clock = clock

    async def create_token(self, store_id: str, spec: TokenCreate, *, actor: str) -> TokenCreated:
        secret = new_secret(TOKEN_PREFIX)
        token_id = secrets.token_hex(8)
        now = self._clock()
        ttl = timedelta(hours=spec.ttl_hours) if spec.ttl_hours else self._default_token_ttl
        async with self._engine.begin() as conn:
            if await conn.scalar(sa.select(stores.c.id).where(stores.c.id == store_id)) is None:
                raise NotFound(f"store {store_id!r} does not exist", code="store_not_found")
            await conn.execute(
                enrollment_tokens.insert().values(
                    id=token_id,
                    token_hash=hash_secret(secret),
                    store_id=store_id,
                    role=spec.role,
                    expires_at=now + ttl,
                    max_uses=spec.max_uses,
                    uses=0,
                    created_at=now,
                )
            )
            await self._audit.record(
                AuditEvent(
                    action="token.create",
                    outcome=Outcome.SUCCESS,
                    actor=actor,
                    target=store_id,
                    detail={"token_id": token_id, "role": spec.role, "max_uses": spec.max_uses},
                ),
                connection=conn,
            )
        return TokenCreated(
            id=token_id,
            store_id=store_id,
            role=spec.role,
            expires_at=now + ttl,
            max_uses=spec.max_uses,
            uses=0,
            revoked=False,
            token=secret,
            ca_fingerprint=self._ca_fingerprint,
        )

    async def list_tokens(self, store_id: str) -> list[TokenView]:
        async with self._engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(enrollment_tokens)
                    .where(enrollment_tokens.c.store_id == store_id)
                    .order_by(enrollment_tokens.c.created_at)
                )
            ).all()
        return [
            TokenView(
                id=r.id,
                store_id=r.store_id,
                role=r.role,
                expires_at=r.expires_at,
                max_uses=r.max_uses,
                uses=r.uses,
                revoked=r.revoked_at is not None,
            )
            for r in rows
        ]

    async def enroll(self, request: EnrollmentRequest, *, source: str) -> EnrollmentResponse:
        try:
            load_csr(request.csr_pem)
        except CSRRejected as exc:
            await self._refuse(exc.code, source=source, detail={"message": exc.message})
            raise
        digest = hash_secret(request.token)
        now = self._clock()
        device_id = "dev-" + secrets.token_hex(8)
        # One transaction: if signing fails (a remote CA is down) the token is not consumed.
        async with self._engine.begin() as conn:
            consumed = (
                await conn.execute(
                    sa.update(enrollment_tokens)
                    .where(
                        enrollment_tokens.c.token_hash == digest,
                        enrollment_tokens.c.revoked_at.is_(None),
                        enrollment_tokens.c.expires_at > now,
                        enrollment_tokens.c.uses < enrollment_tokens.c.max_uses,
                    )
                    .values(uses=enrollment_tokens.c.uses + 1)
                    .returning(enrollment_tokens.c.id, enrollment_tokens.c.store_id, enrollment_tokens.c.role)
                )
            ).first()
            if consumed is not None:
                issued = await self._ca.sign_device_csr(
                    request.csr_pem,
                    device_id=device_id,
                    store_id=consumed.store_id,
                    validity=self._cert_validity,
                )
                info = request.device
                await conn.execute(
                    devices.insert().values(
                        id=device_id,
                        store_id=consumed.store_id,
                        role=consumed.role or info.role,
                        model=info.model,
                        serial=info.serial,
                        os=info.os,
                        hostname=info.hostname,
                        agent_version=info.agent_version,
                        enrolled_at=now,
                        cert_serial=issued.serial,
                        cert_not_after=issued.not_after,
                    )
                )
                await conn.execute(
                    certificates.insert().values(
                        serial=issued.serial,
                        device_id=device_id,
                        not_before=issued.not_before,
                        not_after=issued.not_after,
                        status="valid",
                        created_at=now,
                    )
                )
                await self._audit.record(
                    AuditEvent(
                        action="device.enroll",
                        outcome=Outcome.SUCCESS,
                        actor=f"token:{consumed.id}",
                        target=device_id,
                        source=source,
                        detail={
                            "store_id": consumed.store_id,
                            "serial": issued.serial,
                            "not_after": issued.not_after.isoformat(),
                        },
                    ),
                    connection=conn,
                )
        if consumed is None:
            reason = await self._why_refused(digest)
            await self._refuse(reason, source=source)
            raise EnrollmentRefused(_REFUSAL_MESSAGES[reason], code=reason)
        await self._publisher.refresh_devices([device_id])
        return EnrollmentResponse(
            device_id=device_id,
            store_id=consumed.store_id,
            certificate_pem=issued.certificate_pem,
            ca_chain_pem=self._ca.ca_chain_pem(),
            broker=self._broker,
            signing_keys=self._keyring.public_keys(),
            health_interval_s=self._health_interval_s,
        )

    async def _why_refused(self, digest: str) -> str:
        async with self._engine.connect() as conn:
            token = (
                await conn.execute(
                    sa.select(enrollment_tokens).where(enrollment_tokens.c.token_hash == digest)
                )
            ).first()
        if token is None:
            return "token_unknown"
        if token.revoked_at is not None:
            return "token_revoked"
        if token.expires_at <= self._clock():
            return "token_expired"
        return "token_used"

    async def _refuse(self, reason: str, *, source: str, detail: dict[str, str] | None = None) -> None:
        await self._audit.record(
            AuditEvent(
                action="device.enroll",
                outcome=Outcome.DENIED,
                actor="anonymous",
                source=source,
                detail={"reason": reason, **(detail or {})},
            )
        )


_REFUSAL_MESSAGES = {
    "token_unknown": "enrollment token is not known",
    "token_revoked": "enrollment token was revoked",
    "token_expired": "enrollment token has expired",
    "token_used": "enrollment token has no uses left",
}
