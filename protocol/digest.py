"""`Content-Digest` (RFC 9530) with SHA-256: how an agent's upload proves it arrived intact.

The agent sends ``Content-Digest: sha-256=:<base64 of the SHA-256>:``; the control plane
recomputes it over the bytes it received and refuses the upload on a mismatch.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

HEADER = "Content-Digest"
_ALGORITHM = "sha-256"


def content_digest(data: bytes) -> str:
    """The header value for `data`."""
    return sha256_content_digest(hashlib.sha256(data).hexdigest())


def sha256_content_digest(sha256_hex: str) -> str:
    """The header value for a SHA-256 known as hex (of a stored file)."""
    return f"{_ALGORITHM}=:{base64.b64encode(bytes.fromhex(sha256_hex)).decode()}:"


def declared_sha256(header: str) -> str:
    """The SHA-256 (hex) a `Content-Digest` header declares. Other algorithms in the
    dictionary are ignored; a header without a well-formed sha-256 member raises ValueError."""
    for member in header.split(","):
        name, separator, value = member.strip().partition("=")
        if name.strip().lower() != _ALGORITHM:
            continue
        value = value.strip()
        if not separator or len(value) < 2 or value[0] != ":" or value[-1] != ":":
            raise ValueError("the sha-256 member must be a byte sequence (:base64:)")
        try:
            digest = base64.b64decode(value[1:-1], validate=True)
        except binascii.Error:
            raise ValueError("the sha-256 member is not valid base64") from None
        if len(digest) != hashlib.sha256().digest_size:
            raise ValueError(f"the sha-256 member is {len(digest)} bytes, not 32")
        return digest.hex()
    raise ValueError("no sha-256 member (the only algorithm accepted)")
