"""The device's cryptographic identity: an EC P-256 key made here (it never leaves the
device), the CSR sent at enrollment, and the certificate and CA chain received back.

The CSR's subject is only a hint: the control plane decides the certificate's identity
(CN = device id, URI SAN ``spiffe://…/store/<store>/device/<id>``).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.errors import ConfigurationError, StateError

_FINGERPRINT_RE = re.compile(r"^sha256:([0-9a-f]{64})$")


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise StateError(f"the device key is unreadable: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise StateError("the device key is not an EC P-256 key")
    return key


def build_csr(key: ec.EllipticCurvePrivateKey, *, common_name_hint: str = "storefleet-agent") -> str:
    """A PEM CSR signed by `key`. The subject is a hint the server ignores."""
    hint = common_name_hint.strip()[:64] or "storefleet-agent"
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hint)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def load_certificates(pem: str | bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle, in order; at least one."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise StateError(f"not a PEM certificate bundle: {exc}") from exc
    return certs


def load_certificate(pem: str | bytes) -> x509.Certificate:
    return load_certificates(pem)[0]


def certificate_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def fingerprint(cert: x509.Certificate) -> str:
    """``sha256:<hex>`` of the certificate's DER encoding, the form operators pin."""
    return "sha256:" + hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def normalise_fingerprint(value: str) -> str:
    """Accept ``sha256:AB:CD…`` or ``sha256:abcd…``; return ``sha256:abcd…`` or raise."""
    algorithm, _, digest = value.strip().partition(":")
    normalised = f"{algorithm.lower()}:{digest.replace(':', '').lower()}"
    if not _FINGERPRINT_RE.match(normalised):
        raise ConfigurationError(
            "the CA fingerprint must look like sha256:<64 hex digits> (SHA-256 of the CA certificate DER)"
        )
    return normalised


def fingerprint_matches(cert: x509.Certificate, expected: str) -> bool:
    return hmac.compare_digest(fingerprint(cert), normalise_fingerprint(expected))


def matches_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return cert.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)


def common_name(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if len(names) == 1 else None


def expiry(cert: x509.Certificate) -> datetime:
    return cert.not_valid_after_utc


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True when `issuer` signed `cert` directly."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
