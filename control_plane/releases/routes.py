"""Release endpoints: create (immutable), read, list."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status

from control_plane.api.deps import OperatorDep, ServicesDep
from control_plane.releases.models import ReleaseCreate, ReleaseView

router = APIRouter(prefix="/v1/releases", tags=["releases"])


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_release(body: ReleaseCreate, services: ServicesDep, operator: OperatorDep) -> ReleaseView:
    """A named, immutable configuration change (merge patches on config, policies, checks)."""
    return await services.releases.create(body, actor=operator.name)


@router.get("")
async def list_releases(
    services: ServicesDep, _operator: OperatorDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[ReleaseView]:
    return await services.releases.recent(limit=limit)


@router.get("/{release_id}")
async def get_release(release_id: str, services: ServicesDep, _operator: OperatorDep) -> ReleaseView:
    return await services.releases.get(release_id)
