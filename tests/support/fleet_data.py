"""The shared fleet fixture data (`../shared/data/` from the project root; see its README)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    """`../shared/data` from the project root (a git worktree may sit one level deeper)."""
    for parent in _ROOT.parents:
        candidate = parent / "shared" / "data"
        if (candidate / "stores.csv").exists():
            return candidate
    raise FileNotFoundError(f"shared/data/stores.csv not found above {_ROOT}")


def stores() -> list[dict[str, Any]]:
    with (data_dir() / "stores.csv").open(newline="") as handle:
        return [{**row, "trading_hours": json.loads(row["trading_hours"])} for row in csv.DictReader(handle)]


def templates() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((data_dir() / "templates.json").read_text())
    return loaded
