"""What `storefleet serve` runs: built from settings, started, run until cancelled.

ControlPlane.open()   data dir, database + migrations, CA, keys, admin key, services
ControlPlane.run()    embedded broker (unless external), broker session, ingest, renewals,
                      audit writer and the HTTPS API, until cancelled or signalled
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import TracebackType

import uvicorn
from cryptography.hazmat.primitives import serialization
from sqlalchemy.ext.asyncio import AsyncEngine

from control_plane.api.app import create_app
from control_plane.audit import AuditEvent, AuditLog, Outcome
from control_plane.auth.api_keys import ApiKeys
from control_plane.broker.embedded import EmbeddedBroker
from control_plane.broker.mosquitto_log import MosquittoLogWatcher
from control_plane.certificates.renewal import RenewalService
from control_plane.commands.service import UPLOAD_KEY_FILE, CommandService, load_or_create_upload_key
from control_plane.db.engine import create_engine, create_read_engine, migrate
from control_plane.desired.publisher import DesiredStatePublisher
from control_plane.desired.service import ConfigService
from control_plane.devices.lifecycle import DeviceLifecycle
from control_plane.devices.revocation import RevocationRegistry
from control_plane.devices.service import DeviceService
from control_plane.devices.tags import DeviceTags
from control_plane.enrollment.ratelimit import RateLimiter
from control_plane.enrollment.service import EnrollmentService
from control_plane.groups.service import GroupService
from control_plane.health.history import HealthHistory
from control_plane.health.rollup import StoreRollup
from control_plane.health.service import HealthMonitor
from control_plane.health.staleness import StalenessSweeper
from control_plane.ingest import Ingest
from control_plane.mqtt.link import BrokerLink, share_group
from control_plane.pki.ca import BuiltinCA, write_identity
from control_plane.pki.factory import open_pki
from control_plane.pki.gateway import CAGateway
from control_plane.pki.identity import control_plane_service
from control_plane.pki.service_identity import ServiceIdentity
from control_plane.pki.signing_keys import SigningKeyring
from control_plane.provisioning.service import ProvisioningService
from control_plane.provisioning.worker import ProvisioningWorker
from control_plane.releases.service import ReleaseService
from control_plane.rollouts.driver import RolloutDriver
from control_plane.rollouts.service import RolloutService
from control_plane.settings import ControlPlaneSettings
from control_plane.stores.service import StoreService
from control_plane.templates.service import TemplateService
from protocol.messages import BrokerEndpoint

logger = logging.getLogger(__name__)

SERVICE_CERT_VALIDITY = timedelta(days=30)


@dataclass
class Services:
    engine: AsyncEngine
    read_engine: AsyncEngine  # read-only API paths; `engine` itself except on SQLite
    audit: AuditLog
    api_keys: ApiKeys
    stores: StoreService
    enrollment: EnrollmentService
    devices: DeviceService
    publisher: DesiredStatePublisher
    ingest: Ingest
    link: BrokerLink
    renewals: RenewalService
    ca_chain_pem: str
    registry: RevocationRegistry
    lifecycle: DeviceLifecycle
    enroll_limiter: RateLimiter
    ca: CAGateway
    config: ConfigService
    commands: CommandService
    tags: DeviceTags
    groups: GroupService
    releases: ReleaseService
    rollouts: RolloutService
    rollout_driver: RolloutDriver
    health: HealthMonitor
    templates: TemplateService
    provisioning: ProvisioningService
    provisioning_worker: ProvisioningWorker
    # Refusal counters of the embedded broker (None with an external broker).
    broker_counters: Callable[[], dict[str, int]] | None = None


def ca_fingerprint(ca: BuiltinCA) -> str:
    der = ca.root_certificate.public_bytes(serialization.Encoding.DER)  # agents pin the root
    return "sha256:" + hashlib.sha256(der).hexdigest()


class _ApiServer(uvicorn.Server):
    """uvicorn without its own signal handling: the CLI owns SIGINT/SIGTERM and cancels
    `ControlPlane.run`, so the broker, ingest and audit writer shut down cleanly too."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ControlPlane:
    def __init__(self, settings: ControlPlaneSettings) -> None:
        self.settings = settings
        self.new_admin_key: str | None = None
        self.ready = asyncio.Event()
        self._services: Services | None = None
        self._broker: EmbeddedBroker | None = None
        self._http: uvicorn.Server | None = None

    @property
    def services(self) -> Services:
        if self._services is None:
            raise RuntimeError("ControlPlane.open() has not run")
        return self._services

    @property
    def broker(self) -> EmbeddedBroker | None:
        return self._broker

    @property
    def base_url(self) -> str:
        return f"https://{self.settings.advertised_host}:{self.settings.port}"

    async def __aenter__(self) -> ControlPlane:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def open(self) -> None:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        s.data_dir.chmod(0o700)
        engine = create_engine(s.resolved_database_url)
        await migrate(engine)
        read_engine = create_read_engine(s.resolved_database_url, engine)

        pki = await asyncio.to_thread(open_pki, s)  # key generation, Vault: off the loop
        ca = pki.local
        keyring = SigningKeyring.load_or_create(s.pki_dir / "signing")
        hostnames = list(dict.fromkeys([s.advertised_host, "localhost", "127.0.0.1"]))
        key_pem, issued = ca.issue_server_identity(hostnames)
        self._server_key, self._server_cert = write_identity(s.pki_dir, "server", key_pem, issued)
        self._ca_file = pki.trust_bundle_file  # built-in root + intermediate (+ Vault chain)
        service_name = control_plane_service(s.replica_id)  # also the MQTT client id
        identity = ServiceIdentity(
            ca,
            name=service_name,
            validity=SERVICE_CERT_VALIDITY,
            directory=s.pki_dir,
            trust_file=self._ca_file,
        )

        audit = AuditLog(engine)
        api_keys = ApiKeys(engine, read_engine=read_engine, cache_ttl=s.api_key_cache_s)
        given = s.admin_key.get_secret_value() if s.admin_key else None
        self.new_admin_key = await api_keys.ensure_admin(s.data_dir, given)

        ingest = Ingest(
            engine,
            audit,
            max_message_bytes=s.max_message_bytes,
            flush_interval_s=s.ingest_flush_interval_s,
            batch_size=s.ingest_batch_size,
        )
        broker_host, broker_port = s.broker_endpoint
        upload_key = load_or_create_upload_key(s.pki_dir / UPLOAD_KEY_FILE)
        publisher_ref: list[DesiredStatePublisher] = []
        link = BrokerLink(
            host=broker_host,
            port=broker_port,
            tls_context=identity.tls_context,
            client_id=service_name,
            on_message=ingest.handle,
            on_connected=lambda: publisher_ref[0].republish_all(),
            reconnect_max_s=s.mqtt_reconnect_max_s,
            # Replicas split device messages (docs/running.md "Several replicas").
            shared_group=share_group(upload_key) if s.replica_id is not None else None,
        )
        publisher = DesiredStatePublisher(engine, keyring, link)
        publisher_ref.append(publisher)
        gateway = pki.gateway
        renewals = RenewalService(
            engine=engine,
            ca=gateway,
            audit=audit,
            link=link,
            cert_validity=s.device_cert_validity,
            min_interval=timedelta(seconds=s.renewal_min_interval_s),
            ca_retry_after_s=s.renewal_ca_retry_after_s,
            queue_size=s.renewal_queue_size,
            workers=s.renewal_workers,
        )
        ingest.route_renewals(renewals.submit)
        s.artifacts_dir.mkdir(mode=0o700, exist_ok=True)
        commands = CommandService(
            engine=engine,
            keyring=keyring,
            link=link,
            audit=audit,
            artifacts_dir=s.artifacts_dir,
            upload_key=upload_key,
            base_url=self.base_url,
            default_ttl=timedelta(seconds=s.command_default_ttl_s),
            max_ttl=timedelta(seconds=s.command_max_ttl_s),
            sweep_interval_s=s.command_sweep_interval_s,
            resend_after=timedelta(seconds=s.command_resend_after_s),
            artifact_max_bytes=s.artifact_max_bytes,
        )
        ingest.route_commands(commands.submit_result, on_online=commands.device_online)
        registry = RevocationRegistry(engine=engine, gateway=gateway, crl_path=s.pki_dir / "crl.pem")
        rollout_driver = RolloutDriver(
            engine=engine,
            publisher=publisher,
            tick_s=s.rollout_tick_s,
            lease_ttl_s=s.rollout_lease_ttl_s,
            holder=None if s.replica_id is None else f"{service_name}:{secrets.token_hex(3)}",
        )
        offline_after = timedelta(seconds=s.health_interval_s * s.offline_after_intervals)
        health = HealthMonitor(
            sweeper=StalenessSweeper(engine=engine, offline_after=offline_after),
            rollup=StoreRollup(
                engine=engine, offline_after=offline_after, sync_grace=timedelta(seconds=s.store_sync_grace_s)
            ),
            history=HealthHistory(
                engine=engine,
                retention=timedelta(hours=s.health_retention_hours),
                delete_batch=s.health_retention_batch,
            ),
            sweep_interval_s=s.health_sweep_interval_s,
            rollup_interval_s=s.store_rollup_interval_s,
            retention_interval_s=s.health_retention_interval_s,
        )
        enrollment = EnrollmentService(
            engine=engine,
            ca=gateway,
            ca_fingerprint=ca_fingerprint(ca),
            keyring=keyring,
            publisher=publisher,
            registry=registry,
            audit=audit,
            broker=BrokerEndpoint(host=broker_host, port=broker_port),
            cert_validity=s.device_cert_validity,
            default_token_ttl=timedelta(hours=s.default_token_ttl_hours),
            health_interval_s=s.health_interval_s,
        )
        lifecycle = DeviceLifecycle(engine=engine, registry=registry, link=link, audit=audit)
        provisioning = ProvisioningService(
            engine=engine,
            enrollment=enrollment,
            audit=audit,
            timeout=timedelta(seconds=s.provisioning_timeout_s),
            offline_after=offline_after,
        )
        provisioning_worker = ProvisioningWorker(
            engine=engine,
            publisher=publisher,
            lifecycle=lifecycle,
            link=link,
            offline_after=offline_after,
            interval_s=s.provisioning_interval_s,
        )
        provisioning.on_change = provisioning_worker.wake
        enrollment.on_enrolled = lambda _store_id: provisioning_worker.wake()
        enrollment.on_reenrolled = ingest.forget_sequence
        self._services = Services(
            engine=engine,
            read_engine=read_engine,
            audit=audit,
            api_keys=api_keys,
            stores=StoreService(
                engine=engine,
                read_engine=read_engine,
                publisher=publisher,
                audit=audit,
                provisioning=provisioning,
            ),
            enrollment=enrollment,
            devices=DeviceService(engine=read_engine, offline_after=offline_after),
            publisher=publisher,
            ingest=ingest,
            link=link,
            renewals=renewals,
            ca_chain_pem=pki.trust_bundle_pem,
            registry=registry,
            lifecycle=lifecycle,
            ca=gateway,
            config=ConfigService(engine=engine, publisher=publisher, keyring=keyring, audit=audit),
            releases=ReleaseService(engine=engine, audit=audit),
            rollouts=RolloutService(engine=engine, audit=audit, wake_driver=rollout_driver.wake),
            rollout_driver=rollout_driver,
            enroll_limiter=RateLimiter(
                rate_per_s=s.enroll_rate_per_source_s, burst=s.enroll_burst_per_source
            ),
            commands=commands,
            tags=DeviceTags(engine=engine, publisher=publisher, audit=audit),
            groups=GroupService(engine=engine, publisher=publisher, audit=audit),
            health=health,
            templates=TemplateService(engine=engine, audit=audit),
            provisioning=provisioning,
            provisioning_worker=provisioning_worker,
        )

    async def close(self) -> None:
        if self._services is not None:
            await self._services.audit.flush()
            await self._services.engine.dispose()
            if self._services.read_engine is not self._services.engine:
                await self._services.read_engine.dispose()
            self._services.ca.close()
            self._services = None

    def _on_broker_security_event(self, event: str, details: dict[str, object]) -> None:
        identity = details.get("identity") or details.get("client_id") or details.get("source") or "unknown"
        self.services.audit.record_nowait(
            AuditEvent(
                action=f"broker.{event}",
                outcome=Outcome.DENIED,
                actor=str(identity)[:200],
                target=str(details.get("topic") or "")[:200] or None,
                detail={k: str(v)[:200] for k, v in details.items()},
            )
        )

    async def run(self) -> None:
        """Run every service until cancelled, or until SIGINT/SIGTERM stops the HTTP server."""
        s, services = self.settings, self.services
        if s.embedded_broker:
            self._broker = EmbeddedBroker(
                host=s.host,
                port=s.mqtt_port,
                ca_file=self._ca_file,
                cert_file=self._server_cert,
                key_file=self._server_key,
                trust_domain=s.trust_domain,
                max_message_bytes=s.max_message_bytes,
                on_security_event=self._on_broker_security_event,
            )
            await self._broker.start()
            services.registry.enforcer = self._broker
            services.broker_counters = lambda: dict(self._broker.counters) if self._broker else {}
        # Revocations survive restarts: the broker refuses revoked serials from the first CONNECT.
        # (The serials reach the broker before the CA is asked for a CRL: with Vault down the
        # control plane still starts, keeps the last crl.pem, and re-signs at the next revocation.)
        await services.registry.publish_after_commit()
        try:
            async with asyncio.TaskGroup() as group:
                background = [
                    group.create_task(services.audit.run(), name="audit"),
                    group.create_task(services.ingest.run(), name="ingest"),
                    group.create_task(services.publisher.run(), name="desired-publisher"),
                    group.create_task(services.registry.run(), name="crl-retry"),
                    *(
                        [group.create_task(self._watch_broker_log(s.broker_log_file), name="broker-log")]
                        if s.broker_log_file is not None and not s.embedded_broker
                        else []
                    ),
                    group.create_task(services.link.run(), name="broker-link"),
                    group.create_task(services.renewals.run(), name="renewals"),
                    group.create_task(services.commands.run(), name="commands"),
                    *(
                        [group.create_task(services.rollout_driver.run(), name="rollout-driver")]
                        if s.rollout_driver
                        else []
                    ),
                    group.create_task(services.health.run(), name="health-jobs"),
                    group.create_task(services.provisioning_worker.run(), name="provisioning"),
                ]
                try:
                    await self._serve_http()
                finally:
                    for task in background:
                        task.cancel()
        finally:
            with contextlib.suppress(Exception):
                await services.ingest.flush()
            if self._broker is not None:
                await self._broker.stop()

    async def _watch_broker_log(self, path: Path) -> None:
        await MosquittoLogWatcher(path, self._on_broker_security_event).run()

    async def _serve_http(self) -> None:
        s = self.settings
        config = uvicorn.Config(
            create_app(self.services),
            host=s.host,
            port=s.port,
            ssl_keyfile=str(self._server_key),
            ssl_certfile=str(self._server_cert),
            log_level="warning",
            access_log=False,
            lifespan="off",
            # Idle keep-alive TLS connections would otherwise hold shutdown for the 30 s TLS close timeout.
            timeout_graceful_shutdown=2,
            http="httptools",
        )
        self._http = _ApiServer(config)
        serving = asyncio.create_task(self._http.serve(), name="https")
        watcher = asyncio.create_task(self._mark_ready(), name="ready")
        try:
            await asyncio.shield(serving)
        except asyncio.CancelledError:
            self._http.should_exit = True
            await serving
            raise
        finally:
            watcher.cancel()

    async def _mark_ready(self) -> None:
        assert self._http is not None
        # uvicorn and aiomqtt expose flags, not events, for "started" and "connected".
        while not (self._http.started and self.services.link.is_connected):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        self.ready.set()
        logger.info("control plane ready at %s (broker %s:%d)", self.base_url, *self.settings.broker_endpoint)
