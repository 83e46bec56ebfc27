import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import ConfigurationError, StateError
from agent.identity import (
    build_csr,
    common_name,
    fingerprint,
    fingerprint_matches,
    generate_key,
    load_certificates,
    load_private_key,
    matches_key,
    normalise_fingerprint,
    private_key_pem,
)


def test_generated_key_is_p256_and_round_trips_through_pem():
    key = generate_key()
    assert isinstance(key.curve, ec.SECP256R1)
    assert load_private_key(private_key_pem(key)).private_numbers() == key.private_numbers()


def test_csr_is_signed_by_the_key_and_carries_only_a_hint():
    key = generate_key()
    csr = x509.load_pem_x509_csr(build_csr(key, common_name_hint="till-3.store.local").encode())
    assert csr.is_signature_valid
    assert csr.public_key() == key.public_key()
    assert csr.subject.rfc4514_string() == "CN=till-3.store.local"


def test_csr_hint_is_trimmed_to_a_valid_common_name():
    key = generate_key()
    long = x509.load_pem_x509_csr(build_csr(key, common_name_hint="x" * 300).encode())
    empty = x509.load_pem_x509_csr(build_csr(key, common_name_hint="  ").encode())
    assert len(long.subject.rfc4514_string()) == len("CN=") + 64
    assert empty.subject.rfc4514_string() == "CN=storefleet-agent"


def test_certificate_must_match_the_device_key(ca):
    key, other = generate_key(), generate_key()
    cert = ca.issue(key.public_key(), "dev-0001")
    assert matches_key(cert, key)
    assert not matches_key(cert, other)
    assert common_name(cert) == "dev-0001"


def test_fingerprint_is_sha256_of_der_and_accepts_operator_spellings(ca):
    value = fingerprint(ca.cert)
    assert value.startswith("sha256:")
    assert len(value) == len("sha256:") + 64
    hex_digest = value.removeprefix("sha256:")
    colons = ":".join(hex_digest[i : i + 2] for i in range(0, 64, 2)).upper()
    assert normalise_fingerprint("SHA256:" + colons) == value
    assert fingerprint_matches(ca.cert, "sha256:" + colons)
    assert not fingerprint_matches(ca.cert, "sha256:" + "0" * 64)


@pytest.mark.parametrize("bad", ["", "abcd", "sha1:" + "a" * 40, "sha256:" + "g" * 64, "sha256:" + "a" * 63])
def test_malformed_fingerprints_are_refused(bad):
    with pytest.raises(ConfigurationError, match="sha256:<64 hex digits>"):
        normalise_fingerprint(bad)


def test_bundle_loads_in_order_and_garbage_is_refused(ca):
    from tests.unit.agent.factories import LocalCA

    other = LocalCA.create("other")
    assert load_certificates(ca.pem + other.pem) == [ca.cert, other.cert]
    with pytest.raises(StateError):
        load_certificates("not a certificate")


def test_unreadable_or_wrong_type_key_is_a_state_error():
    with pytest.raises(StateError, match="unreadable"):
        load_private_key(b"garbage")
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(StateError, match="P-256"):
        load_private_key(private_key_pem(p384))
