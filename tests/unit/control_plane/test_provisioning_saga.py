"""The provisioning saga's rules: level-triggered states, milestones once, the deadline."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from control_plane.provisioning.saga import DeviceFacts, SagaState, advance, device_facts

START = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
EXPECTED = {"pos": 2, "tablet": 1}


def device(
    device_id: str, role: str = "pos", *, desired=1, applied=1, status="applied", healthy=True, online=True
):
    return DeviceFacts(
        id=device_id,
        role=role,
        desired_version=desired,
        applied_version=applied,
        apply_status=status,
        healthy=healthy,
        online=online,
    )


def run(state, devices, progress=None, now=START + timedelta(seconds=5), deadline=START + timedelta(hours=1)):
    return advance(
        state=state,
        expected=EXPECTED,
        progress=progress or {},
        devices=devices,
        started_at=START,
        deadline_at=deadline,
        now=now,
    )


def test_waits_for_every_expected_device_and_records_each_milestone_once():
    step = run(SagaState.WAITING_ENROLLMENT, [device("a"), device("b", desired=0, applied=0, status=None)])
    assert step.state is SagaState.WAITING_ENROLLMENT
    assert [kind for kind, _ in step.events] == [
        "device_enrolled",
        "device_configured",
        "device_healthy",
        "device_enrolled",
        "device_healthy",
    ]
    assert step.refresh == ["b"]  # enrolled without a desired state: ask the publisher (again)
    again = run(SagaState.WAITING_ENROLLMENT, [device("a"), device("b")], progress=step.progress)
    assert [(kind, detail["device_id"]) for kind, detail in again.events] == [("device_configured", "b")]


def test_forward_through_configuring_and_verifying_to_ready():
    devices = [device("a"), device("b"), device("c", "tablet", desired=0, applied=0, status=None)]
    step = run(SagaState.WAITING_ENROLLMENT, devices)
    assert step.state is SagaState.CONFIGURING
    assert ("state_changed", {"from": "waiting_enrollment", "to": "configuring"}) in step.events

    devices[2] = device("c", "tablet", applied=0, status=None)
    step = run(SagaState.CONFIGURING, devices, progress=step.progress)
    assert step.state is SagaState.VERIFYING

    devices[2] = device("c", "tablet", online=False)  # applied but its session dropped
    assert run(SagaState.VERIFYING, devices, progress=step.progress).state is SagaState.VERIFYING
    devices[2] = device("c", "tablet")
    step = run(SagaState.VERIFYING, devices, progress=step.progress, now=START + timedelta(seconds=12.5))
    assert step.ready
    assert step.events[-1] == ("ready", {"seconds_to_ready": 12.5, "devices": 3})


def test_a_failed_apply_or_unhealthy_device_is_not_ready():
    for broken in (device("b", status="failed", applied=0), device("b", healthy=False)):
        step = run(SagaState.VERIFYING, [device("a"), broken, device("c", "tablet")])
        assert step.state is SagaState.VERIFYING


def test_a_device_lost_midway_sends_the_store_back_to_waiting():
    step = run(SagaState.VERIFYING, [device("a"), device("c", "tablet")])
    assert step.state is SagaState.WAITING_ENROLLMENT
    assert ("state_changed", {"from": "verifying", "to": "waiting_enrollment"}) in step.events


def test_extra_devices_do_not_stand_in_for_a_missing_role():
    step = run(SagaState.WAITING_ENROLLMENT, [device("a"), device("b"), device("x", "kiosk")])
    assert step.state is SagaState.WAITING_ENROLLMENT


def test_the_deadline_fails_the_saga_with_what_is_missing():
    step = run(
        SagaState.VERIFYING,
        [device("a"), device("b", healthy=False), device("c", "tablet")],
        now=START + timedelta(hours=2),
    )
    assert step.state is SagaState.FAILING
    assert step.error == "deadline passed in verifying: pos 1/2 ready"
    assert step.events[-1][0] == "deadline_passed"
    # Ready at the deadline still counts as ready.
    on_time = run(
        SagaState.VERIFYING,
        [device("a"), device("b"), device("c", "tablet")],
        now=START + timedelta(hours=2),
    )
    assert on_time.ready


def test_device_facts_from_rows():
    row = {
        "id": "d",
        "role": "pos",
        "desired_version": 2,
        "applied_version": 2,
        "apply_status": "applied",
        "health_status": "unknown",
        "reported_healthy": True,
        "online": True,
    }
    facts = device_facts(row)
    assert (facts.configured, facts.healthy, facts.online, facts.ready) == (True, True, True, True)
    # The health roll-up's verdict wins over the last report's flag; no report: not healthy.
    assert not device_facts(row | {"health_status": "unhealthy"}).healthy
    assert not device_facts(row | {"reported_healthy": None}).healthy
    assert device_facts(row | {"health_status": "healthy", "reported_healthy": None}).healthy
    assert not device_facts(row | {"online": None}).ready
    assert not device_facts(row | {"applied_version": 1}).configured
