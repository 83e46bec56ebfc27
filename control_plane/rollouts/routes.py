"""Rollout endpoints: create, dry-run plan, progress, devices, events (long-poll and SSE),
and control (pause, resume, abort, rollback)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, status
from fastapi.responses import StreamingResponse

from control_plane.api.deps import OperatorDep, ServicesDep
from control_plane.rollouts.models import (
    DeviceState,
    DryRunPlan,
    RolloutCreate,
    RolloutDeviceView,
    RolloutEvent,
    RolloutView,
)
from control_plane.rollouts.service import FINAL_STATES

router = APIRouter(prefix="/v1/rollouts", tags=["rollouts"])


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_rollout(body: RolloutCreate, services: ServicesDep, operator: OperatorDep) -> RolloutView:
    """Start (or schedule, with start_at) a staged rollout of a release to the selected devices."""
    return await services.rollouts.create(body, actor=operator.name)


@router.post("/plan")
async def plan_rollout(body: RolloutCreate, services: ServicesDep, _operator: OperatorDep) -> DryRunPlan:
    """Dry run: waves, devices deferred right now, and the configuration diff per group of
    devices that change alike. Nothing is sent or stored."""
    return await services.rollouts.dry_run(body)


@router.get("")
async def list_rollouts(
    services: ServicesDep, _operator: OperatorDep, limit: Annotated[int, Query(ge=1, le=500)] = 50
) -> list[RolloutView]:
    return await services.rollouts.recent(limit=limit)


@router.get("/{rollout_id}")
async def get_rollout(rollout_id: str, services: ServicesDep, _operator: OperatorDep) -> RolloutView:
    """Progress: the rollout's state and device counts per state, overall and per wave."""
    return await services.rollouts.get(rollout_id)


@router.get("/{rollout_id}/devices")
async def rollout_devices(
    rollout_id: str,
    services: ServicesDep,
    _operator: OperatorDep,
    state: DeviceState | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[RolloutDeviceView]:
    return await services.rollouts.devices(
        rollout_id, state=state.value if state else None, limit=limit, offset=offset
    )


@router.get("/{rollout_id}/events")
async def rollout_events(
    rollout_id: str,
    services: ServicesDep,
    _operator: OperatorDep,
    after: Annotated[int, Query(ge=0, description="the last event id you have")] = 0,
    wait: Annotated[float, Query(ge=0, le=60, description="long-poll: seconds to wait for one")] = 0,
) -> list[RolloutEvent]:
    return await services.rollouts.events(rollout_id, after=after, wait_s=wait)


@router.get("/{rollout_id}/events/stream")
async def rollout_event_stream(
    rollout_id: str,
    services: ServicesDep,
    _operator: OperatorDep,
    after: Annotated[int, Query(ge=0)] = 0,
) -> StreamingResponse:
    """Server-sent events until the rollout is finished (completed or rolled back)."""
    await services.rollouts.get(rollout_id)  # 404 before the stream starts

    async def stream() -> AsyncIterator[str]:
        last = after
        while True:
            events = await services.rollouts.events(rollout_id, after=last, wait_s=15)
            for event in events:
                last = event.id
                data = json.dumps(event.model_dump(mode="json"))
                yield f"id: {event.id}\nevent: {event.kind}\ndata: {data}\n\n"
            if not events:
                yield ": keep-alive\n\n"
                if (await services.rollouts.get(rollout_id)).state in FINAL_STATES:
                    return
            await asyncio.sleep(0)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.post("/{rollout_id}/pause")
async def pause_rollout(rollout_id: str, services: ServicesDep, operator: OperatorDep) -> RolloutView:
    return await services.rollouts.pause(rollout_id, actor=operator.name)


@router.post("/{rollout_id}/resume")
async def resume_rollout(rollout_id: str, services: ServicesDep, operator: OperatorDep) -> RolloutView:
    """Continue a paused rollout (failures so far are accepted; new ones count again)."""
    return await services.rollouts.resume(rollout_id, actor=operator.name)


@router.post("/{rollout_id}/abort")
async def abort_rollout(rollout_id: str, services: ServicesDep, operator: OperatorDep) -> RolloutView:
    """Stop, and roll back every device that moved (each gets a new version, old content)."""
    return await services.rollouts.abort(rollout_id, actor=operator.name)


@router.post("/{rollout_id}/rollback")
async def rollback_rollout(rollout_id: str, services: ServicesDep, operator: OperatorDep) -> RolloutView:
    """Roll back a rollout in any state, a completed one included."""
    return await services.rollouts.rollback(rollout_id, actor=operator.name)
