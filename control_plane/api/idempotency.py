"""Idempotency-Key for POSTs: a retried request gets the first answer, not a second effect.

A client that may retry (timeouts, a lost connection) sends ``Idempotency-Key: <unique
string>`` with its POST. The first request runs and its answer (status, body, ETag/Location
headers) is stored under (caller, key); a retry with the same key and the same request gets
that answer again with ``Idempotency-Replayed: true``. The same key with a different request
is 422 ``idempotency_key_reused``; a retry while the first is still running is 409
``idempotency_in_progress``. Answers of 5xx are not kept, so such a request can be retried.
The caller is the hash of its credential: keys of different operators never collide, and no
secret is stored: enrollment-token secrets in an answer are replaced before it is kept (a
replay says so with ``Idempotency-Secrets-Redacted: true``). Keys are kept for `retention` (24 h by default).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from control_plane.api.errors import error_body
from control_plane.clock import Clock, utc_now
from control_plane.db.schema import idempotency_keys

logger = logging.getLogger(__name__)

HEADER = b"idempotency-key"
_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")  # visible ASCII, like a token
_KEPT_HEADERS = (b"content-type", b"etag", b"location")
_IN_PROGRESS = 0
_PURGE_EVERY = 500
# Values that must never be stored: enrollment token secrets (control_plane.enrollment.service
# TOKEN_PREFIX). A replayed answer shows REDACTED in their place.
SECRET_PREFIXES = ("sfe_",)
REDACTED = "(secret shown once; not replayed)"


class IdempotencyMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        engine: AsyncEngine,
        retention: timedelta = timedelta(hours=24),
        clock: Clock = utc_now,
    ) -> None:
        self.app = app
        self._engine = engine
        self._retention = retention
        self._clock = clock
        self._inserts = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        key_bytes = headers.get(HEADER)
        credential = headers.get(b"authorization")
        if key_bytes is None or credential is None:
            # No key: nothing to do. No credential: the route refuses it (401) anyway.
            await self.app(scope, receive, send)
            return
        key = key_bytes.decode("latin-1")
        if not _KEY.match(key):
            await _answer(
                send, 422, error_body("invalid_request", "Idempotency-Key: 1 to 200 visible ASCII characters")
            )
            return
        body = await _read_body(receive)
        actor = hashlib.sha256(credential).hexdigest()
        path = scope["path"] + (
            "?" + scope["query_string"].decode("latin-1") if scope["query_string"] else ""
        )
        request_hash = hashlib.sha256(b"POST " + path.encode() + b"\n" + body).hexdigest()

        claimed, stored = await self._claim(actor, key, path, request_hash)
        if not claimed:
            await self._replay(send, stored, request_hash)
            return

        captured: dict[str, Any] = {"status": 500, "headers": [], "body": bytearray()}

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                captured["status"] = message["status"]
                captured["headers"] = [
                    (k, v) for k, v in message.get("headers", []) if k.lower() in _KEPT_HEADERS
                ]
            elif message["type"] == "http.response.body":
                captured["body"].extend(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, _replaying(body, receive), capture)
        finally:
            await self._finish(actor, key, captured)

    async def _claim(self, actor: str, key: str, path: str, request_hash: str) -> tuple[bool, Any]:
        """Record the key as in progress → (True, None); if it is known already → (False, its
        row, or None if that request has just been dropped after a 5xx)."""
        now = self._clock()
        self._inserts += 1
        try:
            async with self._engine.begin() as conn:
                if self._inserts % _PURGE_EVERY == 1:
                    await conn.execute(
                        idempotency_keys.delete().where(idempotency_keys.c.created_at < now - self._retention)
                    )
                await conn.execute(
                    idempotency_keys.insert().values(
                        actor=actor,
                        key=key,
                        method="POST",
                        path=path[:500],
                        request_hash=request_hash,
                        status_code=_IN_PROGRESS,
                        response=None,
                        created_at=now,
                    )
                )
        except IntegrityError:
            known = sa.select(idempotency_keys).where(
                idempotency_keys.c.actor == actor, idempotency_keys.c.key == key
            )
            async with self._engine.connect() as conn:
                return False, (await conn.execute(known)).first()
        return True, None

    async def _replay(self, send: Send, row: Any, request_hash: str) -> None:
        if row is None or row.status_code == _IN_PROGRESS:
            await _answer(
                send,
                409,
                error_body("idempotency_in_progress", "a request with this Idempotency-Key is still running"),
            )
            return
        if row.request_hash != request_hash:
            await _answer(
                send,
                422,
                error_body("idempotency_key_reused", "this Idempotency-Key was used for a different request"),
            )
            return
        stored = row.response or {}
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in stored.get("headers", [])]
        headers.append((b"idempotency-replayed", b"true"))
        if stored.get("redacted"):
            headers.append((b"idempotency-secrets-redacted", b"true"))
        body = stored.get("body", "").encode()
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": row.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _finish(self, actor: str, key: str, captured: dict[str, Any]) -> None:
        where = sa.and_(idempotency_keys.c.actor == actor, idempotency_keys.c.key == key)
        try:
            async with self._engine.begin() as conn:
                if captured["status"] >= 500:
                    await conn.execute(idempotency_keys.delete().where(where))
                    return
                body, redacted = _without_secrets(bytes(captured["body"]).decode("utf-8", errors="replace"))
                response = {
                    "headers": [(k.decode("latin-1"), v.decode("latin-1")) for k, v in captured["headers"]],
                    "body": body,
                    "redacted": redacted,
                }
                await conn.execute(
                    idempotency_keys.update()
                    .where(where)
                    .values(status_code=captured["status"], response=response)
                )
        except Exception:
            logger.exception("could not record the answer for an Idempotency-Key; a retry will run again")
            async with self._engine.begin() as conn:
                await conn.execute(idempotency_keys.delete().where(where))


def _without_secrets(body: str) -> tuple[str, bool]:
    """The answer as it may be stored: secrets shown once (enrollment tokens) are replaced.

    A replay then carries everything but the secret (the ids to revoke and re-issue with)."""
    if not any(prefix in body for prefix in SECRET_PREFIXES):
        return body, False
    try:
        document = json.loads(body)
    except ValueError:
        return "", True  # not JSON but holds a secret: keep nothing of it

    def scrub(value: Any) -> Any:
        if isinstance(value, str) and value.startswith(SECRET_PREFIXES):
            return REDACTED
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [scrub(v) for v in value]
        return value

    return json.dumps(scrub(document)), True


async def _read_body(receive: Receive) -> bytes:
    chunks = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.extend(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return bytes(chunks)


def _replaying(body: bytes, original: Receive) -> Receive:
    """The body we already read, then whatever the client does next (e.g. disconnect)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await original()

    return receive


async def _answer(send: Send, status: int, payload: dict[str, object]) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
