"""Import templates from a file in the fleet data's `templates.json` format::

    {"templates": {"express": {"pos": 2, "tablet": 2}, ...}, "device_models": {...}}

Each entry becomes a template with that manifest (id = the entry's name); one that exists
already gets a new version when its manifest changed. Layers, time zone and trading hours
stay as they were (or empty): the file only knows manifests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from control_plane.errors import InvalidInput, NotFound
from control_plane.templates.models import TemplateCreate, TemplateSpec
from control_plane.templates.service import TemplateService


@dataclass(frozen=True, slots=True)
class ImportResult:
    template_id: str
    version: int
    outcome: str  # created | updated | unchanged


def parse_templates_file(path: Path) -> list[TemplateCreate]:
    """Validate the whole file before anything is written; errors name the entry and field."""
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"{path}: not readable JSON ({exc})") from None
    entries = document.get("templates") if isinstance(document, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise InvalidInput(f'{path}: expected {{"templates": {{name: {{role: count}}}}}}')
    parsed = []
    for name, manifest in entries.items():
        try:
            parsed.append(
                TemplateCreate(
                    id=name,
                    name=str(name).replace("_", " ").title(),
                    description=f"imported from {path.name}",
                    manifest=manifest,
                )
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise InvalidInput(f"{path}: template {name!r}, field {field!r}: {first['msg']}") from None
    return parsed


async def import_templates(service: TemplateService, path: Path, *, actor: str) -> list[ImportResult]:
    results = []
    for spec in parse_templates_file(path):
        try:
            current = await service.get(spec.id)
        except NotFound:
            created = await service.create(spec, actor=actor)
            results.append(ImportResult(spec.id, created.version, "created"))
            continue
        merged: dict[str, Any] = {
            "name": current.name,
            "description": current.description,
            "manifest": spec.manifest,
            "layer": current.layer,
            "roles": {role: layer for role, layer in current.roles.items() if role in spec.manifest},
            "timezone": current.timezone,
            "trading_hours": current.trading_hours,
        }
        updated = await service.update(
            spec.id, TemplateSpec.model_validate(merged), expected_version=current.version, actor=actor
        )
        results.append(
            ImportResult(
                spec.id, updated.version, "updated" if updated.version != current.version else "unchanged"
            )
        )
    return results
