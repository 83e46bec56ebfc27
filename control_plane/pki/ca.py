"""The built-in certificate authority (embedded default): an offline-able root and an intermediate.

``storefleet ca init`` (or the first ``storefleet serve``) creates, in ``<data>/pki``::

    ca.pem            root certificate (EC P-256, 10 years): what agents pin (sha256 of its DER)
    ca.key            root key (0600): only needed by `ca init`; move it offline afterwards
    intermediate.pem  intermediate certificate (EC P-256, 5 years), signed by the root
    intermediate.key  intermediate key (0600, encrypted when a passphrase is given)

The intermediate signs everything: device certificates from CSRs, the server certificate of
the HTTPS API and of the broker, and the control plane's client certificate. A data directory
from an earlier version (``ca.key``/``ca.pem`` only) keeps working with its root as the issuer
until ``storefleet ca init`` adds an intermediate under it.

The CSR's subject and extensions are ignored: the CA decides the identity (see
`control_plane.pki.identity`).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from control_plane.errors import CSRRejected, StorefleetError
from control_plane.pki.files import write_private, write_public
from control_plane.pki.identity import device_uri, service_uri

logger = logging.getLogger(__name__)

ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)
# Issued certificates start slightly in the past so that a device clock a little behind works.
BACKDATE = timedelta(minutes=5)
ROOT_VALIDITY = timedelta(days=3650)
INTERMEDIATE_VALIDITY = timedelta(days=1826)
SERVER_VALIDITY = timedelta(days=365)
# A CRL is re-signed on every revocation and at start-up; this bounds how stale a copy may be.
CRL_VALIDITY = timedelta(days=7)

ROOT_CERT, ROOT_KEY = "ca.pem", "ca.key"
INTERMEDIATE_CERT, INTERMEDIATE_KEY = "intermediate.pem", "intermediate.key"
PASSPHRASE_VARIABLE = "STOREFLEET_CA_KEY_PASSPHRASE"  # noqa: S105 - a variable name, not a secret


class CAConfigurationError(StorefleetError):
    """The CA cannot be set up from its files or settings (start-up only, never an HTTP answer)."""

    code = "ca_misconfigured"


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    certificate_pem: str
    serial: str  # hex
    not_before: datetime
    not_after: datetime
    # Intermediates between the certificate and the root, for a TLS server or client to send along.
    chain_pem: str = ""


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


def certificate_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


class InitOutcome(StrEnum):
    CREATED = "created"  # a new root and intermediate
    UPGRADED = "upgraded"  # an intermediate added under an existing (earlier version's) root
    EXISTING = "existing"  # nothing to do


class BuiltinCA:
    """An issuing CA key and certificate, and the certificates above it up to the root.

    `certificate` is the issuer (the intermediate, or the root of an earlier version's data
    directory); `root_certificate` is the trust anchor agents pin.
    """

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        cert: x509.Certificate,
        trust_domain: str,
        *,
        parents: Sequence[x509.Certificate] = (),
    ) -> None:
        self._key = key
        self._cert = cert
        self._parents = tuple(parents)  # issuer of `cert` first, root last; empty if `cert` is the root
        self.trust_domain = trust_domain

    @property
    def certificate(self) -> x509.Certificate:
        """The certificate that signs what this CA issues."""
        return self._cert

    @property
    def root_certificate(self) -> x509.Certificate:
        return self._parents[-1] if self._parents else self._cert

    # --- files ---------------------------------------------------------------------------

    @classmethod
    def initialize(cls, directory: Path, *, trust_domain: str, passphrase: str | None = None) -> InitOutcome:
        """Create the root and intermediate (or only the intermediate under an existing root)."""
        if (directory / INTERMEDIATE_CERT).exists():
            return InitOutcome.EXISTING
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        root_cert_path, root_key_path = directory / ROOT_CERT, directory / ROOT_KEY
        if root_cert_path.exists():
            if not root_key_path.exists():
                raise CAConfigurationError(
                    f"{root_key_path} is needed once to sign the intermediate: bring the root key back"
                )
            root_key = _load_key(root_key_path, passphrase)
            root_cert = x509.load_pem_x509_certificate(root_cert_path.read_bytes())
            _check_pair(root_key, root_cert, root_key_path)
            outcome = InitOutcome.UPGRADED
        else:
            root_key = ec.generate_private_key(ec.SECP256R1())
            root_cert = _ca_certificate(
                subject=_ca_name(f"storefleet root CA ({trust_domain})"),
                public_key=root_key.public_key(),
                issuer=None,
                signing_key=root_key,
                validity=ROOT_VALIDITY,
                path_length=1,
            )
            write_private(root_key_path, _key_pem(root_key, passphrase))
            write_public(root_cert_path, certificate_pem(root_cert).encode())
            outcome = InitOutcome.CREATED
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _ca_certificate(
            subject=_ca_name(f"storefleet intermediate CA ({trust_domain})"),
            public_key=key.public_key(),
            issuer=root_cert,
            signing_key=root_key,
            validity=min(INTERMEDIATE_VALIDITY, root_cert.not_valid_after_utc - datetime.now(UTC)),
            path_length=0,
        )
        write_private(directory / INTERMEDIATE_KEY, _key_pem(key, passphrase))
        write_public(directory / INTERMEDIATE_CERT, certificate_pem(cert).encode())
        logger.info("built-in CA %s in %s", outcome.value, directory)
        return outcome

    @classmethod
    def load(cls, directory: Path, *, trust_domain: str, passphrase: str | None = None) -> BuiltinCA:
        """Load the issuing CA; the root key is read only for an earlier version's root-only layout."""
        root_cert_path = directory / ROOT_CERT
        if not root_cert_path.exists():
            raise CAConfigurationError(f"no CA in {directory}: run `storefleet ca init`")
        root_cert = x509.load_pem_x509_certificate(root_cert_path.read_bytes())
        cert_path, key_path = directory / INTERMEDIATE_CERT, directory / INTERMEDIATE_KEY
        if cert_path.exists():
            if not key_path.exists():
                raise CAConfigurationError(f"{key_path} is missing: the intermediate cannot sign")
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = _load_key(key_path, passphrase)
            try:
                cert.verify_directly_issued_by(root_cert)
            except (ValueError, TypeError, InvalidSignature):
                raise CAConfigurationError(f"{cert_path} was not issued by {root_cert_path}") from None
            _check_pair(key, cert, key_path)
            return cls(key, cert, trust_domain, parents=[root_cert])
        root_key_path = directory / ROOT_KEY
        if not root_key_path.exists():
            raise CAConfigurationError(
                f"{directory} has a root certificate but neither its key nor an intermediate: "
                "run `storefleet ca init` with the root key in place"
            )
        key = _load_key(root_key_path, passphrase)
        _check_pair(key, root_cert, root_key_path)
        return cls(key, root_cert, trust_domain)

    @classmethod
    def load_or_create(
        cls, directory: Path, *, trust_domain: str, passphrase: str | None = None
    ) -> BuiltinCA:
        if not (directory / ROOT_CERT).exists():
            cls.initialize(directory, trust_domain=trust_domain, passphrase=passphrase)
        return cls.load(directory, trust_domain=trust_domain, passphrase=passphrase)

    # --- CertificateAuthority ---------------------------------------------------------------

    def ca_chain_pem(self) -> str:
        """The issuer first, the root last."""
        return "".join(certificate_pem(cert) for cert in (self._cert, *self._parents))

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
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
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

    # --- our own services -------------------------------------------------------------------

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
        # Never past the issuer's own expiry (a chain is only as valid as its shortest link).
        not_before, not_after = now - BACKDATE, min(now + validity, self._cert.not_valid_after_utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        return IssuedCertificate(
            certificate_pem=certificate_pem(cert),
            serial=format(serial, "x"),
            not_before=not_before,
            not_after=not_after,
            chain_pem=self._intermediates_pem(),
        )

    def _intermediates_pem(self) -> str:
        if not self._parents:
            return ""
        return "".join(certificate_pem(cert) for cert in (self._cert, *self._parents[:-1]))


def _ca_name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "storefleet"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _ca_certificate(
    *,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Certificate | None,
    signing_key: ec.EllipticCurvePrivateKey,
    validity: timedelta,
    path_length: int,
) -> x509.Certificate:
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()), critical=False
        )
    return builder.sign(signing_key, hashes.SHA256())


