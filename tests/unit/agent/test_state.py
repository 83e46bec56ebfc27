import sqlite3
import stat
import threading

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.enrollment import ensure_key
from agent.errors import NotEnrolled, StateError
from agent.identity import load_certificate, load_private_key, matches_key
from agent.state import CA_FILE, CERT_FILE, DB_NAME, KEY_FILE, AgentState
from protocol.signing import key_id
from tests.unit.agent.factories import DEVICE_ID, STORE_ID, desired_document, enroll_directly


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_fresh_state_is_not_enrolled_and_has_nothing_applied():
    state = AgentState.in_memory()
    assert state.enrollment() is None
    assert state.applied().version == 0
    assert state.applied().document is None
    with pytest.raises(NotEnrolled, match="storefleet-agent enroll"):
        state.require_enrollment()


def test_enrollment_persists_across_reopen(tmp_path, ca, signing_key):
    state = AgentState.open(tmp_path)
    response = enroll_directly(state, ca=ca, signing_keys=[signing_key], broker=("mqtt.example", 8884))
    state.close()

    reopened = AgentState.open(tmp_path)
    enrollment = reopened.require_enrollment()
    assert (enrollment.device_id, enrollment.store_id) == (DEVICE_ID, STORE_ID)
    assert (enrollment.broker_host, enrollment.broker_port) == ("mqtt.example", 8884)
    assert enrollment.health_interval_s == 30.0
    assert reopened.certificate_pem() == response.certificate_pem
    assert reopened.ca_chain_pem() == ca.pem
    assert reopened.signing_keys() == {
        key_id(signing_key.public_key()): response.signing_keys[0].public_key_pem
    }
    key = load_private_key(reopened.private_key_pem())
    assert matches_key(load_certificate(reopened.certificate_pem()), key)
    reopened.close()


def test_applied_version_and_document_persist_across_reopen(tmp_path, ca, signing_key):
    state = AgentState.open(tmp_path)
    enroll_directly(state, ca=ca, signing_keys=[signing_key])
    document = desired_document(5, config={"é": [1, 2.5, None]})
    state.record_applied(5, document)
    state.close()

    reopened = AgentState.open(tmp_path)
    applied = reopened.applied()
    assert applied.version == 5
    assert applied.document == document
    assert applied.applied_at is not None
    reopened.close()


def test_health_sequence_keeps_increasing_across_restarts(tmp_path):
    state = AgentState.open(tmp_path)
    first = [state.next_health_seq() for _ in range(3)]
    state.close()
    reopened = AgentState.open(tmp_path)
    later = [reopened.next_health_seq() for _ in range(2)]
    reopened.close()
    assert first + later == [0, 1, 2, 3, 4]


def test_recording_an_older_version_is_refused(state):
    state.record_applied(7, desired_document(7))
    with pytest.raises(StateError):
        state.record_applied(6, desired_document(6))
    assert state.applied().version == 7


def test_re_enrolling_as_another_device_forgets_the_applied_state(state, ca, signing_key):
    state.record_applied(3, desired_document(3))
    other_key = ec.generate_private_key(ec.SECP256R1())
    enroll_directly(state, ca=ca, signing_keys=[other_key], device_id="dev-0002")
    assert state.require_enrollment().device_id == "dev-0002"
    assert state.applied().version == 0
    assert list(state.signing_keys()) == [key_id(other_key.public_key())]


def test_re_enrolling_the_same_device_keeps_the_applied_state(state, ca, signing_key):
    state.record_applied(3, desired_document(3))
    enroll_directly(state, ca=ca, signing_keys=[signing_key])
    assert state.applied().version == 3


def test_key_file_is_private_and_directory_closed(tmp_path):
    state_dir = tmp_path / "state"
    state = AgentState.open(state_dir)
    key = ensure_key(state)
    assert mode(state_dir) == 0o700
    assert mode(state_dir / KEY_FILE) == 0o600
    assert mode(state_dir / DB_NAME) == 0o600
    # The key is made once and then reused.
    assert ensure_key(state).private_numbers() == key.private_numbers()
    state.close()


def test_certificates_live_next_to_the_database(disk_state):
    directory = disk_state.directory
    assert (directory / CERT_FILE).read_text() == disk_state.certificate_pem()
    assert (directory / CA_FILE).read_text() == disk_state.ca_chain_pem()
    files = disk_state.credential_files()
    assert files is not None
    assert files.private_key == directory / KEY_FILE


