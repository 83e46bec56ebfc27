"""Control-plane replicas: their names, who counts as the control plane, broker rights, settings."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

from control_plane.broker.acl import is_allowed
from control_plane.broker.embedded import client_id_matches
from control_plane.broker.mosquitto import mosquitto_acl
from control_plane.cli import build_parser
from control_plane.mqtt.link import BrokerLink, share_group
from control_plane.pki.ca import BuiltinCA
from control_plane.pki.identity import (
    CONTROL_PLANE_SERVICE,
    CertificateIdentity,
    IdentityKind,
    control_plane_service,
    identity_of,
)
from control_plane.settings import ControlPlaneSettings
from protocol.topics import TopicKind, device_topic, fleet_filter

REPLICA_A = CertificateIdentity(IdentityKind.SERVICE, f"{CONTROL_PLANE_SERVICE}-a")
PG = "postgresql+asyncpg://storefleet@db/storefleet"


def test_a_replica_is_named_after_its_id() -> None:
    assert control_plane_service(None) == CONTROL_PLANE_SERVICE
    assert control_plane_service("eu-1") == "storefleet-control-plane-eu-1"


@pytest.mark.parametrize("replica_id", ["", "A", "-a", "a/b", "a+", "a#", "a b", "a\n", "a" * 33])
def test_a_replica_id_outside_the_pattern_is_refused(replica_id: str) -> None:
    with pytest.raises(ValueError, match="invalid replica id"):
        control_plane_service(replica_id)


@pytest.mark.parametrize(
    ("kind", "name", "control_plane"),
    [
        (IdentityKind.SERVICE, CONTROL_PLANE_SERVICE, True),
        (IdentityKind.SERVICE, f"{CONTROL_PLANE_SERVICE}-a", True),
        (IdentityKind.SERVICE, f"{CONTROL_PLANE_SERVICE}-{'b' * 32}", True),
        (IdentityKind.SERVICE, f"{CONTROL_PLANE_SERVICE}-", False),
        (IdentityKind.SERVICE, f"{CONTROL_PLANE_SERVICE}-A", False),
        (IdentityKind.SERVICE, f"{CONTROL_PLANE_SERVICE}x", False),
        (IdentityKind.SERVICE, "storefleet-api", False),
        # Only a service certificate: a device is never the control plane, whatever its name.
        (IdentityKind.DEVICE, f"{CONTROL_PLANE_SERVICE}-a", False),
    ],
)
def test_who_counts_as_the_control_plane(kind: IdentityKind, name: str, control_plane: bool) -> None:
    assert CertificateIdentity(
        kind, name, "store-1" if kind is IdentityKind.DEVICE else None
    ).is_control_plane is (control_plane)


def test_certificates_issued_by_the_ca_prove_a_replica_and_never_make_a_device_one(tmp_path: Path) -> None:
    ca = BuiltinCA.load_or_create(tmp_path / "pki", trust_domain="t.example")
    _, issued = ca.issue_service_identity(control_plane_service("b"), timedelta(hours=1))
    replica = identity_of(x509.load_pem_x509_certificate(issued.certificate_pem.encode()), "t.example")
    assert replica is not None
    assert replica.is_control_plane
    assert replica.name == "storefleet-control-plane-b"

    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    device_cert = ca.sign_device_csr(
        csr.public_bytes(serialization.Encoding.PEM).decode(),
        device_id="storefleet-control-plane-b",
        store_id="store-1",
        validity=timedelta(hours=1),
    )
    device = identity_of(x509.load_pem_x509_certificate(device_cert.certificate_pem.encode()), "t.example")
    assert device is not None
    assert device.kind is IdentityKind.DEVICE
    assert not device.is_control_plane


def test_a_replica_has_the_control_planes_topic_rights() -> None:
    assert is_allowed(REPLICA_A, "subscribe", fleet_filter(TopicKind.HEALTH))
    assert is_allowed(REPLICA_A, "publish", device_topic("dev-a", TopicKind.DESIRED))
    assert not is_allowed(REPLICA_A, "publish", "elsewhere/x")


@pytest.mark.parametrize(
    ("client_id", "allowed"),
    [
        (f"{CONTROL_PLANE_SERVICE}-a", True),
        (f"{CONTROL_PLANE_SERVICE}-a-probe", True),
        (f"{CONTROL_PLANE_SERVICE}-b", False),  # another replica's session
        (CONTROL_PLANE_SERVICE, False),
        ("dev-a", False),
    ],
)
def test_a_replica_connects_to_the_embedded_broker_under_its_own_name(client_id: str, allowed: bool) -> None:
    assert client_id_matches(REPLICA_A, client_id) is allowed


def test_the_mosquitto_acl_lists_each_replica_with_the_control_planes_rights() -> None:
    text = mosquitto_acl(["a", "b", "a"])
    blocks = text.split("\n\n")[1:]
    users = [block.splitlines() for block in blocks if block.strip()]
    assert users == [
        [f"user {name}", "topic readwrite sf/v1/#"]
        for name in (CONTROL_PLANE_SERVICE, f"{CONTROL_PLANE_SERVICE}-a", f"{CONTROL_PLANE_SERVICE}-b")
    ]
    with pytest.raises(ValueError, match="invalid replica id"):
        mosquitto_acl(["a\ntopic readwrite #"])


def test_replica_id_needs_a_shared_broker_and_postgresql(tmp_path: Path) -> None:
    broker = "mqtts://mqtt:8883"
    settings = ControlPlaneSettings(data_dir=tmp_path, replica_id="a", broker_url=broker, database_url=PG)
    assert settings.replica_id == "a"
    with pytest.raises(ValidationError, match="replica_id needs an external broker"):
        ControlPlaneSettings(data_dir=tmp_path, replica_id="a", database_url=PG)
    with pytest.raises(ValidationError, match="replica_id needs an external broker"):
        ControlPlaneSettings(data_dir=tmp_path, replica_id="a", broker_url=broker)
    with pytest.raises(ValidationError, match="replica_id"):
        ControlPlaneSettings(data_dir=tmp_path, replica_id="Bad_Id", broker_url=broker, database_url=PG)


def test_the_cli_takes_replica_ids(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(
        [
            "broker-config",
            "mosquitto",
            "--out",
            "x",
            "--control-plane-replica",
            "a",
            "--control-plane-replica",
            "b",
        ]
    )
    assert args.control_plane_replica == ["a", "b"]
    assert parser.parse_args(["serve", "--replica-id", "eu-1"]).replica_id == "eu-1"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--replica-id", "EU 1"])
    assert "invalid replica id" in capsys.readouterr().err


def test_replicas_subscribe_in_a_secret_share_group() -> None:
    def link(group: str | None) -> BrokerLink:
        return BrokerLink(
            host="mqtt",
            port=8883,
            tls_context=lambda: None,
            client_id="x",
            on_message=lambda _t, _p: None,  # type: ignore[arg-type,return-value]
            shared_group=group,
        )

    plain = link(None).subscriptions
    assert plain == [
        fleet_filter(kind)
        for kind in (
            TopicKind.REPORTED,
            TopicKind.HEALTH,
            TopicKind.STATUS,
            TopicKind.COMMAND_RESULT,
            TopicKind.RENEW,
        )
    ]
    group = share_group(b"k" * 32)
    assert group == share_group(b"k" * 32) != share_group(b"j" * 32)
    assert all(char not in group for char in "/+#")
    assert len(group) > 20
    assert link(group).subscriptions == [f"$share/{group}/{topic_filter}" for topic_filter in plain]
