"""Group membership in bulk, and inventory pages, on SQLite and PostgreSQL.

    python -m benchmarks.group_membership [--devices 10000] [--static 3] [--dynamic 5] \
        [--repeat 5] [--json out.json]

A fresh, migrated database per backend (a file in a temp dir; a new database on the local
PostgreSQL), filled with device rows in 20 stores with random roles and tags, `--static`
groups of 20 % of the fleet each and `--dynamic` groups selecting by tag, role and store.
Measured (median of `--repeat` runs, inside the measuring lock):

- `group_layers_for` over every device id — what the desired-state layer assembly does
  when the whole fleet is refreshed;
- one inventory page of 1000 devices filtered by tag, sorted by `last_seen_at`, with tags and
  groups in each view — what `GET /v1/devices?tag=…&sort=last_seen_at&limit=1000` costs.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from benchmarks.common import emit_report, measuring_lock_async
from control_plane.db.schema import group_members, groups
from control_plane.devices.models import DeviceListQuery
from control_plane.devices.service import DeviceService
from control_plane.groups.membership import group_layers_for
from tests.support.inventory import T0, device_row, insert_devices, insert_stores, migrated_engine

TAGS = ["eu", "beta", "night", "pilot", "legacy"]


async def _fill(engine: Any, args: argparse.Namespace, rng: random.Random) -> list[str]:
    store_ids = [f"S{i:02d}" for i in range(20)]
    await insert_stores(engine, store_ids)
    rows, tags = [], {}
    for i in range(args.devices):
        device_id = f"dev-{i:06d}"
        seen = T0 + timedelta(seconds=rng.randint(0, 3600)) if i % 10 else None
        rows.append(
            device_row(
                device_id,
                rng.choice(store_ids),
                role=rng.choice(["pos", "kiosk", "tablet", "backoffice"]),
                last_seen_at=seen,
            )
        )
        tags[device_id] = rng.sample(TAGS, rng.randint(0, 3))
    await insert_devices(engine, rows, tags)
    ids = [r["id"] for r in rows]
    layer = {"config": {"k": "v"}, "policies": {}, "checks": {}}
    async with engine.begin() as conn:
        for n in range(args.static):
            await conn.execute(
                groups.insert().values(
                    id=f"static-{n}",
                    name="s",
                    kind="static",
                    layer=layer,
                    priority=n,
                    created_at=T0,
                    updated_at=T0,
                )
            )
            members = rng.sample(ids, len(ids) // 5)
            await conn.execute(
                group_members.insert(),
                [{"group_id": f"static-{n}", "device_id": d, "added_at": T0} for d in members],
            )
        for n in range(args.dynamic):
            selector = [
                {"tag": [TAGS[n % len(TAGS)]]},
                {"role": ["kiosk"], "tag": ["eu"]},
                {"store_id": store_ids[: 2 + n]},
            ][n % 3]
            await conn.execute(
                groups.insert().values(
                    id=f"dynamic-{n}",
                    name="d",
                    kind="dynamic",
                    selector=selector,
                    layer=layer,
                    priority=50 + n,
                    created_at=T0,
                    updated_at=T0,
                )
            )
    return ids


async def _measure(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(11)  # noqa: S311 - reproducible test data, not secrets
    with tempfile.TemporaryDirectory(prefix="storefleet-bench-") as tmp:
        async with migrated_engine(kind, Path(tmp)) as engine:
            ids = await _fill(engine, args, rng)
            service = DeviceService(engine=engine, offline_after=timedelta(seconds=90))
            query = DeviceListQuery(tag=["eu"], sort="last_seen_at", limit=1000)
            layers_s, page_s = [], []
            async with measuring_lock_async():
                for _ in range(args.repeat):
                    async with engine.connect() as conn:
                        started = time.perf_counter()
                        layers = await group_layers_for(conn, ids)
                        layers_s.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    page = await service.list_devices(query)
                    page_s.append(time.perf_counter() - started)
            return {
                "backend": kind,
                "devices": args.devices,
                "devices_in_a_group": len(layers),
                "group_layers_for_all_s": round(statistics.median(layers_s), 4),
                "page_of_1000_with_tags_and_groups_s": round(statistics.median(page_s), 4),
                "page_items": len(page.items),
            }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--static", type=int, default=3)
    parser.add_argument("--dynamic", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = [asyncio.run(_measure(kind, args)) for kind in ("sqlite", "postgres")]
    emit_report(
        {
            "benchmark": "group-membership",
            "static_groups": args.static,
            "dynamic_groups": args.dynamic,
            "results": results,
        },
        args.json,
    )


if __name__ == "__main__":
    main()
