"""The broker ACL rules (`acl.is_allowed`) and the Mosquitto configuration generated from them."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from control_plane.broker.acl import is_allowed
from control_plane.broker.embedded import client_id_matches
from control_plane.broker.mosquitto import mosquitto_acl, write_mosquitto_config
from control_plane.pki.ca import BuiltinCA
from control_plane.pki.identity import CONTROL_PLANE_SERVICE, CertificateIdentity, IdentityKind
from protocol.messages import MAX_MESSAGE_BYTES
from protocol.topics import DEVICE_PUBLISHES, DEVICE_SUBSCRIBES, TopicKind, device_topic, fleet_filter

DEVICE_A = CertificateIdentity(IdentityKind.DEVICE, "dev-a", "store-1")
CONTROL_PLANE = CertificateIdentity(IdentityKind.SERVICE, CONTROL_PLANE_SERVICE)
OTHER_SERVICE = CertificateIdentity(IdentityKind.SERVICE, "storefleet-api")
# A device whose id happens to be the service's name gets device rights, nothing more.
DEVICE_NAMED_LIKE_SERVICE = CertificateIdentity(IdentityKind.DEVICE, CONTROL_PLANE_SERVICE, "store-1")

ACTIONS = ("publish", "subscribe", "receive")


@pytest.mark.parametrize("kind", sorted(TopicKind))
def test_device_publishes_exactly_its_own_device_publishes_topics(kind: TopicKind) -> None:
    assert is_allowed(DEVICE_A, "publish", device_topic("dev-a", kind)) is (kind in DEVICE_PUBLISHES)


@pytest.mark.parametrize("action", ["subscribe", "receive"])
@pytest.mark.parametrize("kind", sorted(TopicKind))
def test_device_subscribes_to_and_receives_exactly_its_own_device_subscribes_topics(
    action: str, kind: TopicKind
) -> None:
    assert is_allowed(DEVICE_A, action, device_topic("dev-a", kind)) is (kind in DEVICE_SUBSCRIBES)  # type: ignore[arg-type]


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("kind", sorted(TopicKind))
def test_device_gets_nothing_of_another_device(action: str, kind: TopicKind) -> None:
    assert not is_allowed(DEVICE_A, action, device_topic("dev-b", kind))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "topic",
    [
        fleet_filter(TopicKind.DESIRED),
        "sf/v1/dev/dev-a/#",
        "sf/v1/dev/dev-a/+",
        "sf/v1/dev/dev-a/cmd/#",
        "sf/v1/#",
        "#",
        "+/v1/dev/dev-a/desired",
        "sf/v1/dev/dev-a/desired/",
        "/sf/v1/dev/dev-a/desired",
        "sf/v1/dev/DEV-A/desired",
        "sf/v1/dev/dev-a/unknown",
        "",
    ],
)
@pytest.mark.parametrize("action", ACTIONS)
def test_device_gets_no_wildcard_nor_malformed_topic(action: str, topic: str) -> None:
    assert not is_allowed(DEVICE_A, action, topic)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("action", "topic"),
    [
        ("publish", device_topic("dev-a", TopicKind.DESIRED)),
        ("publish", device_topic("dev-b", TopicKind.COMMAND)),
        ("subscribe", fleet_filter(TopicKind.REPORTED)),
        ("subscribe", "sf/v1/#"),
        ("subscribe", device_topic("dev-a", TopicKind.HEALTH)),
        ("receive", device_topic("dev-a", TopicKind.STATUS)),
        ("publish", "sf/v1/anything/else"),
    ],
)
def test_control_plane_may_use_everything_under_the_root(action: str, topic: str) -> None:
    assert is_allowed(CONTROL_PLANE, action, topic)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("action", "topic"),
    [
        ("subscribe", "#"),
        ("subscribe", "sf/#"),
        ("publish", "sf/v2/dev/dev-a/desired"),
        ("publish", "$SYS/broker/load"),
        ("publish", fleet_filter(TopicKind.DESIRED)),  # wildcards only in filters
        ("publish", "sf/v1/#"),
        ("subscribe", "sf/v1/dev/a#"),
        ("subscribe", "sf/v1/#/desired"),
        ("subscribe", "sf/v1/dev/dev+/desired"),
    ],
)
def test_control_plane_gets_nothing_outside_the_root_nor_malformed(action: str, topic: str) -> None:
    assert not is_allowed(CONTROL_PLANE, action, topic)  # type: ignore[arg-type]


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize(
    "topic", [device_topic("storefleet-api", TopicKind.REPORTED), "sf/v1/#", fleet_filter(TopicKind.DESIRED)]
)
def test_other_services_get_nothing(action: str, topic: str) -> None:
    assert not is_allowed(OTHER_SERVICE, action, topic)  # type: ignore[arg-type]


def test_a_device_named_like_the_control_plane_gets_only_device_rights() -> None:
    assert not is_allowed(DEVICE_NAMED_LIKE_SERVICE, "subscribe", fleet_filter(TopicKind.REPORTED))
    assert not is_allowed(DEVICE_NAMED_LIKE_SERVICE, "publish", device_topic("dev-a", TopicKind.DESIRED))


@pytest.mark.parametrize(
    ("identity", "client_id", "allowed"),
    [
        (DEVICE_A, "dev-a", True),
        (DEVICE_A, "dev-a-2", False),
        (DEVICE_A, "dev-b", False),
        (DEVICE_A, "", False),
        (CONTROL_PLANE, CONTROL_PLANE_SERVICE, True),
        (CONTROL_PLANE, f"{CONTROL_PLANE_SERVICE}-ingest", True),
        (CONTROL_PLANE, f"{CONTROL_PLANE_SERVICE}x", False),
        (CONTROL_PLANE, "dev-a", False),
        (OTHER_SERVICE, "storefleet-api", True),
        (OTHER_SERVICE, "storefleet-api-1", False),
        (DEVICE_NAMED_LIKE_SERVICE, f"{CONTROL_PLANE_SERVICE}-ingest", False),
    ],
)
def test_client_id_must_match_the_certificate_identity(
    identity: CertificateIdentity, client_id: str, allowed: bool
) -> None:
    assert client_id_matches(identity, client_id) is allowed


# --- Mosquitto ------------------------------------------------------------------------------


def _acl_rules(text: str) -> tuple[dict[str, set[str]], dict[str, dict[str, set[str]]]]:
    """(patterns by access, topics by user and access) from a Mosquitto ACL file."""
    patterns: dict[str, set[str]] = {"read": set(), "write": set(), "readwrite": set()}
    users: dict[str, dict[str, set[str]]] = {}
    user: str | None = None
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        keyword, *rest = line.split()
        if keyword == "user":
            user = rest[0]
            users[user] = {"read": set(), "write": set(), "readwrite": set()}
        elif keyword == "pattern":
            patterns[rest[0]].add(rest[1])
        elif keyword == "topic":
            assert user is not None, "topic lines before any user line would apply to anonymous clients"
            users[user][rest[0]].add(rest[1])
        else:
            raise AssertionError(f"unexpected ACL line {line!r}")
    return patterns, users


def test_mosquitto_acl_gives_devices_what_is_allowed_gives_them() -> None:
    patterns, _ = _acl_rules(mosquitto_acl())

    assert patterns["readwrite"] == set()
    for kind in TopicKind:
        pattern = f"sf/v1/dev/%u/{kind.value}"
        topic = device_topic("dev-a", kind)
        assert (pattern in patterns["write"]) is is_allowed(DEVICE_A, "publish", topic)
        assert (pattern in patterns["read"]) is is_allowed(DEVICE_A, "subscribe", topic)
    assert all("+" not in p and "#" not in p for p in patterns["read"] | patterns["write"])


def test_mosquitto_acl_gives_the_control_plane_the_root_and_nobody_else_anything() -> None:
    _, users = _acl_rules(mosquitto_acl())

    assert users == {CONTROL_PLANE_SERVICE: {"read": set(), "write": set(), "readwrite": {"sf/v1/#"}}}


def _settings(conf: Path) -> list[tuple[str, str]]:
    settings = []
    for line in conf.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            settings.append((key, value))
    return settings


@pytest.fixture
def ca(tmp_path: Path) -> BuiltinCA:
    return BuiltinCA.load_or_create(tmp_path / "ca", trust_domain="test.storefleet.example")


def test_mosquitto_config_requires_mtls_and_limits_sizes(tmp_path: Path, ca: BuiltinCA) -> None:
    conf = write_mosquitto_config(tmp_path / "broker", ca=ca, port=8883)
    settings = _settings(conf)
    values = dict(settings)

    assert values["per_listener_settings"] == "false"
    assert values["allow_anonymous"] == "false"
    assert values["listener"] == "8883 127.0.0.1"
    assert values["require_certificate"] == "true"
    assert values["use_identity_as_username"] == "true"
    assert values["tls_version"] == "tlsv1.2"
    assert values["message_size_limit"] == str(MAX_MESSAGE_BYTES)
    assert int(values["max_packet_size"]) > MAX_MESSAGE_BYTES
    assert values["persistence"] == "false"
    assert "user" not in values
    assert "use_username_as_clientid" not in values
    # listener options come after the listener line, global ones before it
    keys = [key for key, _ in settings]
    assert keys.index("listener") < keys.index("require_certificate")
    assert keys.index("acl_file") < keys.index("listener")
    assert Path(values["acl_file"]).read_text() == mosquitto_acl()


def test_mosquitto_config_writes_the_ca_and_a_server_identity_issued_by_it(
    tmp_path: Path, ca: BuiltinCA
) -> None:
    conf = write_mosquitto_config(
        tmp_path / "broker", ca=ca, port=8883, hostnames=["mqtt.example", "10.0.0.5"]
    )
    values = dict(_settings(conf))

    assert Path(values["cafile"]).read_text() == ca.ca_chain_pem()
    assert stat.S_IMODE(Path(values["keyfile"]).stat().st_mode) == 0o600
    certificate = x509.load_pem_x509_certificate(Path(values["certfile"]).read_bytes())
    certificate.verify_directly_issued_by(ca.certificate)
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mqtt.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_mosquitto_config_options(tmp_path: Path, ca: BuiltinCA) -> None:
    conf = write_mosquitto_config(
        tmp_path / "broker",
        ca=ca,
        port=1884,
        bind_address="0.0.0.0",
        run_as_user="root",
        max_message_bytes=1000,
        persistence_dir=tmp_path / "data",
        client_id_from_certificate=True,
    )
    values = dict(_settings(conf))

    assert values["listener"] == "1884 0.0.0.0"
    assert values["user"] == "root"
    assert values["message_size_limit"] == "1000"
    assert values["persistence"] == "true"
    assert values["persistence_location"] == f"{(tmp_path / 'data').resolve()}/"
    assert values["use_username_as_clientid"] == "true"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"port": 70000},
        {"port": 1883, "run_as_user": "root\nallow_anonymous true"},
        {"port": 1883, "max_message_bytes": 0},
    ],
)
def test_mosquitto_config_refuses_values_it_cannot_write_safely(
    tmp_path: Path, ca: BuiltinCA, kwargs: dict[str, object]
) -> None:
    with pytest.raises(ValueError):
        write_mosquitto_config(tmp_path / "broker", ca=ca, **kwargs)  # type: ignore[arg-type]
