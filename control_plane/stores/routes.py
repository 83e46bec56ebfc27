"""Store endpoints."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response, status

from control_plane.api.deps import OperatorDep, ServicesDep
from control_plane.api.preconditions import expected_revision, set_etag
from control_plane.enrollment.models import TokenCreate, TokenCreated, TokenView
from control_plane.stores.models import StoreConfig, StoreCreate, StoreCreated, StorePatch, StoreView

router = APIRouter(prefix="/v1/stores", tags=["stores"])


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_store(spec: StoreCreate, services: ServicesDep, operator: OperatorDep) -> StoreCreated:
    """Create a store. With `template_id` it is made from the template and provisioned: the
    answer carries one enrollment token per role (secrets shown once) and the saga's state."""
    return await services.stores.create(spec, actor=operator.name)


@router.get("")
async def list_stores(services: ServicesDep, _operator: OperatorDep) -> list[StoreView]:
    return await services.stores.list_stores()


@router.get("/{store_id}")
async def get_store(
    store_id: str, services: ServicesDep, _operator: OperatorDep, response: Response
) -> StoreView:
    """The store; its `ETag` header is the revision of its configuration layer (for If-Match)."""
    view = await services.stores.get(store_id)
    set_etag(response, view.config_revision)
    return view


@router.patch("/{store_id}")
async def update_store(
    store_id: str,
    patch: StorePatch,
    services: ServicesDep,
    operator: OperatorDep,
    response: Response,
    expected: Annotated[int | None, Depends(expected_revision)],
) -> StoreView:
    """Change the store's name, time zone, region or trading hours (e.g. holiday hours); the
    fields sent replace theirs. Rollouts follow new trading hours within a tick. `If-Match`
    with the store's `ETag` → 412 if it changed meanwhile."""
    view = await services.stores.update(store_id, patch, actor=operator.name, expected_revision=expected)
    set_etag(response, view.config_revision)
    return view


@router.put("/{store_id}/config")
async def set_store_config(
    store_id: str,
    layer: StoreConfig,
    services: ServicesDep,
    operator: OperatorDep,
    response: Response,
    expected: Annotated[int | None, Depends(expected_revision)],
) -> StoreView:
    """Replace the store's configuration layer; devices whose effective state changes get a new
    version. Send the `ETag` of your read as `If-Match` to fail with 412 instead of overwriting
    a change made meanwhile."""
    view = await services.stores.set_config(store_id, layer, actor=operator.name, expected_revision=expected)
    set_etag(response, view.config_revision)
    return view


@router.post("/{store_id}/enrollment-tokens", status_code=status.HTTP_201_CREATED)
async def create_enrollment_token(
    store_id: str, services: ServicesDep, operator: OperatorDep, spec: TokenCreate | None = None
) -> TokenCreated:
    """Issue an enrollment token for the store. The secret is in this response only."""
    return await services.enrollment.create_token(store_id, spec or TokenCreate(), actor=operator.name)


@router.get("/{store_id}/enrollment-tokens")
async def list_enrollment_tokens(
    store_id: str, services: ServicesDep, _operator: OperatorDep
) -> list[TokenView]:
    await services.stores.get(store_id)
    return await services.enrollment.list_tokens(store_id)


@router.delete("/{store_id}/enrollment-tokens/{token_id}", status_code=status.HTTP_204_NO_CONTENT)
async def revoke_enrollment_token(
    store_id: str, token_id: str, services: ServicesDep, operator: OperatorDep
) -> None:
    """Revoke a token: enrollments with it are refused from now on (`token_revoked`)."""
    await services.enrollment.revoke_token(store_id, token_id, actor=operator.name)
