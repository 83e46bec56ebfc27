"""Device lifecycle rules: revoke and decommission.

Revoke: every certificate of the device is revoked, the CRL is re-published, and the embedded
broker drops the device now and refuses it from then on. Its desired state stays (an operator
can issue a re-enrollment token to bring it back).

Decommission: revoke, plus the retained topics of the device (desired, status) are cleared
on the broker and the device can never come back (re-enrollment refused).
"""

from __future__ import annotations

import logging

import aiomqtt
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from control_plane.audit import AuditEvent, AuditLog, Outcome
from control_plane.clock import Clock, utc_now
from control_plane.db.schema import devices
from control_plane.desired.publisher import Publisher
from control_plane.devices.revocation import RevocationRegistry, revoke_certificates
from control_plane.errors import Conflict, NotFound
from protocol.topics import TopicKind, device_topic

logger = logging.getLogger(__name__)

ACTIVE, REVOKED, DECOMMISSIONED = "active", "revoked", "decommissioned"


class DeviceLifecycle:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        registry: RevocationRegistry,
        link: Publisher,
        audit: AuditLog,
        clock: Clock = utc_now,
    ) -> None:
        self._engine = engine
        self._registry = registry
        self._link = link
        self._audit = audit
        self._clock = clock

    async def revoke(self, device_id: str, *, reason: str, actor: str) -> list[str]:
        serials = await self._retire(
            device_id, new_state=REVOKED, reason=reason, actor=actor, action="device.revoke"
        )
        return serials

    async def decommission(self, device_id: str, *, actor: str) -> list[str]:
        serials = await self._retire(
            device_id,
            new_state=DECOMMISSIONED,
            reason="decommissioned",
            actor=actor,
            action="device.decommission",
        )
        # An empty retained message deletes the retained one (MQTT 3.1.1 §3.3.1.3).
        for kind in (TopicKind.DESIRED, TopicKind.STATUS):
            try:
                await self._link.publish(device_topic(device_id, kind), b"", qos=1, retain=True)
            except (ConnectionError, aiomqtt.MqttError):
                logger.warning("broker not connected: retained %s of %s not cleared", kind.value, device_id)
        return serials

    async def _retire(
        self, device_id: str, *, new_state: str, reason: str, actor: str, action: str
    ) -> list[str]:
        now = self._clock()
        async with self._engine.begin() as conn:
            state = await conn.scalar(
                sa.select(devices.c.state).where(devices.c.id == device_id).with_for_update()
            )
            if state is None:
                raise NotFound(f"device {device_id!r} does not exist", code="device_not_found")
            if state == DECOMMISSIONED:
                raise Conflict(f"device {device_id!r} is decommissioned", code="device_decommissioned")
            serials = await revoke_certificates(conn, device_id, reason=reason, at=now)
            await conn.execute(
                sa.update(devices).where(devices.c.id == device_id).values(state=new_state, online=False)
            )
            await self._audit.record(
                AuditEvent(
                    action=action,
                    outcome=Outcome.SUCCESS,
                    actor=actor,
                    target=device_id,
                    detail={"reason": reason, "serials": serials, "previous_state": state},
                ),
                connection=conn,
            )
        try:
            await self._registry.publish_after_commit(serials)
        finally:
            enforcer = self._registry.enforcer
            if enforcer is not None:
                await enforcer.disconnect(device_id)
        return serials
