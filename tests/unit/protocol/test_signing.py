import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from protocol.errors import InvalidMessage, SignatureInvalid, UnknownSigningKey
from protocol.signing import canonical_json, key_id, sign_document, verify_document


@pytest.fixture
def key():
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def trusted(key):
    return {key_id(key.public_key()): key.public_key()}


DOC = {"schema": 1, "device_id": "dev-abc", "version": 3, "config": {"b": 1, "a": [1, 2]}}


def test_canonical_json_sorts_keys_and_strips_whitespace():
    assert canonical_json({"b": 1, "a": {"d": 2, "c": "é"}}) == '{"a":{"c":"é","d":2},"b":1}'.encode()


def test_canonical_json_refuses_nan():
    with pytest.raises(InvalidMessage):
        canonical_json({"x": float("nan")})


def test_signed_document_verifies(key, trusted):
    verify_document(sign_document(DOC, key), trusted)


def test_signature_survives_json_round_trip_with_other_key_order(key, trusted):
    signed = sign_document(DOC, key)
    reordered = json.loads(json.dumps(dict(reversed(list(signed.items()))), indent=4))
    verify_document(reordered, trusted)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda d: d.update(version=4),
        lambda d: d["config"].update(b=2),
        lambda d: d.update(extra_field="added later"),
        lambda d: d.pop("device_id"),
    ],
)
def test_any_change_breaks_the_signature(key, trusted, tamper):
    signed = json.loads(json.dumps(sign_document(DOC, key)))
    tamper(signed)
    with pytest.raises(SignatureInvalid):
        verify_document(signed, trusted)


def test_unknown_key_id_is_refused(key):
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(UnknownSigningKey):
        verify_document(sign_document(DOC, key), {key_id(other.public_key()): other.public_key()})


def test_key_id_cannot_be_swapped_to_another_trusted_key(key):
    other = ec.generate_private_key(ec.SECP256R1())
    signed = sign_document(DOC, key)
    signed["kid"] = key_id(other.public_key())
    with pytest.raises(SignatureInvalid):
        verify_document(
            signed,
            {key_id(other.public_key()): other.public_key(), key_id(key.public_key()): key.public_key()},
        )


@pytest.mark.parametrize("sig", ["", "!!!not-base64!!!", "AAAA"])
def test_unsigned_or_garbled_signature_is_refused(key, trusted, sig):
    signed = sign_document(DOC, key)
    signed["sig"] = sig
    with pytest.raises(SignatureInvalid):
        verify_document(signed, trusted)
