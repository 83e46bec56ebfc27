"""Configuration endpoints: device overrides, effective configuration, signing keys."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response, status

from control_plane.api.deps import OperatorDep, ServicesDep
from control_plane.api.preconditions import expected_revision, set_etag
from control_plane.desired.layers import ConfigLayer
from control_plane.desired.models import EffectiveConfig, OverridesView, SigningKeyView

router = APIRouter(prefix="/v1/devices", tags=["configuration"])
signing_keys_router = APIRouter(prefix="/v1/signing-keys", tags=["signing keys"])


@router.get("/{device_id}/overrides")
async def get_overrides(
    device_id: str, services: ServicesDep, _operator: OperatorDep, response: Response
) -> OverridesView:
    """The device layer: the highest configuration layer, for this device only."""
    view = await services.config.get_overrides(device_id)
    set_etag(response, view.revision)
    return view


@router.put("/{device_id}/overrides")
async def set_overrides(
    device_id: str,
    layer: ConfigLayer,
    services: ServicesDep,
    operator: OperatorDep,
    response: Response,
    expected: Annotated[int | None, Depends(expected_revision)],
) -> OverridesView:
    """Replace the device layer (If-Match: the ETag of your read → 412 if it changed since)."""
    view = await services.config.set_overrides(
        device_id, layer, actor=operator.name, expected_revision=expected
    )
    set_etag(response, view.revision)
    return view


@router.get("/{device_id}/effective-config")
async def get_effective_config(
    device_id: str, services: ServicesDep, _operator: OperatorDep
) -> EffectiveConfig:
    """What the device should run: every layer merged, and which layer set each value."""
    return await services.config.effective_config(device_id)


@signing_keys_router.get("")
async def list_signing_keys(services: ServicesDep, _operator: OperatorDep) -> list[SigningKeyView]:
    return services.config.signing_keys()


@signing_keys_router.post("", status_code=status.HTTP_201_CREATED)
async def add_signing_key(services: ServicesDep, operator: OperatorDep) -> SigningKeyView:
    """Start a rotation: a new key every device is told to trust (it does not sign yet)."""
    return await services.config.add_signing_key(actor=operator.name)


@signing_keys_router.post("/{kid}/activate")
async def activate_signing_key(
    kid: str,
    services: ServicesDep,
    operator: OperatorDep,
    force: Annotated[bool, Query(description="activate even if devices are not in sync yet")] = False,
) -> SigningKeyView:
    """Sign with this key from now on (409 while devices may not trust it yet)."""
    return await services.config.activate_signing_key(kid, actor=operator.name, force=force)


@signing_keys_router.delete("/{kid}", status_code=status.HTTP_204_NO_CONTENT)
async def retire_signing_key(kid: str, services: ServicesDep, operator: OperatorDep) -> None:
    """End a rotation: devices are told to stop trusting this key."""
    await services.config.retire_signing_key(kid, actor=operator.name)
