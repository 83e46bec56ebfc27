"""Effective configuration: layers merged with JSON merge patch (RFC 7396) semantics.

Layers, lowest first: platform defaults → store. (Templates, groups, device overrides and
rollout releases slot in between as they arrive.) A `null` in a higher layer deletes a key.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from typing import Any

from protocol.signing import canonical_json

PLATFORM_DEFAULTS: dict[str, dict[str, Any]] = {"config": {}, "policies": {}}


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
    """Merge `{"config": …, "policies": …}` layers, lowest first."""
    merged: dict[str, dict[str, Any]] = {"config": {}, "policies": {}}
    for layer in (PLATFORM_DEFAULTS, *layers):
        for section in ("config", "policies"):
            merged[section] = merge_patch(merged[section], layer.get(section) or {})
    return merged


def content_hash(state: Mapping[str, Any]) -> str:
    """Identity of a desired content: a new version is issued only when this changes."""
    return hashlib.sha256(canonical_json(state)).hexdigest()
