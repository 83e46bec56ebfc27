"""Canonical JSON and ES256 (ECDSA P-256 / SHA-256) signatures for desired state.

The signature covers the canonical JSON of the whole document except `sig`: keys sorted,
no insignificant white space, UTF-8, no NaN. The receiver verifies the document exactly as
received (a dict), so fields a newer control plane adds stay covered.

This module needs `cryptography`, a dependency of both the agent and the control plane;
it is the one place in `protocol/` that does.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from protocol.errors import InvalidMessage, SignatureInvalid, UnknownSigningKey

SIGNATURE_FIELD = "sig"
KEY_ID_FIELD = "kid"


def canonical_json(document: Mapping[str, Any]) -> bytes:
    try:
        return json.dumps(
            document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode()
    except ValueError as exc:
        raise InvalidMessage(f"document is not canonicalisable: {exc}") from None


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "es256-" + hashlib.sha256(spki).hexdigest()[:16]


def load_public_key(pem: str) -> ec.EllipticCurvePublicKey:
    key = serialization.load_pem_public_key(pem.encode())
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise InvalidMessage("config-signing key must be an EC P-256 public key")
    return key


def _signed_bytes(document: Mapping[str, Any]) -> bytes:
    return canonical_json({k: v for k, v in document.items() if k != SIGNATURE_FIELD})


def sign_document(document: Mapping[str, Any], private_key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    """Return a copy of `document` with `kid` set and `sig` over everything else."""
    signed = {k: v for k, v in document.items() if k != SIGNATURE_FIELD}
    signed[KEY_ID_FIELD] = key_id(private_key.public_key())
    signature = private_key.sign(_signed_bytes(signed), ec.ECDSA(hashes.SHA256()))
    signed[SIGNATURE_FIELD] = base64.urlsafe_b64encode(signature).rstrip(b"=").decode()
    return signed


def verify_document(
    document: Mapping[str, Any], trusted_keys: Mapping[str, ec.EllipticCurvePublicKey]
) -> None:
    """Raise unless `document` carries a valid signature by one of `trusted_keys` (by kid)."""
    kid = document.get(KEY_ID_FIELD)
    sig = document.get(SIGNATURE_FIELD)
    if not isinstance(kid, str) or not isinstance(sig, str) or not sig:
        raise SignatureInvalid("document is not signed")
    public_key = trusted_keys.get(kid)
    if public_key is None:
        raise UnknownSigningKey(kid)
    try:
        signature = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
    except (binascii.Error, ValueError):
        raise SignatureInvalid("signature is not base64url") from None
    try:
        public_key.verify(signature, _signed_bytes(document), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureInvalid("signature does not verify") from None
