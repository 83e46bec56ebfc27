"""Provisioning endpoints under the store: progress, cancel, re-issued tokens, timeline."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status

from control_plane.api.deps import OperatorDep, ServicesDep
from control_plane.enrollment.models import TokenCreated
from control_plane.provisioning.models import ProvisioningView, StoreEventPage

router = APIRouter(prefix="/v1/stores", tags=["provisioning"])


@router.get("/{store_id}/provisioning")
async def get_provisioning(store_id: str, services: ServicesDep, _operator: OperatorDep) -> ProvisioningView:
    """The saga's state, expected vs enrolled / configured / healthy / online per role, times."""
    return await services.provisioning.get(store_id)


@router.post("/{store_id}/provisioning/cancel", status_code=status.HTTP_202_ACCEPTED)
async def cancel_provisioning(
    store_id: str, services: ServicesDep, operator: OperatorDep
) -> ProvisioningView:
    """Stop provisioning and undo it: tokens revoked, enrolled devices decommissioned (certificates
    revoked, retained topics cleared), the store decommissioned. Runs in the background; poll
    GET …/provisioning until `cancelled`."""
    return await services.provisioning.cancel(store_id, actor=operator.name)


@router.post("/{store_id}/provisioning/tokens", status_code=status.HTTP_201_CREATED)
async def reissue_provisioning_tokens(
    store_id: str, services: ServicesDep, operator: OperatorDep
) -> list[TokenCreated]:
    """Revoke the saga's tokens and issue new ones for the devices still missing (secrets shown once)."""
    return await services.provisioning.reissue_tokens(store_id, actor=operator.name)


@router.get("/{store_id}/events")
async def list_store_events(
    store_id: str,
    services: ServicesDep,
    _operator: OperatorDep,
    cursor: Annotated[
        str | None, Query(pattern=r"^\d{1,18}$", description="next_cursor of the previous page")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> StoreEventPage:
    """The store's timeline, oldest first, paginated by event id."""
    return await services.provisioning.events(
        store_id, cursor=int(cursor) if cursor is not None else None, limit=limit
    )
