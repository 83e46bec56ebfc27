import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import ApplyError
from agent.handlers import CONFIG_FILE, FileConfigHandler, MemoryHandler
from agent.reconciler import Reconciler, trusted_keys
from agent.state import AgentState
from protocol.messages import MAX_MESSAGE_BYTES, ApplyStatus, BrokerEndpoint, EnrollmentResponse
from protocol.signing import sign_document
from tests.unit.agent.factories import DEVICE_ID, desired_document, signed_desired

GOLDEN = Path(__file__).resolve().parents[2] / "golden"


def payload(document) -> bytes:
    return json.dumps(document).encode()


def make_reconciler(state, handler=None, **kwargs):
    handler = handler or MemoryHandler()
    return (
        Reconciler(
            device_id=state.require_enrollment().device_id,
            state=state,
            handler=handler,
            keys=trusted_keys(state.signing_keys()),
            **kwargs,
        ),
        handler,
    )


async def test_newer_signed_version_is_applied_and_becomes_last_known_good(state, signing_key):
    applied_versions = []
    reconciler, handler = make_reconciler(state, on_applied=applied_versions.append)
    document = signed_desired(3, signing_key)

    report = await reconciler.handle(payload(document))

    assert report.status is ApplyStatus.APPLIED
    assert (report.device_id, report.version, report.applied_version) == (DEVICE_ID, 3, 3)
    assert report.reason is None
    assert handler.applied.version == 3
    assert state.applied().version == 3
    assert state.applied().document == document
    assert applied_versions == [3]


async def test_applied_version_survives_a_restart(tmp_path, disk_state, signing_key):
    reconciler, _ = make_reconciler(disk_state)
    await reconciler.handle(payload(signed_desired(4, signing_key)))
    disk_state.close()

    reopened = AgentState.open(disk_state.directory)
    again, handler = make_reconciler(reopened)
    assert again.applied_version == 4
    report = await again.handle(payload(signed_desired(3, signing_key)))
    assert report.status is ApplyStatus.REJECTED
    assert report.reason == "stale_version"
    assert handler.attempts == 0
    reopened.close()


async def test_tampered_document_is_rejected_as_bad_signature(state, signing_key):
    reconciler, handler = make_reconciler(state)
    document = signed_desired(1, signing_key)
    document["config"] = {"pos": {"currency": "XXX"}}

    report = await reconciler.handle(payload(document))

    assert (report.status, report.reason) == (ApplyStatus.REJECTED, "bad_signature")
    assert report.version == 1
    assert report.applied_version == 0
    assert handler.attempts == 0
    assert state.applied().version == 0


async def test_unsigned_document_is_rejected(state):
    reconciler, handler = make_reconciler(state)
    report = await reconciler.handle(payload(desired_document(1)))
    assert (report.status, report.reason) == (ApplyStatus.REJECTED, "bad_signature")
    assert handler.attempts == 0


async def test_document_signed_by_an_unpinned_key_is_rejected(state):
    reconciler, handler = make_reconciler(state)
    stranger = ec.generate_private_key(ec.SECP256R1())
    report = await reconciler.handle(payload(signed_desired(1, stranger)))
    assert (report.status, report.reason) == (ApplyStatus.REJECTED, "unknown_signing_key")
    assert handler.attempts == 0


async def test_fields_added_by_a_newer_control_plane_stay_covered_by_the_signature(state, signing_key):
    reconciler, _ = make_reconciler(state)
    document = signed_desired(1, signing_key, rollout={"id": "r-1", "wave": 2})
    assert (await reconciler.handle(payload(document))).status is ApplyStatus.APPLIED

    tampered = signed_desired(2, signing_key, rollout={"id": "r-1", "wave": 2})
    tampered["rollout"]["wave"] = 3
    report = await reconciler.handle(payload(tampered))
    assert report.reason == "bad_signature"


@pytest.mark.parametrize("version", [1, 2])
async def test_older_version_is_rejected_as_stale(state, signing_key, version):
    reconciler, handler = make_reconciler(state)
    await reconciler.handle(payload(signed_desired(3, signing_key)))

    report = await reconciler.handle(payload(signed_desired(version, signing_key)))

    assert (report.status, report.reason) == (ApplyStatus.REJECTED, "stale_version")
    assert report.version == version
    assert report.applied_version == 3
    assert handler.attempts == 1
    assert handler.applied.version == 3


