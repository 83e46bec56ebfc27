"""`storefleet`: the control-plane server and operator commands.

    storefleet serve [--data-dir DIR] [--host H] [--port P] [--mqtt-port M]
                     [--database-url URL] [--broker-url mqtts://…] [--broker-log-file F]
    storefleet broker-config mosquitto --data-dir DIR --out DIR [--port P] [--control-plane-replica ID …]
    storefleet ca init [--data-dir DIR] [--trust-domain T]
    storefleet templates import FILE [--data-dir DIR] [--database-url URL]
    storefleet demo

Flags override `STOREFLEET_*` environment variables (see docs/configuration.md). `demo`
belongs to the simulator (it runs real agents) and is imported only when asked for.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from control_plane.logs import configure_logging
from control_plane.settings import ControlPlaneSettings


def _settings(args: argparse.Namespace, names: tuple[str, ...]) -> ControlPlaneSettings:
    given: dict[str, Any] = {
        name: getattr(args, name) for name in names if getattr(args, name, None) is not None
    }
    try:
        return ControlPlaneSettings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise SystemExit(f"storefleet: invalid setting {field!r}: {first['msg']}") from None


async def _serve(settings: ControlPlaneSettings) -> None:
    from control_plane.runtime import ControlPlane

    async with ControlPlane(settings) as control_plane:
        if control_plane.new_admin_key:
            print(
                "Admin API key (shown once; also saved to "
                f"{settings.data_dir / 'admin.key'}):\n  {control_plane.new_admin_key}",
                flush=True,
            )
        print(
            f"storefleet control plane: API {control_plane.base_url}  "
            f"broker mqtts://{':'.join(map(str, settings.broker_endpoint))}  "
            f"data {settings.data_dir.resolve()}",
            flush=True,
        )
        stop = asyncio.current_task()
        assert stop is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.cancel)
        try:
            await control_plane.run()
        except asyncio.CancelledError:
            logging.getLogger(__name__).info("stopped by signal")


def _broker_config(args: argparse.Namespace) -> None:
    from control_plane.broker.mosquitto import write_mosquitto_config
    from control_plane.pki.factory import load_builtin_ca
    from control_plane.pki.files import write_public

    settings = _settings(args, ("data_dir", "trust_domain"))
    ca = load_builtin_ca(settings)
    crl_file = settings.pki_dir / "crl.pem"
    if not crl_file.exists():  # `serve` keeps it current from then on
        write_public(crl_file, ca.crl_pem([]).encode())
    conf = write_mosquitto_config(
        args.out,
        ca=ca,
        port=args.port,
        bind_address=args.bind,
        hostnames=args.hostname or None,
        run_as_user=args.user,
        client_id_from_certificate=args.client_id_from_certificate,
        control_plane_replicas=args.control_plane_replica or (),
        crl_file=crl_file,
        log_file=args.out / "mosquitto.log",
    )
    if settings.ca_backend != "builtin":
        # Devices' certificates come from Vault: Mosquitto must trust its chain too.
        from control_plane.pki.factory import open_pki

        write_public(conf.parent / "ca.pem", open_pki(settings).trust_bundle_pem.encode())
    print(
        f"wrote {conf}\nstart it with: mosquitto -c {conf}\n"
        f"then: storefleet serve --data-dir {settings.data_dir} --broker-url mqtts://127.0.0.1:{args.port} "
        f"--broker-log-file {args.out / 'mosquitto.log'}"
    )


def _ca_init(args: argparse.Namespace) -> None:
    from control_plane.pki.ca import INTERMEDIATE_CERT, ROOT_CERT, ROOT_KEY, BuiltinCA
    from control_plane.pki.factory import ca_passphrase
    from control_plane.runtime import ca_fingerprint

    settings = _settings(args, ("data_dir", "trust_domain"))
    pki = settings.pki_dir
    passphrase = ca_passphrase(settings)
    outcome = BuiltinCA.initialize(pki, trust_domain=settings.trust_domain, passphrase=passphrase)
    ca = BuiltinCA.load(pki, trust_domain=settings.trust_domain, passphrase=passphrase)
    print(
        f"built-in CA {outcome.value} in {pki.resolve()}\n"
        f"  root          {ROOT_CERT:<17} {ca_fingerprint(ca)}  (agents pin this: --ca-fingerprint)\n"
        f"  intermediate  {INTERMEDIATE_CERT:<17} signs every certificate"
        f"{' (key passphrase-protected)' if passphrase else ''}"
    )
    if (pki / ROOT_KEY).exists():
        print(f"The root key {pki / ROOT_KEY} is only needed to sign a new intermediate: move it offline.")


async def _templates_import(args: argparse.Namespace) -> None:
    from control_plane.audit import AuditLog
    from control_plane.db.engine import create_engine, migrate
    from control_plane.errors import StorefleetError
    from control_plane.templates.importer import import_templates
    from control_plane.templates.service import TemplateService

    settings = _settings(args, ("data_dir", "database_url"))
    if settings.database_url is None:  # SQLite in the data dir, as `serve` would make it
        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    engine = create_engine(settings.resolved_database_url)
    try:
        await migrate(engine)
        service = TemplateService(engine=engine, audit=AuditLog(engine))
        for result in await import_templates(service, args.file, actor="cli:templates-import"):
            print(f"{result.template_id}: {result.outcome} (version {result.version})")
    except StorefleetError as exc:
        raise SystemExit(f"storefleet: {exc.message}") from None
    finally:
        await engine.dispose()


@contextlib.contextmanager
def _ca_setup_errors() -> Iterator[None]:
    from control_plane.pki.ca import CAConfigurationError

    try:
        yield
    except CAConfigurationError as exc:
        raise SystemExit(f"storefleet: {exc.message}") from None


SERVE_FLAGS = (
    "broker_log_file",
    "data_dir",
    "host",
    "port",
    "mqtt_port",
    "database_url",
    "broker_url",
    "public_host",
    "trust_domain",
    "log_format",
    "replica_id",
)


def _replica_id(value: str) -> str:
    from control_plane.pki.identity import control_plane_service

    try:
        control_plane_service(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="storefleet", description="Store Provisioning Platform control plane"
    )
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the control plane (embedded broker + SQLite by default)")
    serve.add_argument("--data-dir", type=Path)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--mqtt-port", type=int, help="port of the embedded broker")
    serve.add_argument("--database-url", help="postgresql+asyncpg://… (default: SQLite in the data dir)")
    serve.add_argument("--broker-url", help="mqtts://host:port of an external broker (default: embedded)")
    serve.add_argument("--public-host", help="host name agents use to reach this server and broker")
    serve.add_argument("--trust-domain")
    serve.add_argument("--log-format", choices=["text", "json"])
    serve.add_argument(
        "--replica-id", type=_replica_id, help="this replica's id when several share a broker and database"
    )
    serve.add_argument(
        "--broker-log-file", type=Path, help="an external Mosquitto's log: refusals go to the audit log"
    )

    broker = sub.add_parser("broker-config", help="generate configuration for a production broker")
    broker_sub = broker.add_subparsers(dest="broker", required=True)
    mosquitto = broker_sub.add_parser("mosquitto", help="Mosquitto with mTLS, identity usernames and ACL")
    mosquitto.add_argument("--data-dir", type=Path, help="the control plane's data dir (its CA signs)")
    mosquitto.add_argument("--trust-domain")
    mosquitto.add_argument("--out", type=Path, required=True)
    mosquitto.add_argument("--port", type=int, default=8883)
    mosquitto.add_argument("--bind", default="127.0.0.1")
    mosquitto.add_argument("--hostname", action="append", help="name/IP for the broker certificate (repeat)")
    mosquitto.add_argument("--user", help="user Mosquitto runs as (e.g. root in a test sandbox)")
    mosquitto.add_argument(
        "--client-id-from-certificate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="force each client id to its certificate CN (stops client-id take-over; one connection per "
        "identity, which is what the control plane uses)",
    )

    mosquitto.add_argument(
        "--control-plane-replica",
        action="append",
        type=_replica_id,
        metavar="ID",
        help="allow a control-plane replica started with --replica-id ID (repeat for each)",
    )

    ca = sub.add_parser("ca", help="the built-in certificate authority")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True)
    ca_init = ca_sub.add_parser(
        "init", help="create the root and intermediate CA (serve does it on first start); idempotent"
    )
    ca_init.add_argument("--data-dir", type=Path)
    ca_init.add_argument("--trust-domain")

    templates = sub.add_parser("templates", help="store templates")
    templates_sub = templates.add_subparsers(dest="templates_command", required=True)
    templates_import = templates_sub.add_parser(
        "import", help="create/update templates from a templates.json (name → {role: count})"
    )
    templates_import.add_argument("file", type=Path)
    templates_import.add_argument("--data-dir", type=Path)
    templates_import.add_argument("--database-url")

    sub.add_parser("demo", help="run the product end to end with 20 in-process agents, then exit")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        settings = _settings(args, SERVE_FLAGS)
        configure_logging(level=args.log_level, fmt=settings.log_format)
        with _ca_setup_errors(), contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(settings))
    elif args.command == "broker-config":
        configure_logging(level=args.log_level)
        with _ca_setup_errors():
            _broker_config(args)
    elif args.command == "ca":
        configure_logging(level=args.log_level)
        with _ca_setup_errors():
            _ca_init(args)
    elif args.command == "templates":
        configure_logging(level=args.log_level)
        asyncio.run(_templates_import(args))
    elif args.command == "demo":
        from simulators.demo import run_demo

        configure_logging(level="WARNING")
        sys.exit(asyncio.run(run_demo()))


if __name__ == "__main__":
    main()
