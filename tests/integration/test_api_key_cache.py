"""Operator API keys are checked from memory, yet key changes in the database take effect:
a new key at once, a deleted key within `api_key_cache_s`."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from control_plane.auth.api_keys import hash_secret
from control_plane.db.schema import api_keys
from tests.conftest import start_stack

CACHE_S = 1.0
NEW_KEY = "sfk_second-operator-key-0123456789abcdef012345"


@pytest.mark.parametrize(
    "stack_name",
    [
        pytest.param("embedded-sqlite", marks=pytest.mark.integration),
        pytest.param(
            "mosquitto-postgres",
            marks=[pytest.mark.integration, pytest.mark.mosquitto, pytest.mark.postgres],
        ),
    ],
)
async def test_new_key_works_at_once_and_a_deleted_key_stops_within_the_cache_time(
    stack_name: str, tmp_path: Path
):
    async with start_stack(stack_name, tmp_path, api_key_cache_s=CACHE_S) as cp:
        services = cp.control_plane.services
        headers = {"Authorization": f"Bearer {NEW_KEY}"}
        assert (await cp.api.get("/v1/stores")).status_code == 200  # the snapshot is loaded now

        # Another replica (or an operator's tooling) adds a key: usable on the very next request.
        async with services.engine.begin() as conn:
            await conn.execute(
                api_keys.insert().values(
                    id="ops-2",
                    name="ops-2",
                    key_hash=hash_secret(NEW_KEY),
                    role="admin",
                    created_at=datetime.now(UTC),
                )
            )
        assert (await cp.anonymous.get("/v1/stores", headers=headers)).status_code == 200

        # ...and deletes it: refused within the cache time, and the refusal is audited.
        async with services.engine.begin() as conn:
            await conn.execute(sa.delete(api_keys).where(api_keys.c.id == "ops-2"))
        deleted_at = asyncio.get_running_loop().time()
        while (response := await cp.anonymous.get("/v1/stores", headers=headers)).status_code == 200:
            assert asyncio.get_running_loop().time() - deleted_at < CACHE_S + 0.5, (
                "deleted key still accepted"
            )
            await asyncio.sleep(0.05)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
        denied = await services.audit.records(action="api.authenticate")
        assert len(denied) == 1
        assert denied[0]["detail"]["path"] == "/v1/stores"

        # The admin key was never affected.
        assert (await cp.api.get("/v1/stores")).status_code == 200