async def test_same_version_with_other_content_is_rejected_as_stale(state, signing_key):
    reconciler, handler = make_reconciler(state)
    await reconciler.handle(payload(signed_desired(3, signing_key)))
    report = await reconciler.handle(payload(signed_desired(3, signing_key, config={"other": True})))
    assert (report.status, report.reason) == (ApplyStatus.REJECTED, "stale_version")
    assert handler.attempts == 1


async def test_identical_redelivery_is_acknowledged_without_reapplying(state, signing_key):
    """The retained desired state arrives again after every reconnect."""
    reconciler, handler = make_reconciler(state)
    document = signed_desired(3, signing_key)
    await reconciler.handle(payload(document))

    # Same document, other key order and white space: still the same signed document.
    again = json.dumps(dict(reversed(list(document.items()))), indent=2).encode()
    report = await reconciler.handle(again)

    assert report.status is ApplyStatus.APPLIED
    assert (report.version, report.applied_version) == (3, 3)
    assert handler.attempts == 1


async def test_redelivery_after_restart_is_acknowledged_without_reapplying(disk_state, signing_key):
    document = signed_desired(2, signing_key)
    first, _ = make_reconciler(disk_state)
    await first.handle(payload(document))

    restarted, handler = make_reconciler(disk_state)
    report = await restarted.handle(payload(document))
    assert report.status is ApplyStatus.APPLIED
    assert handler.attempts == 0


async def test_document_for_another_device_is_rejected(state, signing_key):
    reconciler, handler = make_reconciler(state)
    report = await reconciler.handle(payload(signed_desired(1, signing_key, device_id="dev-9999")))
    assert (report.status, report.reason) == (ApplyStatus.REJECTED, "wrong_device")
    assert report.device_id == DEVICE_ID
    assert "dev-9999" in report.detail
    assert handler.attempts == 0


async def test_newer_schema_is_rejected_as_unsupported(state, signing_key):
    reconciler, handler = make_reconciler(state)
    document = sign_document({**desired_document(1), "schema": 2, "new_thing": {}}, signing_key)
    report = await reconciler.handle(payload(document))
    assert (report.status, report.reason) == (ApplyStatus.REJECTED, "unsupported_schema")
    assert report.version == 1
    assert handler.attempts == 0


@pytest.mark.parametrize(
    ("raw", "version"),
    [
        (b"{not json", 0),
        (b"\xff\xfe", 0),
        (b"[1, 2, 3]", 0),
        (b'"a string"', 0),
        (json.dumps({"schema": 1, "device_id": DEVICE_ID, "version": 5}).encode(), 5),
        (json.dumps({**desired_document(2), "version": "two"}).encode(), 0),
        (json.dumps({**desired_document(2), "schema": "1"}).encode(), 2),
    ],
)
async def test_malformed_messages_are_rejected_as_invalid(state, raw, version):
    reconciler, handler = make_reconciler(state)
    report = await reconciler.handle(raw)
    assert (report.status, report.reason) == (ApplyStatus.REJECTED, "invalid_message")
    assert report.version == version
    assert report.detail
    assert handler.attempts == 0


async def test_non_finite_numbers_are_rejected_as_invalid(state, signing_key):
    reconciler, handler = make_reconciler(state)
    document = signed_desired(1, signing_key)
    raw = json.dumps({**document, "config": {"x": float("nan")}}).encode()  # Python writes NaN
    report = await reconciler.handle(raw)
    assert (report.status, report.reason) == (ApplyStatus.REJECTED, "invalid_message")
    assert handler.attempts == 0


async def test_oversized_message_is_rejected_before_parsing(state, signing_key):
    reconciler, handler = make_reconciler(state)
    document = signed_desired(1, signing_key, config={"blob": "x" * MAX_MESSAGE_BYTES})
    report = await reconciler.handle(payload(document))
    assert (report.status, report.reason) == (ApplyStatus.REJECTED, "invalid_message")
    assert "exceeds" in report.detail
    assert handler.attempts == 0


async def test_failed_apply_reports_failed_and_keeps_last_known_good(state, signing_key):
    handler = MemoryHandler(fail_versions={2})
    reconciler, _ = make_reconciler(state, handler)
    good = signed_desired(1, signing_key)
    await reconciler.handle(payload(good))

    report = await reconciler.handle(payload(signed_desired(2, signing_key)))

    assert (report.status, report.reason) == (ApplyStatus.FAILED, "apply_failed")
    assert report.version == 2
    assert report.applied_version == 1
    assert "version 2" in report.detail
    assert state.applied().document == good
    assert handler.applied.version == 1

    # The failure is not sticky: the next version goes through.
    report = await reconciler.handle(payload(signed_desired(3, signing_key)))
    assert report.status is ApplyStatus.APPLIED
    assert report.applied_version == 3


