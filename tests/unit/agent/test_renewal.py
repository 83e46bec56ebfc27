"""Renewal without a broker: the schedule (injected rng and clock), the exchange through
`Renewer.run` / `deliver`, verification of what comes back, and credential selection."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from agent.errors import CertificateExpired
from agent.identity import (
    certificate_pem,
    generate_key,
    load_certificate,
    load_private_key,
    matches_key,
    private_key_pem,
)
from agent.renewal import Renewer, renewal_due_at
from agent.settings import AgentSettings
from agent.state import AgentState
from protocol.messages import RenewalRequest, RenewalResponse, RenewalStatus, decode
from tests.unit.agent.factories import DEVICE_ID, LocalCA, enroll_directly

T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


class FixedRng(random.Random):
    """`uniform(a, b)` returns `a + share * (b - a)`: the jitter source pinned for a test."""

    def __init__(self, share: float) -> None:
        super().__init__(0)
        self.share = share

    def uniform(self, a: float, b: float) -> float:
        return a + self.share * (b - a)


# --- the schedule ------------------------------------------------------------------------


@pytest.mark.parametrize(("share", "expected_hours"), [(0.0, 44.4), (0.5, 48.0), (1.0, 51.6)])
def test_renewal_is_due_at_two_thirds_of_the_life_give_or_take_the_jitter(share, expected_hours):
    due = renewal_due_at(
        not_before=T0,
        not_after=T0 + 3 * DAY,
        obtained_at=None,
        fraction=2 / 3,
        jitter=0.05,
        rng=FixedRng(share),
    )
    assert due - T0 == pytest.approx(timedelta(hours=expected_hours), abs=timedelta(seconds=1))


def test_a_fleet_enrolled_at_the_same_instant_does_not_renew_at_the_same_instant():
    rng = random.Random(7)
    due = [
        renewal_due_at(
            not_before=T0, not_after=T0 + 3 * DAY, obtained_at=T0, fraction=2 / 3, jitter=0.05, rng=rng
        )
        for _ in range(1000)
    ]
    spread = max(due) - min(due)
    assert timedelta(hours=6) < spread <= timedelta(hours=7.2)  # ±5 % of 72 h
    assert all(T0 + timedelta(hours=44.4) <= at <= T0 + timedelta(hours=51.6) for at in due)
    # Spread out, not bunched: every hour of the window gets some of the fleet.
    hours = {int((at - T0).total_seconds() // 3600) for at in due}
    assert hours == set(range(44, 52))


def test_life_counts_from_when_the_device_got_the_certificate_not_the_backdated_not_before():
    # A 12 s certificate back-dated 5 minutes by the CA is not "mostly spent" on arrival.
    obtained = T0 + timedelta(minutes=5)
    due = renewal_due_at(
        not_before=T0,
        not_after=obtained + timedelta(seconds=12),
        obtained_at=obtained,
        fraction=2 / 3,
        jitter=0.0,
        rng=FixedRng(0.5),
    )
    assert due == obtained + timedelta(seconds=8)
    # A recorded time outside the validity is clamped into it.
    late = renewal_due_at(
        not_before=T0,
        not_after=T0 + DAY,
        obtained_at=T0 + 2 * DAY,
        fraction=2 / 3,
        jitter=0.0,
        rng=FixedRng(0),
    )
    assert late == T0 + DAY


def test_settings_keep_the_renewal_window_inside_the_certificate_life():
    with pytest.raises(ValueError, match="renew_at_fraction"):
        AgentSettings(renew_at_fraction=0.95, renew_jitter_fraction=0.1)
    with pytest.raises(ValueError, match="renewal_retry_max_s"):
        AgentSettings(renewal_retry_min_s=10, renewal_retry_max_s=5)


# --- the exchange ------------------------------------------------------------------------


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def settings(tmp_path: Path, **overrides: object) -> AgentSettings:
    values: dict[str, object] = {
        "state_dir": tmp_path,
        "renewal_timeout_s": 0.2,
        "renewal_attempts": 2,
        "renewal_retry_min_s": 30.0,
        "renewal_retry_max_s": 60.0,
        **overrides,
    }
    return AgentSettings(**values)  # type: ignore[arg-type]


class FakeControlPlane:
    """Answers each request it is sent through `Renewer.deliver`, the way the MQTT path would."""

    def __init__(self, renewer: Renewer, ca: LocalCA, *, answer: str = "issue") -> None:
        self.renewer = renewer
        self.ca = ca
        self.answer = answer
        self.requests: list[RenewalRequest] = []

    async def send(self, payload: bytes) -> None:
        request = decode(RenewalRequest, payload)
        self.requests.append(request)
        if self.answer == "silent":
            return
        response = self.respond(request)
        asyncio.get_running_loop().call_soon(self.renewer.deliver, response.to_json())

    def respond(self, request: RenewalRequest) -> RenewalResponse:
        common = {"device_id": request.device_id, "request_id": request.request_id}
        if self.answer == "refuse":
            return RenewalResponse(
                **common, status=RenewalStatus.REFUSED, reason="ca_unavailable", retry_after_s=5
            )
        if self.answer == "foreign_ca":
            cert = LocalCA.create("foreign").sign_csr(request.csr_pem, request.device_id)
        elif self.answer == "other_key":
            cert = certificate_pem(self.ca.issue(generate_key().public_key(), request.device_id))
        elif self.answer == "other_device":
            cert = self.ca.sign_csr(request.csr_pem, "dev-9999")
        else:
            cert = self.ca.sign_csr(request.csr_pem, request.device_id)
        return RenewalResponse(
            **common,
            status=RenewalStatus.ISSUED,
            certificate_pem=cert,
            ca_chain_pem=self.ca.pem,
            not_after=load_certificate(cert).not_valid_after_utc,
        )


@pytest.fixture
def renewal_due_clock(memory_state: AgentState) -> Clock:
    """Wall clock at 90 % of the enrolled certificate's life: renewal is due, nothing expired."""
    cert = load_certificate(memory_state.certificate_pem() or "")
    start = memory_state.certificate_obtained_at(memory_state.certificate_pem() or "")
    assert start is not None
    return Clock(start + (cert.not_valid_after_utc - start) * 0.9)


