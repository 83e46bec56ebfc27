"""group_layers_for: the membership the desired-state layer assembly relies on.

Groups and devices are written as rows (tests.support.inventory) — thousands of devices are
needed to show the chunked queries stay correct past the bound-parameter limits.
"""

from __future__ import annotations

import random

import pytest

from control_plane.db.schema import group_members, groups
from control_plane.devices.filters import GroupSelector
from control_plane.groups.membership import GroupLayer, group_ids_for, group_layers_for
from tests.support.inventory import T0, device_row, insert_devices, insert_stores, migrated_engine

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def engine(request, tmp_path):
    async with migrated_engine(request.param, tmp_path) as engine:
        yield engine


async def insert_group(engine, group_id, *, priority=100, selector=None, members=(), layer=None):
    async with engine.begin() as conn:
        await conn.execute(
            groups.insert().values(
                id=group_id,
                name=group_id,
                kind="dynamic" if selector is not None else "static",
                selector=selector,
                layer=layer or {"config": {"set_by": group_id}, "policies": {}, "checks": {}},
                priority=priority,
                revision=1,
                created_at=T0,
                updated_at=T0,
            )
        )
        if members:
            await conn.execute(
                group_members.insert(),
                [{"group_id": group_id, "device_id": d, "added_at": T0} for d in members],
            )


async def test_layers_in_priority_then_id_order_from_static_and_dynamic_groups(engine):
    await insert_stores(engine, ["S1", "S2"])
    await insert_devices(
        engine,
        [
            device_row("dev-1", "S1"),
            device_row("dev-2", "S1", role="kiosk"),
            device_row("dev-3", "S2"),
            device_row("dev-4", "S2", role="kiosk"),
        ],
        tags={"dev-1": ["eu"], "dev-2": ["eu", "beta"]},
    )
    await insert_group(engine, "zz-first", priority=5, members=["dev-1"])
    await insert_group(engine, "eu", priority=100, selector={"tag": ["eu"]})
    await insert_group(engine, "b-kiosks", priority=100, selector={"role": ["kiosk"]})
    await insert_group(engine, "late", priority=900, members=["dev-2", "dev-1"])
    await insert_group(engine, "s2-beta", priority=50, selector={"store_id": ["S2"], "tag": ["beta"]})

    async with engine.connect() as conn:
        layers = await group_layers_for(conn, ["dev-1", "dev-2", "dev-3", "dev-4", "dev-unknown"])
        ids = await group_ids_for(conn, ["dev-2"])

    assert {d: [g.group_id for g in ls] for d, ls in layers.items()} == {
        "dev-1": ["zz-first", "eu", "late"],
        "dev-2": ["b-kiosks", "eu", "late"],  # equal priority 100: id order
        "dev-4": ["b-kiosks"],
    }  # dev-3 is in no group, dev-unknown does not exist: both absent
    assert layers["dev-1"][0] == GroupLayer(
        group_id="zz-first",
        priority=5,
        layer={"config": {"set_by": "zz-first"}, "policies": {}, "checks": {}},
    )
    assert ids == {"dev-2": ["b-kiosks", "eu", "late"]}


async def test_no_groups_and_no_devices(engine):
    await insert_stores(engine, ["S1"])
    await insert_devices(engine, [device_row("dev-1", "S1")])
    async with engine.connect() as conn:
        assert await group_layers_for(conn, ["dev-1"]) == {}
    await insert_group(engine, "all", selector={})
    async with engine.connect() as conn:
        assert await group_layers_for(conn, []) == {}
        assert [g.group_id for g in (await group_layers_for(conn, ["dev-1", "dev-1"]))["dev-1"]] == ["all"]


async def test_ten_thousand_devices_in_chunks(engine):
    """10,000 ids span many chunks on both sides (static 900, dynamic 500): every answer is
    checked against the same membership computed in Python."""
    rng = random.Random(7)
    store_ids = [f"S{i}" for i in range(20)]
    await insert_stores(engine, store_ids)
    rows, tags = [], {}
    for i in range(10_000):
        device_id = f"dev-{i:05d}"
        rows.append(device_row(device_id, rng.choice(store_ids), role=rng.choice(["pos", "kiosk", "tablet"])))
        tags[device_id] = rng.sample(["eu", "beta", "night"], rng.randint(0, 2))
    await insert_devices(engine, rows, tags)
    static = {f"static-{n}": rng.sample([r["id"] for r in rows], 2_000) for n in range(3)}
    for n, (group_id, members) in enumerate(static.items()):
        await insert_group(engine, group_id, priority=10 * n, members=members)
    selectors = {
        "dyn-beta": {"tag": ["beta"]},
        "dyn-eu-kiosk": {"tag": ["eu"], "role": ["kiosk"]},
        "dyn-stores": {"store_id": store_ids[:5]},
        "dyn-eu-night": {"tag": ["eu", "night"]},
    }
    for group_id, selector in selectors.items():
        await insert_group(engine, group_id, priority=15, selector=selector)

    def expected_groups(row) -> list[str]:
        found = [(10 * n, g) for n, (g, members) in enumerate(static.items()) if row["id"] in members]
        for group_id, sel in selectors.items():
            s = GroupSelector.model_validate(sel)
            if (s.tag is None or set(s.tag) <= set(tags[row["id"]])) and (
                (s.role is None or row["role"] in s.role)
                and (s.store_id is None or row["store_id"] in s.store_id)
            ):
                found.append((15, group_id))
        return [g for _, g in sorted(found)]

    ids = [r["id"] for r in rows]
    rng.shuffle(ids)
    async with engine.connect() as conn:
        layers = await group_layers_for(conn, ids)
    expected = {r["id"]: expected_groups(r) for r in rows}
    assert {d: [g.group_id for g in ls] for d, ls in layers.items()} == {
        d: g for d, g in expected.items() if g
    }
    assert len(layers) > 5_000  # the test exercises real membership, not an empty answer
