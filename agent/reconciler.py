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
6. `signing_keys` and every         rejected ``invalid_config``: nothing was changed
   handler's section validate
7. the pipeline installs it         failed ``apply_failed`` (reverted: last-known-good in force)
8. its app checks pass once         failed ``post_apply_unhealthy`` (reverted; detail names
                                    the check), or applied: the raw document becomes
                                    last-known-good (see `agent.pipeline`).

Signing-key rotation. A document whose signature verified with a pinned key may carry
`signing_keys` (kid → PEM): after it is applied, the agent pins exactly that set, in the
same transaction that records the version. The set must contain the kid that signed the
document itself (so the document in force, re-delivered after a reconnect, still verifies;
and a compromised-looking hand-over to keys we cannot check is refused); every entry must be
an EC P-256 key whose kid is its `es256-…` key id; at most 16 keys. Otherwise the document is
rejected ``invalid_config`` and nothing changes. An empty map keeps the pinned set. To retire
a key, the control plane first sends {old, new} signed by old, then signs with new and sends
{new}.

Every report carries `applied_version`, the version actually in force after the message.
The reconciler never raises for a bad message; it raises only if local state fails.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import ApplyError, InvalidConfig, PostApplyUnhealthy, StateError
from agent.handlers import ApplyHandler, FileHandler, Handler
from agent.pipeline import ApplyPipeline, StepHook, Verify
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
from protocol.signing import KEY_ID_FIELD, canonical_json, key_id, load_public_key, verify_document

logger = logging.getLogger(__name__)

REASON_WRONG_DEVICE = "wrong_device"
REASON_STALE = "stale_version"
REASON_APPLY_FAILED = "apply_failed"
REASON_INVALID_CONFIG = "invalid_config"
REASON_UNHEALTHY = "post_apply_unhealthy"
MAX_PINNED_KEYS = 16
_DETAIL_MAX = 1000


def trusted_keys(pems: Mapping[str, str]) -> dict[str, ec.EllipticCurvePublicKey]:
    """Parse the pinned signing keys once (kid → public key)."""
    return {kid: load_public_key(pem) for kid, pem in pems.items()}


def rotated_keys(
    desired: DesiredState, document: Mapping[str, Any], pinned: Mapping[str, Any]
) -> dict[str, str] | None:
    """The signing keys to pin after `desired` is applied (None: keep the pinned set), or
    `InvalidConfig` (rules in the module docstring)."""
    proposed = desired.signing_keys
    if not proposed:
        return None
    if len(proposed) > MAX_PINNED_KEYS:
        raise InvalidConfig(f"signing_keys lists {len(proposed)} keys; at most {MAX_PINNED_KEYS}")
    signer = document.get(KEY_ID_FIELD)
    if signer not in proposed:
        raise InvalidConfig(f"signing_keys must include {signer!r}, the key that signed this document")
    for kid, pem in proposed.items():
        try:
            actual = key_id(load_public_key(pem))
        except (ProtocolError, ValueError, TypeError) as exc:
            raise InvalidConfig(f"signing_keys[{kid[:40]!r}] is not an EC P-256 public key: {exc}") from None
        if actual != kid:
            raise InvalidConfig(f"signing_keys[{kid[:40]!r}] holds the key {actual}")
    if set(proposed) == set(pinned):
        return None
    return dict(proposed)


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
        handler: Handler | Sequence[Handler],
        keys: Mapping[str, ec.EllipticCurvePublicKey],
        max_bytes: int = MAX_MESSAGE_BYTES,
        on_applied: Callable[[int], None] | None = None,
        verify: Verify | None = None,
        step_delay_s: float = 0.0,
        on_step: StepHook | None = None,
        log: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
    ) -> None:
        self.device_id = device_id
        self._state = state
        self._keys = dict(keys)
        self._max_bytes = max_bytes
        self._on_applied = on_applied
        self._log = log or logger
        handlers = [handler] if isinstance(handler, FileHandler | ApplyHandler) else list(handler)
        self.pipeline = ApplyPipeline(
            state, handlers, verify=verify, step_delay_s=step_delay_s, on_step=on_step, log=self._log
        )
        applied = state.applied()
        self.applied_version = applied.version
        self._applied_canonical = canonical_json(applied.document) if applied.document is not None else None
        self.applied: DesiredState | None = None
        if applied.document is not None:
            try:
                self.applied = DesiredState.model_validate(applied.document)
            except ValueError:
                # Recorded by an agent that read it differently: still last-known-good on disk.
                self._log.warning("the last applied document no longer validates; keeping it in force")

    @property
    def keys(self) -> dict[str, ec.EllipticCurvePublicKey]:
        """The config-signing keys pinned now (after any rotation)."""
        return dict(self._keys)

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
            signing_keys = rotated_keys(desired, raw, self._keys)
            await self.pipeline.apply(desired, raw, previous=self.applied, signing_keys=signing_keys)
        except InvalidConfig as exc:
            return self._reject(desired.version, REASON_INVALID_CONFIG, exc.detail)
        except PostApplyUnhealthy as exc:
            self._log.warning("version %s reverted: %s", desired.version, exc.detail)
            return self._report(desired.version, ApplyStatus.FAILED, REASON_UNHEALTHY, exc.detail)
        except ApplyError as exc:
            self._log.warning("applying version %s failed: %s", desired.version, exc.detail)
            return self._report(desired.version, ApplyStatus.FAILED, REASON_APPLY_FAILED, exc.detail)
        except StateError:
            raise
        except Exception as exc:
            # A handler bug must not take the session down (the retained message would come
            # back after the reconnect and crash it again): report it and keep going.
            self._log.exception("apply handler crashed on version %s", desired.version)
            detail = f"{type(exc).__name__}: {exc}"
            return self._report(desired.version, ApplyStatus.FAILED, REASON_APPLY_FAILED, detail)

        self.applied_version = desired.version
        self._applied_canonical = canonical_json(raw)
        self.applied = desired
        if signing_keys is not None:
            self._keys = trusted_keys(signing_keys)
            self._log.info("config-signing keys rotated: now pinning %s", ", ".join(sorted(signing_keys)))
        self._log.info("applied desired state version %s", desired.version)
        if self._on_applied is not None:
            self._on_applied(desired.version)
        return self._report(desired.version, ApplyStatus.APPLIED)

    def _parse(self, payload: bytes) -> dict[str, Any]:
        return parse_object(payload, max_bytes=self._max_bytes)
