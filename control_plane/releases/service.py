"""Create and read releases. A release never changes once created: a rollout, its rollback
and the audit trail all refer to exactly what was approved."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from control_plane.audit import AuditEvent, AuditLog, Outcome
from control_plane.clock import Clock, utc_now
from control_plane.db.schema import releases
from control_plane.errors import Conflict, InvalidInput, NotFound
from control_plane.releases.models import ReleaseCreate, ReleaseView
from protocol.messages import MAX_MESSAGE_BYTES
from protocol.signing import canonical_json

# A release rides inside every desired-state document of its devices: leave room for the rest.
MAX_LAYER_BYTES = MAX_MESSAGE_BYTES // 4
MAX_DEPTH = 16


def validate_layer(layer: Mapping[str, Any]) -> None:
    """What the schema cannot say: size, nesting, policy names (agent policies are flat
    name → value settings; there is no per-handler schema in the agent yet)."""
    size = len(canonical_json(dict(layer)))
    if size > MAX_LAYER_BYTES:
        raise InvalidInput(f"field 'layer': {size} bytes, at most {MAX_LAYER_BYTES}")
    if _depth(layer) > MAX_DEPTH:
        raise InvalidInput(f"field 'layer': nested deeper than {MAX_DEPTH} levels")
    for name in layer.get("policies") or {}:
        if (
            not name
            or len(name) > 64
            or not name.replace("_", "").replace("-", "").replace(".", "").isalnum()
        ):
            raise InvalidInput(f"field 'layer.policies.{name}': policy names are letters, digits, _ - .")
    if not any(layer.get(section) for section in ("config", "policies", "checks")):
        raise InvalidInput("field 'layer': a release must change something")


def _depth(value: Any) -> int:
    if isinstance(value, Mapping):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


class ReleaseService:
    def __init__(self, *, engine: AsyncEngine, audit: AuditLog, clock: Clock = utc_now) -> None:
        self._engine = engine
        self._audit = audit
        self._clock = clock

    async def create(self, request: ReleaseCreate, *, actor: str) -> ReleaseView:
        layer = request.layer.as_layer()
        validate_layer(layer)
        release_id = request.id or f"rel-{secrets.token_hex(6)}"
        row: dict[str, Any] = {
            "id": release_id,
            "name": request.name,
            "notes": request.notes,
            "layer": layer,
            "created_by": actor,
            "created_at": self._clock(),
        }
        try:
            async with self._engine.begin() as conn:
                await conn.execute(releases.insert().values(**row))
                await self._audit.record(
                    AuditEvent(
                        action="release.create", outcome=Outcome.SUCCESS, actor=actor, target=release_id
                    ),
                    connection=conn,
                )
        except IntegrityError as exc:
            raise Conflict(f"release {row['id']!r} exists already (releases are immutable)") from exc
        return ReleaseView(**row)

    async def get(self, release_id: str) -> ReleaseView:
        async with self._engine.connect() as conn:
            row = (await conn.execute(sa.select(releases).where(releases.c.id == release_id))).first()
        if row is None:
            raise NotFound(f"release {release_id!r} does not exist", code="release_not_found")
        return ReleaseView(**row._mapping)

    async def recent(self, *, limit: int = 100) -> list[ReleaseView]:
        async with self._engine.connect() as conn:
            rows = await conn.execute(sa.select(releases).order_by(releases.c.created_at.desc()).limit(limit))
            return [ReleaseView(**row._mapping) for row in rows]
