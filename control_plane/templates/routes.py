"""Template endpoints. A template's ETag is its current version ("r3"); PUT with If-Match."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Response, status

from control_plane.api.deps import OperatorDep, ServicesDep
from control_plane.api.preconditions import expected_revision, set_etag
from control_plane.templates.models import TemplateCreate, TemplateSpec, TemplateVersionView, TemplateView

router = APIRouter(prefix="/v1/templates", tags=["templates"])

ExpectedVersion = Annotated[int | None, Depends(expected_revision)]


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_template(
    spec: TemplateCreate, response: Response, services: ServicesDep, operator: OperatorDep
) -> TemplateView:
    """Create a template at version 1."""
    view = await services.templates.create(spec, actor=operator.name)
    set_etag(response, view.version)
    return view


@router.get("")
async def list_templates(
    services: ServicesDep, _operator: OperatorDep, include_archived: bool = False
) -> list[TemplateView]:
    return await services.templates.list_templates(include_archived=include_archived)


@router.get("/{template_id}")
async def get_template(
    template_id: str, response: Response, services: ServicesDep, _operator: OperatorDep
) -> TemplateView:
    """The template with its current version (ETag: that version)."""
    view = await services.templates.get(template_id)
    set_etag(response, view.version)
    return view


@router.put("/{template_id}", responses={412: {"description": "If-Match names an older version"}})
async def update_template(
    template_id: str,
    spec: TemplateSpec,
    response: Response,
    services: ServicesDep,
    operator: OperatorDep,
    expected: ExpectedVersion,
) -> TemplateView:
    """Write a new version (none if nothing changed). Existing stores keep their version."""
    view = await services.templates.update(template_id, spec, expected_version=expected, actor=operator.name)
    set_etag(response, view.version)
    return view


@router.delete("/{template_id}", status_code=status.HTTP_204_NO_CONTENT)
async def archive_template(template_id: str, services: ServicesDep, operator: OperatorDep) -> None:
    """Archive: no new stores from it; stores made from it keep their version."""
    await services.templates.archive(template_id, actor=operator.name)


@router.get("/{template_id}/versions")
async def list_template_versions(
    template_id: str, services: ServicesDep, _operator: OperatorDep
) -> list[TemplateVersionView]:
    return await services.templates.list_versions(template_id)


@router.get("/{template_id}/versions/{version}")
async def get_template_version(
    template_id: str,
    version: Annotated[int, Path(ge=1)],
    services: ServicesDep,
    _operator: OperatorDep,
) -> TemplateVersionView:
    return await services.templates.get_version(template_id, version)