async def test_failed_apply_of_a_version_is_retried_on_redelivery(state, signing_key):
    handler = MemoryHandler(fail_versions={1})
    reconciler, _ = make_reconciler(state, handler)
    document = payload(signed_desired(1, signing_key))
    assert (await reconciler.handle(document)).status is ApplyStatus.FAILED
    handler.fail_versions.clear()
    assert (await reconciler.handle(document)).status is ApplyStatus.APPLIED


async def test_failed_file_apply_leaves_the_old_files_in_force(tmp_path, state, signing_key):
    config_dir = tmp_path / "config"
    reconciler, _ = make_reconciler(state, FileConfigHandler(config_dir))
    await reconciler.handle(payload(signed_desired(1, signing_key, config={"v": 1})))
    (config_dir / "policies.json").unlink()
    (config_dir / "policies.json").mkdir()
    (config_dir / "policies.json" / "x").write_text("")

    report = await reconciler.handle(payload(signed_desired(2, signing_key, config={"v": 2})))

    assert report.status is ApplyStatus.FAILED
    assert report.applied_version == 1
    assert json.loads((config_dir / CONFIG_FILE).read_text()) == {"v": 1}


class CrashingHandler:
    async def apply(self, desired):
        raise RuntimeError("handler bug")


class RefusingHandler:
    async def apply(self, desired):
        raise ApplyError("disk full", detail="x" * 5000)


async def test_a_crashing_handler_is_reported_not_raised(state, signing_key):
    reconciler, _ = make_reconciler(state, CrashingHandler())
    report = await reconciler.handle(payload(signed_desired(1, signing_key)))
    assert (report.status, report.reason) == (ApplyStatus.FAILED, "apply_failed")
    assert "RuntimeError: handler bug" in report.detail
    assert state.applied().version == 0


async def test_long_failure_detail_is_truncated_to_the_wire_limit(state, signing_key):
    reconciler, _ = make_reconciler(state, RefusingHandler())
    report = await reconciler.handle(payload(signed_desired(1, signing_key)))
    assert len(report.detail) == 1000
    assert report.to_json()  # fits the ReportedState model


async def test_golden_desired_state_from_the_protocol_applies(ca):
    """The control plane's published test vector verifies against the key it pins."""
    golden = json.loads((GOLDEN / "desired_state.json").read_text())
    enrollment = json.loads((GOLDEN / "enrollment_response.json").read_text())
    from tests.unit.agent.factories import enrollment_response

    state = AgentState.in_memory()
    response = enrollment_response(
        ca=ca,
        device_key=ec.generate_private_key(ec.SECP256R1()),
        signing_keys=[],
        device_id=golden["device_id"],
        store_id=golden["store_id"],
    )
    state.save_enrollment(
        EnrollmentResponse.model_validate(
            {
                **response.model_dump(by_alias=True),
                "signing_keys": enrollment["signing_keys"],
                "broker": BrokerEndpoint(host="localhost", port=8883).model_dump(),
            }
        )
    )
    reconciler, handler = make_reconciler(state)
    report = await reconciler.handle((GOLDEN / "desired_state.json").read_bytes())
    assert report.status is ApplyStatus.APPLIED, report.detail
    assert handler.applied.config["pos"]["currency"] == "EUR"
    state.close()


# --- validation, post-apply checks --------------------------------------------------------


async def test_invalid_section_is_rejected_as_invalid_config_and_changes_nothing(
    tmp_path, state, signing_key
):
    from agent.handlers import ENV_FILE, default_handlers

    config_dir = tmp_path / "config"
    reconciler, _ = make_reconciler(state, default_handlers(config_dir))
    await reconciler.handle(payload(signed_desired(1, signing_key, config={"env": {"A": "1"}})))
    before = {p.name: p.read_bytes() for p in config_dir.iterdir()}

    bad = signed_desired(2, signing_key, config={"env": {"A": "1\nB=2"}})
    report = await reconciler.handle(payload(bad))

    assert (report.status, report.reason) == (ApplyStatus.REJECTED, "invalid_config")
    assert "config.env.A" in report.detail
    assert report.applied_version == 1
    assert {p.name: p.read_bytes() for p in config_dir.iterdir()} == before
    assert ENV_FILE in before
    assert state.applied().version == 1


async def test_too_many_checks_are_invalid_config(state, signing_key):
    reconciler, handler = make_reconciler(state)
    checks = {f"c{i}": {"kind": "process", "target": "x"} for i in range(65)}
    report = await reconciler.handle(payload(signed_desired(1, signing_key, checks=checks)))
    assert (report.status, report.reason) == (ApplyStatus.REJECTED, "invalid_config")
    assert handler.attempts == 0


