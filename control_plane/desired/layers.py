"""Effective configuration: layers merged with JSON merge patch (RFC 7396) semantics.

Layers, lowest first: platform defaults → store. (Templates, groups, device overrides and
rollout releases slot in between as they arrive.) A `null` in a higher layer deletes a key.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from protocol.messages import AppCheck, CheckName
from protocol.signing import canonical_json

SECTIONS = ("config", "policies", "checks")
PLATFORM_DEFAULTS: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}


class ConfigLayer(BaseModel):
    """One layer of configuration as operators write it (template role, store, group, device).

    Each section is a JSON merge patch (RFC 7396) over the layers below it: objects merge, a
    `null` removes the key (or the app check of that name) set lower down.
    """

    model_config = ConfigDict(extra="forbid")

    config: dict[str, Any] = Field(default_factory=dict)
    policies: dict[str, Any] = Field(default_factory=dict)
    checks: dict[CheckName, AppCheck | None] = Field(default_factory=dict)

    def as_layer(self) -> dict[str, dict[str, Any]]:
        """The stored JSON form (app checks with their defaults filled in)."""
        return {
            "config": self.config,
            "policies": self.policies,
            "checks": {
                name: (check.model_dump(mode="json") if check is not None else None)
                for name, check in self.checks.items()
            },
        }


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396: objects merge recursively, `null` removes, anything else replaces."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def effective_state(*layers: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Merge `{"config": …, "policies": …, "checks": …}` layers, lowest first."""
    merged: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for layer in (PLATFORM_DEFAULTS, *layers):
        for section in SECTIONS:
            merged[section] = merge_patch(merged[section], layer.get(section) or {})
    return merged


def content_hash(state: Mapping[str, Any]) -> str:
    """Identity of a desired content: a new version is issued only when this changes."""
    return hashlib.sha256(canonical_json(state)).hexdigest()
