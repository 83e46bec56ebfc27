"""Effective configuration: layers merged with JSON merge patch (RFC 7396) semantics.

Layers, lowest first: platform defaults → template → template role → store → groups (by
priority, then id) → device overrides (`control_plane.desired.assembly` gathers them). A
`null` in a higher layer deletes a key. Rollout releases will slot in on top.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from protocol.messages import AppCheck, CheckName
from protocol.sections import SectionError, check_patch
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

    # What the agents' handlers would refuse is refused here, where it can still be fixed
    # (`protocol.sections`); combinations across layers are checked on each device's result
    # when a rollout is planned.
    @field_validator("config")
    @classmethod
    def _agents_accept_the_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        with _refused_by_agents():
            check_patch(config=config)
        return config

    @field_validator("policies")
    @classmethod
    def _agents_accept_the_policies(cls, policies: dict[str, Any]) -> dict[str, Any]:
        with _refused_by_agents():
            check_patch(policies=policies)
        return policies

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


@contextlib.contextmanager
def _refused_by_agents() -> Iterator[None]:
    """A `SectionError` as a validation error of the field being checked."""
    try:
        yield
    except SectionError as exc:
        raise PydanticCustomError("refused_by_agents", "{message}", {"message": exc.message}) from None


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


def _pointer(parent: str, key: str) -> str:
    return f"{parent}/{key.replace('~', '~0').replace('/', '~1')}"


def _forget(provenance: dict[str, str], path: str) -> None:
    prefix = path + "/"
    for known in [p for p in provenance if p == path or p.startswith(prefix)]:
        del provenance[known]


def _merge_tracked(
    target: dict[str, Any], patch: Mapping[str, Any], path: str, source: str, provenance: dict[str, str]
) -> None:
    for key, value in patch.items():
        here = _pointer(path, key)
        if value is None:
            target.pop(key, None)
            _forget(provenance, here)
        elif isinstance(value, Mapping):
            existing = target.get(key)
            if not isinstance(existing, dict):
                existing = {}
                target[key] = existing
                _forget(provenance, here)
                provenance[here] = source  # this layer made the object
            _merge_tracked(existing, value, here, source, provenance)
        else:
            target[key] = copy.deepcopy(value)
            _forget(provenance, here)
            provenance[here] = source


def effective_state_with_provenance(
    layers: Sequence[tuple[str, Mapping[str, Any]]],
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """`effective_state` of `(source, layer)` pairs, plus which source set each value.

    Provenance maps a JSON pointer (``/config/pos/tax``) to the source of the layer that set
    it last, for every leaf of the result (scalars, arrays and empty objects); an object's
    own entry is kept only when it ends up empty (then it is the layer that made it).
    """
    merged: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    provenance: dict[str, str] = {}
    for source, layer in (("platform", PLATFORM_DEFAULTS), *layers):
        for section in SECTIONS:
            patch = layer.get(section) or {}
            if isinstance(patch, Mapping):
                _merge_tracked(merged[section], patch, f"/{section}", source, provenance)
    leaves = {path: source for path, source in provenance.items() if _is_leaf(merged, path)}
    return merged, dict(sorted(leaves.items()))


def _is_leaf(state: Mapping[str, Any], pointer: str) -> bool:
    node: Any = state
    for part in pointer.lstrip("/").split("/"):
        key = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, Mapping) or key not in node:
            return False
        node = node[key]
    return not isinstance(node, Mapping) or not node
