import json

import pytest

from protocol.errors import InvalidMessage, UnsupportedSchema
from protocol.messages import MAX_MESSAGE_BYTES, ApplyStatus, HealthReport, ReportedState, decode

HEALTH = {
    "schema": 1,
    "device_id": "dev-abc",
    "seq": 1,
    "cpu_percent": 1.0,
    "memory_percent": 2.0,
    "disk_percent": 3.0,
    "uptime_s": 4.0,
}


def test_unknown_fields_from_a_newer_minor_version_are_ignored():
    report = decode(HealthReport, json.dumps({**HEALTH, "gpu_percent": 9}).encode())
    assert report.seq == 1


def test_newer_schema_is_refused_with_its_own_reason():
    with pytest.raises(UnsupportedSchema) as info:
        decode(HealthReport, json.dumps({**HEALTH, "schema": 2}).encode())
    assert info.value.reason == "unsupported_schema"


@pytest.mark.parametrize("schema", [None, 0, "1", True, -1])
def test_missing_or_bogus_schema_is_invalid(schema):
    payload = (
        {**HEALTH, "schema": schema}
        if schema is not None
        else {k: v for k, v in HEALTH.items() if k != "schema"}
    )
    with pytest.raises(InvalidMessage):
        decode(HealthReport, json.dumps(payload).encode())


@pytest.mark.parametrize("payload", [b"", b"not json", b"[1,2]", b"\xff\xfe", b'"string"'])
def test_malformed_payloads_get_a_clear_error(payload):
    with pytest.raises(InvalidMessage):
        decode(HealthReport, payload)


def test_error_names_the_offending_field():
    with pytest.raises(InvalidMessage, match="cpu_percent"):
        decode(HealthReport, json.dumps({**HEALTH, "cpu_percent": 250}).encode())


def test_oversized_message_is_refused_before_parsing():
    payload = json.dumps({**HEALTH, "padding": "x" * MAX_MESSAGE_BYTES}).encode()
    with pytest.raises(InvalidMessage, match="exceeds"):
        decode(HealthReport, payload)


def test_reported_state_statuses():
    for status in ApplyStatus:
        report = ReportedState(device_id="dev-abc", version=1, status=status)
        assert decode(ReportedState, report.to_json()).status is status


@pytest.mark.parametrize("depth", [40, 5000])
def test_deeply_nested_payload_is_invalid_not_a_crash(depth):
    payload = {**HEALTH, "x": None}
    nested = "[" * depth + "]" * depth
    raw = json.dumps(payload).replace("null", nested).encode()
    assert len(raw) < MAX_MESSAGE_BYTES
    with pytest.raises(InvalidMessage, match="nests deeper"):
        decode(HealthReport, raw)
