"""The device layer (overrides), effective configuration with provenance, and signing-key rotation."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from control_plane.api.preconditions import etag_for
from control_plane.audit import AuditEvent, AuditLog, Outcome
from control_plane.clock import Clock, utc_now
from control_plane.db.schema import devices
from control_plane.desired.assembly import assemble
from control_plane.desired.layers import SECTIONS, ConfigLayer, effective_state_with_provenance
from control_plane.desired.models import EffectiveConfig, LayerSource, OverridesView, SigningKeyView
from control_plane.desired.publisher import DesiredStatePublisher
from control_plane.errors import Conflict, NotFound, PreconditionFailed
from control_plane.pki.signing_keys import SigningKeyring


class ConfigService:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        publisher: DesiredStatePublisher,
        keyring: SigningKeyring,
        audit: AuditLog,
        clock: Clock = utc_now,
    ) -> None:
        self._engine = engine
        self._publisher = publisher
        self._keyring = keyring
        self._audit = audit
        self._clock = clock

    # --- device overrides --------------------------------------------------------------

    async def get_overrides(self, device_id: str) -> OverridesView:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(devices.c.overrides, devices.c.overrides_revision).where(
                        devices.c.id == device_id
                    )
                )
            ).first()
        if row is None:
            raise NotFound(f"device {device_id!r} does not exist", code="device_not_found")
        return OverridesView(
            device_id=device_id, revision=row.overrides_revision, **_sections(row.overrides or {})
        )

    async def set_overrides(
        self, device_id: str, layer: ConfigLayer, *, actor: str, expected_revision: int | None
    ) -> OverridesView:
        """Replace the device layer (If-Match aware) and issue a new version if the result changed."""
        async with self._engine.begin() as conn:
            where = [devices.c.id == device_id, devices.c.state == "active"]
            if expected_revision is not None:
                where.append(devices.c.overrides_revision == expected_revision)
            result = await conn.execute(
                sa.update(devices)
                .where(*where)
                .values(overrides=layer.as_layer(), overrides_revision=devices.c.overrides_revision + 1)
            )
            if result.rowcount == 0:
                row = (
                    await conn.execute(
                        sa.select(devices.c.state, devices.c.overrides_revision).where(
                            devices.c.id == device_id
                        )
                    )
                ).first()
                if row is None:
                    raise NotFound(f"device {device_id!r} does not exist", code="device_not_found")
                if row.state != "active":
                    raise Conflict(f"device {device_id!r} is {row.state}", code="device_not_active")
                raise PreconditionFailed(
                    f"device {device_id!r} overrides are at revision {row.overrides_revision}, "
                    f"not {expected_revision}: read them again and re-apply your change",
                    current_etag=etag_for(row.overrides_revision),
                )
            await self._audit.record(
                AuditEvent(
                    action="device.set_overrides", outcome=Outcome.SUCCESS, actor=actor, target=device_id
                ),
                connection=conn,
            )
        await self._publisher.refresh_now_or_later([device_id])
        return await self.get_overrides(device_id)

    # --- effective configuration -------------------------------------------------------

    async def effective_config(self, device_id: str) -> EffectiveConfig:
        async with self._engine.connect() as conn:
            device = (
                await conn.execute(
                    sa.select(devices.c.state, devices.c.desired_version, devices.c.applied_version).where(
                        devices.c.id == device_id
                    )
                )
            ).first()
            if device is None:
                raise NotFound(f"device {device_id!r} does not exist", code="device_not_found")
            if device.state != "active":
                raise Conflict(
                    f"device {device_id!r} is {device.state}: it has no configuration",
                    code="device_not_active",
                )
            (item,) = await assemble(conn, devices.c.id == device_id)
        state, provenance = effective_state_with_provenance(item.layers)
        return EffectiveConfig(
            device_id=device_id,
            store_id=item.store_id,
            role=item.role,
            desired_version=device.desired_version,
            applied_version=device.applied_version,
            config=state["config"],
            policies=state["policies"],
            checks=state["checks"],
            layers=[LayerSource.parse(source) for source, _ in item.layers],
            provenance={path: LayerSource.parse(source) for path, source in provenance.items()},
        )

    # --- signing keys ------------------------------------------------------------------

    def signing_keys(self) -> list[SigningKeyView]:
        return [
            SigningKeyView(
                kid=key.kid, public_key_pem=key.public_key_pem, active=key.kid == self._keyring.active_kid
            )
            for key in self._keyring.public_keys()
        ]

    async def add_signing_key(self, *, actor: str) -> SigningKeyView:
        kid = self._keyring.add()
        await self._audit.record(
            AuditEvent(action="signing_key.add", outcome=Outcome.SUCCESS, actor=actor, target=kid)
        )
        await self._distribute_trusted_keys()
        return next(view for view in self.signing_keys() if view.kid == kid)

    async def activate_signing_key(self, kid: str, *, actor: str, force: bool) -> SigningKeyView:
        """Sign with `kid` from now on. Refused while devices have not applied the version
        that made them trust it (they would reject everything signed by it), unless forced."""
        if kid not in {key.kid for key in self._keyring.public_keys()}:
            raise NotFound(f"signing key {kid!r} is not in the keyring", code="signing_key_not_found")
        lagging = await self._devices_out_of_sync()
        if lagging and not force:
            raise Conflict(
                f"{lagging} active devices have not applied their newest desired state yet, so they may "
                f"not trust {kid} yet; wait for them, or pass force=true",
                code="rotation_in_progress",
            )
        self._keyring.activate(kid)
        await self._audit.record(
            AuditEvent(
                action="signing_key.activate",
                outcome=Outcome.SUCCESS,
                actor=actor,
                target=kid,
                detail={"devices_out_of_sync": lagging, "forced": force},
            )
        )
        return next(view for view in self.signing_keys() if view.kid == kid)

    async def retire_signing_key(self, kid: str, *, actor: str) -> None:
        self._keyring.retire(kid)
        await self._audit.record(
            AuditEvent(action="signing_key.retire", outcome=Outcome.SUCCESS, actor=actor, target=kid)
        )
        await self._distribute_trusted_keys()

    async def _distribute_trusted_keys(self) -> None:
        await self._publisher.refresh_now_or_later(everyone=True)

    async def _devices_out_of_sync(self) -> int:
        async with self._engine.connect() as conn:
            count = await conn.scalar(
                sa.select(sa.func.count()).where(
                    devices.c.state == "active", devices.c.applied_version < devices.c.desired_version
                )
            )
        return int(count or 0)


def _sections(layer: dict[str, Any]) -> dict[str, Any]:
    return {section: layer.get(section) or {} for section in SECTIONS}
