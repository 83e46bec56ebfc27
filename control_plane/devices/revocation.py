"""Certificate revocation: the database is the record, the CRL and the broker follow it.

`revoke_certificates` marks a device's valid certificates revoked inside the caller's
transaction. `RevocationRegistry.publish` then tells the CA backend (Vault keeps its own
list), signs a fresh CRL (`GET /v1/pki/crl`, and `<data>/pki/crl.pem` which Mosquitto's
`crlfile` points at), and hands the revoked serials to the embedded broker, which refuses
them from the next CONNECT on. Published at start-up too, so the file is never missing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Protocol

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from control_plane.db.schema import certificates
from control_plane.errors import CAUnavailable
from control_plane.pki.ca import RevokedCertificate
from control_plane.pki.files import write_public
from control_plane.pki.gateway import CAGateway

logger = logging.getLogger(__name__)


class RevocationEnforcer(Protocol):
    """What a broker we control can do about revocation (the embedded one can; Mosquitto cannot)."""

    def set_revoked_serials(self, serials: set[str]) -> None: ...

    async def disconnect(self, client_id: str) -> bool: ...


async def revoke_certificates(
    conn: AsyncConnection, device_id: str, *, reason: str, at: datetime
) -> list[str]:
    """Mark every valid certificate of the device revoked; return their serials."""
    rows = await conn.execute(
        sa.update(certificates)
        .where(certificates.c.device_id == device_id, certificates.c.status == "valid")
        .values(status="revoked", revoked_at=at, revocation_reason=reason)
        .returning(certificates.c.serial)
    )
    return [row.serial for row in rows]


class RevocationRegistry:
    def __init__(
        self, *, engine: AsyncEngine, gateway: CAGateway, crl_path: Path, retry_interval_s: float = 30.0
    ) -> None:
        self._engine = engine
        self._gateway = gateway
        self.crl_path = crl_path
        self.enforcer: RevocationEnforcer | None = None
        self._retry_interval_s = retry_interval_s
        self._crl_pem: str | None = None
        # Serialises publications: two concurrent revocations must not write CRLs out of order.
        self._lock = asyncio.Lock()
        self._untold: set[str] = set()  # revoked here, not yet acknowledged by the CA backend
        self.stale = False  # the CRL on disk misses a revocation (the CA was unavailable)

    @property
    def crl_pem(self) -> str | None:
        if self._crl_pem is None and self.crl_path.exists():
            self._crl_pem = self.crl_path.read_text()
        return self._crl_pem

    async def revoked(self) -> list[RevokedCertificate]:
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                sa.select(certificates.c.serial, certificates.c.revoked_at).where(
                    certificates.c.status == "revoked"
                )
            )
            return [RevokedCertificate(serial=r.serial, revoked_at=r.revoked_at) for r in rows]

    async def publish(self, newly_revoked: Sequence[str] = ()) -> str:
        """Push revocations to the CA backend, re-sign and write the CRL, update the broker.

        Raises `CAUnavailable` when the CA cannot be reached; the registry is then `stale` and
        `run()` tries again.
        """
        async with self._lock:
            self._untold.update(newly_revoked)
            revoked = await self.revoked()
            # The broker first: it needs no CA, so a CA outage cannot delay the lock-out.
            if self.enforcer is not None:
                self.enforcer.set_revoked_serials({entry.serial for entry in revoked})
            try:
                for serial in sorted(self._untold):
                    await self._gateway.revoke(serial)
                    self._untold.discard(serial)
                crl = await self._gateway.crl_pem(revoked)
            except CAUnavailable:
                self.stale = True
                raise
            write_public(self.crl_path, crl.encode())
            self._crl_pem, self.stale = crl, False
        if newly_revoked:
            logger.warning("revoked %d certificate(s); CRL now lists %d", len(newly_revoked), len(revoked))
        return crl

    async def publish_after_commit(self, newly_revoked: Sequence[str] = ()) -> None:
        """`publish` for callers whose revocation is already committed: never fails them."""
        try:
            await self.publish(newly_revoked)
        except CAUnavailable as exc:
            logger.warning("CRL not re-signed (%s); the broker already refuses the serials, retrying", exc)

    async def run(self) -> None:
        """Re-publish while the CRL is stale (a revocation happened while the CA was down)."""
        while True:
            await asyncio.sleep(self._retry_interval_s)
            if self.stale:
                await self.publish_after_commit()