def test_in_memory_state_writes_no_files(tmp_path, monkeypatch, ca, signing_key):
    monkeypatch.chdir(tmp_path)
    state = AgentState.in_memory()
    enroll_directly(state, ca=ca, signing_keys=[signing_key])
    state.record_applied(1, desired_document(1))
    state.next_health_seq()
    assert state.credential_files() is None
    assert not state.on_disk
    assert list(tmp_path.iterdir()) == []


async def test_io_runs_disk_calls_off_the_loop_and_memory_calls_inline(disk_state, memory_state):
    main = threading.get_ident()
    assert await memory_state.io(threading.get_ident) == main
    assert await disk_state.io(threading.get_ident) != main
    assert await disk_state.io(disk_state.next_health_seq) == 0


def test_database_from_a_newer_agent_is_refused(tmp_path):
    AgentState.open(tmp_path).close()
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(StateError, match="newer"):
        AgentState.open(tmp_path)


def test_unusable_state_directory_is_a_state_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StateError, match="cannot open"):
        AgentState.open(blocker / "state")


# --- health outbox -------------------------------------------------------------------------


def queue(state, count, *, limit):
    return [state.enqueue_health(lambda seq: f'{{"seq": {seq}}}', limit=limit) for _ in range(count)]


def test_outbox_keeps_reports_in_sequence_order_until_sent(state):
    assert queue(state, 3, limit=10) == [0, 1, 2]
    batch, dropped = state.queued_health(2)
    assert [seq for seq, _ in batch] == [0, 1]
    assert [payload for _, payload in batch] == ['{"seq": 0}', '{"seq": 1}']
    assert dropped == 0
    state.health_sent(1)
    assert [seq for seq, _ in state.queued_health(10)[0]] == [2]
    assert state.health_backlog() == 1


def test_a_full_outbox_drops_the_oldest_and_counts_them(state):
    queue(state, 8, limit=5)
    batch, dropped = state.queued_health(10)
    assert [seq for seq, _ in batch] == [3, 4, 5, 6, 7]
    assert dropped == 3
    # The report that carried the count was sent: the count starts again; new drops add up.
    state.health_sent(3, dropped_reported=3)
    assert state.health_dropped() == 0
    queue(state, 3, limit=5)  # 4..7 + 8, 9, 10 → 2 more dropped
    batch, dropped = state.queued_health(10)
    assert [seq for seq, _ in batch] == [6, 7, 8, 9, 10]
    assert dropped == 2


def test_outbox_and_sequence_survive_a_restart(disk_state):
    queue(disk_state, 4, limit=3)
    disk_state.close()
    reopened = AgentState.open(disk_state.directory)
    try:
        batch, dropped = reopened.queued_health(10)
        assert ([seq for seq, _ in batch], dropped) == ([1, 2, 3], 1)
        assert queue(reopened, 1, limit=3) == [4]
    finally:
        reopened.close()


def test_a_failed_render_queues_nothing_and_keeps_the_sequence(state):
    queue(state, 1, limit=5)

    def broken(seq):
        raise ValueError("bad report")

    with pytest.raises(ValueError, match="bad report"):
        state.enqueue_health(broken, limit=5)
    assert queue(state, 1, limit=5) == [1]
    assert [seq for seq, _ in state.queued_health(10)[0]] == [0, 1]


def test_a_state_from_before_the_outbox_gains_its_tables(disk_state):
    disk_state._db.execute("DROP TABLE health_outbox")
    disk_state._db.execute("DROP TABLE apply_journal")
    disk_state.close()
    reopened = AgentState.open(disk_state.directory)
    try:
        assert reopened.enrollment() is not None
        assert queue(reopened, 1, limit=5) == [0]
        assert reopened.journal() is None
    finally:
        reopened.close()


def test_opening_the_state_beside_a_running_agent_never_fails(disk_state):
    """`storefleet-agent status` opens the database while the agent writes to it."""
    stop = threading.Event()

    def agent_writes():
        while not stop.is_set():
            disk_state.health_sent(disk_state.enqueue_health(lambda seq: "{}", limit=10))

    writer = threading.Thread(target=agent_writes)
    writer.start()
    try:
        for _ in range(100):
            AgentState.open(disk_state.directory).close()
    finally:
        stop.set()
        writer.join()
