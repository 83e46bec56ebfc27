"""Real certificates for tests: device and service client credentials from a `BuiltinCA`, foreign CAs.

Keys are generated here the way the agent generates them (EC P-256, CSR signed by the CA), so
a test exercises the same certificates the product issues.
"""

from __future__ import annotations

import ssl
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from control_plane.pki.ca import BuiltinCA, write_identity
from control_plane.pki.files import write_public
from control_plane.pki.identity import CONTROL_PLANE_SERVICE

CLIENT_VALIDITY = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class ClientCredentials:
    """What an MQTT client needs for mTLS: the CA it trusts for the server, its cert and key.

    `cert_file`/`key_file` are None for a client that presents no certificate.
    """

    server_ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None

    def ssl_context(self, *, legacy_tls: bool = False) -> ssl.SSLContext:
        """A client context; `legacy_tls` offers only TLS 1.0/1.1, which brokers must refuse."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.server_ca_file))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if legacy_tls:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                context.minimum_version = ssl.TLSVersion.TLSv1
                context.maximum_version = ssl.TLSVersion.TLSv1_1
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
        if self.cert_file is not None and self.key_file is not None:
            context.load_cert_chain(str(self.cert_file), str(self.key_file))
        return context


def write_ca_certificate(ca: BuiltinCA, path: Path) -> Path:
    write_public(path, ca.ca_chain_pem().encode())
    return path


def make_foreign_ca(directory: Path, *, trust_domain: str) -> BuiltinCA:
    """Another CA, with the same trust domain: its certificates name identities we know."""
    return BuiltinCA.load_or_create(directory, trust_domain=trust_domain)


def make_device_credentials(
    ca: BuiltinCA,
    directory: Path,
    device_id: str,
    *,
    store_id: str = "store-1",
    server_ca_file: Path,
    validity: timedelta = CLIENT_VALIDITY,
) -> ClientCredentials:
    """Key and CSR made on the "device", certificate signed by `ca`; written to `directory`."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    issued = ca.sign_device_csr(
        csr.public_bytes(serialization.Encoding.PEM).decode(),
        device_id=device_id,
        store_id=store_id,
        validity=validity,
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key_file, cert_file = write_identity(directory, device_id, key_pem, issued)
    return ClientCredentials(server_ca_file=server_ca_file, cert_file=cert_file, key_file=key_file)


def make_service_credentials(
    ca: BuiltinCA,
    directory: Path,
    *,
    name: str = CONTROL_PLANE_SERVICE,
    server_ca_file: Path,
    validity: timedelta = CLIENT_VALIDITY,
) -> ClientCredentials:
    key_pem, issued = ca.issue_service_identity(name, validity)
    key_file, cert_file = write_identity(directory, name, key_pem, issued)
    return ClientCredentials(server_ca_file=server_ca_file, cert_file=cert_file, key_file=key_file)


def make_server_identity(ca: BuiltinCA, directory: Path, hostnames: list[str]) -> tuple[Path, Path]:
    """A TLS server certificate and key for a broker under test; returns (cert_file, key_file)."""
    key_pem, issued = ca.issue_server_identity(hostnames)
    key_file, cert_file = write_identity(directory, "server", key_pem, issued)
    return cert_file, key_file


__all__ = [
    "ClientCredentials",
    "make_device_credentials",
    "make_foreign_ca",
    "make_server_identity",
    "make_service_credentials",
    "write_ca_certificate",
]


def self_signed_ca(name: str, validity: timedelta) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A bare self-signed P-256 CA, built by hand (for trust-anchor and legacy-layout tests)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + validity)
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
    return key, cert
