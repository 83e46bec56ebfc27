"""The async face of the CA backends, and the trust bundle they imply.

Backends are synchronous (hvac is); every call runs in the gateway's own small thread pool
(so a hung backend cannot starve the event loop's default executor), bounded by `timeout_s`,
behind a `CircuitBreaker`: a caller gets `CAUnavailable` (HTTP 503 + Retry-After) within the
timeout, and at once while the circuit is open, never a hang.

Two CAs may be involved. `backend` signs device certificates (the built-in CA or Vault PKI);
`local`, the built-in CA, always issues the server certificates of the API and broker and the
control plane's client certificate. The trust bundle handed to agents (`ca_chain_pem`, also
``GET /v1/pki/ca``) and to the broker holds both: the built-in root first (agents pin the
first certificate), then the built-in intermediate, then the backend's chain. The CRL is the
backend's, followed (when the backend is not the built-in CA) by one signed by the built-in CA,
so a broker that checks CRLs (Mosquitto ``crlfile``) has one for every issuer it trusts.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import ParamSpec, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from control_plane.errors import CAUnavailable, CSRRejected
from control_plane.pki.breaker import CircuitBreaker
from control_plane.pki.ca import (
    BuiltinCA,
    CertificateAuthority,
    IssuedCertificate,
    RevokedCertificate,
    certificate_pem,
)

P = ParamSpec("P")
T = TypeVar("T")

# Threads for backend calls: enough for a burst of enrollments, few enough that calls stuck on a
# hung backend (each bounded by the backend's own HTTP timeout) stay cheap.
MAX_BACKEND_THREADS = 8


def trust_bundle_pem(local: BuiltinCA, backend_chain_pem: str = "") -> str:
    """Root first, then the built-in chain, then the backend's chain; each certificate once."""
    certs = [local.root_certificate, *x509.load_pem_x509_certificates(local.ca_chain_pem().encode())]
    if backend_chain_pem.strip():
        certs += x509.load_pem_x509_certificates(backend_chain_pem.encode())
    seen: set[bytes] = set()
    bundle = []
    for cert in certs:
        der = cert.public_bytes(serialization.Encoding.DER)
        if der not in seen:
            seen.add(der)
            bundle.append(certificate_pem(cert))
    return "".join(bundle)


class CAGateway:
    def __init__(
        self,
        backend: CertificateAuthority,
        *,
        local: BuiltinCA | None = None,
        timeout_s: float = 5.0,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        """`local` defaults to `backend` when that is the built-in CA (it is required otherwise)."""
        if local is None:
            if not isinstance(backend, BuiltinCA):
                raise TypeError("a CAGateway over an external backend needs the built-in CA as `local`")
            local = backend
        self.backend = backend
        self.local = local
        self.breaker = breaker or CircuitBreaker(failure_threshold=3, reset_after_s=30.0)
        self._timeout_s = timeout_s
        # Read once: Vault's chain is cached by the backend (see `control_plane.pki.factory`).
        self._trust_bundle = trust_bundle_pem(local, "" if backend is local else backend.ca_chain_pem())
        self._executor: ThreadPoolExecutor | None = None

    def ca_chain_pem(self) -> str:
        """The trust bundle (see the module docstring)."""
        return self._trust_bundle

    async def sign_device_csr(
        self, csr_pem: str, *, device_id: str, store_id: str, validity: timedelta
    ) -> IssuedCertificate:
        return await self._call(
            self.backend.sign_device_csr, csr_pem, device_id=device_id, store_id=store_id, validity=validity
        )

    async def revoke(self, serial: str) -> None:
        await self._call(self.backend.revoke, serial)

    async def crl_pem(self, revoked: list[RevokedCertificate]) -> str:
        return await self._call(self._crls, revoked)

    def _crls(self, revoked: list[RevokedCertificate]) -> str:
        crl = self.backend.crl_pem(revoked)
        if self.backend is not self.local:
            crl = crl.rstrip("\n") + "\n" + self.local.crl_pem(revoked)
        return crl

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def _call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        self.breaker.before_call()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(MAX_BACKEND_THREADS, thread_name_prefix="ca-backend")
        context = contextvars.copy_context()
        work = functools.partial(context.run, fn, *args, **kwargs)
        try:
            async with asyncio.timeout(self._timeout_s):  # not wait_for: see control_plane/aio.py
                result = await asyncio.get_running_loop().run_in_executor(self._executor, work)
        except TimeoutError:
            self.breaker.record_failure()
            raise CAUnavailable(f"certificate authority did not answer within {self._timeout_s:g}s") from None
        except CSRRejected:
            self.breaker.record_success()  # the backend answered: it is up
            raise
        except CAUnavailable:
            self.breaker.record_failure()
            raise
        except OSError as exc:
            self.breaker.record_failure()
            raise CAUnavailable(f"certificate authority unreachable: {exc}") from exc
        except BaseException:
            self.breaker.abandon()  # cancelled, or a bug: says nothing about the backend
            raise
        self.breaker.record_success()
        return result
