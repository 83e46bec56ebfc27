"""``storefleet-agent``: enroll this device, run the agent, show its status.

    storefleet-agent enroll --server https://cp.example:8443 --ca-fingerprint sha256:… [--role pos]
    storefleet-agent run
    storefleet-agent status
    storefleet-agent reenroll --server … --ca-fingerprint sha256:…   (or: enroll --reenroll)

`reenroll` brings back a device whose certificate expired (or whose key was lost) with a
re-enrollment token an operator created for it (``POST /v1/devices/{id}/reenrollment-tokens``):
same device id, applied state kept, a new key and certificate.

The token comes from ``--token`` or, better (it stays out of the process list),
``STOREFLEET_AGENT_TOKEN``. The state directory is ``--state-dir``, else
``STOREFLEET_AGENT_STATE_DIR``, else ``/var/lib/storefleet-agent``.

Exit codes: 0 success, 1 the operation failed (enrollment refused, server unreachable, not
enrolled, unusable state), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import signal
import socket
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent import AGENT_VERSION
from agent.errors import AgentError, ConfigurationError, EnrollmentError
from agent.handlers import default_handlers
from agent.health import PsutilProbe
from agent.identity import expiry, load_certificate
from agent.logs import configure_logging
from agent.runtime import Agent
from agent.settings import AgentSettings
from agent.state import DB_NAME, AgentState
from protocol.messages import DeviceInfo

logger = logging.getLogger("agent.cli")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="storefleet-agent", description="storefleet edge agent")
    parser.add_argument("--version", action="version", version=f"%(prog)s {AGENT_VERSION}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_state_dir(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--state-dir",
            type=Path,
            help="agent state directory (default: $STOREFLEET_AGENT_STATE_DIR or /var/lib/storefleet-agent)",
        )

    def with_enrollment(sub: argparse.ArgumentParser) -> None:
        with_state_dir(sub)
        sub.add_argument("--server", help="control plane URL, https://… ($STOREFLEET_AGENT_SERVER_URL)")
        sub.add_argument("--token", help="enrollment token (prefer $STOREFLEET_AGENT_TOKEN)")
        pin = sub.add_mutually_exclusive_group()
        pin.add_argument("--ca-file", type=Path, help="PEM file of the control plane's CA")
        pin.add_argument("--ca-fingerprint", help="sha256:<hex> of the control plane's CA certificate")
        sub.add_argument("--role", help="device role, e.g. pos, kiosk (if the token allows a choice)")
        sub.add_argument("--model", default="", help="hardware model")
        sub.add_argument("--serial", default="", help="hardware serial number")
        sub.add_argument("--hostname", default=None, help="host name to report (default: this host's)")

    enroll_cmd = commands.add_parser("enroll", help="enroll this device with the control plane")
    with_enrollment(enroll_cmd)
    enroll_cmd.add_argument("--force", action="store_true", help="enroll again, as a new device")
    enroll_cmd.add_argument(
        "--reenroll", action="store_true", help="re-enroll this device (same id) with a re-enrollment token"
    )
    reenroll_cmd = commands.add_parser(
        "reenroll", help="re-enroll this device (same id, new key) with a re-enrollment token"
    )
    with_enrollment(reenroll_cmd)
    reenroll_cmd.set_defaults(reenroll=True, force=False)

    run_cmd = commands.add_parser("run", help="run the agent until SIGTERM/SIGINT")
    with_state_dir(run_cmd)
    run_cmd.add_argument(
        "--config-dir",
        type=Path,
        help="where to write config.json, policies.json, storefleet.env and policy.enforced.json",
    )

    status_cmd = commands.add_parser("status", help="print this device's enrollment and applied version")
    with_state_dir(status_cmd)
    return parser


def _settings(args: argparse.Namespace) -> AgentSettings:
    overrides: dict[str, Any] = {}
    if args.state_dir is not None:
        overrides["state_dir"] = args.state_dir
    if getattr(args, "config_dir", None) is not None:
        overrides["config_dir"] = args.config_dir
    if getattr(args, "server", None) is not None:
        overrides["server_url"] = args.server
    if getattr(args, "token", None) is not None:
        overrides["token"] = args.token
    if getattr(args, "ca_file", None) is not None or getattr(args, "ca_fingerprint", None) is not None:
        # A flag replaces whichever pin the environment set.
        overrides["ca_file"] = args.ca_file
        overrides["ca_fingerprint"] = args.ca_fingerprint
    try:
        return AgentSettings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "settings"
        raise ConfigurationError(f"{field}: {first['msg']}") from None


def _open_state(settings: AgentSettings) -> AgentState:
    return AgentState.open(settings.state_dir)


def _print_json(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


# --- enroll --------------------------------------------------------------------------


def _cmd_enroll(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings.server_url is None:
        raise ConfigurationError("no control plane URL: pass --server or set STOREFLEET_AGENT_SERVER_URL")
    if settings.token is None:
        raise ConfigurationError("no enrollment token: pass --token or set STOREFLEET_AGENT_TOKEN")
    if settings.ca_file is None and settings.ca_fingerprint is None:
        raise ConfigurationError("pin the control plane's CA with --ca-file or --ca-fingerprint")
    if args.reenroll and not (settings.state_dir / DB_NAME).exists():
        raise ConfigurationError(f"no enrolled device in {settings.state_dir} to re-enroll: use `enroll`")
    state = _open_state(settings)
    try:
        existing = state.enrollment()
        if args.reenroll and existing is None:
            raise ConfigurationError(f"no enrolled device in {settings.state_dir} to re-enroll: use `enroll`")
        if existing is not None and not args.force and not args.reenroll:
            raise ConfigurationError(
                f"already enrolled as device {existing.device_id} in store {existing.store_id} "
                f"(state in {settings.state_dir}); use `reenroll` with a re-enrollment token to renew "
                "its identity, or --force to enroll as a new device"
            )
        device = DeviceInfo(
            hostname=(args.hostname or socket.gethostname())[:200],
            model=args.model,
            serial=args.serial,
            os=platform.platform()[:200],
            agent_version=AGENT_VERSION,
            role=args.role,
        )
        from agent.enrollment import enroll  # aiohttp (~11 MB resident): not for `run`

        response = asyncio.run(
            enroll(
                server_url=settings.server_url,
                token=settings.token.get_secret_value(),
                state=state,
                ca_file=settings.ca_file,
                ca_fingerprint=settings.ca_fingerprint,
                device=device,
                timeout_s=settings.http_timeout_s,
                reenroll=args.reenroll,
            )
        )
    finally:
        state.close()
    _print_json(
        {
            "reenrolled": bool(args.reenroll),
            "device_id": response.device_id,
            "store_id": response.store_id,
            "broker": f"{response.broker.host}:{response.broker.port}",
            "certificate_not_after": expiry(load_certificate(response.certificate_pem)).isoformat(),
            "state_dir": str(settings.state_dir),
        }
    )
    return EXIT_OK


# --- run -----------------------------------------------------------------------------


async def _serve(agent: Agent) -> None:
    """Run `agent` until SIGTERM or SIGINT, then let it say goodbye and disconnect."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    runner = asyncio.create_task(agent.run(), name="agent")
    stopper = asyncio.create_task(stop.wait(), name="stop")
    try:
        done, _ = await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if runner in done:
            runner.result()  # run() only returns by cancellation: this raises its error
        logger.info("stopping on signal")
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        for task in (stopper, runner):
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise


