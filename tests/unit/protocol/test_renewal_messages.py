"""The renewal messages: what a receiver refuses before acting on it."""

import pytest

from protocol.errors import InvalidMessage
from protocol.messages import RenewalRequest, RenewalResponse, validate
from protocol.topics import DEVICE_PUBLISHES, DEVICE_SUBSCRIBES, TopicKind, device_topic, parse_topic

BASE = {"schema": 1, "device_id": "dev-0123456789abcdef", "request_id": "r-0123456789"}


@pytest.mark.parametrize(
    "fields",
    [
        {"status": "issued"},  # no certificate
        {"status": "issued", "certificate_pem": "-----BEGIN CERTIFICATE-----"},  # no not_after
        {"status": "refused"},  # no reason
        {"status": "maybe", "reason": "x"},
        {"status": "refused", "reason": "ca_unavailable", "retry_after_s": -1},
    ],
)
def test_incomplete_or_inconsistent_answers_are_refused(fields):
    with pytest.raises(InvalidMessage):
        validate(RenewalResponse, {**BASE, **fields})


@pytest.mark.parametrize("request_id", ["short", "has space in it", "a/b+c#d-xyz", "x" * 65])
def test_request_ids_are_bounded_tokens(request_id):
    with pytest.raises(InvalidMessage):
        validate(RenewalRequest, {**BASE, "request_id": request_id, "csr_pem": "x" * 64})


def test_renewal_topics_go_one_way_each():
    assert TopicKind.RENEW in DEVICE_PUBLISHES
    assert TopicKind.RENEW not in DEVICE_SUBSCRIBES
    assert TopicKind.RENEW_RESULT in DEVICE_SUBSCRIBES
    assert TopicKind.RENEW_RESULT not in DEVICE_PUBLISHES
    assert parse_topic(device_topic("dev-1234", TopicKind.RENEW_RESULT)).kind is TopicKind.RENEW_RESULT
    assert device_topic("dev-1234", TopicKind.RENEW) == "sf/v1/dev/dev-1234/renew"
