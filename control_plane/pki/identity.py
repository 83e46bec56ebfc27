"""Who a certificate belongs to, read from its URI SAN (the CSR's subject is never trusted).

Devices:  ``spiffe://<trust-domain>/store/<store_id>/device/<device_id>`` (CN = device id)
Services: ``spiffe://<trust-domain>/service/<name>``                    (CN = name)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from cryptography import x509

from protocol.topics import is_valid_device_id

CONTROL_PLANE_SERVICE = "storefleet-control-plane"


class IdentityKind(StrEnum):
    DEVICE = "device"
    SERVICE = "service"


@dataclass(frozen=True, slots=True)
class CertificateIdentity:
    kind: IdentityKind
    name: str  # device id or service name; equals the certificate CN
    store_id: str | None = None

    @property
    def is_control_plane(self) -> bool:
        return self.kind is IdentityKind.SERVICE and self.name == CONTROL_PLANE_SERVICE


def device_uri(trust_domain: str, store_id: str, device_id: str) -> str:
    return f"spiffe://{trust_domain}/store/{store_id}/device/{device_id}"


def service_uri(trust_domain: str, name: str) -> str:
    return f"spiffe://{trust_domain}/service/{name}"


def identity_of(cert: x509.Certificate, trust_domain: str) -> CertificateIdentity | None:
    """The identity a certificate proves in `trust_domain`, or None if it proves none."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        return None
    prefix = f"spiffe://{trust_domain}/"
    if not uris[0].startswith(prefix):
        return None
    parts = uris[0][len(prefix) :].split("/")
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    common_name = str(cns[0].value) if len(cns) == 1 else None
    if len(parts) == 4 and parts[0] == "store" and parts[2] == "device":
        store_id, device_id = parts[1], parts[3]
        if is_valid_device_id(device_id) and common_name == device_id:
            return CertificateIdentity(IdentityKind.DEVICE, device_id, store_id)
        return None
    if len(parts) == 2 and parts[0] == "service" and common_name == parts[1]:
        return CertificateIdentity(IdentityKind.SERVICE, parts[1])
    return None
