"""The CA circuit breaker on an injected clock, and the gateway that uses it."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

from control_plane.errors import CAUnavailable, CSRRejected
from control_plane.pki.breaker import BreakerState, CircuitBreaker
from control_plane.pki.ca import BuiltinCA, IssuedCertificate, RevokedCertificate
from control_plane.pki.gateway import CAGateway


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def breaker(clock: FakeClock) -> CircuitBreaker:
    return CircuitBreaker(failure_threshold=3, reset_after_s=30, clock=clock)


def fail(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        breaker.before_call()
        breaker.record_failure()


def test_opens_after_n_consecutive_failures_and_fails_fast(breaker, clock):
    fail(breaker, 2)
    assert breaker.state is BreakerState.CLOSED
    breaker.before_call()
    breaker.record_success()  # a success resets the count
    fail(breaker, 2)
    assert breaker.state is BreakerState.CLOSED
    fail(breaker)
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(CAUnavailable, match="retrying in 30s"):
        breaker.before_call()
    clock.advance(20)
    assert breaker.retry_after_s() == pytest.approx(10)
    with pytest.raises(CAUnavailable):
        breaker.before_call()


def test_half_open_admits_one_trial_and_closes_on_success(breaker, clock):
    fail(breaker, 3)
    clock.advance(30)
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.before_call()  # the trial
    with pytest.raises(CAUnavailable, match="trial call"):
        breaker.before_call()  # everyone else still fails fast
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    breaker.before_call()
    breaker.before_call()  # closed: no limit


def test_a_failed_trial_reopens_for_a_fresh_cool_down(breaker, clock):
    fail(breaker, 3)
    clock.advance(31)
    breaker.before_call()
    breaker.record_failure()  # one failure is enough in half-open
    assert breaker.state is BreakerState.OPEN
    assert breaker.retry_after_s() == pytest.approx(30)
    clock.advance(29.9)
    with pytest.raises(CAUnavailable):
        breaker.before_call()
    clock.advance(0.1)
    breaker.before_call()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.consecutive_failures == 0


def test_an_abandoned_trial_lets_the_next_call_try(breaker, clock):
    fail(breaker, 3)
    clock.advance(30)
    breaker.before_call()
    breaker.abandon()  # e.g. the request was cancelled
    breaker.before_call()
    assert breaker.state is BreakerState.HALF_OPEN


@pytest.mark.parametrize(("failures", "reset"), [(0, 1.0), (1, 0.0)])
def test_refuses_nonsense_thresholds(failures, reset):
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=failures, reset_after_s=reset)


# --- the gateway -----------------------------------------------------------------------------


class ScriptedBackend:
    """A CA backend whose next behaviour the test decides: answer, fail, refuse or hang."""

    def __init__(self, ca: BuiltinCA) -> None:
        self.ca = ca
        self.mode = "ok"
        self.calls = 0
        self.release = threading.Event()

    def ca_chain_pem(self) -> str:
        return self.ca.ca_chain_pem()

    def sign_device_csr(
        self, csr_pem: str, *, device_id: str, store_id: str, validity: timedelta
    ) -> IssuedCertificate:
        self.calls += 1
        if self.mode == "down":
            raise CAUnavailable("backend down")
        if self.mode == "refuse":
            raise CSRRejected("refused by the CA")
        if self.mode == "unreachable":
            raise ConnectionRefusedError("connection refused")
        if self.mode == "hang":
            self.release.wait(5)
        return IssuedCertificate("pem", "01", None, None)  # type: ignore[arg-type]

    def revoke(self, serial: str) -> None:
        self.calls += 1

    def crl_pem(self, revoked: list[RevokedCertificate]) -> str:
        return "-----BEGIN X509 CRL-----\nbackend\n-----END X509 CRL-----\n"


@pytest.fixture
def local(tmp_path: Path) -> BuiltinCA:
    return BuiltinCA.load_or_create(tmp_path / "pki", trust_domain="storefleet.local")


@pytest.fixture
def backend(local: BuiltinCA) -> ScriptedBackend:
    return ScriptedBackend(local)


def gateway(backend, local, clock, *, timeout_s: float = 5.0) -> CAGateway:
    return CAGateway(
        backend,
        local=local,
        timeout_s=timeout_s,
        breaker=CircuitBreaker(failure_threshold=2, reset_after_s=10, clock=clock),
    )


async def sign(gw: CAGateway) -> IssuedCertificate:
    return await gw.sign_device_csr("csr", device_id="dev-1", store_id="s", validity=timedelta(hours=1))


async def test_gateway_opens_on_failures_stops_calling_the_backend_and_recovers(backend, local, clock):
    gw = gateway(backend, local, clock)
    backend.mode = "down"
    for _ in range(2):
        with pytest.raises(CAUnavailable, match="backend down"):
            await sign(gw)
    assert backend.calls == 2
    with pytest.raises(CAUnavailable, match="consecutive failures"):
        await sign(gw)
    assert backend.calls == 2  # failed fast: the backend was not asked

    backend.mode = "ok"
    clock.advance(10)
    await sign(gw)  # the trial succeeds
    assert gw.breaker.state is BreakerState.CLOSED
    assert backend.calls == 3


async def test_gateway_maps_os_errors_and_counts_them(backend, local, clock):
    gw = gateway(backend, local, clock)
    backend.mode = "unreachable"
    with pytest.raises(CAUnavailable, match="unreachable"):
        await sign(gw)
    assert gw.breaker.consecutive_failures == 1


async def test_a_refused_csr_is_not_an_outage(backend, local, clock):
    gw = gateway(backend, local, clock)
    backend.mode = "refuse"
    for _ in range(5):
        with pytest.raises(CSRRejected):
            await sign(gw)
    assert gw.breaker.state is BreakerState.CLOSED


async def test_a_hung_backend_answers_503_within_the_timeout(backend, local, clock):
    gw = gateway(backend, local, clock, timeout_s=0.2)
    backend.mode = "hang"
    started = time.monotonic()
    try:
        with pytest.raises(CAUnavailable, match=r"within 0\.2s"):
            await sign(gw)
        assert time.monotonic() - started < 1.0
        # Meanwhile the event loop and its default executor are free.
        assert await asyncio.wait_for(asyncio.to_thread(lambda: 42), 1) == 42
    finally:
        backend.release.set()
        gw.close()


async def test_gateway_crl_adds_the_local_issuers_crl_for_an_external_backend(backend, local, clock):
    gw = gateway(backend, local, clock)
    crl = await gw.crl_pem([])
    assert crl.count("BEGIN X509 CRL") == 2
    assert crl.startswith("-----BEGIN X509 CRL-----\nbackend")


def test_gateway_needs_the_builtin_ca_beside_an_external_backend(backend):
    with pytest.raises(TypeError):
        CAGateway(backend)