async def test_failing_post_apply_check_reports_failed_and_reverts(state, signing_key):
    from agent.checks import SimulatedChecks, verify

    checks = SimulatedChecks(failing={"pos-app"})

    async def gate(desired):
        return await verify(checks, desired, grace_s=0, attempts=2, retry_s=0)

    reconciler, handler = make_reconciler(state, verify=gate)
    assert (await reconciler.handle(payload(signed_desired(1, signing_key)))).status is ApplyStatus.APPLIED
    declared = {"pos-app": {"kind": "tcp", "target": "127.0.0.1:9"}}

    report = await reconciler.handle(payload(signed_desired(2, signing_key, checks=declared)))

    assert (report.status, report.reason) == (ApplyStatus.FAILED, "post_apply_unhealthy")
    assert "pos-app" in report.detail
    assert report.applied_version == 1
    assert handler.applied.version == 1  # reverted
    assert state.applied().version == 1
    assert reconciler.applied.version == 1

    checks.failing.clear()
    report = await reconciler.handle(payload(signed_desired(3, signing_key, checks=declared)))
    assert report.status is ApplyStatus.APPLIED
    assert set(reconciler.applied.checks) == {"pos-app"}


# --- signing-key rotation -------------------------------------------------------------------


def pem_map(*keys):
    from protocol.signing import key_id
    from tests.unit.agent.factories import public_pem

    return {key_id(key.public_key()): public_pem(key) for key in keys}


async def test_rotation_pins_the_new_set_and_the_new_key_verifies_the_next_document(disk_state, signing_key):
    new_key = ec.generate_private_key(ec.SECP256R1())
    reconciler, _ = make_reconciler(disk_state)

    # 1. Signed by the pinned key, introducing the new one.
    report = await reconciler.handle(
        payload(signed_desired(1, signing_key, signing_keys=pem_map(signing_key, new_key)))
    )
    assert report.status is ApplyStatus.APPLIED
    assert set(disk_state.signing_keys()) == set(pem_map(signing_key, new_key))

    # 2. Signed by the new key, retiring the old one.
    report = await reconciler.handle(payload(signed_desired(2, new_key, signing_keys=pem_map(new_key))))
    assert report.status is ApplyStatus.APPLIED
    assert set(disk_state.signing_keys()) == set(pem_map(new_key))

    # 3. The old key is no longer trusted, also after a restart.
    restarted, _ = make_reconciler(disk_state)
    report = await restarted.handle(payload(signed_desired(3, signing_key)))
    assert (report.status, report.reason) == (ApplyStatus.REJECTED, "unknown_signing_key")
    assert (await restarted.handle(payload(signed_desired(3, new_key)))).status is ApplyStatus.APPLIED


@pytest.mark.parametrize("case", ["without-signer", "kid-mismatch", "not-a-key", "too-many"])
async def test_a_rotation_that_could_lock_the_device_out_is_rejected(state, signing_key, case):
    other = ec.generate_private_key(ec.SECP256R1())
    keys = {
        "without-signer": lambda: pem_map(other),
        "kid-mismatch": lambda: {
            **pem_map(signing_key),
            "es256-0000000000000000": pem_map(other).popitem()[1],
        },
        "not-a-key": lambda: {**pem_map(signing_key), "es256-1111111111111111": "not a pem"},
        "too-many": lambda: pem_map(
            signing_key, *(ec.generate_private_key(ec.SECP256R1()) for _ in range(16))
        ),
    }[case]()
    before = state.signing_keys()
    reconciler, handler = make_reconciler(state)
    report = await reconciler.handle(payload(signed_desired(1, signing_key, signing_keys=keys)))
    assert (report.status, report.reason) == (ApplyStatus.REJECTED, "invalid_config")
    assert "signing_keys" in report.detail
    assert handler.attempts == 0
    assert state.signing_keys() == before


async def test_keys_of_a_document_that_failed_to_apply_are_not_adopted(state, signing_key):
    other = ec.generate_private_key(ec.SECP256R1())
    before = state.signing_keys()
    reconciler, _ = make_reconciler(state, MemoryHandler(fail_versions={1}))
    report = await reconciler.handle(
        payload(signed_desired(1, signing_key, signing_keys=pem_map(signing_key, other)))
    )
    assert report.status is ApplyStatus.FAILED
    assert state.signing_keys() == before
    assert set(reconciler.keys) == set(before)
