"""Enrollment rules.

A token is consumed with one conditional UPDATE (not expired, not revoked, uses left), so two
devices racing for a single-use token cannot both win. The CSR is checked before the token
is consumed: a malformed CSR does not burn a token; and the whole enrollment is one
transaction, so a CA outage does not burn it either. The certificate's identity is decided
here, never taken from the CSR.

A token bound to a device (`create_reenrollment_token`) re-issues that device's identity:
same device id, a new certificate, the old ones revoked ("superseded"). It is how a device
whose certificate expired while offline, or whose key was lost, comes back: an explicit,
audited operator action.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from control_plane.audit import AuditEvent, AuditLog, Outcome
from control_plane.auth.api_keys import hash_secret, new_secret
from control_plane.clock import Clock, utc_now
from control_plane.db.schema import certificates, devices, enrollment_tokens, stores
from control_plane.desired.publisher import DesiredStatePublisher
from control_plane.devices.lifecycle import DECOMMISSIONED
from control_plane.devices.revocation import RevocationRegistry, revoke_certificates
from control_plane.enrollment.models import TokenCreate, TokenCreated, TokenView
from control_plane.errors import Conflict, CSRRejected, EnrollmentRefused, NotFound, StorefleetError
from control_plane.pki.ca import IssuedCertificate, load_csr
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
        registry: RevocationRegistry,
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
        self._registry = registry
        self._audit = audit
        self._broker = broker
        self._cert_validity = cert_validity
        self._default_token_ttl = default_token_ttl
        self._health_interval_s = health_interval_s
        self._clock = clock
        # Told the store id of each new enrollment (the provisioning saga wakes up on it).
        self.on_enrolled: Callable[[str], None] | None = None
        # Called with the device id after a re-enrollment (its health sequence may restart).
        self.on_reenrolled: Callable[[str], None] | None = None

    # --- tokens ------------------------------------------------------------------------

    async def create_token(self, store_id: str, spec: TokenCreate, *, actor: str) -> TokenCreated:
        async with self._engine.begin() as conn:
            status = await conn.scalar(sa.select(stores.c.status).where(stores.c.id == store_id))
            if status is None:
                raise NotFound(f"store {store_id!r} does not exist", code="store_not_found")
            if status == DECOMMISSIONED:
                raise Conflict(f"store {store_id!r} is decommissioned", code="store_decommissioned")
            return await self._insert_token(conn, store_id, spec, actor=actor, device_id=None)

    async def issue_token(
        self, conn: AsyncConnection, store_id: str, spec: TokenCreate, *, actor: str
    ) -> TokenCreated:
        """`create_token` inside the caller's transaction (a store and its tokens in one commit)."""
        return await self._insert_token(conn, store_id, spec, actor=actor, device_id=None)

    async def create_reenrollment_token(
        self, device_id: str, spec: TokenCreate, *, actor: str
    ) -> TokenCreated:
        """A single-use token that re-issues this device's identity (same device id)."""
        async with self._engine.begin() as conn:
            device = (
                await conn.execute(
                    sa.select(devices.c.store_id, devices.c.state, devices.c.role).where(
                        devices.c.id == device_id
                    )
                )
            ).first()
            if device is None:
                raise NotFound(f"device {device_id!r} does not exist", code="device_not_found")
            if device.state == DECOMMISSIONED:
                raise Conflict(f"device {device_id!r} is decommissioned", code="device_decommissioned")
            single = TokenCreate(role=device.role, ttl_hours=spec.ttl_hours, max_uses=1)
            return await self._insert_token(conn, device.store_id, single, actor=actor, device_id=device_id)

    async def _insert_token(
        self, conn: AsyncConnection, store_id: str, spec: TokenCreate, *, actor: str, device_id: str | None
    ) -> TokenCreated:
        secret = new_secret(TOKEN_PREFIX)
        token_id = secrets.token_hex(8)
        now = self._clock()
        expires_at = now + (timedelta(hours=spec.ttl_hours) if spec.ttl_hours else self._default_token_ttl)
        # Values as parameters, not .values(): keying a fresh .values() statement cost ~0.3 ms.
        await conn.execute(
            enrollment_tokens.insert(),
            {
                "id": token_id,
                "token_hash": hash_secret(secret),
                "store_id": store_id,
                "role": spec.role,
                "expires_at": expires_at,
                "max_uses": spec.max_uses,
                "uses": 0,
                "created_at": now,
                "device_id": device_id,
            },
        )
        await self._audit.record(
            AuditEvent(
                action="token.create",
                outcome=Outcome.SUCCESS,
                actor=actor,
                target=store_id,
                detail={
                    "token_id": token_id,
                    "role": spec.role,
                    "max_uses": spec.max_uses,
                    "device_id": device_id,
                },
            ),
            connection=conn,
        )
        return TokenCreated(
            id=token_id,
            store_id=store_id,
            role=spec.role,
            device_id=device_id,
            expires_at=expires_at,
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
                    .order_by(enrollment_tokens.c.created_at, enrollment_tokens.c.id)
                )
            ).all()
        return [
            TokenView(
                id=r.id,
                store_id=r.store_id,
                role=r.role,
                device_id=r.device_id,
                expires_at=r.expires_at,
                max_uses=r.max_uses,
                uses=r.uses,
                revoked=r.revoked_at is not None,
            )
            for r in rows
        ]

    async def revoke_token(self, store_id: str, token_id: str, *, actor: str) -> None:
        async with self._engine.begin() as conn:
            result = await conn.execute(
                sa.update(enrollment_tokens)
                .where(enrollment_tokens.c.id == token_id, enrollment_tokens.c.store_id == store_id)
                .values(revoked_at=sa.func.coalesce(enrollment_tokens.c.revoked_at, self._clock()))
            )
            if result.rowcount == 0:
                raise NotFound(
                    f"token {token_id!r} does not exist in store {store_id!r}", code="token_not_found"
                )
            await self._audit.record(
                AuditEvent(
                    action="token.revoke",
                    outcome=Outcome.SUCCESS,
                    actor=actor,
                    target=store_id,
                    detail={"token_id": token_id},
                ),
                connection=conn,
            )

    # --- enrollment ----------------------------------------------------------------------

    async def enroll(self, request: EnrollmentRequest, *, source: str) -> EnrollmentResponse:
        try:
            load_csr(request.csr_pem)
        except CSRRejected as exc:
            await self._refuse(exc.code, source=source, detail={"message": exc.message})
            raise
        digest = hash_secret(request.token)
        # Read first, sign, then consume: the certificate is signed outside any transaction, so
        # the database's writer lock is held only for four short statements. A token that is
        # not usable is refused before anything is signed; one that a concurrent request used up
        # meanwhile is refused by the conditional UPDATE (the signed certificate is discarded).
        token = await self._usable_token(digest)
        if token is None:
            reason = await self._why_refused(digest)
            await self._refuse(reason, source=source)
            raise EnrollmentRefused(_REFUSAL_MESSAGES[reason], code=reason)
        device_id = token.device_id or "dev-" + secrets.token_hex(8)
        if token.device_id is not None and await self._is_decommissioned(token.device_id):
            await self._refuse("device_decommissioned", source=source, detail={"device_id": token.device_id})
            raise Conflict(f"device {token.device_id!r} is decommissioned", code="device_decommissioned")
        try:
            issued = await self._ca.sign_device_csr(
                request.csr_pem, device_id=device_id, store_id=token.store_id, validity=self._cert_validity
            )
        except StorefleetError as exc:  # CA down (503) or the CA refused the CSR (422): loud, too
            await self._refuse(exc.code, source=source, detail={"message": exc.message})
            raise
        now = self._clock()
        superseded: list[str] = []
        async with self._engine.begin() as conn:
            consumed = await conn.execute(
                sa.update(enrollment_tokens)
                .where(
                    enrollment_tokens.c.id == token.id,
                    enrollment_tokens.c.revoked_at.is_(None),
                    enrollment_tokens.c.expires_at > now,
                    enrollment_tokens.c.uses < enrollment_tokens.c.max_uses,
                )
                .values(uses=enrollment_tokens.c.uses + 1)
            )
            if consumed.rowcount == 1:
                if token.device_id is None:
                    await self._insert_device(conn, request, device_id, token, issued)
                else:
                    superseded = await self._reissue(conn, request, device_id, issued)
                await conn.execute(
                    certificates.insert().values(
                        serial=issued.serial,
                        device_id=device_id,
                        not_before=issued.not_before,
                        not_after=issued.not_after,
                        status="valid",
                        created_at=now,
                        issued_by="enroll" if token.device_id is None else "reenroll",
                    )
                )
                await self._audit.record(
                    AuditEvent(
                        action="device.enroll" if token.device_id is None else "device.reenroll",
                        outcome=Outcome.SUCCESS,
                        actor=f"token:{token.id}",
                        target=device_id,
                        source=source,
                        detail={
                            "store_id": token.store_id,
                            "serial": issued.serial,
                            "not_after": issued.not_after.isoformat(),
                            "superseded": superseded,
                        },
                    ),
                    connection=conn,
                )
        if consumed.rowcount != 1:
            reason = await self._why_refused(digest)
            await self._refuse(reason, source=source)
            raise EnrollmentRefused(_REFUSAL_MESSAGES[reason], code=reason)
        if superseded:
            await self._registry.publish_after_commit(superseded)
        self._publisher.request_refresh([device_id])
        if self.on_enrolled is not None:
            self.on_enrolled(token.store_id)
        if token.device_id is not None and self.on_reenrolled is not None:
            self.on_reenrolled(device_id)
        return EnrollmentResponse(
            device_id=device_id,
            store_id=token.store_id,
            certificate_pem=issued.certificate_pem,
            ca_chain_pem=self._ca.ca_chain_pem(),
            broker=self._broker,
            signing_keys=self._keyring.public_keys(),
            health_interval_s=self._health_interval_s,
        )

    async def _is_decommissioned(self, device_id: str) -> bool:
        async with self._engine.connect() as conn:
            state = await conn.scalar(sa.select(devices.c.state).where(devices.c.id == device_id))
        return state is None or state == DECOMMISSIONED

    async def _usable_token(self, digest: str) -> Any:
        async with self._engine.connect() as conn:
            return (
                await conn.execute(
                    sa.select(
                        enrollment_tokens.c.id,
                        enrollment_tokens.c.store_id,
                        enrollment_tokens.c.role,
                        enrollment_tokens.c.device_id,
                    ).where(
                        enrollment_tokens.c.token_hash == digest,
                        enrollment_tokens.c.revoked_at.is_(None),
                        enrollment_tokens.c.expires_at > self._clock(),
                        enrollment_tokens.c.uses < enrollment_tokens.c.max_uses,
                    )
                )
            ).first()

    async def _insert_device(
        self,
        conn: AsyncConnection,
        request: EnrollmentRequest,
        device_id: str,
        token: Any,
        issued: IssuedCertificate,
    ) -> None:
        info = request.device
        await conn.execute(
            devices.insert().values(
                id=device_id,
                store_id=token.store_id,
                role=token.role or info.role,
                model=info.model,
                serial=info.serial,
                os=info.os,
                hostname=info.hostname,
                agent_version=info.agent_version,
                enrolled_at=self._clock(),
                cert_serial=issued.serial,
                cert_not_after=issued.not_after,
            )
        )

    async def _reissue(
        self, conn: AsyncConnection, request: EnrollmentRequest, device_id: str, issued: IssuedCertificate
    ) -> list[str]:
        state = await conn.scalar(sa.select(devices.c.state).where(devices.c.id == device_id))
        if state is None or state == DECOMMISSIONED:
            # Checked when the token was made; a decommission since then wins.
            raise Conflict(f"device {device_id!r} is decommissioned", code="device_decommissioned")
        superseded = await revoke_certificates(conn, device_id, reason="superseded", at=self._clock())
        info = request.device
        await conn.execute(
            sa.update(devices)
            .where(devices.c.id == device_id)
            .values(
                state="active",
                cert_serial=issued.serial,
                cert_not_after=issued.not_after,
                agent_version=info.agent_version,
                hostname=info.hostname,
                os=info.os,
                # A re-enrolled device may have lost its state (and its health sequence):
                # its next report starts the sequence again.
                health_seq=None,
            )
        )
        return superseded

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
