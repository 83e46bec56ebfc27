import ssl

import pytest

from agent.errors import NotEnrolled, StateError
from agent.identity import generate_key, private_key_pem
from agent.state import AgentState
from agent.tls import broker_client_context, pinned_server_context


def test_broker_context_verifies_the_server_and_refuses_old_tls(state):
    context = broker_client_context(state)
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    # Only our CA is trusted, not the system store.
    assert [cert["subject"] for cert in context.get_ca_certs()] == [((("commonName", "test root CA"),),)]


def test_broker_context_needs_an_enrollment():
    with pytest.raises(NotEnrolled):
        broker_client_context(AgentState.in_memory())


def test_a_key_that_does_not_match_the_certificate_is_a_state_error(state):
    state.save_private_key(private_key_pem(generate_key()))
    with pytest.raises(StateError, match="certificate and key"):
        broker_client_context(state)


def test_pinned_context_trusts_only_the_pin(ca):
    context = pinned_server_context(ca.pem)
    assert len(context.get_ca_certs()) == 1
    assert context.verify_flags & ssl.VERIFY_X509_PARTIAL_CHAIN
    with pytest.raises(StateError):
        pinned_server_context("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