async def test_a_due_renewal_stages_a_certificate_for_a_new_key(
    tmp_path, memory_state, ca, renewal_due_clock
):
    old_key_pem = memory_state.private_key_pem()
    renewer = Renewer(
        settings=settings(tmp_path), state=memory_state, device_id=DEVICE_ID, clock=renewal_due_clock
    )
    plane = FakeControlPlane(renewer, ca)
    assert (await renewer.select()) is not None

    async with asyncio.timeout(5):
        await renewer.run(plane.send)

    [request] = plane.requests
    csr = x509.load_pem_x509_csr(request.csr_pem.encode())
    assert csr.is_signature_valid
    staged_cert, staged_key = memory_state.pending_certificate_pem(), memory_state.pending_private_key_pem()
    assert staged_cert is not None
    assert staged_key is not None
    assert staged_key != old_key_pem  # a new key, every renewal
    assert matches_key(load_certificate(staged_cert), load_private_key(staged_key))
    assert memory_state.private_key_pem() == old_key_pem  # the old pair stays until the new one works
    assert memory_state.renewal().status == "staged"


async def test_the_staged_pair_is_committed_after_a_connection_with_it(
    tmp_path, memory_state, ca, renewal_due_clock
):
    renewer = Renewer(
        settings=settings(tmp_path), state=memory_state, device_id=DEVICE_ID, clock=renewal_due_clock
    )
    await renewer.select()
    await renewer.run(FakeControlPlane(renewer, ca).send)
    staged = memory_state.pending_certificate_pem()

    chosen = await renewer.select()
    assert chosen is not None
    assert chosen.pending
    await renewer.connected()  # CONNACK

    assert memory_state.certificate_pem() == staged
    assert memory_state.pending_certificate_pem() is None
    assert renewer.renewals == 1
    record = memory_state.renewal()
    assert (record.status, record.renewals, record.last_renewed_at) == ("scheduled", 1, renewal_due_clock.now)


