"""Certificate renewal: when to renew, the exchange over the live MQTT session, and which
credentials the next connection uses.

Renewal rides the device's own mTLS session: the broker lets a device publish only under its
own id, so the request is authenticated by the certificate being renewed. One renewal::

    start  = when this certificate reached the device (recorded), else its not_before
    due    = start + life * (renew_at_fraction ± renew_jitter_fraction)   drawn once per cert
    ── at due, still connected ──────────────────────────────────────────────────────────────
    1. new P-256 key (in memory), CSR, RenewalRequest(request_id) on …/renew, QoS 1
    2. wait renewal_timeout_s for …/renew/result; no answer → send the same request again (same
       id: the control plane answers a re-sent request with the same certificate)
    3. refused → keep the current certificate; retry after retry_after_s, or with backoff
    4. issued → verify (for the new key, CN = device id, clientAuth, issued by the CA pinned at
       enrollment, not expired) → stage key + certificate beside the current pair, fsynced
    5. end the session with a clean DISCONNECT: no "offline" status and no will, so the control
       plane never sees the device drop; the persistent session keeps anything queued
    6. connect at once with the staged pair → CONNACK → commit (rename over the current pair)
       refused → connect with the current pair (still valid), drop the staged one, retry later

A crash at any point leaves a working pair (`AgentState.recover_credentials`). A certificate
that has expired is never presented: with no valid pair left, the agent stops connecting and
says how to re-enroll (`storefleet-agent reenroll`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.backoff import backoff_delay
from agent.errors import CertificateExpired, RenewalFailed, StateError
from agent.identity import (
    build_csr,
    common_name,
    fingerprint,
    generate_key,
    issued_by,
    load_certificate,
    load_certificates,
    matches_key,
    private_key_pem,
)
from agent.settings import AgentSettings
from agent.state import AgentState, RenewalRecord
from protocol.errors import ProtocolError
from protocol.messages import RenewalRequest, RenewalResponse, RenewalStatus, decode

logger = logging.getLogger(__name__)

Clock = Callable[[], datetime]
Send = Callable[[bytes], Awaitable[None]]
Log = logging.Logger | logging.LoggerAdapter[logging.Logger]

# Long waits are cut into slices so that a wall-clock step (NTP) is noticed within this.
_MAX_SLEEP_S = 300.0


def _utc_now() -> datetime:
    return datetime.now(UTC)


def renewal_due_at(
    *,
    not_before: datetime,
    not_after: datetime,
    obtained_at: datetime | None,
    fraction: float,
    jitter: float,
    rng: random.Random,
) -> datetime:
    """When to renew a certificate: `fraction` of its life, plus or minus up to `jitter` of it.

    Its life counts from when the device obtained it (CAs back-date not_before to tolerate
    clock skew, which would make short certificates look mostly spent on arrival).
    """
    start = not_before if obtained_at is None else min(max(obtained_at, not_before), not_after)
    share = fraction + rng.uniform(-jitter, jitter) if jitter > 0 else fraction
    return start + (not_after - start) * share


@dataclass(frozen=True, slots=True)
class Credential:
    """A certificate the agent can connect with: the current one, or a staged renewed one."""

    pending: bool
    fingerprint: str
    not_before: datetime
    not_after: datetime
    obtained_at: datetime | None

    def usable(self, now: datetime) -> bool:
        return now < self.not_after


class CredentialsStaged(Exception):  # a signal, not an error
    """Raised inside a session to end it and reconnect at once with the renewed credentials."""


@dataclass(slots=True)
class _InFlight:
    key: ec.EllipticCurvePrivateKey
    request: RenewalRequest
    answer: asyncio.Future[RenewalResponse]
    sent: int = 0


@dataclass(slots=True)
class _Due:
    fingerprint: str
    at: datetime


@dataclass(slots=True)
class _Failures:
    count: int = 0
    retry_at: datetime | None = None
    last_error: str | None = None


class Renewer:
    """The renewal side of one agent. `Agent` calls `select` before each connection,
    `connected` / `connect_failed` after it, runs `run` as a child of each session and feeds
    it the messages of the renew/result topic through `deliver`."""

    def __init__(
        self,
        *,
        settings: AgentSettings,
        state: AgentState,
        device_id: str,
        log: Log | None = None,
        rng: random.Random | None = None,
        clock: Clock = _utc_now,
    ) -> None:
        self._settings = settings
        self._state = state
        self.device_id = device_id
        self.log = log or logger
        # Jitter only: not security-relevant.
        self._rng = rng or random.Random()  # noqa: S311
        self._clock = clock
        self.active: Credential | None = None
        self.in_play: frozenset[str] = frozenset()  # fingerprints of the current and staged pairs
        self.expired_at: datetime | None = None  # not_after of an expired current certificate
        self._alternative = False  # the current pair is valid behind the staged one in `active`
        self._fallback = False  # next connection: the current pair, the staged one was refused
        self._due: _Due | None = None
        self._failures = _Failures()
        self._inflight: _InFlight | None = None
        self._forced = False  # an operator asked for a renewal now (`renew_now`)
        self._wake = asyncio.Event()
        record = state.renewal()
        self.renewals = record.renewals
        self.last_renewed_at = record.last_renewed_at
        self.status = record.status
        self.next_renewal_at: datetime | None = record.next_renewal_at

    @property
    def last_error(self) -> str | None:
        return self._failures.last_error

    # --- which credentials --------------------------------------------------------------

    async def select(self) -> Credential | None:
        """The pair for the next connection: the staged renewed one first (unless it was just
        refused), else the current one while it is valid; None when nothing valid is left."""
        now = self._clock()
        pending = await self._load(pending=True)
        if pending is not None and not pending.usable(now):
            self.log.warning("the staged renewed certificate expired before it was used; dropping it")
            await self._state.io(self._state.discard_pending_credentials)
            pending = None
        current = await self._load(pending=False)
        current_usable = current is not None and current.usable(now)
        self.in_play = frozenset(c.fingerprint for c in (current, pending) if c is not None)
        self.expired_at = current.not_after if current is not None and not current_usable else None
        if pending is not None and not (self._fallback and current_usable):
            self.active, self._alternative = pending, current_usable
        elif current_usable:
            self.active, self._alternative = current, False
        else:
            self.active, self._alternative = None, False
        return self.active

    async def _load(self, *, pending: bool) -> Credential | None:
        read = self._state.pending_certificate_pem if pending else self._state.certificate_pem
        pem = await self._state.io(read)
        if pem is None:
            return None
        try:
            cert = load_certificate(pem)
        except StateError:
            if not pending:
                raise
            self.log.warning("the staged renewed certificate is unreadable; dropping it")
            await self._state.io(self._state.discard_pending_credentials)
            return None
        return Credential(
            pending=pending,
            fingerprint=fingerprint(cert),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            obtained_at=await self._state.io(self._state.certificate_obtained_at, pem),
        )

    async def connected(self) -> None:
        """The broker accepted the connection (CONNACK) with `active`."""
        active = self.active
        if active is None:
            return
        if active.pending:
            await self._state.io(self._state.commit_credentials)
            self.active = Credential(
                pending=False,
                fingerprint=active.fingerprint,
                not_before=active.not_before,
                not_after=active.not_after,
                obtained_at=active.obtained_at,
            )
            self._fallback = self._alternative = False
            self._failures = _Failures()
            self.renewals += 1
            self.last_renewed_at = self._clock()
            self.log.info(
                "connected with the renewed certificate (valid until %s); it replaces the previous one",
                active.not_after.isoformat(),
            )
            await self._record("scheduled")
            return
        if self._fallback:
            self._fallback = False
            await self._state.io(self._state.discard_pending_credentials)
            self._failed(RenewalFailed("the broker refused the renewed certificate", code="renewed_refused"))
            await self._record("retrying")
        elif self.status in ("", "expired"):
            await self._record("scheduled")

    def connect_failed(self) -> bool:
        """No CONNACK with `active`. True: try the previous (still valid) pair at once."""
        active = self.active
        if active is not None and active.pending and self._alternative and not self._fallback:
            self._fallback = True
            self.log.warning("could not connect with the renewed certificate; trying the previous one")
            return True
        # Both failed (or there is no alternative): the network, not the certificate. The
        # staged pair goes first again after the usual backoff.
        self._fallback = False
        return False

    def renew_now(self) -> None:
        """Renew at once instead of at the scheduled time (the rotate_certificate command);
        the running session's `run` wakes up and renews (a failure falls back to the backoff)."""
        self._forced = True
        self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        """Sleep, unless `renew_now` wakes us."""
        self._wake.clear()
        if self._forced:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):  # not wait_for: on 3.11 it can swallow a cancel
                await self._wake.wait()

    # --- the exchange -------------------------------------------------------------------

    def deliver(self, payload: bytes) -> None:
        """A message on this device's renew/result topic."""
        try:
            response = decode(RenewalResponse, payload)
        except ProtocolError as exc:
            self.log.warning("ignoring an invalid renewal answer: %s", exc)
            return
        inflight = self._inflight
        if (
            inflight is None
            or response.request_id != inflight.request.request_id
            or response.device_id != self.device_id
        ):
            self.log.debug(
                "ignoring a renewal answer to request %s, which is not pending", response.request_id
            )
            return
        if not inflight.answer.done():
            inflight.answer.set_result(response)

    async def run(self, send: Send, *, can_renew: bool = True) -> None:
        """A child of each session: renew when due. Returns once renewed credentials are
        staged (the session then reconnects with them); raises `CertificateExpired` when the
        certificate in use expires first. Without `can_renew` (the broker refused the
        renewal topic) it only watches the expiry."""
        active = self.active
        if active is None:
            raise CertificateExpired(self.expired_message())
        while True:
            now = self._clock()
            if not active.usable(now):
                raise CertificateExpired(self.expired_message(active.not_after))
            if not can_renew:
                self._forced = False  # nothing to do with it over this session
                await self._sleep(min((active.not_after - now).total_seconds(), _MAX_SLEEP_S))
                continue
            due = self._next_attempt(active, now)
            if self.next_renewal_at != due:
                self.next_renewal_at = due
                await self._record(self.status if self.status == "retrying" else "scheduled")
            if now < due:
                wait = (min(due, active.not_after) - now).total_seconds()
                await self._sleep(min(max(wait, 0.0), _MAX_SLEEP_S))
                continue
            try:
                await self._renew(send)
            except RenewalFailed as exc:
                self._forced = False
                self._failed(exc)
                await self._record("retrying")
                continue
            return

    def _next_attempt(self, active: Credential, now: datetime) -> datetime:
        if self._forced:
            return now
        if self._failures.retry_at is not None:
            return self._failures.retry_at
        if self._due is None or self._due.fingerprint != active.fingerprint:
            at = renewal_due_at(
                not_before=active.not_before,
                not_after=active.not_after,
                obtained_at=active.obtained_at,
                fraction=self._settings.renew_at_fraction,
                jitter=self._settings.renew_jitter_fraction,
                rng=self._rng,
            )
            self._due = _Due(active.fingerprint, at)
        return self._due.at

    async def _renew(self, send: Send) -> None:
        inflight = self._inflight
        if inflight is None:
            key = generate_key()
            request = RenewalRequest(
                device_id=self.device_id,
                request_id=secrets.token_urlsafe(18),
                csr_pem=build_csr(key, common_name_hint=self.device_id),
            )
            inflight = self._inflight = _InFlight(key, request, asyncio.get_running_loop().create_future())
            self.log.info("renewing the device certificate (request %s)", request.request_id)
            await self._record("renewing")
        attempts, timeout_s = self._settings.renewal_attempts, self._settings.renewal_timeout_s
        while not inflight.answer.done():
            if inflight.sent >= attempts:
                self._inflight = None
                raise RenewalFailed(
                    f"no answer to the renewal request within {attempts} x {timeout_s:g}s",
                    code="renewal_timeout",
                )
            inflight.sent += 1
            await send(inflight.request.to_json())
            try:
                async with asyncio.timeout(timeout_s):
                    await asyncio.shield(inflight.answer)
            except TimeoutError:
                self.log.warning(
                    "no renewal answer within %gs (attempt %d of %d)", timeout_s, inflight.sent, attempts
                )
        self._inflight = None
        response = inflight.answer.result()
        if response.status is RenewalStatus.REFUSED:
            raise RenewalFailed(
                f"the control plane refused the renewal ({response.reason})",
                code=response.reason or "refused",
                retry_after_s=response.retry_after_s,
            )
        cert_pem = await self._state.io(self._verified, response, inflight.key)
        await self._state.io(self._state.stage_credentials, private_key_pem(inflight.key), cert_pem)
        self._forced = False
        self.log.info(
            "received a renewed certificate valid until %s; reconnecting with it",
            response.not_after.isoformat() if response.not_after else "?",
        )
        await self._record("staged")

    def _verified(self, response: RenewalResponse, key: ec.EllipticCurvePrivateKey) -> str:
        """The certificate PEM, once it is for our new key and identity and from our CA."""

        def invalid(message: str) -> RenewalFailed:
            return RenewalFailed(
                f"the renewed certificate is not acceptable: {message}", code="invalid_response"
            )

        ca_pem = self._state.ca_chain_pem()
        if response.certificate_pem is None or ca_pem is None:
            raise invalid("no certificate, or no CA pinned at enrollment")
        try:
            cert = load_certificate(response.certificate_pem)
            anchors = load_certificates(ca_pem)
        except StateError as exc:
            raise invalid(str(exc)) from exc
        if not matches_key(cert, key):
            raise invalid("it is not for the new key")
        if common_name(cert) != self.device_id:
            raise invalid(f"it does not name device {self.device_id}")
        if not any(issued_by(cert, anchor) for anchor in anchors):
            raise invalid("it was not issued by the CA pinned at enrollment")
        if not _client_auth(cert):
            raise invalid("it is not a TLS client certificate")
        if not cert.not_valid_after_utc > self._clock():
            raise invalid("it has already expired")
        return response.certificate_pem

    def _failed(self, exc: RenewalFailed) -> None:
        failures = self._failures
        failures.count += 1
        failures.last_error = f"{exc.code}: {exc.message}"
        if exc.retry_after_s is not None:
            delay = exc.retry_after_s + self._rng.uniform(0, self._settings.renewal_retry_min_s)
        else:
            delay = backoff_delay(
                failures.count,
                minimum=self._settings.renewal_retry_min_s,
                maximum=self._settings.renewal_retry_max_s,
                rng=self._rng,
            )
        failures.retry_at = self._clock() + timedelta(seconds=delay)
        valid_until = self.active.not_after.isoformat() if self.active is not None else "?"
        self.log.warning(
            "certificate renewal failed (%s); the current certificate (valid until %s) stays in use, "
            "next attempt in %.0fs",
            failures.last_error,
            valid_until,
            delay,
        )

    # --- expiry ---------------------------------------------------------------------------

    def expired_message(self, not_after: datetime | None = None) -> str:
        when = f" at {not_after.isoformat()}" if not_after is not None else ""
        return (
            f"the device certificate expired{when} and no renewed one is available: this agent "
            "will not connect with an expired certificate. Re-enroll the device: an operator "
            f"creates a re-enrollment token (POST /v1/devices/{self.device_id}/reenrollment-tokens), "
            "then run `storefleet-agent reenroll --token … --server https://… --ca-fingerprint sha256:…`"
        )

    async def expired(self) -> None:
        self.next_renewal_at = None
        await self._record("expired")

    async def _record(self, status: str) -> None:
        self.status = status
        record = RenewalRecord(
            status=status,
            next_renewal_at=self.next_renewal_at,
            last_renewed_at=self.last_renewed_at,
            last_error=self._failures.last_error,
            renewals=self.renewals,
        )
        await self._state.io(self._state.record_renewal, record)


def _client_auth(cert: x509.Certificate) -> bool:
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True  # no EKU: any purpose
    return ExtendedKeyUsageOID.CLIENT_AUTH in usage
