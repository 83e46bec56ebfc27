"""Golden vectors: the wire format other implementations (and older agents) rely on."""

import json
from pathlib import Path

import pytest

from protocol.messages import (
    DesiredState,
    DeviceStatus,
    EnrollmentRequest,
    EnrollmentResponse,
    HealthReport,
    RenewalRequest,
    RenewalResponse,
    ReportedState,
    decode,
)
from protocol.signing import canonical_json, key_id, load_public_key, verify_document

GOLDEN = Path(__file__).parents[2] / "golden"


@pytest.mark.parametrize(
    ("filename", "model"),
    [
        ("enrollment_request.json", EnrollmentRequest),
        ("enrollment_response.json", EnrollmentResponse),
        ("desired_state.json", DesiredState),
        ("reported_state.json", ReportedState),
        ("reported_state_rejected.json", ReportedState),
        ("health_report.json", HealthReport),
        ("status_online.json", DeviceStatus),
        ("status_offline.json", DeviceStatus),
        ("renewal_request.json", RenewalRequest),
        ("renewal_response.json", RenewalResponse),
        ("renewal_response_refused.json", RenewalResponse),
    ],
)
def test_golden_message_decodes_and_round_trips(filename, model):
    raw = (GOLDEN / filename).read_bytes()
    message = decode(model, raw)
    again = decode(model, message.to_json())
    assert again == message
    # Every field of the vector survives a round trip (nothing silently dropped or renamed).
    original = json.loads(raw)
    dumped = json.loads(message.to_json())
    for key in original:
        assert key in dumped, f"{filename}: field {key!r} lost"


def test_golden_desired_state_signature_verifies_with_pinned_key():
    document = json.loads((GOLDEN / "desired_state.json").read_text())
    public_key = load_public_key((GOLDEN / "signing_key.pub.pem").read_text())
    assert document["kid"] == key_id(public_key)
    verify_document(document, {key_id(public_key): public_key})


def test_golden_canonical_form_is_stable():
    document = json.loads((GOLDEN / "desired_state.json").read_text())
    unsigned = {k: v for k, v in document.items() if k != "sig"}
    assert canonical_json(unsigned) == (GOLDEN / "desired_state.canonical.txt").read_bytes()
