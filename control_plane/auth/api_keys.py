"""Operator API keys.

Keys are 256-bit random strings, so a plain SHA-256 is a sound way to store them (no
password stretching needed). The admin key is created at first start, printed once and
written to `<data>/admin.key` (0600); or it is given by `STOREFLEET_ADMIN_KEY`.

Every operator request authenticates, so the keys are looked up in memory: a snapshot of
all key hashes (there are few keys), loaded again when it is `cache_ttl` old and when a
presented key is not in it (a key created a moment ago works at once). A key deleted or
replaced in the database, by this replica or another, stops working within `cache_ttl`.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Callable
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
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        read_engine: AsyncEngine | None = None,
        clock: Clock = utc_now,
        cache_ttl: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._read_engine = read_engine or engine
        self._clock = clock
        self._cache_ttl = cache_ttl
        self._monotonic = monotonic
        self._by_hash: dict[str, Operator] = {}
        self._loaded_at: float | None = None
        self._loading: asyncio.Future[None] | None = None

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
                self._loaded_at = None  # the old admin key must stop working now
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
        loaded_at = self._loaded_at
        if loaded_at is None or self._monotonic() - loaded_at >= self._cache_ttl:
            await self._reload()
        operator = self._by_hash.get(digest)
        if operator is None and self._loaded_at == loaded_at:
            await self._reload()  # perhaps a key made since the snapshot
            operator = self._by_hash.get(digest)
        # The lookup is by SHA-256 of a 256-bit key: timing tells nothing about a valid key.
        if operator is None:
            raise AuthenticationFailed("invalid API key")
        return operator

    async def _reload(self) -> None:
        """Load every key hash; concurrent callers share one query."""
        if self._loading is not None:
            await asyncio.shield(self._loading)
            return
        self._loading = asyncio.get_running_loop().create_future()
        try:
            started = self._monotonic()
            async with self._read_engine.connect() as conn:
                rows = (
                    await conn.execute(
                        sa.select(api_keys.c.id, api_keys.c.name, api_keys.c.role, api_keys.c.key_hash)
                    )
                ).all()
            self._by_hash = {r.key_hash: Operator(key_id=r.id, name=r.name, role=r.role) for r in rows}
            self._loaded_at = started
            self._loading.set_result(None)
        except asyncio.CancelledError:
            self._loading.cancel()
            raise
        except Exception as exc:
            self._loading.set_exception(exc)
            self._loading.exception()  # mark retrieved: the waiters re-raise it
            raise
        finally:
            self._loading = None
