"""`Reconciler`: turns one desired-state message into one `ReportedState`.

The checks, in order, each with the reason code the control plane sees:

1. size and JSON                    rejected ``invalid_message``
2. schema rule (protocol.versions)  rejected ``unsupported_schema`` / ``invalid_message``
3. the document is for this device  rejected ``wrong_device``
4. signature by a pinned key,       rejected ``unknown_signing_key`` / ``bad_signature``
   verified on the raw dict as received (fields a newer control plane adds stay covered)
5. version newer than the applied   rejected ``stale_version``
   one (anti-rollback: a rollback is a *new* version with old content). An identical
   re-delivery of the version in force (the retained message after a reconnect) is
   acknowledged as applied without applying it again.
6. the handler applies it           failed ``apply_failed`` (last-known-good stays in force)
                                    or applied; the raw document becomes last-known-good.

Every report carries `applied_version`, the version actually in force after the message.
The reconciler never raises for a bad message; it raises only if local state fails.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import ApplyError
from agent.handlers import ApplyHandler
from agent.state import AgentState
from protocol.errors import ProtocolError
from protocol.messages import (
    MAX_MESSAGE_BYTES,
    ApplyStatus,
    DesiredState,
    ReportedState,
    parse_object,
    validate,
)
from protocol.signing import canonical_json, load_public_key, verify_document

logger = logging.getLogger(__name__)

REASON_WRONG_DEVICE = "wrong_device"
REASON_STALE = "stale_version"
REASON_APPLY_FAILED = "apply_failed"
_DETAIL_MAX = 1000


def trusted_keys(pems: Mapping[str, str]) -> dict[str, ec.EllipticCurvePublicKey]:
    """Parse the pinned signing keys once (kid → public key)."""
    return {kid: load_public_key(pem) for kid, pem in pems.items()}


def _version_of(document: Mapping[str, Any] | None) -> int:
    """The version a (possibly invalid) document claims, for the report; 0 if none."""
    if document is None:
        return 0
    version = document.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version >= 0:
        return version
    return 0


class Reconciler:
    def __init__(
        self,
        *,
        device_id: str,
        state: AgentState,
        handler: ApplyHandler,
        keys: Mapping[str, ec.EllipticCurvePublicKey],
        max_bytes: int = MAX_MESSAGE_BYTES,
        on_applied: Callable[[int], None] | None = None,
        log: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
    ) -> None:
        self.device_id = device_id
        self._state = state
        self._handler = handler
        self._keys = dict(keys)
        self._max_bytes = max_bytes
        self._on_applied = on_applied
        self._log = log or logger
        applied = state.applied()
        self.applied_version = applied.version
        self._applied_canonical = canonical_json(applied.document) if applied.document is not None else None

    def _report(
        self, version: int, status: ApplyStatus, reason: str | None = None, detail: str | None = None
    ) -> ReportedState:
        return ReportedState(
            device_id=self.device_id,
            version=version,
            status=status,
            reason=reason,
            detail=detail[:_DETAIL_MAX] if detail else None,
            applied_version=self.applied_version,
        )

    def _reject(self, version: int, reason: str, detail: str) -> ReportedState:
        self._log.warning("rejected desired state version %s: %s (%s)", version, reason, detail)
        return self._report(version, ApplyStatus.REJECTED, reason, detail)

    async def handle(self, payload: bytes) -> ReportedState:
        raw: dict[str, Any] | None = None
        try:
            raw = self._parse(payload)
            desired = validate(DesiredState, raw)
        except ProtocolError as exc:
            return self._reject(_version_of(raw), exc.reason, str(exc))

        if desired.device_id != self.device_id:
            return self._reject(
                desired.version, REASON_WRONG_DEVICE, f"document is for device {desired.device_id!r}"
            )

        try:
            verify_document(raw, self._keys)
        except ProtocolError as exc:
            return self._reject(desired.version, exc.reason, str(exc))

        if desired.version <= self.applied_version:
            if desired.version == self.applied_version and canonical_json(raw) == self._applied_canonical:
                self._log.debug("version %s re-delivered; already in force", desired.version)
                return self._report(desired.version, ApplyStatus.APPLIED)
            return self._reject(
                desired.version,
                REASON_STALE,
                f"version {desired.version} is not newer than applied version {self.applied_version}",
            )

        try:
            await self._handler.apply(desired)
        except ApplyError as exc:
            self._log.warning("applying version %s failed: %s", desired.version, exc.detail)
            return self._report(desired.version, ApplyStatus.FAILED, REASON_APPLY_FAILED, exc.detail)
        except Exception as exc:
            # A handler bug must not take the session down (the retained message would come
            # back after the reconnect and crash it again): report it and keep going.
            self._log.exception("apply handler crashed on version %s", desired.version)
            detail = f"{type(exc).__name__}: {exc}"
            return self._report(desired.version, ApplyStatus.FAILED, REASON_APPLY_FAILED, detail)

        await self._state.io(self._state.record_applied, desired.version, raw)
        self.applied_version = desired.version
        self._applied_canonical = canonical_json(raw)
        self._log.info("applied desired state version %s", desired.version)
        if self._on_applied is not None:
            self._on_applied(desired.version)
        return self._report(desired.version, ApplyStatus.APPLIED)

    def _parse(self, payload: bytes) -> dict[str, Any]:
        return parse_object(payload, max_bytes=self._max_bytes)
