"""`GET /metrics` in the Prometheus text format.

Gauges are read from the database at scrape time (a scrape every 15-60 s costs two small
queries); counters come from the live ingest and broker objects.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from control_plane.api.deps import ServicesDep

if TYPE_CHECKING:
    from control_plane.runtime import Services

router = APIRouter(tags=["health"])

EXPIRY_BUCKETS = [
    ("1h", timedelta(hours=1)),
    ("24h", timedelta(hours=24)),
    ("7d", timedelta(days=7)),
    ("30d", timedelta(days=30)),
]


async def render(services: Services) -> bytes:
    registry = CollectorRegistry()
    certs = Gauge(
        "storefleet_certificates_valid",
        "Valid device certificates by time left until expiry",
        ["expires_within"],
        registry=registry,
    )
    for label, count in (await services.devices.certificate_expiry_buckets(EXPIRY_BUCKETS)).items():
        certs.labels(expires_within=label).set(count)
    devices = Gauge(
        "storefleet_devices",
        "Devices by lifecycle state and connection",
        ["state", "online"],
        registry=registry,
    )
    for (state, online), count in (await services.devices.counts_by_state()).items():
        devices.labels(state=state, online=str(online).lower()).set(count)
    accepted = Counter("storefleet_ingest_accepted", "Device messages accepted", ["kind"], registry=registry)
    for kind, count in services.ingest.accepted.items():
        accepted.labels(kind=kind).inc(count)
    rejected = Counter(
        "storefleet_ingest_rejected", "Device messages rejected", ["reason"], registry=registry
    )
    for reason, count in services.ingest.rejected.items():
        rejected.labels(reason=reason).inc(count)
    if services.broker_counters is not None:
        broker = Counter(
            "storefleet_broker_refusals", "Embedded broker refusals", ["kind"], registry=registry
        )
        for kind, count in services.broker_counters().items():
            broker.labels(kind=kind).inc(count)
    published = Counter(
        "storefleet_desired_published", "Desired-state documents published", registry=registry
    )
    published.inc(services.publisher.published)
    renewal = services.renewals
    renewals = Counter(
        "storefleet_renewals", "Certificate renewal requests by outcome", ["outcome"], registry=registry
    )
    for outcome, count in (
        ("issued", renewal.issued),
        ("dropped", renewal.dropped),
        ("unsent", renewal.unsent),
    ):
        renewals.labels(outcome=outcome).inc(count)
    for reason, count in renewal.refused.items():
        renewals.labels(outcome=f"refused_{reason}").inc(count)
    commands = Counter(
        "storefleet_commands", "Operator command sends and device results", ["event"], registry=registry
    )
    for event, count in (
        ("sent", services.commands.sent),
        ("result", services.commands.results),
        ("duplicate_result", services.commands.duplicate_results),
        ("dropped_result", services.commands.dropped_results),
    ):
        commands.labels(event=event).inc(count)
    await _health_metrics(services, registry)
    audit_dropped = Counter(
        "storefleet_audit_dropped", "Audit records lost to a full queue", registry=registry
    )
    audit_dropped.inc(services.audit.dropped)
    return generate_latest(registry)


@router.get("/metrics", response_class=Response)
async def metrics(services: ServicesDep) -> Response:
    return Response(await render(services), media_type=CONTENT_TYPE_LATEST)


async def _health_metrics(services: Services, registry: CollectorRegistry) -> None:
    ingest, health = services.ingest, services.health
    history = Counter(
        "storefleet_health_history_rows", "Health-history rows by outcome", ["outcome"], registry=registry
    )
    for outcome, count in (
        ("written", ingest.history_written),
        ("ignored_inactive_device", ingest.history_ignored),
        ("dropped_buffer_full", ingest.history_overflow),
        ("duplicate_not_stored", ingest.history_duplicates),
        ("deleted_retention", health.history.deleted),
    ):
        history.labels(outcome=outcome).inc(count)
    Gauge("storefleet_ingest_flush_seconds_max", "Longest ingest flush since start", registry=registry).set(
        ingest.flush_seconds_max
    )
    Counter(
        "storefleet_devices_marked_offline", "Devices marked offline by staleness", registry=registry
    ).inc(health.sweeper.marked_offline)
    changes = Counter(
        "storefleet_store_status_changes",
        "Store status changes by the roll-up, by new status",
        ["to"],
        registry=registry,
    )
    for status, count in health.rollup.changes.items():
        changes.labels(to=status).inc(count)
    stores = Gauge("storefleet_stores", "Stores by status", ["status"], registry=registry)
    for status, count in (await health.rollup.counts_by_status()).items():
        stores.labels(status=status).set(count)
