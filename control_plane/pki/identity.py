"""Who a certificate belongs to, read from its URI SAN (the CSR's subject is never trusted).

Devices:  ``spiffe://<trust-domain>/store/<store_id>/device/<device_id>`` (CN = device id)
Services: ``spiffe://<trust-domain>/service/<name>``                    (CN = name)

The control plane is the service ``storefleet-control-plane``, or with several replicas on one
broker ``storefleet-control-plane-<replica_id>`` each (one MQTT identity per replica: Mosquitto
makes the certificate's CN the client id, so replicas sharing a name would kick each other off).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from cryptography import x509

from protocol.topics import is_valid_device_id

CONTROL_PLANE_SERVICE = "storefleet-control-plane"
# A replica id becomes part of a certificate name and an MQTT client id / ACL user.
REPLICA_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,31}$"
_REPLICA_ID_RE = re.compile(REPLICA_ID_PATTERN)


def control_plane_service(replica_id: str | None = None) -> str:
    """The control plane's service name: shared by a single replica, one per replica otherwise."""
    if replica_id is None:
        return CONTROL_PLANE_SERVICE
    if not _REPLICA_ID_RE.fullmatch(replica_id):
        raise ValueError(f"invalid replica id {replica_id!r} (expected {REPLICA_ID_PATTERN})")
    return f"{CONTROL_PLANE_SERVICE}-{replica_id}"


def is_control_plane_name(name: str) -> bool:
    """True for ``storefleet-control-plane`` and ``storefleet-control-plane-<replica_id>``."""
    if name == CONTROL_PLANE_SERVICE:
        return True
    prefix = CONTROL_PLANE_SERVICE + "-"
    return name.startswith(prefix) and bool(_REPLICA_ID_RE.fullmatch(name[len(prefix) :]))


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
        # Only a service certificate (URI SAN .../service/...) counts, never a device's.
        return self.kind is IdentityKind.SERVICE and is_control_plane_name(self.name)


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
