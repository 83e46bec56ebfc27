"""Desired-state issue throughput: the publisher's refresh of N devices, without agents or broker.

    python -m benchmarks.issue [--devices 10000] [--backend sqlite|postgres|both] [--repeat 3] \
        [--profile 25] [--json out.json]

A fresh, migrated database per backend, filled directly with N device rows in 50 stores
(each with its own store layer), 4 roles, 2 static groups (20 % of the fleet each) and 2
dynamic groups (by tag and by role). Measured inside the measuring lock, median of `--repeat`:

- `changed`: a release layer is put in force on every device (what a 100 % rollout wave
  does), then `DesiredStatePublisher.refresh_devices(all ids)` — every device gets a new,
  signed version;
- `unchanged`: the same refresh again: every content hash is equal, nothing is issued;
- `publish`: handing the issued documents to a broker link that discards them (the
  publisher's own encoding cost, not the broker's).

Wall time and this process's CPU time (the database server's not included) are reported.
`--profile K` prints the K most expensive functions (cProfile, cumulative) of one `changed` refresh.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import ec

from benchmarks.common import emit_report, measuring_lock_async
from control_plane.db.schema import device_releases, group_members, groups, releases, rollouts, stores
from control_plane.desired.publisher import DesiredStatePublisher
from control_plane.pki.signing_keys import SigningKeyring
from tests.support.inventory import T0, device_row, insert_devices, insert_stores, migrated_engine

ROLES = ["pos", "kiosk", "tablet", "backoffice"]
TAGS = ["eu", "beta", "night"]


class _DiscardingLink:
    """A connected broker link that drops every message (measures the publisher, not a broker)."""

    def __init__(self) -> None:
        self.sent = 0

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self.sent += 1

    @property
    def is_connected(self) -> bool:
        return True


def _layer(config: dict[str, Any], policies: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"config": config, "policies": policies or {}, "checks": {}}


async def _fill(engine: Any, devices: int, rng: random.Random) -> list[str]:
    store_ids = [f"S{i:03d}" for i in range(50)]
    await insert_stores(engine, store_ids)
    async with engine.begin() as conn:
        for n, store_id in enumerate(store_ids):
            await conn.execute(
                stores.update()
                .where(stores.c.id == store_id)
                .values(config=_layer({"store": {"number": n, "tz": "Europe/Berlin"}}, {"reboot": "03:00"}))
            )
    rows, tags = [], {}
    for i in range(devices):
        device_id = f"dev-{i:06d}"
        rows.append(device_row(device_id, store_ids[i % len(store_ids)], role=rng.choice(ROLES)))
        tags[device_id] = rng.sample(TAGS, rng.randint(0, 2))
    for start in range(0, len(rows), 2000):
        chunk = rows[start : start + 2000]
        await insert_devices(engine, chunk, {r["id"]: tags[r["id"]] for r in chunk})
    ids = [r["id"] for r in rows]
    async with engine.begin() as conn:
        for n in range(2):
            await conn.execute(
                groups.insert().values(
                    id=f"static-{n}",
                    name="s",
                    kind="static",
                    layer=_layer({"feature": {f"flag{n}": True}}),
                    priority=n,
                    created_at=T0,
                    updated_at=T0,
                )
            )
            await conn.execute(
                group_members.insert(),
                [
                    {"group_id": f"static-{n}", "device_id": d, "added_at": T0}
                    for d in rng.sample(ids, len(ids) // 5)
                ],
            )
        for n, selector in enumerate([{"tag": ["eu"]}, {"role": ["kiosk"]}]):
            await conn.execute(
                groups.insert().values(
                    id=f"dynamic-{n}",
                    name="d",
                    kind="dynamic",
                    selector=selector,
                    layer=_layer({"pos": {"theme": f"t{n}"}}),
                    priority=10 + n,
                    created_at=T0,
                    updated_at=T0,
                )
            )
    return ids


async def _put_release_in_force(engine: Any, ids: list[str], n: int) -> None:
    """What a rollout wave does: a `device_releases` row per device, then a refresh."""
    release_id, rollout_id = f"rel-{n}", f"ro-{n}"
    async with engine.begin() as conn:
        await conn.execute(
            releases.insert().values(
                id=release_id,
                name="r",
                layer=_layer({"pos": {"build": f"2026.{n}"}}),
                created_by="b",
                created_at=T0,
            )
        )
        await conn.execute(
            rollouts.insert().values(
                id=rollout_id,
                release_id=release_id,
                selector={},
                plan={},
                state="running",
                seq=n,
                created_by="b",
                created_at=T0,
                updated_at=T0,
            )
        )
        await conn.execute(sa.delete(device_releases))
        for start in range(0, len(ids), 5000):
            await conn.execute(
                device_releases.insert(),
                [
                    {"device_id": d, "rollout_id": rollout_id, "release_id": release_id, "seq": n}
                    for d in ids[start : start + 5000]
                ],
            )


async def _measure(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(5)  # noqa: S311 - reproducible test data, not secrets
    keyring = SigningKeyring([ec.generate_private_key(ec.SECP256R1())])
    with tempfile.TemporaryDirectory(prefix="storefleet-bench-") as tmp:
        async with migrated_engine(kind, Path(tmp)) as engine:
            ids = await _fill(engine, args.devices, rng)
            link = _DiscardingLink()
            publisher = DesiredStatePublisher(engine, keyring, link)
            await publisher.refresh_devices(ids)  # the fleet's first versions
            publisher._outbox.clear()
            changed_s, unchanged_s, publish_s = [], [], []
            changed_cpu_s, unchanged_cpu_s = [], []
            profile_text = ""
            async with measuring_lock_async():
                for n in range(1, args.repeat + 1):
                    await _put_release_in_force(engine, ids, n)
                    profiler = cProfile.Profile() if args.profile and n == 1 else None
                    started, cpu = time.perf_counter(), time.process_time()
                    if profiler:
                        profiler.enable()
                    issued = await publisher.refresh_devices(ids)
                    if profiler:
                        profiler.disable()
                    changed_s.append(time.perf_counter() - started)
                    changed_cpu_s.append(time.process_time() - cpu)
                    assert issued == len(ids), issued
                    if profiler:
                        out = io.StringIO()
                        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(args.profile)
                        profile_text = out.getvalue()
                    documents, publisher._outbox = publisher._outbox, []
                    started = time.perf_counter()
                    await publisher._publish(documents)
                    publish_s.append(time.perf_counter() - started)
                    started, cpu = time.perf_counter(), time.process_time()
                    again = await publisher.refresh_devices(ids)
                    unchanged_s.append(time.perf_counter() - started)
                    unchanged_cpu_s.append(time.process_time() - cpu)
                    assert again == 0, again
            if profile_text:
                print(f"--- cProfile of one changed refresh ({kind}) ---\n{profile_text}")
            return {
                "backend": kind,
                "devices": args.devices,
                "changed_refresh_s": round(statistics.median(changed_s), 3),
                "changed_per_s": round(args.devices / statistics.median(changed_s)),
                "changed_cpu_s": round(statistics.median(changed_cpu_s), 3),
                "unchanged_refresh_s": round(statistics.median(unchanged_s), 3),
                "unchanged_cpu_s": round(statistics.median(unchanged_cpu_s), 3),
                "publish_encode_s": round(statistics.median(publish_s), 3),
                "runs_changed_s": [round(s, 3) for s in changed_s],
            }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    kinds = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    results = [asyncio.run(_measure(kind, args)) for kind in kinds]
    emit_report({"benchmark": "desired-state-issue", "results": results}, args.json)


if __name__ == "__main__":
    main()
