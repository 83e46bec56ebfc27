"""Renewed credentials in `AgentState`: staged beside the current pair, committed after a
successful connection, dropped on fallback, and a working pair after a kill at any point."""

from __future__ import annotations

import stat
from collections.abc import Callable

import pytest

from agent.identity import certificate_pem, generate_key, load_certificate, load_private_key, matches_key
from agent.identity import private_key_pem as key_pem
from agent.state import (
    CERT_FILE,
    KEY_FILE,
    PENDING_CERT_FILE,
    PENDING_KEY_FILE,
    AgentState,
)
from agent.tls import broker_client_context
from tests.unit.agent.factories import DEVICE_ID, LocalCA, enrollment_response


def new_pair(ca: LocalCA) -> tuple[bytes, str]:
    key = generate_key()
    return key_pem(key), certificate_pem(ca.issue(key.public_key(), DEVICE_ID))


def current_pair(state: AgentState) -> tuple[bytes, str]:
    key, cert = state.private_key_pem(), state.certificate_pem()
    assert key is not None
    assert cert is not None
    return key, cert


def assert_working_pair(state: AgentState) -> None:
    key, cert = current_pair(state)
    assert matches_key(load_certificate(cert), load_private_key(key))
    broker_client_context(state)  # what the next connection loads


def test_staging_keeps_the_current_pair_in_force(state, ca):
    before = current_pair(state)
    staged_key, staged_cert = new_pair(ca)
    state.stage_credentials(staged_key, staged_cert)

    assert current_pair(state) == before
    assert (state.pending_private_key_pem(), state.pending_certificate_pem()) == (staged_key, staged_cert)
    broker_client_context(state, pending=True)
    assert state.certificate_obtained_at(staged_cert) is not None


def test_commit_replaces_the_current_pair(state, ca):
    staged_key, staged_cert = new_pair(ca)
    old_cert = current_pair(state)[1]
    state.stage_credentials(staged_key, staged_cert)
    state.commit_credentials()

    assert current_pair(state) == (staged_key, staged_cert)
    assert state.pending_certificate_pem() is None
    assert state.pending_private_key_pem() is None
    assert_working_pair(state)
    assert state.certificate_obtained_at(old_cert) is None  # history of retired pairs pruned
    if state.on_disk:
        assert state.directory is not None
        assert stat.S_IMODE((state.directory / KEY_FILE).stat().st_mode) == 0o600


def test_discard_forgets_the_staged_pair(state, ca):
    before = current_pair(state)
    state.stage_credentials(*new_pair(ca))
    state.discard_pending_credentials()
    assert current_pair(state) == before
    assert state.pending_certificate_pem() is None
    assert state.recover_credentials() is None


def test_nothing_to_commit_is_an_error(state):
    from agent.errors import StateError

    with pytest.raises(StateError):
        state.commit_credentials()


# --- killed at any point ---------------------------------------------------------------


class Killed(BaseException):
    """The process died here (SIGKILL, power cut): nothing after it runs."""


class DyingBlobs:
    """The state's file store, dying before its `budget`-th mutation."""

    def __init__(self, inner, budget: int) -> None:
        self.inner = inner
        self.budget = budget

    def _spend(self) -> None:
        if self.budget == 0:
            raise Killed
        self.budget -= 1

    def read(self, name):
        return self.inner.read(name)

    def write(self, name, data, *, private):
        self._spend()
        self.inner.write(name, data, private=private)

    def delete(self, name):
        self._spend()
        self.inner.delete(name)

    def rename(self, source, target):
        self._spend()
        self.inner.rename(source, target)


def restart(state: AgentState) -> AgentState:
    """A new process on the same state (disk), or the same memory after the kill."""
    if isinstance(state._blobs, DyingBlobs):  # type: ignore[attr-defined]
        state._blobs = state._blobs.inner  # type: ignore[attr-defined]
    if state.directory is None:
        return state
    directory = state.directory
    state.close()
    return AgentState.open(directory)


