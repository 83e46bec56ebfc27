"""What the simulator costs per agent: RSS and CPU of N real agents at steady state.

    python -m benchmarks.simulator_cost --devices 2000 --procs 2 --mosquitto --postgres

The agents run in `--procs` worker processes, one at least (the control plane, in this
process, is not counted); each reports health every `--interval` seconds for `--seconds`. Figures: RSS added
per agent (worker RSS after connecting minus before enrolling), CPU per agent at steady state
(% of a core), and the health figures (sent vs accepted, lost). Goal context: 10,000 agents in
one process on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from benchmarks.common import emit_report, measuring_lock_async, simulator_target
from simulators.scenarios import Driver, SimConfig

RESULTS = Path(__file__).parent / "results"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    config = SimConfig(
        scenario="steady",
        stores=max(1, args.devices // args.devices_per_store),
        devices_per_store=args.devices_per_store,
        procs=args.procs,
        duration_s=args.seconds,
        health_interval_s=args.interval,
        enroll_concurrency=args.enroll_concurrency,
        timeout_s=args.timeout,
        isolate_agents=True,
    )
    async with (
        simulator_target(postgres=args.postgres, mosquitto=args.mosquitto) as target,
        measuring_lock_async(),
    ):
        report = await Driver(config, target).run()
    simulator = report["simulator"]
    return {
        "benchmark": "simulator_cost",
        "control_plane": report["control_plane"],
        "devices": report["devices"],
        "procs": args.procs,
        "health_interval_s": args.interval,
        "rss_added_kb_per_agent": simulator["rss_added_kb_per_agent"],
        "worker_rss_mb": simulator["rss_mb_per_shard"],
        "steady_cpu_percent_of_a_core": simulator.get("steady_cpu_percent_of_a_core"),
        "steady_cpu_percent_per_agent": simulator.get("steady_cpu_percent_per_agent"),
        "health": report["health"],
        "provision": report["provision"],
        "control_plane_process": report["control_plane_process"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.simulator_cost", description=__doc__)
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--devices-per-store", type=int, default=100)
    parser.add_argument("--procs", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=30.0, help="health interval (the product default)")
    parser.add_argument("--enroll-concurrency", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--postgres", action="store_true")
    parser.add_argument("--mosquitto", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = asyncio.run(run(args))
    emit_report(report, args.json or RESULTS / f"simulator-cost-{args.devices}.json")


if __name__ == "__main__":
    main()
