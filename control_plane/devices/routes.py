"""Device endpoints: inventory, lifecycle (revoke, decommission, re-enroll) and certificates."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, status

from control_plane.api.deps import OperatorDep, ServicesDep
from control_plane.devices.models import (
    CertificateView,
    DeviceListQuery,
    DevicePage,
    DeviceView,
    RevokeRequest,
    TagsChange,
    TagsReplace,
    parse_duration,
)
from control_plane.enrollment.models import TokenCreate, TokenCreated

router = APIRouter(prefix="/v1/devices", tags=["devices"])
certificates_router = APIRouter(prefix="/v1/certificates", tags=["certificates"])


@router.get("")
async def list_devices(
    query: Annotated[DeviceListQuery, Query()], services: ServicesDep, _operator: OperatorDep
) -> DevicePage:
    """Filter, search (`q`), sort and page the inventory. Lists are repeated parameters
    (`?role=pos&role=kiosk`); `tag` requires all given tags; `state` defaults to active.
    Follow `next_cursor` until it is null; a cursor only works with the query that made it."""
    return await services.devices.list_devices(query)


@router.get("/{device_id}")
async def get_device(device_id: str, services: ServicesDep, _operator: OperatorDep) -> DeviceView:
    return await services.devices.get(device_id)


@router.put("/{device_id}/tags")
async def replace_device_tags(
    device_id: str, tags: TagsReplace, services: ServicesDep, operator: OperatorDep
) -> DeviceView:
    """Make the device's tags exactly these (dynamic groups selecting on tags follow)."""
    await services.tags.replace(device_id, tags.tags, actor=operator.name)
    return await services.devices.get(device_id)


@router.patch("/{device_id}/tags")
async def change_device_tags(
    device_id: str, change: TagsChange, services: ServicesDep, operator: OperatorDep
) -> DeviceView:
    """Remove `remove`, then add `add`, against the device's tags at that moment."""
    await services.tags.change(device_id, add=change.add, remove=change.remove, actor=operator.name)
    return await services.devices.get(device_id)


@router.post("/{device_id}/revoke")
async def revoke_device(
    device_id: str,
    services: ServicesDep,
    operator: OperatorDep,
    request: Annotated[RevokeRequest | None, Body()] = None,
) -> DeviceView:
    """Revoke every certificate of the device: CRL re-published, the device cut off the broker."""
    reason = (request or RevokeRequest()).reason
    await services.lifecycle.revoke(device_id, reason=reason, actor=operator.name)
    return await services.devices.get(device_id)


@router.post("/{device_id}/decommission")
async def decommission_device(device_id: str, services: ServicesDep, operator: OperatorDep) -> DeviceView:
    """Revoke the device for good and clear its retained topics on the broker."""
    await services.lifecycle.decommission(device_id, actor=operator.name)
    return await services.devices.get(device_id)


@router.post("/{device_id}/reenrollment-tokens", status_code=status.HTTP_201_CREATED)
async def create_reenrollment_token(
    device_id: str, services: ServicesDep, operator: OperatorDep, spec: TokenCreate | None = None
) -> TokenCreated:
    """A single-use token that gives this device a new certificate under the same device id."""
    return await services.enrollment.create_reenrollment_token(
        device_id, spec or TokenCreate(), actor=operator.name
    )


@certificates_router.get("")
async def list_certificates(
    services: ServicesDep,
    _operator: OperatorDep,
    expiring_within: Annotated[
        str | None, Query(description="only valid certificates expiring within this long: 3600, 90m, 72h, 7d")
    ] = None,
    status: Annotated[str | None, Query(pattern="^(valid|revoked)$")] = None,
    device_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
) -> list[CertificateView]:
    window = parse_duration(expiring_within) if expiring_within is not None else None
    return await services.devices.list_certificates(
        expiring_within=window, status=status, device_id=device_id, limit=limit
    )
