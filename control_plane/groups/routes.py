"""Group endpoints. Mutations of a group take `If-Match` (its ETag, "r<revision>") → 412 if stale."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response, status

from control_plane.api.deps import OperatorDep, ServicesDep
from control_plane.api.preconditions import expected_revision, set_etag
from control_plane.desired.layers import ConfigLayer
from control_plane.devices.filters import GroupSelector
from control_plane.devices.models import DeviceListQuery, DevicePage
from control_plane.groups.models import GroupCreate, GroupUpdate, GroupView, MembersAdd

router = APIRouter(prefix="/v1/groups", tags=["groups"])

ExpectedRevision = Annotated[int | None, Depends(expected_revision)]


def _with_etag(response: Response, view: GroupView) -> GroupView:
    set_etag(response, view.revision)
    return view


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_group(
    spec: GroupCreate, response: Response, services: ServicesDep, operator: OperatorDep
) -> GroupView:
    """A static group (add members explicitly) or a dynamic one (members: devices matching `selector`)."""
    return _with_etag(response, await services.groups.create(spec, actor=operator.name))


@router.get("")
async def list_groups(services: ServicesDep, _operator: OperatorDep) -> list[GroupView]:
    """Every group, in the order their layers apply (priority, then id)."""
    return await services.groups.list_groups()


@router.get("/{group_id}")
async def get_group(
    group_id: str, response: Response, services: ServicesDep, _operator: OperatorDep
) -> GroupView:
    return _with_etag(response, await services.groups.get(group_id))


@router.patch("/{group_id}")
async def update_group(
    group_id: str,
    change: GroupUpdate,
    response: Response,
    services: ServicesDep,
    operator: OperatorDep,
    revision: ExpectedRevision,
) -> GroupView:
    """Rename or re-prioritise the group."""
    view = await services.groups.update(group_id, change, expected_revision=revision, actor=operator.name)
    return _with_etag(response, view)


@router.put("/{group_id}/layer")
async def set_group_layer(
    group_id: str,
    layer: ConfigLayer,
    response: Response,
    services: ServicesDep,
    operator: OperatorDep,
    revision: ExpectedRevision,
) -> GroupView:
    """Replace the group's configuration layer; members whose effective state changes get a new version."""
    view = await services.groups.set_layer(group_id, layer, expected_revision=revision, actor=operator.name)
    return _with_etag(response, view)


@router.put("/{group_id}/selector")
async def set_group_selector(
    group_id: str,
    selector: GroupSelector,
    response: Response,
    services: ServicesDep,
    operator: OperatorDep,
    revision: ExpectedRevision,
) -> GroupView:
    """Replace a dynamic group's selector."""
    view = await services.groups.set_selector(
        group_id, selector, expected_revision=revision, actor=operator.name
    )
    return _with_etag(response, view)


@router.delete("/{group_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_group(
    group_id: str, services: ServicesDep, operator: OperatorDep, revision: ExpectedRevision
) -> None:
    await services.groups.delete(group_id, expected_revision=revision, actor=operator.name)


@router.get("/{group_id}/members")
async def list_group_members(
    group_id: str,
    query: Annotated[DeviceListQuery, Query()],
    services: ServicesDep,
    _operator: OperatorDep,
) -> DevicePage:
    """The group's devices (dynamic: those matching its selector now), with every filter and the
    cursor pagination of `GET /v1/devices`."""
    within = await services.groups.members_clause(group_id)
    return await services.devices.list_devices(query, within=within, scope=f"group:{group_id}")


@router.post("/{group_id}/members")
async def add_group_members(
    group_id: str, members: MembersAdd, response: Response, services: ServicesDep, operator: OperatorDep
) -> GroupView:
    """Add devices to a static group; devices already in it are left alone."""
    view = await services.groups.add_members(group_id, members.device_ids, actor=operator.name)
    return _with_etag(response, view)


@router.delete("/{group_id}/members/{device_id}", status_code=status.HTTP_204_NO_CONTENT)
async def remove_group_member(
    group_id: str, device_id: str, services: ServicesDep, operator: OperatorDep
) -> None:
    await services.groups.remove_member(group_id, device_id, actor=operator.name)
