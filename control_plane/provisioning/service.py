"""Provisioning rules at the API's edge: start a saga (inside the store's creation), show it,
cancel it, re-issue its tokens, read the store timeline. The worker (`worker.py`) moves it.

Tokens: one per role of the manifest, scoped to that role, with `max_uses` = the role's
count and expiring at the saga's deadline. Their secrets are returned once, in the answer
that created the store (or by `reissue_tokens`, which revokes the old ones); only hashes are
stored, as for every enrollment token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from control_plane.audit import AuditEvent, AuditLog, Outcome
from control_plane.clock import Clock, utc_now
from control_plane.db.schema import devices, enrollment_tokens, store_events, store_provisioning, stores
from control_plane.enrollment.models import TokenCreate, TokenCreated, TokenView
from control_plane.enrollment.service import EnrollmentService
from control_plane.errors import Conflict, NotFound
from control_plane.provisioning.models import ProvisioningView, StoreEvent, StoreEventPage
from control_plane.provisioning.saga import (
    ACTIVE,
    FORWARD,
    SagaState,
    device_facts,
    role_progress,
)

logger = logging.getLogger(__name__)

MAX_EVENTS_PAGE = 1000
MAX_TOKEN_TTL = timedelta(days=30)  # what an enrollment token may live (TokenCreate.ttl_hours)


async def record_events(
    conn: AsyncConnection, store_id: str, at: datetime, events: list[tuple[str, dict[str, Any]]]
) -> None:
    """Append to a store's timeline inside the caller's transaction."""
    if events:
        await conn.execute(
            store_events.insert(),
            [{"store_id": store_id, "at": at, "kind": kind, "detail": detail} for kind, detail in events],
        )


# A device enrolled this long ago without a desired state lost the publisher's request (a
# crash right after its enrollment committed): the worker asks again. Younger ones are on their way.
REFRESH_GRACE = timedelta(seconds=5)


def device_columns(*, now: datetime, offline_after: timedelta) -> tuple[sa.ColumnElement[Any], ...]:
    """What the saga reads of a device, with the flags computed in SQL (no JSON or datetime
    decoding per row in Python: a pass reads every device of every store in provisioning)."""
    return (
        devices.c.id,
        devices.c.store_id,
        devices.c.role,
        devices.c.desired_version,
        devices.c.applied_version,
        devices.c.apply_status,
        devices.c.health_status,
        devices.c.health["healthy"].as_boolean().label("reported_healthy"),
        sa.and_(devices.c.online, devices.c.last_seen_at >= now - offline_after).label("online"),
        (devices.c.enrolled_at < now - REFRESH_GRACE).label("overdue"),
    )


class ProvisioningService:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        enrollment: EnrollmentService,
        audit: AuditLog,
        timeout: timedelta,
        offline_after: timedelta,
        clock: Clock = utc_now,
    ) -> None:
        self._engine = engine
        self._enrollment = enrollment
        self._audit = audit
        self._timeout = timeout
        self._offline_after = offline_after
        self._clock = clock
        # Set by the runtime: wakes the worker (a new saga, a cancel).
        self.on_change: Callable[[], None] = lambda: None

    async def start(
        self,
        conn: AsyncConnection,
        *,
        store_id: str,
        expected: Mapping[str, int],
        template: tuple[str, int] | None,
        now: datetime,
        actor: str,
    ) -> list[TokenCreated]:
        """Create the saga and its tokens in the store's creation transaction; return the tokens."""
        deadline = now + self._timeout
        ttl_hours = min(self._timeout, MAX_TOKEN_TTL).total_seconds() / 3600
        tokens = [
            await self._enrollment.issue_token(
                conn, store_id, TokenCreate(role=role, max_uses=count, ttl_hours=ttl_hours), actor=actor
            )
            for role, count in sorted(expected.items())
        ]
        await conn.execute(
            store_provisioning.insert().values(
                store_id=store_id,
                state=SagaState.WAITING_ENROLLMENT.value,
                expected=dict(expected),
                token_ids=[token.id for token in tokens],
                started_at=now,
                updated_at=now,
                deadline_at=deadline,
                progress={},
            )
        )
        created: dict[str, Any] = {"expected": dict(expected), "deadline_at": deadline.isoformat()}
        if template is not None:
            created |= {"template_id": template[0], "template_version": template[1]}
        await record_events(
            conn,
            store_id,
            now,
            [
                ("created", created),
                (
                    "tokens_issued",
                    {"tokens": [{"id": t.id, "role": t.role, "max_uses": t.max_uses} for t in tokens]},
                ),
            ],
        )
        return tokens

    async def get(self, store_id: str) -> ProvisioningView:
        async with self._engine.connect() as conn:
            return await self._view(conn, store_id)

    async def cancel(self, store_id: str, *, actor: str) -> ProvisioningView:
        """Ask for compensation; the worker carries it out. Repeating a cancel is harmless."""
        async with self._engine.begin() as conn:
            saga = await self._locked(conn, store_id)
            state = SagaState(saga.state)
            if state is SagaState.READY:
                raise Conflict(
                    f"store {store_id!r} is ready: provisioning is over (decommission its devices instead)",
                    code="provisioning_finished",
                )
            if state in FORWARD:
                now = self._clock()
                await conn.execute(
                    sa.update(store_provisioning)
                    .where(store_provisioning.c.store_id == store_id)
                    .values(state=SagaState.CANCELLING.value, updated_at=now)
                )
                await record_events(
                    conn, store_id, now, [("cancel_requested", {"by": actor, "from": state.value})]
                )
                await self._audit.record(
                    AuditEvent(
                        action="store.provisioning_cancel",
                        outcome=Outcome.SUCCESS,
                        actor=actor,
                        target=store_id,
                        detail={"from": state.value},
                    ),
                    connection=conn,
                )
            view = await self._view(conn, store_id)
        self.on_change()
        return view

    async def reissue_tokens(self, store_id: str, *, actor: str) -> list[TokenCreated]:
        """Revoke the saga's tokens and issue new ones for the devices still missing per role
        (for secrets that were lost, or a device that must be replaced mid-way)."""
        async with self._engine.begin() as conn:
            saga = await self._locked(conn, store_id)
            if SagaState(saga.state) not in FORWARD:
                raise Conflict(
                    f"store {store_id!r} is {saga.state}: no tokens to re-issue",
                    code="provisioning_not_active",
                )
            now = self._clock()
            enrolled: dict[str | None, int] = dict(
                (
                    await conn.execute(
                        sa.select(devices.c.role, sa.func.count())
                        .where(devices.c.store_id == store_id, devices.c.state == "active")
                        .group_by(devices.c.role)
                    )
                ).all()
            )
            revoked = await conn.execute(
                sa.update(enrollment_tokens)
                .where(enrollment_tokens.c.id.in_(saga.token_ids), enrollment_tokens.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            remaining = {
                role: count - int(enrolled.get(role, 0))
                for role, count in saga.expected.items()
                if count > int(enrolled.get(role, 0))
            }
            ttl = saga.deadline_at - now if saga.deadline_at is not None else self._timeout
            ttl_hours = max(min(ttl, MAX_TOKEN_TTL).total_seconds() / 3600, 1 / 3600)
            tokens = [
                await self._enrollment.issue_token(
                    conn, store_id, TokenCreate(role=role, max_uses=count, ttl_hours=ttl_hours), actor=actor
                )
                for role, count in sorted(remaining.items())
            ]
            await conn.execute(
                sa.update(store_provisioning)
                .where(store_provisioning.c.store_id == store_id)
                .values(token_ids=[*saga.token_ids, *(t.id for t in tokens)], updated_at=now)
            )
            await record_events(
                conn,
                store_id,
                now,
                [
                    (
                        "tokens_reissued",
                        {
                            "revoked": revoked.rowcount,
                            "tokens": [{"id": t.id, "role": t.role, "max_uses": t.max_uses} for t in tokens],
                        },
                    )
                ],
            )
        return tokens

    async def events(self, store_id: str, *, cursor: int | None, limit: int) -> StoreEventPage:
        """The store's timeline, oldest first; `cursor` is the last id of the previous page."""
        limit = max(1, min(limit, MAX_EVENTS_PAGE))
        query = (
            sa.select(store_events)
            .where(store_events.c.store_id == store_id)
            .order_by(store_events.c.id)
            .limit(limit + 1)
        )
        if cursor is not None:
            query = query.where(store_events.c.id > cursor)
        async with self._engine.connect() as conn:
            if await conn.scalar(sa.select(stores.c.id).where(stores.c.id == store_id)) is None:
                raise NotFound(f"store {store_id!r} does not exist", code="store_not_found")
            rows = (await conn.execute(query)).all()
        items = [
            StoreEvent(id=r.id, store_id=r.store_id, at=r.at, kind=r.kind, detail=r.detail)
            for r in rows[:limit]
        ]
        return StoreEventPage(items=items, next_cursor=str(items[-1].id) if len(rows) > limit else None)

    async def active_count(self) -> int:
        async with self._engine.connect() as conn:
            count = await conn.scalar(
                sa.select(sa.func.count())
                .select_from(store_provisioning)
                .where(store_provisioning.c.state.in_([s.value for s in ACTIVE]))
            )
        return int(count or 0)

    async def _locked(self, conn: AsyncConnection, store_id: str) -> Any:
        saga = (
            await conn.execute(
                sa.select(store_provisioning)
                .where(store_provisioning.c.store_id == store_id)
                .with_for_update()
            )
        ).first()
        if saga is None:
            await self._require_store(conn, store_id)
            raise NotFound(f"store {store_id!r} was not provisioned from a template", code="not_provisioned")
        return saga

    async def _require_store(self, conn: AsyncConnection, store_id: str) -> None:
        if await conn.scalar(sa.select(stores.c.id).where(stores.c.id == store_id)) is None:
            raise NotFound(f"store {store_id!r} does not exist", code="store_not_found")

    async def _view(self, conn: AsyncConnection, store_id: str) -> ProvisioningView:
        saga = (
            await conn.execute(sa.select(store_provisioning).where(store_provisioning.c.store_id == store_id))
        ).first()
        if saga is None:
            await self._require_store(conn, store_id)
            raise NotFound(f"store {store_id!r} was not provisioned from a template", code="not_provisioned")
        rows = await conn.execute(
            sa.select(*device_columns(now=self._clock(), offline_after=self._offline_after)).where(
                devices.c.store_id == store_id, devices.c.state == "active"
            )
        )
        facts = [device_facts(row._mapping) for row in rows]
        tokens = await conn.execute(
            sa.select(enrollment_tokens)
            .where(enrollment_tokens.c.id.in_(saga.token_ids))
            .order_by(enrollment_tokens.c.created_at, enrollment_tokens.c.role)
        )
        return ProvisioningView(
            store_id=store_id,
            state=saga.state,
            expected=saga.expected,
            roles=role_progress(saga.expected, facts),
            tokens=[
                TokenView(
                    id=t.id,
                    store_id=t.store_id,
                    role=t.role,
                    expires_at=t.expires_at,
                    max_uses=t.max_uses,
                    uses=t.uses,
                    revoked=t.revoked_at is not None,
                )
                for t in tokens
            ],
            started_at=saga.started_at,
            updated_at=saga.updated_at,
            deadline_at=saga.deadline_at,
            ready_at=saga.ready_at,
            seconds_to_ready=saga.seconds_to_ready,
            error=saga.error,
        )
