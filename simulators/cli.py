"""`storefleet-sim`: run N real agents in one process and measure what happens.

    storefleet-sim provision --stores 10 --devices-per-store 10            # embedded control plane
    storefleet-sim provision --server https://cp:8443 --admin-key-file admin.key --ca-file ca.pem …

Each agent enrolls with its own key and a token over HTTPS, connects to the broker with mTLS
and applies its signed desired state. At the end a JSON report with the figures is printed
(and written with --report). More scenarios (steady, rollout, storm, chaos) build on this.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from simulators.provision import ProvisionScenario, run_provision


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="storefleet-sim", description="storefleet fleet simulator")
    sub = parser.add_subparsers(dest="scenario", required=True)
    provision = sub.add_parser("provision", help="S stores x D devices enroll, connect and apply config")
    provision.add_argument("--stores", type=int, default=2)
    provision.add_argument("--devices-per-store", type=int, default=10)
    provision.add_argument("--seed", type=int, default=0)
    provision.add_argument("--enroll-concurrency", type=int, default=50)
    provision.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for convergence")
    provision.add_argument("--server", help="control plane URL (default: start an embedded one)")
    provision.add_argument(
        "--admin-key-file", type=Path, help="file holding an operator API key (with --server)"
    )
    provision.add_argument("--ca-file", type=Path, help="the control plane's CA certificate (with --server)")
    provision.add_argument("--report", type=Path, help="also write the JSON report here")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.stores < 1 or args.devices_per_store < 1:
        raise SystemExit("storefleet-sim: --stores and --devices-per-store must be at least 1")
    if args.server and not (args.admin_key_file and args.ca_file):
        raise SystemExit("storefleet-sim: --server needs --admin-key-file and --ca-file")
    scenario = ProvisionScenario(
        stores=args.stores,
        devices_per_store=args.devices_per_store,
        seed=args.seed,
        enroll_concurrency=args.enroll_concurrency,
        timeout_s=args.timeout,
        server_url=args.server,
        admin_key=args.admin_key_file.read_text().strip() if args.admin_key_file else None,
        ca_file=args.ca_file,
    )
    report = asyncio.run(run_provision(scenario))
    text = json.dumps(report, indent=2)
    print(text)
    if args.report:
        args.report.write_text(text + "\n")
    sys.exit(0 if report["converged"] else 1)


if __name__ == "__main__":
    main()
