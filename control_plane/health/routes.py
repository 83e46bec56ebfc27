"""Health endpoints: a store's roll-up and a device's history."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query

from control_plane.api.deps import OperatorDep, ServicesDep
from control_plane.health.models import HealthSample, StoreHealth

router = APIRouter(tags=["health"])


@router.get("/v1/stores/{store_id}/health")
async def store_health(store_id: str, services: ServicesDep, _operator: OperatorDep) -> StoreHealth:
    """Counts of the store's active devices behind its status, and failing app checks by name."""
    return await services.health.rollup.store_health(store_id)


@router.get("/v1/devices/{device_id}/health-history")
async def device_health_history(
    device_id: str,
    services: ServicesDep,
    _operator: OperatorDep,
    since: Annotated[datetime | None, Query(description="only reports sampled at or after this time")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[HealthSample]:
    """The device's health reports, newest first (kept for `health_retention_hours`)."""
    return await services.health.history.samples(device_id, since=since, limit=limit)