def _key_pem(key: ec.EllipticCurvePrivateKey, passphrase: str | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase.encode())
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def _load_key(path: Path, passphrase: str | None) -> ec.EllipticCurvePrivateKey:
    data = path.read_bytes()
    encrypted = b"ENCRYPTED" in data.split(b"\n", 1)[0]
    if encrypted and not passphrase:
        raise CAConfigurationError(f"{path} is encrypted: set {PASSPHRASE_VARIABLE}")
    if not encrypted and passphrase:
        logger.warning("%s is not passphrase-protected although %s is set", path, PASSPHRASE_VARIABLE)
    try:
        key = serialization.load_pem_private_key(
            data, password=passphrase.encode() if encrypted and passphrase else None
        )
    except (ValueError, TypeError):
        reason = "wrong passphrase or damaged file" if encrypted else "not a PEM private key"
        raise CAConfigurationError(f"cannot load {path}: {reason}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CAConfigurationError(f"{path} is not an EC private key")
    return key


def _check_pair(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, key_path: Path) -> None:
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        raise CAConfigurationError(f"{key_path} does not belong to its certificate")


def write_identity(
    directory: Path, stem: str, key_pem: bytes, issued: IssuedCertificate
) -> tuple[Path, Path]:
    """Write `<stem>.key` (0600) and `<stem>.pem` (certificate, then its intermediates); return the paths."""
    key_path, cert_path = directory / f"{stem}.key", directory / f"{stem}.pem"
    write_private(key_path, key_pem)
    write_public(cert_path, (issued.certificate_pem + issued.chain_pem).encode())
    return key_path, cert_path
