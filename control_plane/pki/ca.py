"""The built-in certificate authority (embedded default).

A self-signed EC P-256 root generated on first start and kept in the data directory
(``pki/ca.key`` 0600, ``pki/ca.pem``). It signs device certificates from CSRs, the server
certificate of the HTTPS API and of the broker, and the control plane's client certificate.

The CSR's subject and extensions are ignored: the CA decides the identity (see
`control_plane.pki.identity`).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from control_plane.errors import CSRRejected
from control_plane.pki.files import write_private, write_public
from control_plane.pki.identity import device_uri, service_uri

ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)
# Issued certificates start slightly in the past so that a device clock a little behind works.
BACKDATE = timedelta(minutes=5)
CA_VALIDITY = timedelta(days=3650)
SERVER_VALIDITY = timedelta(days=365)
# A CRL is re-signed on every revocation and at start-up; this bounds how stale a copy may be.
CRL_VALIDITY = timedelta(days=7)


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    certificate_pem: str
    serial: str  # hex
    not_before: datetime
    not_after: datetime


@dataclass(frozen=True, slots=True)
class RevokedCertificate:
    serial: str  # hex
    revoked_at: datetime


class CertificateAuthority(Protocol):
    """What the control plane needs from any CA backend (built-in, Vault PKI).

    Synchronous on purpose (hvac is): callers go through `control_plane.pki.gateway.CAGateway`,
    which runs these in a thread with a timeout.
    """

    def ca_chain_pem(self) -> str: ...

    def sign_device_csr(
        self, csr_pem: str, *, device_id: str, store_id: str, validity: timedelta
    ) -> IssuedCertificate: ...

    def revoke(self, serial: str) -> None:
        """Tell the backend a certificate is revoked (the built-in CA keeps no state: no-op)."""
        ...

    def crl_pem(self, revoked: list[RevokedCertificate]) -> str:
        """A current CRL. The built-in CA signs one from `revoked`; Vault serves its own."""
        ...


def load_csr(csr_pem: str) -> x509.CertificateSigningRequest:
    """Parse and check a CSR: well-formed PEM, valid self-signature, EC P-256 or P-384 key."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError:
        raise CSRRejected("field 'csr_pem': not a PEM-encoded certificate signing request") from None
    if not csr.is_signature_valid:
        raise CSRRejected("field 'csr_pem': CSR signature does not verify", code="csr_bad_signature")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ALLOWED_CURVES):
        raise CSRRejected("field 'csr_pem': key must be EC P-256 or P-384", code="csr_weak_key")
    return csr


class BuiltinCA:
    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, trust_domain: str) -> None:
        self._key = key
        self._cert = cert
        self.trust_domain = trust_domain

    @property
    def certificate(self) -> x509.Certificate:
        return self._cert

    @classmethod
    def load_or_create(cls, directory: Path, *, trust_domain: str) -> BuiltinCA:
        key_path, cert_path = directory / "ca.key", directory / "ca.pem"
        if key_path.exists() and cert_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{key_path} is not an EC private key")
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            return cls(key, cert, trust_domain)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "storefleet"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"storefleet root CA ({trust_domain})"),
            ]
        )
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        write_private(
            key_path,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return cls(key, cert, trust_domain)

    def ca_chain_pem(self) -> str:
        return self._cert.public_bytes(serialization.Encoding.PEM).decode()

    def _issue(
        self,
        public_key: ec.EllipticCurvePublicKey,
        common_name: str,
        san: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        validity: timedelta,
    ) -> IssuedCertificate:
        now = datetime.now(UTC)
        serial = x509.random_serial_number()
        not_before, not_after = now - BACKDATE, now + validity
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        return IssuedCertificate(
            certificate_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
            serial=format(serial, "x"),
            not_before=not_before,
            not_after=not_after,
        )

    def sign_device_csr(
        self, csr_pem: str, *, device_id: str, store_id: str, validity: timedelta
    ) -> IssuedCertificate:
        csr = load_csr(csr_pem)
        public_key = csr.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)  # checked by load_csr
        san: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(device_uri(self.trust_domain, store_id, device_id))
        ]
        return self._issue(public_key, device_id, san, ExtendedKeyUsageOID.CLIENT_AUTH, validity)

    def revoke(self, serial: str) -> None:
        """Revocations are kept in the database; the CRL is built from them."""

    def crl_pem(self, revoked: list[RevokedCertificate]) -> str:
        now = datetime.now(UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self._cert.subject)
            .last_update(now - BACKDATE)
            .next_update(now + CRL_VALIDITY)
        )
        for entry in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(int(entry.serial, 16))
                .revocation_date(entry.revoked_at)
                .build()
            )
        crl = builder.sign(self._key, hashes.SHA256())
        return crl.public_bytes(serialization.Encoding.PEM).decode()

    def issue_service_identity(self, name: str, validity: timedelta) -> tuple[bytes, IssuedCertificate]:
        """A key and client certificate for one of our own services (e.g. the control plane)."""
        key = ec.generate_private_key(ec.SECP256R1())
        san: list[x509.GeneralName] = [x509.UniformResourceIdentifier(service_uri(self.trust_domain, name))]
        issued = self._issue(key.public_key(), name, san, ExtendedKeyUsageOID.CLIENT_AUTH, validity)
        return _key_pem(key), issued

    def issue_server_identity(
        self, hostnames: list[str], validity: timedelta = SERVER_VALIDITY
    ) -> tuple[bytes, IssuedCertificate]:
        """A key and TLS server certificate for the API or the broker."""
        key = ec.generate_private_key(ec.SECP256R1())
        san: list[x509.GeneralName] = []
        for host in hostnames:
            try:
                san.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                san.append(x509.DNSName(host))
        issued = self._issue(key.public_key(), hostnames[0], san, ExtendedKeyUsageOID.SERVER_AUTH, validity)
        return _key_pem(key), issued


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_identity(
    directory: Path, stem: str, key_pem: bytes, issued: IssuedCertificate
) -> tuple[Path, Path]:
    """Write `<stem>.key` (0600) and `<stem>.pem`; return their paths."""
    key_path, cert_path = directory / f"{stem}.key", directory / f"{stem}.pem"
    write_private(key_path, key_pem)
    write_public(cert_path, issued.certificate_pem.encode())
    return key_path, cert_path
