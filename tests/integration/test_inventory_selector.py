"""DeviceSelector → SQL on SQLite and PostgreSQL: each filter, and filters combined.

Devices are inserted as rows (tests.support.inventory) so that each attribute can be chosen.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa
from pydantic import ValidationError

from control_plane.db.schema import devices
from control_plane.devices.filters import DeviceSelector, GroupSelector, selector_clause
from tests.support.inventory import T0, device_row, insert_devices, insert_stores, migrated_engine

pytestmark = pytest.mark.integration

NOW = T0 + timedelta(days=1)
FRESH = NOW - timedelta(seconds=10)
STALE = NOW - timedelta(hours=1)
ONLINE_AFTER = NOW - timedelta(minutes=1)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def engine(request, tmp_path):
    async with migrated_engine(request.param, tmp_path) as engine:
        await insert_stores(engine, ["DE-1", "DE-2", "FR-1"])
        await insert_devices(
            engine,
            [
                device_row(
                    "pos-a1",
                    "DE-1",
                    serial="AbC-100",
                    online=True,
                    last_seen_at=FRESH,
                    desired_version=3,
                    applied_version=3,
                    apply_status="applied",
                    health_status="healthy",
                    agent_version="1.2.0",
                ),
                device_row(
                    "pos-a2",
                    "DE-1",
                    serial="abc-200",
                    online=True,
                    last_seen_at=STALE,
                    desired_version=3,
                    applied_version=2,
                    apply_status="failed",
                    health_status="unhealthy",
                    agent_version="1.2.10",
                ),
                device_row(
                    "kiosk-b1",
                    "DE-2",
                    role="kiosk",
                    model="KIOSK-9",
                    hostname="Lobby_1",
                    agent_version="1.3.0",
                    desired_version=1,
                    applied_version=1,
                    apply_status="applied",
                    health_status="healthy",
                ),
                device_row(
                    "tab-c1",
                    "FR-1",
                    role="tablet",
                    model="TAB-X",
                    os="Android 14",
                    hostname="tab%1",
                    agent_version="1.20.0",
                ),
                device_row("pos-old", "FR-1", state="decommissioned"),
                device_row("pos-rev", "DE-2", state="revoked", online=True, last_seen_at=FRESH),
            ],
            tags={
                "pos-a1": ["eu", "beta"],
                "pos-a2": ["eu"],
                "kiosk-b1": ["beta"],
                "pos-old": ["eu", "beta"],
            },
        )
        yield engine


async def matching(engine, selector) -> list[str]:
    async with engine.connect() as conn:
        rows = await conn.scalars(
            sa.select(devices.c.id)
            .where(selector_clause(selector, online_after=ONLINE_AFTER))
            .order_by(devices.c.id)
        )
        return list(rows)


async def select(engine, **filters) -> list[str]:
    return await matching(engine, DeviceSelector(**filters))


async def test_each_filter(engine):
    assert await select(engine) == ["kiosk-b1", "pos-a1", "pos-a2", "tab-c1"]  # active only
    assert await select(engine, state=["any"]) == [
        "kiosk-b1",
        "pos-a1",
        "pos-a2",
        "pos-old",
        "pos-rev",
        "tab-c1",
    ]
    assert await select(engine, state=["revoked", "decommissioned"]) == ["pos-old", "pos-rev"]
    assert await select(engine, store_id=["DE-1", "DE-2"]) == ["kiosk-b1", "pos-a1", "pos-a2"]
    assert await select(engine, role=["kiosk", "tablet"]) == ["kiosk-b1", "tab-c1"]
    assert await select(engine, model="KIOSK-9") == ["kiosk-b1"]
    assert await select(engine, model="KIOSK") == []  # exact unless it ends in *
    assert await select(engine, model="KIOSK*") == ["kiosk-b1"]
    assert await select(engine, os="Android*") == ["tab-c1"]
    assert await select(engine, agent_version="1.2.*") == ["pos-a1", "pos-a2"]  # not 1.20.0
    assert await select(engine, agent_version="1.2.0") == ["pos-a1"]
    assert await select(engine, health_status=["unhealthy", "unknown"]) == ["pos-a2", "tab-c1"]
    assert await select(engine, apply_status=["failed"]) == ["pos-a2"]
    assert await select(engine, in_sync=True) == ["kiosk-b1", "pos-a1"]
    assert await select(engine, in_sync=False) == ["pos-a2", "tab-c1"]  # never issued counts as not in sync
    assert await select(engine, desired_version=3) == ["pos-a1", "pos-a2"]
    assert await select(engine, applied_version_min=1, applied_version_max=2) == ["kiosk-b1", "pos-a2"]
    assert await select(engine, desired_version_max=0) == ["tab-c1"]


async def test_online_applies_staleness_like_the_device_view(engine):
    # pos-a2 said "online" but was last heard from an hour ago: offline, like GET /v1/devices/{id}.
    assert await select(engine, online=True) == ["pos-a1"]
    assert await select(engine, online=False) == ["kiosk-b1", "pos-a2", "tab-c1"]


async def test_tags_require_all_given(engine):
    assert await select(engine, tag=["eu"]) == ["pos-a1", "pos-a2"]
    assert await select(engine, tag=["beta"]) == ["kiosk-b1", "pos-a1"]
    assert await select(engine, tag=["eu", "beta"]) == ["pos-a1"]
    assert await select(engine, tag=["eu", "beta", "eu"]) == ["pos-a1"]  # a repeat is one tag
    assert await select(engine, tag=["nowhere"]) == []


async def test_search_is_case_insensitive_over_id_serial_and_hostname(engine):
    assert await select(engine, q="ABC") == ["pos-a1", "pos-a2"]  # serial AbC-100, abc-200
    assert await select(engine, q="lobby") == ["kiosk-b1"]  # hostname Lobby_1
    assert await select(engine, q="TAB-C") == ["tab-c1"]  # id
    # LIKE wildcards in the search text are literal characters.
    assert await select(engine, q="%") == ["tab-c1"]  # hostname tab%1
    assert await select(engine, q="y_1") == ["kiosk-b1"]
    assert await select(engine, q="b_1") == []


async def test_filters_combine_with_and(engine):
    assert await select(engine, store_id=["DE-1", "DE-2"], tag=["beta"], in_sync=True) == [
        "kiosk-b1",
        "pos-a1",
    ]
    assert await select(engine, store_id=["DE-1"], tag=["beta"], health_status=["healthy"], q="abc") == [
        "pos-a1"
    ]
    assert await select(engine, role=["pos"], online=False) == ["pos-a2"]
    assert await select(engine, role=["pos"], state=["any"], tag=["eu", "beta"]) == ["pos-a1", "pos-old"]


async def test_group_selector_matches_inventory_attributes_in_any_state(engine):
    assert await matching(engine, GroupSelector(tag=["eu"])) == ["pos-a1", "pos-a2", "pos-old"]
    assert await matching(engine, GroupSelector()) == [
        "kiosk-b1",
        "pos-a1",
        "pos-a2",
        "pos-old",
        "pos-rev",
        "tab-c1",
    ]


def test_runtime_state_is_refused_in_a_group_selector():
    with pytest.raises(ValidationError) as refused:
        GroupSelector.model_validate({"role": ["pos"], "online": True})
    assert refused.value.errors()[0]["loc"] == ("online",)
    with pytest.raises(ValidationError):
        DeviceSelector.model_validate({"colour": "red"})
    with pytest.raises(ValidationError):
        DeviceSelector(tag=["EU"])  # tags are lower-case
    with pytest.raises(ValidationError):
        DeviceSelector(role=[])  # an empty list would match nothing: say so instead
