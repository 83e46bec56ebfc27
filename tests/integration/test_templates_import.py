"""`storefleet templates import` with the fleet data's templates.json, then the API shows them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import start_stack
from tests.support import fleet_data

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def _import(data_dir: Path, file: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOREFLEET_")}
    return subprocess.run(
        [
            BIN / "storefleet",
            "--log-level",
            "WARNING",
            "templates",
            "import",
            str(file),
            "--data-dir",
            str(data_dir),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


async def test_import_creates_then_versions_only_what_changed(tmp_path):
    data_dir = tmp_path / "control-plane"
    source = fleet_data.data_dir() / "templates.json"
    first = _import(data_dir, source)
    assert first.returncode == 0, first.stderr
    assert sorted(first.stdout.splitlines()) == [
        "express: created (version 1)",
        "flagship: created (version 1)",
        "standard: created (version 1)",
    ]
    assert "unchanged (version 1)" in _import(data_dir, source).stdout

    changed = json.loads(source.read_text())
    changed["templates"]["express"]["kiosk"] = 1
    edited = tmp_path / "templates.json"
    edited.write_text(json.dumps(changed))
    again = _import(data_dir, edited)
    assert "express: updated (version 2)" in again.stdout
    assert "standard: unchanged (version 1)" in again.stdout

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"templates": {"tiny": {"pos": 0}}}))
    refused = _import(data_dir, bad)
    assert refused.returncode != 0
    assert "template 'tiny', field 'manifest.pos'" in refused.stderr

    async with start_stack("embedded-sqlite", tmp_path) as cp:
        listed = {t["id"]: t for t in (await cp.api.get("/v1/templates")).json()}
        assert set(listed) == {"express", "standard", "flagship"}
        assert listed["standard"]["manifest"] == {"pos": 4, "tablet": 6, "kiosk": 1, "backoffice": 1}
        assert listed["flagship"]["device_count"] == 44
        assert listed["express"]["version"] == 2
        assert (await cp.api.get("/v1/templates/express/versions/1")).json()["manifest"] == {
            "pos": 2,
            "tablet": 2,
        }
        assert "tiny" not in listed