async def test_a_renewed_certificate_the_broker_refuses_falls_back_to_the_previous_one(
    tmp_path, memory_state, ca, renewal_due_clock
):
    previous = memory_state.certificate_pem()
    renewer = Renewer(
        settings=settings(tmp_path), state=memory_state, device_id=DEVICE_ID, clock=renewal_due_clock
    )
    await renewer.select()
    await renewer.run(FakeControlPlane(renewer, ca).send)

    assert (await renewer.select()).pending  # type: ignore[union-attr]
    assert renewer.connect_failed() is True  # no CONNACK with the new pair: try the old one at once
    chosen = await renewer.select()
    assert chosen is not None
    assert not chosen.pending
    await renewer.connected()  # the old pair works: the new one was refused, drop it

    assert memory_state.certificate_pem() == previous
    assert memory_state.pending_certificate_pem() is None
    assert "renewed_refused" in (memory_state.renewal().last_error or "")
    assert memory_state.renewal().status == "retrying"


async def test_when_neither_pair_connects_the_renewed_one_goes_first_again(
    tmp_path, memory_state, ca, renewal_due_clock
):
    renewer = Renewer(
        settings=settings(tmp_path), state=memory_state, device_id=DEVICE_ID, clock=renewal_due_clock
    )
    await renewer.select()
    await renewer.run(FakeControlPlane(renewer, ca).send)

    assert (await renewer.select()).pending  # type: ignore[union-attr]
    assert renewer.connect_failed() is True
    assert not (await renewer.select()).pending  # type: ignore[union-attr]
    assert renewer.connect_failed() is False  # the network, not the certificate: back off
    assert (await renewer.select()).pending  # type: ignore[union-attr]
    assert memory_state.pending_certificate_pem() is not None


@pytest.mark.parametrize("answer", ["foreign_ca", "other_key", "other_device"])
async def test_an_unacceptable_certificate_is_never_staged(
    tmp_path, memory_state, ca, renewal_due_clock, answer
):
    renewer = Renewer(
        settings=settings(tmp_path), state=memory_state, device_id=DEVICE_ID, clock=renewal_due_clock
    )
    plane = FakeControlPlane(renewer, ca, answer=answer)
    await renewer.select()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await renewer.run(plane.send)  # fails, then waits for the retry
    assert memory_state.pending_certificate_pem() is None
    assert (renewer.last_error or "").startswith("invalid_response")
    assert renewer.next_renewal_at is not None
    assert renewer.next_renewal_at >= renewal_due_clock.now + timedelta(seconds=30)


async def test_a_refusal_is_retried_after_the_control_plane_hint(
    tmp_path, memory_state, ca, renewal_due_clock
):
    renewer = Renewer(
        settings=settings(tmp_path),
        state=memory_state,
        device_id=DEVICE_ID,
        clock=renewal_due_clock,
        rng=FixedRng(0.0),
    )
    await renewer.select()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await renewer.run(FakeControlPlane(renewer, ca, answer="refuse").send)
    assert renewer.last_error is not None
    assert renewer.last_error.startswith("ca_unavailable")
    assert renewer.next_renewal_at == renewal_due_clock.now + timedelta(seconds=5)
    record = memory_state.renewal()
    assert (record.status, record.next_renewal_at) == ("retrying", renewer.next_renewal_at)


