"""Command endpoints: operators create and read commands; devices upload log archives.

The artifact upload is not an operator call: it is authenticated by the single-use upload
token carried in the signed collect_logs command (``Authorization: Bearer sfu_…``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import FileResponse

from control_plane.api.deps import OperatorDep, ServicesDep, client_address
from control_plane.commands.models import CommandCreate, CommandView
from control_plane.errors import InvalidInput
from protocol.digest import HEADER, sha256_content_digest

device_commands_router = APIRouter(prefix="/v1/devices", tags=["commands"])
router = APIRouter(prefix="/v1/commands", tags=["commands"])


@device_commands_router.post("/{device_id}/commands", status_code=status.HTTP_201_CREATED)
async def create_command(
    device_id: str, spec: CommandCreate, response: Response, services: ServicesDep, operator: OperatorDep
) -> CommandView:
    """Send a signed command (ping, reboot, collect_logs, rotate_certificate) to an active device.

    201 with the new command; 200 with the existing one when `command_id` was used before
    with the same body (409 with another body).
    """
    view, created = await services.commands.create(device_id, spec, actor=operator.name)
    if not created:
        response.status_code = status.HTTP_200_OK
    return view


@device_commands_router.get("/{device_id}/commands")
async def list_device_commands(
    device_id: str,
    services: ServicesDep,
    _operator: OperatorDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[CommandView]:
    """The device's commands, newest first."""
    return await services.commands.list_for_device(device_id, limit=limit)


@device_commands_router.put("/{device_id}/commands/{command_id}/artifact")
async def upload_artifact(
    device_id: str, command_id: str, request: Request, services: ServicesDep
) -> CommandView:
    """The agent uploads the collect_logs archive (gzip'd tar), once, before the command expires,
    with its `Content-Digest`."""
    declared = request.headers.get("content-length")
    try:
        declared_bytes = int(declared) if declared is not None else None
    except ValueError:
        raise InvalidInput("header 'content-length' is not a number") from None
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return await services.commands.store_artifact(
        device_id=device_id,
        command_id=command_id,
        token=token.strip() if scheme.lower() == "bearer" else None,
        body=request.stream(),
        declared_bytes=declared_bytes,
        content_digest=request.headers.get(HEADER),
        source=client_address(request),
    )


@router.get("/{command_id}")
async def get_command(command_id: str, services: ServicesDep, _operator: OperatorDep) -> CommandView:
    return await services.commands.get(command_id)


@router.get("/{command_id}/artifact", response_class=FileResponse)
async def download_artifact(command_id: str, services: ServicesDep, _operator: OperatorDep) -> FileResponse:
    """The log archive a device uploaded for a collect_logs command."""
    path, artifact = await services.commands.artifact_file(command_id)
    # The digest the upload was verified against, so the download can be checked the same way.
    headers = {HEADER: sha256_content_digest(artifact.sha256)} if artifact.sha256 else None
    return FileResponse(path, media_type="application/gzip", filename=f"{command_id}.tar.gz", headers=headers)
