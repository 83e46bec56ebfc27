"""Real key material for the agent tests: a small CA, device certificates issued from the
agent's own CSR, config-signing keys and signed desired-state documents."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.enrollment import ensure_key
from agent.identity import certificate_pem
from agent.state import AgentState
from protocol.messages import BrokerEndpoint, EnrollmentResponse, SigningKey
from protocol.signing import key_id, sign_document
from tests.support.certs import self_signed_ca

DEVICE_ID = "dev-0001"
STORE_ID = "store-1"


@dataclass
class LocalCA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str = "test root CA") -> LocalCA:
        key, cert = self_signed_ca(name, timedelta(days=30))
        return cls(key, cert)

    @property
    def pem(self) -> str:
        return certificate_pem(self.cert)

    def issue(
        self,
        public_key: ec.EllipticCurvePublicKey,
        common_name: str,
        *,
        server_names: list[str] | None = None,
        validity: timedelta = timedelta(hours=1),
    ) -> x509.Certificate:
        now = datetime.now(UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        if server_names is not None:
            sans: list[x509.GeneralName] = []
            for name in server_names:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(name)))
                except ValueError:
                    sans.append(x509.DNSName(name))
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
        else:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
        return builder.sign(self.key, hashes.SHA256())

    def sign_csr(self, csr_pem: str, device_id: str) -> str:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        public_key = csr.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        return certificate_pem(self.issue(public_key, device_id))


def public_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def signing_key_entry(key: ec.EllipticCurvePrivateKey) -> SigningKey:
    return SigningKey(kid=key_id(key.public_key()), public_key_pem=public_pem(key))


def enrollment_response(
    *,
    ca: LocalCA,
    device_key: ec.EllipticCurvePrivateKey,
    signing_keys: list[ec.EllipticCurvePrivateKey],
    device_id: str = DEVICE_ID,
    store_id: str = STORE_ID,
    broker: tuple[str, int] = ("127.0.0.1", 8883),
    health_interval_s: float = 30.0,
) -> EnrollmentResponse:
    return EnrollmentResponse(
        device_id=device_id,
        store_id=store_id,
        certificate_pem=certificate_pem(ca.issue(device_key.public_key(), device_id)),
        ca_chain_pem=ca.pem,
        broker=BrokerEndpoint(host=broker[0], port=broker[1]),
        signing_keys=[signing_key_entry(key) for key in signing_keys],
        health_interval_s=health_interval_s,
    )


def enroll_directly(
    state: AgentState,
    *,
    ca: LocalCA,
    signing_keys: list[ec.EllipticCurvePrivateKey],
    device_id: str = DEVICE_ID,
    **kwargs: Any,
) -> EnrollmentResponse:
    """What a successful enrollment leaves behind, without the HTTP round trip."""
    response = enrollment_response(
        ca=ca, device_key=ensure_key(state), signing_keys=signing_keys, device_id=device_id, **kwargs
    )
    state.save_enrollment(response)
    return response


def desired_document(
    version: int,
    *,
    device_id: str = DEVICE_ID,
    store_id: str = STORE_ID,
    config: dict[str, Any] | None = None,
    policies: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "schema": 1,
        "device_id": device_id,
        "store_id": store_id,
        "version": version,
        "issued_at": "2026-12-03T12:00:00Z",
        "config": config if config is not None else {"pos": {"currency": "EUR"}, "v": version},
        "policies": policies if policies is not None else {"screen_lock_timeout_s": 300},
        **extra,
    }


def signed_desired(version: int, key: ec.EllipticCurvePrivateKey, **kwargs: Any) -> dict[str, Any]:
    return sign_document(desired_document(version, **kwargs), key)
