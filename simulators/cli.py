"""`storefleet-sim`: run N real agents (in one process or several) and measure what happens.

    storefleet-sim provision --stores 10 --devices-per-store 10       # embedded control plane
    storefleet-sim steady --stores 10 --devices-per-store 100 --interval 1 --duration 30 --procs 2
    storefleet-sim rollout --stores 100 --devices-per-store 10 --report out.json --plots plots/
    storefleet-sim storm --stores 10 --devices-per-store 50
    storefleet-sim chaos --stores 5 --devices-per-store 10 --seed 7 --duration 20
    storefleet-sim rollout --config scenario.toml                     # flags from a TOML table
    storefleet-sim rollout --server https://cp:8443 --admin-key-file admin.key --ca-file ca.pem …

Each agent enrolls with its own key and a token over HTTPS, connects to the broker with mTLS
and applies its signed desired state. A live progress display runs on a terminal (not with
--quiet); at the end the JSON report is printed (and written with --report), plots with
--plots. The exit status is 0 when the scenario's figures are what a healthy fleet gives.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tomllib
from pathlib import Path
from typing import Any

from simulators.faults import ChaosRates
from simulators.scenarios import SCENARIOS, ScenarioError, SimConfig, Target, run_scenario


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML file: keys are these options (stores = 10, …)")
    parser.add_argument("--stores", type=int, default=2)
    parser.add_argument("--devices-per-store", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="same seed, same devices and fault plan")
    parser.add_argument("--procs", type=int, default=1, help="worker processes for the agents")
    parser.add_argument("--enroll-concurrency", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each phase")
    parser.add_argument("--interval", type=float, help="health report interval (s); steady: 1")
    parser.add_argument("--server", help="control plane URL (default: start an embedded one)")
    parser.add_argument(
        "--admin-key-file", type=Path, help="file holding an operator API key (with --server)"
    )
    parser.add_argument("--ca-file", type=Path, help="the control plane's CA certificate (with --server)")
    parser.add_argument("--report", type=Path, help="also write the JSON report here")
    parser.add_argument("--plots", type=Path, help="write PNG plots into this directory")
    parser.add_argument("--quiet", action="store_true", help="no live progress display")


def build_parser(defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """The parser; `defaults` (from --config) replace the built-in defaults of every scenario."""
    parser = argparse.ArgumentParser(prog="storefleet-sim", description="storefleet fleet simulator")
    sub = parser.add_subparsers(dest="scenario", required=True)
    helps = {
        "provision": "S stores x D devices enroll, connect and apply their configuration",
        "steady": "agents report health at an interval; sent vs accepted, simulator cost per agent",
        "rollout": "a release rolled out to every store (or a store configuration change); propagation",
        "storm": "the broker restarts; everyone reconnects at once",
        "chaos": "random disconnects, devices offline, apply failures, slow devices, trading stores; "
        "a rollout amid it",
    }
    for name in SCENARIOS:
        scenario = sub.add_parser(name, help=helps[name])
        _common(scenario)
        if name in ("steady", "chaos"):
            scenario.add_argument("--duration", type=float, default=10.0, help="seconds")
        if name == "rollout":
            scenario.add_argument("--changes", type=int, default=1, help="configuration changes, in turn")
            scenario.add_argument(
                "--via",
                choices=("release", "store-config"),
                default="release",
                help="ship each change as a release and a rollout (default), or as "
                "PUT /v1/stores/{id}/config per store",
            )
        if name == "storm":
            scenario.add_argument("--downtime", type=float, default=1.0, help="seconds the broker is down")
        if name == "chaos":
            rates = ChaosRates()
            scenario.add_argument(
                "--disconnect-rate",
                type=float,
                default=rates.disconnects_per_device_minute,
                help="disconnects per device per minute",
            )
            scenario.add_argument("--offline-fraction", type=float, default=rates.offline_fraction)
            scenario.add_argument("--offline-seconds", type=float, default=rates.offline_s)
            scenario.add_argument("--failure-rate", type=float, default=rates.apply_failure_rate)
            scenario.add_argument("--slow-fraction", type=float, default=rates.slow_fraction)
            scenario.add_argument("--slow-seconds", type=float, default=rates.slow_apply_s)
            scenario.add_argument(
                "--trading-fraction",
                type=float,
                default=rates.trading_fraction,
                help="share of stores open for trading until the end of the phase (the change's "
                "rollout defers their devices until they close)",
            )
        if defaults:
            scenario.set_defaults(**defaults)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is not None:
        # The file's values become defaults: flags on the command line still win.
        try:
            table: dict[str, Any] = tomllib.loads(args.config.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SystemExit(f"storefleet-sim: cannot read {args.config}: {exc}") from exc
        table = table.get(args.scenario, table)
        known = vars(args)
        unknown = sorted(k for k in table if k.replace("-", "_") not in known)
        if unknown:
            raise SystemExit(f"storefleet-sim: unknown keys in {args.config}: {', '.join(unknown)}")
        args = build_parser({k.replace("-", "_"): v for k, v in table.items()}).parse_args(argv)
    return args


def config_from_args(args: argparse.Namespace) -> SimConfig:
    chaos = ChaosRates()
    if args.scenario == "chaos":
        chaos = ChaosRates(
            duration_s=args.duration,
            disconnects_per_device_minute=args.disconnect_rate,
            offline_fraction=args.offline_fraction,
            offline_s=args.offline_seconds,
            apply_failure_rate=args.failure_rate,
            slow_fraction=args.slow_fraction,
            slow_apply_s=args.slow_seconds,
            trading_fraction=args.trading_fraction,
        )
    return SimConfig(
        scenario=args.scenario,
        stores=args.stores,
        devices_per_store=args.devices_per_store,
        seed=args.seed,
        procs=args.procs,
        enroll_concurrency=args.enroll_concurrency,
        timeout_s=args.timeout,
        duration_s=getattr(args, "duration", 10.0),
        health_interval_s=args.interval,
        changes=getattr(args, "changes", 1),
        via=getattr(args, "via", "release"),
        downtime_s=getattr(args, "downtime", 1.0),
        chaos=chaos,
        quiet=args.quiet,
        plots_dir=args.plots,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.server and not (args.admin_key_file and args.ca_file):
        raise SystemExit("storefleet-sim: --server needs --admin-key-file and --ca-file")
    try:
        config = config_from_args(args)
    except (ScenarioError, ValueError) as exc:
        raise SystemExit(f"storefleet-sim: {exc}") from exc
    target = None
    if args.server:
        target = Target(
            args.server,
            args.admin_key_file.read_text().strip(),
            args.ca_file,
            f"external: {args.server}",
        )
    try:
        report = asyncio.run(run_scenario(config, target))
    except ScenarioError as exc:
        raise SystemExit(f"storefleet-sim: {exc}") from exc
    text = json.dumps(report, indent=2)
    print(text)
    if args.report:
        args.report.write_text(text + "\n")
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