async def _run_agent(settings: AgentSettings, state: AgentState) -> None:
    agent = Agent(settings, state, default_handlers(settings.config_path), PsutilProbe(settings.state_dir))
    agent.log.info(
        "storefleet-agent %s starting: store %s, broker %s:%s, config in %s",
        AGENT_VERSION,
        agent.store_id,
        agent.broker_host,
        agent.broker_port,
        settings.config_path,
    )
    await _serve(agent)
    agent.log.info("stopped")


def _cmd_run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    configure_logging(settings.log_level, settings.log_format, settings.log_file)
    state = _open_state(settings)
    try:
        asyncio.run(_run_agent(settings, state))
    finally:
        state.close()
    return EXIT_OK


# --- status --------------------------------------------------------------------------


def _cmd_status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if not (settings.state_dir / DB_NAME).exists():
        _print_json({"enrolled": False, "state_dir": str(settings.state_dir)})
        return EXIT_FAILURE
    state = _open_state(settings)
    try:
        enrollment = state.enrollment()
        if enrollment is None:
            _print_json({"enrolled": False, "state_dir": str(settings.state_dir)})
            return EXIT_FAILURE
        applied = state.applied()
        cert_pem = state.certificate_pem()
        not_after = expiry(load_certificate(cert_pem)) if cert_pem is not None else None
        staged_pem = state.pending_certificate_pem()
        staged_not_after = expiry(load_certificate(staged_pem)) if staged_pem is not None else None
        now = datetime.now(UTC)
        expired = not_after is None or not_after <= now
        renewal = state.renewal()
        needs_reenrollment = expired and (staged_not_after is None or staged_not_after <= now)
        _print_json(
            {
                "enrolled": True,
                "device_id": enrollment.device_id,
                "store_id": enrollment.store_id,
                "broker": f"{enrollment.broker_host}:{enrollment.broker_port}",
                "enrolled_at": enrollment.enrolled_at.isoformat(),
                "applied_version": applied.version,
                "applied_at": applied.applied_at.isoformat() if applied.applied_at else None,
                "certificate_not_after": not_after.isoformat() if not_after else None,
                "certificate_expired": expired,
                "renewed_certificate_staged_not_after": _iso(staged_not_after),
                "needs_reenrollment": needs_reenrollment,
                "renewal": {
                    "status": "expired" if needs_reenrollment else renewal.status or None,
                    "next_renewal_at": _iso(renewal.next_renewal_at),
                    "last_renewed_at": _iso(renewal.last_renewed_at),
                    "renewals": renewal.renewals,
                    "last_error": renewal.last_error,
                },
                "signing_keys": sorted(state.signing_keys()),
                "interrupted_apply": journal.version if (journal := state.journal()) is not None else None,
                "health_reports_queued": state.health_backlog(),
                "state_dir": str(settings.state_dir),
            }
        )
        if needs_reenrollment:
            sys.stderr.write(
                f"storefleet-agent: the device certificate expired; re-enroll device {enrollment.device_id}: "
                "an operator creates a re-enrollment token (POST /v1/devices/<id>/reenrollment-tokens), "
                "then run `storefleet-agent reenroll --token … --server … --ca-fingerprint …`\n"
            )
    finally:
        state.close()
    return EXIT_OK


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


_COMMANDS = {"enroll": _cmd_enroll, "reenroll": _cmd_enroll, "run": _cmd_run, "status": _cmd_status}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except ConfigurationError as exc:
        sys.stderr.write(f"storefleet-agent: {exc.message}\n")
        return EXIT_USAGE
    except EnrollmentError as exc:
        sys.stderr.write(f"storefleet-agent: enrollment failed: {exc}\n")
        return EXIT_FAILURE
    except AgentError as exc:
        sys.stderr.write(f"storefleet-agent: {exc.message}\n")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
