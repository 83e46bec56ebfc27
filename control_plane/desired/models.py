"""API shapes of configuration layers, effective configuration and signing keys."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class LayerSource(BaseModel):
    """Where a value came from: `layer` is platform, template, role, store, group or device."""

    layer: str
    id: str | None = None

    @classmethod
    def parse(cls, source: str) -> LayerSource:
        layer, _, ident = source.partition(":")
        return cls(layer=layer, id=ident or None)


class OverridesView(BaseModel):
    device_id: str
    config: dict[str, Any]
    policies: dict[str, Any]
    checks: dict[str, Any]
    revision: int = Field(description='the ETag of the device layer is "r<revision>"')


class EffectiveConfig(BaseModel):
    device_id: str
    store_id: str
    role: str | None
    desired_version: int
    applied_version: int
    config: dict[str, Any]
    policies: dict[str, Any]
    checks: dict[str, Any]
    layers: list[LayerSource] = Field(description="the layers merged, lowest first")
    provenance: dict[str, LayerSource] = Field(
        description="JSON pointer of every value (e.g. /config/pos/tax) → the layer that set it"
    )


class SigningKeyView(BaseModel):
    kid: str
    public_key_pem: str
    active: bool
