"""Content-Digest (RFC 9530, sha-256): what the agent sends and the control plane checks."""

from __future__ import annotations

import hashlib

import pytest

from protocol.digest import content_digest, declared_sha256, sha256_content_digest


def test_the_header_declares_the_sha256_of_the_bytes():
    header = content_digest(b"hello world")
    # The RFC 9530 example form: the base64 of the raw digest between colons.
    assert header == "sha-256=:uU0nuZNNPgilLlLX2n2r+sSE7+N6U4DukIj3rOLvzek=:"
    assert declared_sha256(header) == hashlib.sha256(b"hello world").hexdigest()
    assert sha256_content_digest(hashlib.sha256(b"hello world").hexdigest()) == header


def test_other_algorithms_in_the_dictionary_are_ignored():
    header = "sha-512=:AAAA:, SHA-256=:uU0nuZNNPgilLlLX2n2r+sSE7+N6U4DukIj3rOLvzek=:"
    assert declared_sha256(header) == hashlib.sha256(b"hello world").hexdigest()


@pytest.mark.parametrize(
    ("header", "says"),
    [
        ("md5=:AAAA:", "no sha-256 member"),
        ("sha-256=uU0nuZNNPgilLlLX2n2r+sSE7+N6U4DukIj3rOLvzek=", "byte sequence"),
        ("sha-256=:not base64!:", "not valid base64"),
        ("sha-256=:AAAA:", "3 bytes, not 32"),
        ("", "no sha-256 member"),
    ],
)
def test_a_malformed_header_is_refused_saying_why(header: str, says: str):
    with pytest.raises(ValueError, match=says):
        declared_sha256(header)
