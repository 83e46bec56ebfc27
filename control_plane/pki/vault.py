"""Vault (or OpenBao) PKI as the CA backend for device certificates, through hvac.

    VaultPKI.sign_device_csr   our CSR policy (`load_csr`) first, then ``<mount>/sign/<role>``
                               with CN = device id, URI SAN = the device's SPIFFE URI, ttl
    VaultPKI.revoke            ``<mount>/revoke`` (an unknown serial is logged, not fatal)
    VaultPKI.ca_chain_pem      ``<mount>/ca_chain`` (or ``<mount>/ca/pem``), read once and cached
    VaultPKI.crl_pem           ``<mount>/crl/pem``: Vault keeps the revocation list itself

Authentication is a token, or AppRole (role_id + secret_id). The token's lease is tracked with
an injected monotonic clock: before a call, a token past `RENEW_AT` of its TTL is renewed
(``auth/token/renew-self``); when renewal is impossible (not renewable, refused, or the token
is about to expire) AppRole logs in again. A 401/403 (a token lost in a Vault restart, or
revoked) triggers one fresh AppRole login and one retry. A plain token cannot be replaced:
give a long-lived or periodic one, or use AppRole.

hvac and requests errors are translated here, once:

    requests ConnectionError/Timeout, 5xx, sealed, 429  → CAUnavailable (HTTP 503, breaker)
    400 on sign (the role refuses the request)         → CSRRejected (code csr_refused_by_ca)
    401/403/404 (credentials, policy, mount or role)    → CAUnavailable, logged as an error

Calls are synchronous and may come from several threads of `CAGateway`'s pool: the hvac client
is shared (requests' connection pool is thread-safe) and the token state is under a lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from control_plane.errors import CAUnavailable, CSRRejected, StorefleetError
from control_plane.pki.ca import IssuedCertificate, RevokedCertificate, certificate_pem, load_csr, serial_hex
from control_plane.pki.identity import IdentityKind, device_uri, identity_of

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Renew the token once this fraction of its TTL has passed.
RENEW_AT = 2 / 3
# A token with less than this left is treated as expired (the call itself needs time).
EXPIRY_MARGIN_S = 5.0


@dataclass(frozen=True, slots=True)
class AppRoleCredentials:
    role_id: str
    secret_id: str
    mount: str = "approle"


@dataclass(frozen=True, slots=True)
class _Lease:
    obtained_at: float
    ttl_s: float  # 0: the token does not expire
    renewable: bool
    accessor: str  # names the token without being it: safe to log

    def due_for_renewal(self, now: float) -> bool:
        return self.ttl_s > 0 and now >= self.obtained_at + self.ttl_s * RENEW_AT

    def expiring(self, now: float) -> bool:
        return self.ttl_s > 0 and now >= self.obtained_at + self.ttl_s - min(EXPIRY_MARGIN_S, self.ttl_s / 3)


class VaultPKI:
    """`CertificateAuthority` on a Vault/OpenBao PKI mount (see the module docstring)."""

    def __init__(
        self,
        *,
        url: str,
        trust_domain: str,
        token: str | None = None,
        approle: AppRoleCredentials | None = None,
        mount: str = "pki",
        role: str = "storefleet-device",
        verify: str | bool = True,
        timeout_s: float = 5.0,
        ca_chain_pem: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if (token is None) == (approle is None):
            raise ValueError("VaultPKI needs exactly one of token or approle")
        self.url = url
        self.trust_domain = trust_domain
        self.mount = mount
        self.role = role
        self._token = token
        self._approle = approle
        self._clock = clock
        self._client = hvac.Client(url=url, verify=verify, timeout=timeout_s)
        self._lease: _Lease | None = None
        self._lock = threading.Lock()
        self._chain: str | None = ca_chain_pem

    @property
    def token_accessor(self) -> str | None:
        """The current token's accessor (None before the first call)."""
        lease = self._lease
        return lease.accessor if lease is not None else None

    @property
    def auth_method(self) -> str:
        return "approle" if self._approle is not None else "token"

    # --- CertificateAuthority ---------------------------------------------------------------

    def ca_chain_pem(self) -> str:
        """The mount's CA chain, read on first use and cached (the issuer changes rarely)."""
        if self._chain is None:
            chain = self._unauthenticated("read the CA chain", self._read_chain)
            if "BEGIN CERTIFICATE" not in chain:
                raise CAUnavailable(f"Vault PKI mount {self.mount!r} has no CA certificate")
            self._chain = chain
        return self._chain

    def sign_device_csr(
        self, csr_pem: str, *, device_id: str, store_id: str, validity: timedelta
    ) -> IssuedCertificate:
        csr = load_csr(csr_pem)  # our policy applies to every backend
        uri = device_uri(self.trust_domain, store_id, device_id)
        response = self._authenticated(
            "sign a device certificate",
            lambda: self._client.secrets.pki.sign_certificate(
                name=self.role,
                csr=csr_pem,
                common_name=device_id,
                extra_params={
                    "uri_sans": uri,
                    "ttl": f"{max(1, int(validity.total_seconds()))}s",
                    "exclude_cn_from_sans": True,
                    "format": "pem",
                },
                mount_point=self.mount,
            ),
            refusal=True,
        )
        data = response.get("data") or {}
        try:
            cert = x509.load_pem_x509_certificate(str(data["certificate"]).encode())
        except (KeyError, ValueError) as exc:
            raise CAUnavailable("Vault returned no usable certificate") from exc
        self._check_issued(cert, csr, device_id=device_id, store_id=store_id)
        return IssuedCertificate(
            certificate_pem=certificate_pem(cert),
            serial=serial_hex(cert),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            chain_pem=_intermediates(data.get("ca_chain") or [data.get("issuing_ca", "")]),
        )

    def revoke(self, serial: str) -> None:
        number = int(serial, 16)
        vault_serial = number.to_bytes(max(1, (number.bit_length() + 7) // 8), "big").hex(":")
        try:
            self._authenticated(
                "revoke a certificate",
                lambda: self._client.secrets.pki.revoke_certificate(vault_serial, mount_point=self.mount),
            )
        except _NotKnownToVault:
            # Issued by another CA (e.g. before the switch to Vault) or lost by a dev server.
            logger.warning("Vault PKI does not know certificate %s: nothing to revoke there", serial)

    def crl_pem(self, revoked: list[RevokedCertificate]) -> str:
        """Vault's own CRL (it keeps the revocations); `revoked` is not needed."""
        crl = self._unauthenticated(
            "read the CRL", lambda: str(self._client.secrets.pki.read_crl(mount_point=self.mount))
        )
        if "BEGIN X509 CRL" not in crl:
            raise CAUnavailable(f"Vault PKI mount {self.mount!r} returned no CRL")
        return crl

    # --- authentication ---------------------------------------------------------------------

    def ensure_token(self) -> None:
        """Log in, renew or re-login as the lease requires (also called before every call)."""
        with self._lock:
            now = self._clock()
            lease = self._lease
            if lease is None:
                self._login()
            elif lease.expiring(now):
                self._relogin("the token is about to expire")
            elif lease.due_for_renewal(now):
                self._renew_or_relogin()

    def _login(self) -> None:
        if self._approle is not None:
            response = self._client.auth.approle.login(
                role_id=self._approle.role_id,
                secret_id=self._approle.secret_id,
                mount_point=self._approle.mount,
            )
            auth = response["auth"]
            self._lease = _Lease(
                self._clock(), float(auth["lease_duration"]), bool(auth["renewable"]), str(auth["accessor"])
            )
            logger.info(
                "logged in to Vault with AppRole (token accessor %s, TTL %ss)",
                auth["accessor"],
                auth["lease_duration"],
            )
        else:
            self._client.token = self._token
            data = self._client.auth.token.lookup_self()["data"]
            self._lease = _Lease(
                self._clock(), float(data.get("ttl") or 0), bool(data.get("renewable")), str(data["accessor"])
            )
            if self._lease.ttl_s and not self._lease.renewable:
                logger.warning(
                    "the Vault token expires in %ss and cannot be renewed: use AppRole", data.get("ttl")
                )

    def _relogin(self, why: str) -> None:
        if self._approle is None:
            raise CAUnavailable(f"Vault token unusable ({why}) and a plain token cannot log in again")
        logger.info("Vault: logging in again (%s)", why)
        self._lease = None
        self._login()

    def _renew_or_relogin(self) -> None:
        assert self._lease is not None
        if not self._lease.renewable:
            if self._approle is not None:
                self._relogin("the token is not renewable")
            return
        try:
            auth = self._client.auth.token.renew_self()["auth"]
        except hvac.exceptions.VaultError as exc:
            if self._approle is None:
                logger.error("Vault: cannot renew the token: %s", _vault_message(exc))  # noqa: TRY400
                return
            self._relogin(f"renewal refused: {exc}")
            return
        # Near its max TTL Vault renews for less: `expiring` then turns into a fresh login.
        self._lease = _Lease(
            self._clock(), float(auth["lease_duration"]), bool(auth["renewable"]), str(auth["accessor"])
        )
        logger.debug("Vault token renewed (TTL %ss)", auth["lease_duration"])

    def _authenticated(self, what: str, call: Callable[[], T], *, refusal: bool = False) -> T:
        for attempt in (1, 2):
            self._authenticate()
            try:
                return call()
            except (hvac.exceptions.Unauthorized, hvac.exceptions.Forbidden) as exc:
                if attempt == 1 and self._approle is not None:
                    with self._lock:
                        self._lease = None  # the token was lost or revoked: a fresh login, one retry
                    continue
                logger.error(  # noqa: TRY400 - the message is enough, no traceback
                    "Vault refused to %s (credentials or policy): %s", what, _vault_message(exc)
                )
                raise CAUnavailable(f"Vault refused to {what}: check the credentials and policy") from exc
            except Exception as exc:
                translated = _translate(exc, what, refusal=refusal)
                if translated is None:
                    raise
                raise translated from exc
        raise AssertionError("unreachable")

    def _authenticate(self) -> None:
        try:
            self.ensure_token()
        except CAUnavailable:
            raise
        except _UNAVAILABLE as exc:
            raise CAUnavailable(f"Vault unavailable (log in): {type(exc).__name__}") from exc
        except hvac.exceptions.VaultError as exc:
            logger.error(  # noqa: TRY400 - the message is enough, no traceback
                "Vault login failed (%s auth): %s", self.auth_method, _vault_message(exc)
            )
            raise CAUnavailable(f"Vault login failed ({self.auth_method} auth)") from exc
        except requests.exceptions.RequestException as exc:
            raise CAUnavailable(f"Vault unreachable (log in): {type(exc).__name__}") from exc

    def _unauthenticated(self, what: str, call: Callable[[], T]) -> T:
        try:
            return call()
        except Exception as exc:
            translated = _translate(exc, what, refusal=False)
            if translated is None:
                raise
            raise translated from exc

    # --- helpers ----------------------------------------------------------------------------

    def _read_chain(self) -> str:
        chain = str(self._client.secrets.pki.read_ca_certificate_chain(mount_point=self.mount))
        if "BEGIN CERTIFICATE" in chain:
            return chain
        # A root-only mount may serve an empty chain: its CA certificate is the chain.
        return str(self._client.secrets.pki.read_ca_certificate(mount_point=self.mount))

    def _check_issued(
        self, cert: x509.Certificate, csr: x509.CertificateSigningRequest, *, device_id: str, store_id: str
    ) -> None:
        """Refuse what a misconfigured role would issue (CSR subject/SANs copied, another key)."""
        der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        identity = identity_of(cert, self.trust_domain)
        if (
            cert.public_key().public_bytes(der, spki) != csr.public_key().public_bytes(der, spki)
            or identity is None
            or identity.kind is not IdentityKind.DEVICE
            or identity.name != device_id
            or identity.store_id != store_id
        ):
            logger.error("Vault role %r issued a certificate with the wrong identity or key", self.role)
            raise CAUnavailable(f"Vault role {self.role!r} issues certificates we cannot use")


class _NotKnownToVault(CAUnavailable):
    """Vault has no certificate with that serial (revoke only)."""


_UNAVAILABLE = (
    hvac.exceptions.VaultDown,
    hvac.exceptions.InternalServerError,
    hvac.exceptions.BadGateway,
    hvac.exceptions.VaultNotInitialized,
    hvac.exceptions.RateLimitExceeded,
    hvac.exceptions.UnexpectedError,
)


def _translate(exc: Exception, what: str, *, refusal: bool) -> StorefleetError | None:
    """hvac/requests exception → our error (raised `from exc`); None: not theirs, re-raise as is."""
    if isinstance(exc, requests.exceptions.RequestException):
        return CAUnavailable(f"Vault unreachable ({what}): {type(exc).__name__}")
    if isinstance(exc, hvac.exceptions.InvalidRequest):
        message = _vault_message(exc)
        if refusal:
            return CSRRejected(f"the CA refused the request: {message}", code="csr_refused_by_ca")
        if "not found" in message:
            return _NotKnownToVault(message)
        logger.error("Vault refused to %s: %s", what, message)
        return CAUnavailable(f"Vault refused to {what}: {message}")
    if isinstance(exc, _UNAVAILABLE):
        return CAUnavailable(f"Vault unavailable ({what}): {type(exc).__name__}")
    if isinstance(exc, hvac.exceptions.InvalidPath):
        logger.error("Vault: no such path (%s): check vault_mount and vault_role: %s", what, exc)
        return CAUnavailable(f"Vault PKI mount or role not found ({what})")
    if isinstance(exc, hvac.exceptions.VaultError):
        return CAUnavailable(f"Vault error ({what}): {type(exc).__name__}")
    return None


def _vault_message(exc: hvac.exceptions.VaultError) -> str:
    errors: Any = getattr(exc, "errors", None)
    if isinstance(errors, list) and errors:
        return "; ".join(str(e) for e in errors)[:300]
    return str(exc).split(", on ", 1)[0][:300]


def _intermediates(chain: list[str] | str) -> str:
    """The non-self-signed certificates of a Vault `ca_chain` (what a client sends along)."""
    pems = chain if isinstance(chain, list) else [chain]
    out = []
    for pem in pems:
        if not pem:
            continue
        for cert in x509.load_pem_x509_certificates(str(pem).encode()):
            if cert.issuer != cert.subject:
                out.append(certificate_pem(cert))
    return "".join(out)