def run_until_killed(state: AgentState, budget: int, operation: Callable[[AgentState], None]) -> bool:
    state._blobs = DyingBlobs(state._blobs, budget)  # type: ignore[attr-defined]
    try:
        operation(state)
    except Killed:
        return True
    state._blobs = state._blobs.inner  # type: ignore[attr-defined]
    return False


RENEWAL_STEPS = 5  # stage: drop old next.pem, write next.key, write next.pem; commit: 2 renames


@pytest.mark.parametrize("budget", range(RENEWAL_STEPS + 1))
def test_a_renewal_killed_at_any_point_restarts_with_a_working_pair(state, ca, budget):
    old = current_pair(state)
    staged_key, staged_cert = new_pair(ca)

    def renew(s: AgentState) -> None:
        s.stage_credentials(staged_key, staged_cert)
        s.commit_credentials()  # (after a CONNACK with the staged pair)

    killed = run_until_killed(state, budget, renew)
    assert killed is (budget < RENEWAL_STEPS)
    state = restart(state)
    state.recover_credentials()

    assert_working_pair(state)
    # Up to the first rename the old pair is in force; from it on, the new one.
    assert current_pair(state) == (old if budget <= 3 else (staged_key, staged_cert))
    staged = state.pending_certificate_pem()
    if budget == 3:  # staged completely, commit not started: kept, tried first next time
        assert staged == staged_cert
        broker_client_context(state, pending=True)
    else:
        assert staged is None
        assert state.pending_private_key_pem() is None
    assert state.recover_credentials() is None  # recovery is idempotent
    state.close()


REENROLL_STEPS = 6  # drop next.pem, write next.key, write next.pem, write ca.pem, 2 renames


@pytest.mark.parametrize("budget", range(REENROLL_STEPS + 1))
def test_a_reenrollment_killed_at_any_point_restarts_with_a_working_pair(state, ca, signing_key, budget):
    old = current_pair(state)
    key = generate_key()
    response = enrollment_response(ca=ca, device_key=key, signing_keys=[signing_key])

    killed = run_until_killed(
        state, budget, lambda s: s.save_enrollment(response, private_key_pem=key_pem(key))
    )
    assert killed is (budget < REENROLL_STEPS)
    state = restart(state)
    state.recover_credentials()

    assert_working_pair(state)
    new = (key_pem(key), response.certificate_pem)
    assert current_pair(state) == (old if budget <= 4 else new)
    state.close()


def test_recovery_completes_a_commit_interrupted_between_the_renames(state, ca):
    staged_key, staged_cert = new_pair(ca)
    state.stage_credentials(staged_key, staged_cert)
    blobs = state._blobs  # type: ignore[attr-defined]
    blobs.rename(PENDING_CERT_FILE, CERT_FILE)  # …and the process died

    assert state.recover_credentials() == "completed an interrupted commit of renewed credentials"
    assert current_pair(state) == (staged_key, staged_cert)


def test_recovery_drops_a_staged_key_whose_certificate_never_arrived(state, ca):
    before = current_pair(state)
    state._blobs.write(PENDING_KEY_FILE, new_pair(ca)[0], private=True)  # type: ignore[attr-defined]
    assert state.recover_credentials() == "dropped a staged key whose certificate never arrived"
    assert current_pair(state) == before
    assert state.pending_private_key_pem() is None


def test_recovery_drops_a_mismatched_staged_pair(state, ca):
    state.stage_credentials(new_pair(ca)[0], new_pair(ca)[1])
    assert state.recover_credentials() == "dropped a staged certificate and key that do not match"
    assert state.pending_certificate_pem() is None
    assert_working_pair(state)


def test_renewal_status_is_kept(state):
    from datetime import UTC, datetime

    from agent.state import RenewalRecord

    assert state.renewal() == RenewalRecord()
    record = RenewalRecord(
        status="retrying",
        next_renewal_at=datetime(2026, 12, 3, 12, 0, tzinfo=UTC),
        last_renewed_at=None,
        last_error="ca_unavailable: down",
        renewals=2,
    )
    state.record_renewal(record)
    assert state.renewal() == record
