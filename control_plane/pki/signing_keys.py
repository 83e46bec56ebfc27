"""Config-signing keys: the control plane signs every desired state with the active key.

Keys live in ``<data>/pki/signing/<kid>.key`` (0600). The newest is active; all present keys
are handed to agents at enrollment so a rotation can overlap.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from control_plane.pki.files import write_private
from protocol.messages import SigningKey
from protocol.signing import key_id


class SigningKeyring:
    def __init__(self, keys: list[ec.EllipticCurvePrivateKey]) -> None:
        if not keys:
            raise ValueError("a keyring needs at least one key")
        self._keys = keys

    @classmethod
    def load_or_create(cls, directory: Path) -> SigningKeyring:
        paths = sorted(directory.glob("*.key"), key=lambda p: p.stat().st_mtime) if directory.exists() else []
        keys: list[ec.EllipticCurvePrivateKey] = []
        for path in paths:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if isinstance(key, ec.EllipticCurvePrivateKey):
                keys.append(key)
        if not keys:
            key = ec.generate_private_key(ec.SECP256R1())
            write_private(
                directory / f"{key_id(key.public_key())}.key",
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
            )
            keys.append(key)
        return cls(keys)

    @property
    def active(self) -> ec.EllipticCurvePrivateKey:
        return self._keys[-1]

    def public_keys(self) -> list[SigningKey]:
        return [
            SigningKey(
                kid=key_id(key.public_key()),
                public_key_pem=key.public_key()
                .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
                .decode(),
            )
            for key in self._keys
        ]
