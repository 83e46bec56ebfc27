"""The async face of a CA backend.

Backends are synchronous (hvac is); every call here runs in a worker thread, bounded by
`timeout_s`, so a slow CA never stalls the event loop and a caller gets `CAUnavailable`
(HTTP 503 + Retry-After) instead of hanging.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import ParamSpec, TypeVar

from control_plane.errors import CAUnavailable, CSRRejected
from control_plane.pki.ca import CertificateAuthority, IssuedCertificate, RevokedCertificate

P = ParamSpec("P")
T = TypeVar("T")


class CAGateway:
    def __init__(self, backend: CertificateAuthority, *, timeout_s: float = 5.0) -> None:
        self.backend = backend
        self._timeout_s = timeout_s

    def ca_chain_pem(self) -> str:
        return self.backend.ca_chain_pem()

    async def sign_device_csr(
        self, csr_pem: str, *, device_id: str, store_id: str, validity: timedelta
    ) -> IssuedCertificate:
        return await self._call(
            self.backend.sign_device_csr, csr_pem, device_id=device_id, store_id=store_id, validity=validity
        )

    async def revoke(self, serial: str) -> None:
        await self._call(self.backend.revoke, serial)

    async def crl_pem(self, revoked: list[RevokedCertificate]) -> str:
        return await self._call(self.backend.crl_pem, revoked)

    async def _call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, *args, **kwargs), self._timeout_s)
        except TimeoutError:
            raise CAUnavailable(f"certificate authority did not answer within {self._timeout_s:g}s") from None
        except (CSRRejected, CAUnavailable):
            raise
        except OSError as exc:
            raise CAUnavailable(f"certificate authority unreachable: {exc}") from exc
