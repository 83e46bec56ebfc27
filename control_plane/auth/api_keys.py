"""Operator API keys.

Keys are 256-bit random strings, so a plain SHA-256 is a sound way to store them (no
password stretching needed). The admin key is created at first start, printed once and
written to `<data>/admin.key` (0600); or it is given by `STOREFLEET_ADMIN_KEY`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from control_plane.clock import Clock, utc_now
from control_plane.db.schema import api_keys
from control_plane.errors import AuthenticationFailed
from control_plane.pki.files import write_private

KEY_PREFIX = "sfk_"
ADMIN_KEY_FILE = "admin.key"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class Operator:
    key_id: str
    name: str
    role: str


class ApiKeys:
    def __init__(self, engine: AsyncEngine, *, clock: Clock = utc_now) -> None:
        self._engine = engine
        self._clock = clock

    async def ensure_admin(self, data_dir: Path, given: str | None) -> str | None:
        """Make sure an admin key exists. Return the new key when one was generated now."""
        async with self._engine.begin() as conn:
            if given is not None:
                await conn.execute(sa.delete(api_keys).where(api_keys.c.id == "admin"))
                await conn.execute(
                    api_keys.insert().values(
                        id="admin",
                        name="admin",
                        key_hash=hash_secret(given),
                        role="admin",
                        created_at=self._clock(),
                    )
                )
                return None
            existing = await conn.scalar(sa.select(api_keys.c.id).where(api_keys.c.id == "admin"))
            if existing is not None:
                return None
            key = new_secret(KEY_PREFIX)
            await conn.execute(
                api_keys.insert().values(
                    id="admin",
                    name="admin",
                    key_hash=hash_secret(key),
                    role="admin",
                    created_at=self._clock(),
                )
            )
        write_private(data_dir / ADMIN_KEY_FILE, (key + "\n").encode())
        return key

    async def authenticate(self, presented: str) -> Operator:
        digest = hash_secret(presented)
        async with self._engine.connect() as conn:
            row = (await conn.execute(sa.select(api_keys).where(api_keys.c.key_hash == digest))).first()
        # compare_digest keeps the final check constant-time; the lookup is by a hash anyway.
        if row is None or not hmac.compare_digest(row.key_hash, digest):
            raise AuthenticationFailed("invalid API key")
        return Operator(key_id=row.id, name=row.name, role=row.role)
