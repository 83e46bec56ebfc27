"""Device endpoints."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from control_plane.api.deps import OperatorDep, ServicesDep
from control_plane.devices.models import DevicePage, DeviceView

router = APIRouter(prefix="/v1/devices", tags=["devices"])


@router.get("")
async def list_devices(
    services: ServicesDep,
    _operator: OperatorDep,
    store_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: str | None = None,
) -> DevicePage:
    return await services.devices.list_devices(store_id=store_id, limit=limit, cursor=cursor)


@router.get("/{device_id}")
async def get_device(device_id: str, services: ServicesDep, _operator: OperatorDep) -> DeviceView:
    return await services.devices.get(device_id)