async def test_an_unanswered_request_is_sent_again_with_the_same_id_then_given_up(
    tmp_path, memory_state, ca, renewal_due_clock
):
    renewer = Renewer(
        settings=settings(tmp_path, renewal_timeout_s=0.05, renewal_attempts=3),
        state=memory_state,
        device_id=DEVICE_ID,
        clock=renewal_due_clock,
    )
    plane = FakeControlPlane(renewer, ca, answer="silent")
    await renewer.select()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1.0):
            await renewer.run(plane.send)
    assert len(plane.requests) == 3
    assert len({(r.request_id, r.csr_pem) for r in plane.requests}) == 1  # idempotent re-sends
    assert (renewer.last_error or "").startswith("renewal_timeout")


async def test_answers_to_other_requests_are_ignored(tmp_path, memory_state, ca, renewal_due_clock):
    renewer = Renewer(
        settings=settings(tmp_path), state=memory_state, device_id=DEVICE_ID, clock=renewal_due_clock
    )
    plane = FakeControlPlane(renewer, ca)
    await renewer.select()
    stale = RenewalResponse(
        device_id=DEVICE_ID, request_id="someone-elses-request", status=RenewalStatus.REFUSED, reason="x"
    )
    renewer.deliver(stale.to_json())
    renewer.deliver(b"not json")
    async with asyncio.timeout(5):
        await renewer.run(plane.send)
    assert memory_state.pending_certificate_pem() is not None


# --- expiry ------------------------------------------------------------------------------


def expired_state(ca: LocalCA) -> AgentState:
    state = AgentState.in_memory()
    response = enroll_directly(state, ca=ca, signing_keys=[generate_key()])
    key = generate_key()
    state.save_private_key(private_key_pem(key))
    expired = ca.issue(key.public_key(), DEVICE_ID, validity=timedelta(seconds=-1))
    state.save_enrollment(response.model_copy(update={"certificate_pem": certificate_pem(expired)}))
    return state


async def test_an_expired_certificate_is_never_selected(tmp_path, ca):
    state = expired_state(ca)
    renewer = Renewer(settings=settings(tmp_path), state=state, device_id=DEVICE_ID)
    assert await renewer.select() is None
    assert renewer.expired_at is not None
    assert renewer.expired_at < datetime.now(UTC)
    with pytest.raises(CertificateExpired, match="reenroll"):
        await renewer.run(FakeControlPlane(renewer, ca).send)
    await renewer.expired()
    assert state.renewal().status == "expired"


async def test_a_valid_staged_pair_rescues_an_expired_current_one(tmp_path, ca):
    state = expired_state(ca)
    key = generate_key()
    state.stage_credentials(private_key_pem(key), certificate_pem(ca.issue(key.public_key(), DEVICE_ID)))
    renewer = Renewer(settings=settings(tmp_path), state=state, device_id=DEVICE_ID)
    chosen = await renewer.select()
    assert chosen is not None
    assert chosen.pending
    assert renewer.connect_failed() is False  # no valid alternative to fall back to
    assert (await renewer.select()).pending  # type: ignore[union-attr]


async def test_a_staged_pair_that_expired_is_dropped(tmp_path, memory_state, ca):
    key = generate_key()
    stale = ca.issue(key.public_key(), DEVICE_ID, validity=timedelta(seconds=-1))
    memory_state.stage_credentials(private_key_pem(key), certificate_pem(stale))
    renewer = Renewer(settings=settings(tmp_path), state=memory_state, device_id=DEVICE_ID)
    chosen = await renewer.select()
    assert chosen is not None
    assert not chosen.pending
    assert memory_state.pending_certificate_pem() is None


async def test_a_session_ends_when_the_certificate_in_use_expires(tmp_path, memory_state, ca):
    clock = Clock(datetime.now(UTC))
    renewer = Renewer(settings=settings(tmp_path), state=memory_state, device_id=DEVICE_ID, clock=clock)
    active = await renewer.select()
    assert active is not None
    clock.now = active.not_after + timedelta(seconds=1)
    with pytest.raises(CertificateExpired):
        await renewer.run(FakeControlPlane(renewer, ca).send)
