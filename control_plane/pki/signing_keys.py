"""Config-signing keys: the control plane signs every desired state (and command) with the
active key; agents trust every key of the keyring.

Keys live in ``<data>/pki/signing/<kid>.key`` (0600); ``active`` names the signing one (a
keyring without it — written before rotation existed — signs with its newest key). Rotation,
with no window in which a device meets a signature it cannot check:

1. `add()` a key: trusted, not yet signing. The trusted set is part of every desired state
   (`signing_keys`), so each device gets a new version, signed by the old key, that tells it
   to trust the new one too.
2. `activate(kid)` once devices are in sync: from now on documents are signed by the new key.
3. `retire(kid)` the old key: the next version tells devices to drop it. The file moves to
   ``retired/`` (kept for audit, never loaded again).
"""

from __future__ import annotations

import threading
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from control_plane.errors import Conflict, NotFound
from control_plane.pki.files import write_private, write_public
from protocol.messages import SigningKey
from protocol.signing import key_id

ACTIVE_FILE = "active"
RETIRED_DIR = "retired"


def _public_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


class SigningKeyring:
    def __init__(
        self,
        keys: list[ec.EllipticCurvePrivateKey],
        *,
        active_kid: str | None = None,
        directory: Path | None = None,
    ) -> None:
        if not keys:
            raise ValueError("a keyring needs at least one key")
        self._keys = {key_id(key.public_key()): key for key in keys}
        self._active = active_kid if active_kid in self._keys else key_id(keys[-1].public_key())
        self._directory = directory
        self._lock = threading.Lock()

    @classmethod
    def load_or_create(cls, directory: Path) -> SigningKeyring:
        paths = sorted(directory.glob("*.key"), key=lambda p: p.stat().st_mtime) if directory.exists() else []
        keys: list[ec.EllipticCurvePrivateKey] = []
        for path in paths:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if isinstance(key, ec.EllipticCurvePrivateKey):
                keys.append(key)
        if not keys:
            keys.append(_new_key(directory))
        marker = directory / ACTIVE_FILE
        active = marker.read_text().strip() if marker.exists() else None
        return cls(keys, active_kid=active, directory=directory)

    @property
    def active(self) -> ec.EllipticCurvePrivateKey:
        return self._keys[self._active]

    @property
    def active_kid(self) -> str:
        return self._active

    def public_keys(self) -> list[SigningKey]:
        """Every trusted key (handed to agents at enrollment)."""
        return [SigningKey(kid=kid, public_key_pem=_public_pem(key)) for kid, key in self._keys.items()]

    def trusted(self) -> dict[str, str]:
        """kid → public key PEM of every trusted key (the `signing_keys` of a desired state)."""
        return {kid: _public_pem(key) for kid, key in sorted(self._keys.items())}

    def add(self) -> str:
        """A new trusted key that does not sign yet; returns its kid."""
        with self._lock:
            directory = self._require_directory()
            # Pin the signing key first: without the marker a restart would sign with the newest.
            write_public(directory / ACTIVE_FILE, self._active.encode())
            key = _new_key(directory)
            kid = key_id(key.public_key())
            self._keys[kid] = key
            return kid

    def activate(self, kid: str) -> None:
        with self._lock:
            if kid not in self._keys:
                raise NotFound(f"signing key {kid!r} is not in the keyring", code="signing_key_not_found")
            write_public(self._require_directory() / ACTIVE_FILE, kid.encode())
            self._active = kid

    def retire(self, kid: str) -> None:
        with self._lock:
            if kid not in self._keys:
                raise NotFound(f"signing key {kid!r} is not in the keyring", code="signing_key_not_found")
            if kid == self._active:
                raise Conflict(
                    "the active signing key cannot be retired; activate another first", code="key_active"
                )
            directory = self._require_directory()
            retired = directory / RETIRED_DIR
            retired.mkdir(mode=0o700, exist_ok=True)
            (directory / f"{kid}.key").replace(retired / f"{kid}.key")
            del self._keys[kid]

    def _require_directory(self) -> Path:
        if self._directory is None:
            raise RuntimeError("this keyring is not backed by a directory")
        return self._directory


def _new_key(directory: Path) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())
    write_private(
        directory / f"{key_id(key.public_key())}.key",
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return key
