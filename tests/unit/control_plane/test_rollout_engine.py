"""The rollout engine with an injected clock: waves, health gate, thresholds, min sample,
windows across a DST change, deferred / skipped devices, timeouts, the per-store cap, the
pause on no evidence (every device skipped) and the operator's waiver."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from control_plane.rollouts.engine import DeviceStatus, RolloutStatus, Step, assign_waves, step
from control_plane.rollouts.models import DeviceState, Plan, RolloutState, Wave

T0 = datetime(2026, 12, 7, 3, 0, tzinfo=UTC)  # a Monday, 04:00 in Berlin: stores closed
BERLIN_HOURS = {day: [["08:00", "20:00"]] for day in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}


def plan(**fields) -> Plan:
    base = {
        "waves": [Wave(count=1), Wave(percent=100)],
        "bake_s": 60,
        "apply_timeout_s": 120,
        "heartbeat_grace_s": 90,
        "window": "now",
    }
    return Plan(**{**base, **fields})


class Sim:
    """Applies steps the way the driver persists them, and plays the devices' side."""

    def __init__(self, the_plan: Plan, devices: list[DeviceStatus], *, start: datetime = T0) -> None:
        self.rollout = RolloutStatus(
            id="ro-1",
            state=RolloutState.SCHEDULED,
            current_wave=0,
            wave_started_at=None,
            start_at=None,
            failures_accepted=0,
            evidence_waived_wave=None,
            plan=the_plan,
        )
        self.devices = {d.device_id: d for d in devices}
        self.now = start
        self.version = dict.fromkeys(self.devices, 1)
        self.events: list[tuple[str, dict]] = []

    def step(self) -> Step:
        out = step(self.rollout, list(self.devices.values()), self.now)
        self.events.extend(out.events)
        for t in out.transitions:
            device = self.devices[t.device_id]
            device.state = t.state
            if t.state is DeviceState.SENT:
                device.sent_at = self.now
                self.version[t.device_id] += 1
                device.target_version = self.version[t.device_id]
            if t.state is DeviceState.APPLIED:
                device.applied_at = t.at
        if out.state is not None:
            self.rollout.state = out.state
            if out.state is RolloutState.RUNNING and self.rollout.wave_started_at is None:
                self.rollout.wave_started_at = self.now
        if out.current_wave is not None:
            self.rollout.current_wave = out.current_wave
            self.rollout.wave_started_at = self.now
        return out

    def apply(self, device_id: str, *, ok: bool = True) -> None:
        device = self.devices[device_id]
        assert device.target_version is not None
        device.apply_reported_at = self.now
        if ok:
            device.applied_version = device.target_version
            device.apply_status = "applied"
        else:
            device.apply_status = "failed"

    def report_health(self, device_id: str, healthy: bool = True) -> None:
        device = self.devices[device_id]
        device.health_status = "healthy" if healthy else "unhealthy"
        device.health_at = self.now
        device.last_seen_at = self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    def states(self) -> Counter[str]:
        return Counter(d.state.value for d in self.devices.values())

    def sent_now(self) -> list[str]:
        return sorted(d.device_id for d in self.devices.values() if d.state is DeviceState.SENT)

    def run_good_devices(self, seconds: float, *, every: float = 10) -> None:
        """Time passes; every sent device applies, every device reports healthy."""
        for _ in range(int(seconds / every)):
            for device_id in self.sent_now():
                self.apply(device_id)
            self.step()
            for device_id, device in self.devices.items():
                if device.online:
                    self.report_health(device_id)
            self.advance(every)
            self.step()


def fleet(count: int, *, stores: int = 1, role: str = "pos", **fields) -> list[DeviceStatus]:
    return [
        DeviceStatus(
            device_id=f"d{i:03d}",
            store_id=f"s{i % stores}",
            role=role,
            wave=0,
            state=DeviceState.QUEUED,
            online=True,
            last_seen_at=T0,
            **fields,
        )
        for i in range(count)
    ]


def waved(devices: list[DeviceStatus], the_plan: Plan) -> list[DeviceStatus]:
    waves = assign_waves(the_plan, [(d.device_id, d.store_id, None) for d in devices], order_key="ro-1")
    for device in devices:
        device.wave = waves[device.device_id]
    return devices


def test_wave_sizes_cumulative_percent_and_canary_per_region():
    the_plan = Plan(waves=[Wave(count=1, per="region"), Wave(percent=5), Wave(percent=25), Wave(percent=100)])
    targets = [(f"d{i:03d}", f"s{i % 10}", f"r{i % 4}") for i in range(200)]
    waves = assign_waves(the_plan, targets, order_key="ro-x")
    sizes = Counter(waves.values())
    assert sizes == {0: 4, 1: 6, 2: 40, 3: 150}  # 4 regions; 5 % = 10 in total; 25 % = 50; rest
    canary_regions = {region for device, _, region in targets if waves[device] == 0}
    assert canary_regions == {"r0", "r1", "r2", "r3"}
    assert assign_waves(the_plan, targets, order_key="ro-x") == waves  # stable for a rollout


def test_a_scheduled_rollout_waits_for_its_start_time():
    sim = Sim(plan(), waved(fleet(3), plan()))
    sim.rollout.start_at = T0 + timedelta(hours=1)
    assert sim.step().transitions == []
    assert sim.rollout.state is RolloutState.SCHEDULED
    sim.advance(3600)
    out = sim.step()
    assert sim.rollout.state is RolloutState.RUNNING
    assert len(out.sends) == 1  # the canary


def test_canary_passes_only_after_staying_healthy_through_the_bake():
    the_plan = plan(bake_s=60)
    sim = Sim(the_plan, waved(fleet(5, stores=5), the_plan))
    sim.step()
    [canary] = sim.sent_now()
    sim.advance(5)
    sim.apply(canary)
    sim.step()
    assert sim.devices[canary].state is DeviceState.APPLIED
    for _ in range(5):  # 50 s of healthy heartbeats: not baked yet
        sim.advance(10)
        sim.report_health(canary)
        sim.step()
    assert sim.rollout.current_wave == 0
    assert sim.sent_now() == []
    sim.advance(15)
    sim.report_health(canary)
    sim.step()
    assert sim.devices[canary].state is DeviceState.HEALTHY
    assert sim.rollout.current_wave == 1
    sim.step()
    assert len(sim.sent_now()) == 4  # the 100 % wave goes out (five stores, no cap hit)


def test_a_good_release_completes():
    the_plan = plan(bake_s=20)
    sim = Sim(the_plan, waved(fleet(10, stores=10), the_plan))
    sim.step()
    sim.run_good_devices(200)
    assert sim.rollout.state is RolloutState.COMPLETED
    assert sim.states() == {"healthy": 10}


def test_failed_canary_aborts_and_asks_for_rollback():
    the_plan = plan()
    sim = Sim(the_plan, waved(fleet(10, stores=10), the_plan))
    sim.step()
    [canary] = sim.sent_now()
    sim.advance(3)
    sim.apply(canary, ok=False)
    out = sim.step()
    assert sim.devices[canary].state is DeviceState.FAILED
    assert out.rollback
    assert out.events[-1][0] == "aborted"
    assert len([d for d in sim.devices.values() if d.state is DeviceState.SENT]) == 0  # nobody else moved


def test_unhealthy_after_apply_fails_and_pauses_when_configured():
    the_plan = plan(on_failure="pause")
    sim = Sim(the_plan, waved(fleet(4, stores=4), the_plan))
    sim.step()
    [canary] = sim.sent_now()
    sim.advance(2)
    sim.apply(canary)
    sim.step()
    sim.advance(10)
    sim.report_health(canary, healthy=False)
    out = sim.step()
    assert sim.devices[canary].state is DeviceState.FAILED
    assert out.state is RolloutState.PAUSED
    assert "failure threshold" in (out.reason or "")
    # Paused: nothing is sent; resuming accepts the failure seen so far.
    assert sim.step().sends == []
    sim.rollout.state = RolloutState.RUNNING
    sim.rollout.failures_accepted = 1
    sim.step()
    assert sim.rollout.state is RolloutState.RUNNING


def test_a_health_report_from_before_the_apply_does_not_count():
    the_plan = plan(bake_s=30)
    sim = Sim(the_plan, waved(fleet(2, stores=2), the_plan))
    sim.step()
    [canary] = sim.sent_now()
    sim.report_health(canary)  # before the apply
    sim.advance(40)
    sim.apply(canary)
    sim.step()
    sim.advance(40)
    sim.step()
    assert sim.devices[canary].state is DeviceState.APPLIED  # no report since the apply yet


def test_heartbeats_stopping_after_apply_fail_the_device():
    the_plan = plan(heartbeat_grace_s=30, failure_ratio=1.0, failure_min_sample=5)
    sim = Sim(the_plan, waved(fleet(6, stores=6), the_plan))
    sim.step()
    [canary] = sim.sent_now()
    sim.apply(canary)
    sim.step()
    sim.advance(31)
    out = sim.step()
    assert sim.devices[canary].state is DeviceState.FAILED
    assert "heartbeats stopped" in next(t.reason for t in out.transitions if t.device_id == canary)
    # Below the failure min sample, but the canary wave cannot pass on 0 healthy of 1.
    assert out.rollback
    assert "success ratio 0/1" in (out.reason or "")


def test_min_sample_and_success_ratio_gate_the_wave():
    the_plan = plan(
        waves=[Wave(count=4), Wave(percent=100)],
        bake_s=0,
        success_threshold=0.75,
        min_sample=3,
        failure_ratio=None,
        failure_count=3,
        on_failure="pause",
    )
    sim = Sim(the_plan, waved(fleet(10, stores=10), the_plan))
    sim.step()
    canaries = sim.sent_now()
    assert len(canaries) == 4
    sim.apply(canaries[0], ok=False)
    for device_id in canaries[1:]:
        sim.apply(device_id)
    sim.step()
    sim.advance(1)
    for device_id in canaries[1:]:
        sim.report_health(device_id)
    sim.step()
    # 3 healthy of 4 settled = 0.75 ≥ 0.75, failures 1 < 3: the wave passes.
    assert sim.rollout.current_wave == 1


def test_success_ratio_below_threshold_stops_the_rollout():
    the_plan = plan(
        waves=[Wave(count=4), Wave(percent=100)], bake_s=0, success_threshold=0.9, failure_ratio=None
    )
    sim = Sim(the_plan, waved(fleet(10, stores=10), the_plan))
    sim.step()
    canaries = sim.sent_now()
    sim.apply(canaries[0], ok=False)
    for device_id in canaries[1:]:
        sim.apply(device_id)
    sim.step()
    sim.advance(1)
    for device_id in canaries[1:]:
        sim.report_health(device_id)
    out = sim.step()
    assert out.rollback
    assert "success ratio 3/4" in (out.reason or "")


def test_failure_ratio_waits_for_its_min_sample():
    the_plan = plan(
        waves=[Wave(count=5), Wave(percent=100)],
        bake_s=0,
        failure_ratio=0.5,
        failure_min_sample=3,
        success_threshold=0,
    )
    sim = Sim(the_plan, waved(fleet(10, stores=10), the_plan))
    sim.step()
    first, second, third, *_ = sim.sent_now()
    sim.apply(first, ok=False)
    sim.step()
    assert sim.rollout.state is RolloutState.RUNNING  # 1 of 1 failed, but 1 settled < min sample 3
    sim.apply(second, ok=False)
    sim.step()
    assert sim.rollout.state is RolloutState.RUNNING  # 2 settled
    sim.apply(third)
    sim.step()
    sim.advance(1)
    sim.report_health(third)
    out = sim.step()
    assert out.rollback  # 2 of 3 settled failed ≥ 50 %
    assert "2 of 3" in (out.reason or "")


def test_apply_timeout_online_is_timed_out_and_offline_is_skipped():
    the_plan = plan(waves=[Wave(count=2), Wave(percent=100)], failure_ratio=None, failure_count=5)
    sim = Sim(the_plan, waved(fleet(6, stores=6), the_plan))
    sim.step()
    silent, gone = sim.sent_now()
    sim.devices[gone].online = False
    sim.advance(119)
    sim.step()
    assert sim.states()["sent"] == 2
    sim.advance(1)
    sim.step()
    assert sim.devices[silent].state is DeviceState.TIMED_OUT
    assert sim.devices[gone].state is DeviceState.SKIPPED


def test_offline_devices_are_skipped_after_the_deadline_and_do_not_stall():
    the_plan = plan(waves=[Wave(percent=100)], offline_skip_after_s=300, bake_s=0)
    devices = waved(fleet(3, stores=3), the_plan)
    devices[0].online = False
    devices[0].last_seen_at = T0 - timedelta(seconds=100)
    sim = Sim(the_plan, devices)
    sim.step()
    assert sim.devices["d000"].state is DeviceState.QUEUED  # offline, but not for long yet
    sim.run_good_devices(250)
    # The deadline counts from when its turn came (the wave start), not from its last message.
    assert sim.devices["d000"].state is DeviceState.QUEUED
    assert sim.rollout.state is RolloutState.RUNNING
    sim.run_good_devices(60)
    assert sim.devices["d000"].state is DeviceState.SKIPPED
    assert sim.rollout.state is RolloutState.COMPLETED
    assert sim.states() == {"healthy": 2, "skipped": 1}


def test_devices_in_trading_stores_are_deferred_until_closing_time():
    the_plan = plan(window="closed_hours", waves=[Wave(percent=100)], bake_s=0)
    devices = waved(fleet(2, stores=2), the_plan)
    devices[0].timezone = devices[1].timezone = "Europe/Berlin"
    devices[0].trading_hours = BERLIN_HOURS  # s0 trades 08:00-20:00
    sim = Sim(the_plan, devices, start=datetime(2026, 12, 7, 12, 0, tzinfo=UTC))  # 13:00 Berlin
    sim.step()
    assert sim.devices["d000"].state is DeviceState.DEFERRED
    assert sim.devices["d001"].state is DeviceState.SENT  # no trading hours: always in window
    sim.run_good_devices(60)
    assert sim.rollout.state is RolloutState.RUNNING  # the deferred device holds completion only
    sim.now = datetime(2026, 12, 7, 19, 0, tzinfo=UTC)  # 20:00 Berlin: closed
    sim.step()
    assert sim.devices["d000"].state is DeviceState.SENT
    sim.run_good_devices(60)
    assert sim.rollout.state is RolloutState.COMPLETED


@pytest.mark.parametrize(
    ("at_utc", "in_window"),
    [
        # 06:30 UTC on Saturday 28 March 2026 is 07:30 CET: before opening, in the window.
        (datetime(2026, 3, 28, 6, 30, tzinfo=UTC), True),
        # The same UTC time on Sunday 29 March (after the switch to CEST) is 08:30: trading.
        (datetime(2026, 3, 29, 6, 30, tzinfo=UTC), False),
        # Autumn: 25 October 2026 06:30 UTC is 07:30 CET again (CEST ended at 01:00 UTC).
        (datetime(2026, 10, 25, 6, 30, tzinfo=UTC), True),
        (datetime(2026, 10, 24, 6, 30, tzinfo=UTC), False),  # 08:30 CEST the day before
    ],
)
def test_windows_follow_the_store_time_zone_across_dst(at_utc, in_window):
    the_plan = plan(window="closed_hours", waves=[Wave(percent=100)])
    devices = waved(fleet(1), the_plan)
    devices[0].timezone = "Europe/Berlin"
    devices[0].trading_hours = BERLIN_HOURS
    sim = Sim(the_plan, devices, start=at_utc)
    sim.step()
    expected = DeviceState.SENT if in_window else DeviceState.DEFERRED
    assert sim.devices["d000"].state is expected


def test_maintenance_hours_replace_closed_hours():
    hours = {day: [] for day in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}
    hours["mon"] = [["02:00", "04:00"]]
    the_plan = plan(window="closed_hours", maintenance_hours=hours, waves=[Wave(percent=100)])
    devices = waved(fleet(1), the_plan)
    devices[0].timezone = "Europe/Berlin"
    sim = Sim(the_plan, devices, start=datetime(2026, 12, 7, 0, 30, tzinfo=UTC))  # Mon 01:30 Berlin
    sim.step()
    assert sim.devices["d000"].state is DeviceState.DEFERRED
    sim.advance(3600)  # 02:30
    sim.step()
    assert sim.devices["d000"].state is DeviceState.SENT


def test_a_wave_of_only_deferred_devices_waits_instead_of_passing_empty():
    the_plan = plan(window="closed_hours", waves=[Wave(count=1), Wave(percent=100)])
    devices = waved(fleet(4), the_plan)
    for device in devices:
        device.timezone = "Europe/Berlin"
        device.trading_hours = BERLIN_HOURS
    sim = Sim(the_plan, devices, start=datetime(2026, 12, 7, 12, 0, tzinfo=UTC))
    for _ in range(3):
        sim.step()
        sim.advance(60)
    assert sim.rollout.current_wave == 0
    assert sim.states() == {"deferred": 1, "queued": 3}


def offline(devices: list[DeviceStatus], *ids: str) -> list[DeviceStatus]:
    """The given devices (all without ids) are offline, last heard of at T0."""
    for device in devices:
        if not ids or device.device_id in ids:
            device.online = False
    return devices


def test_a_canary_wave_all_skipped_pauses_instead_of_starting_the_next_wave_blind():
    # on_failure=abort: nothing failed, so no rollback either; the operator decides.
    the_plan = plan(waves=[Wave(count=2), Wave(percent=100)], offline_skip_after_s=300, on_failure="abort")
    sim = Sim(the_plan, offline(waved(fleet(6, stores=6), the_plan)))
    sim.step()
    sim.advance(299)
    sim.step()
    assert sim.states() == {"queued": 6}  # offline, not yet past the deadline
    sim.advance(1)
    out = sim.step()
    canaries = sorted(d.device_id for d in sim.devices.values() if d.wave == 0)
    assert sorted(t.device_id for t in out.transitions) == canaries
    assert {t.state for t in out.transitions} == {DeviceState.SKIPPED}
    assert out.state is RolloutState.PAUSED
    assert out.current_wave is None
    assert out.reason == (
        "no evidence: every device of wave 0 was skipped (offline); resume to continue without it"
    )
    assert out.events == [("paused", {"reason": out.reason, "code": "no_evidence", "skipped": 2})]
    # Paused: the 100 % wave never starts, however long it waits.
    for _ in range(3):
        sim.advance(600)
        assert sim.step().transitions == []
    assert sim.rollout.state is RolloutState.PAUSED
    assert sim.rollout.current_wave == 0
    assert sim.states() == {"skipped": 2, "queued": 4}


def test_resuming_waives_the_missing_evidence_of_that_wave_only():
    the_plan = plan(waves=[Wave(count=2), Wave(percent=50), Wave(percent=100)], offline_skip_after_s=300)
    sim = Sim(the_plan, offline(waved(fleet(8, stores=8), the_plan)))
    sim.step()
    sim.advance(300)
    sim.step()
    assert sim.rollout.state is RolloutState.PAUSED
    # The operator resumes: the service records the waiver through the current wave.
    sim.rollout.state = RolloutState.RUNNING
    sim.rollout.evidence_waived_wave = 0
    out = sim.step()
    assert out.current_wave == 1
    assert [kind for kind, _ in out.events] == ["wave_passed", "wave_started"]
    # Wave 1 is all offline too: still no evidence at all, so it pauses again.
    sim.advance(300)
    out = sim.step()
    assert out.state is RolloutState.PAUSED
    assert out.reason is not None
    assert out.reason.startswith("no evidence: every device of waves 0..1 was skipped")
    assert out.events[-1][1]["code"] == "no_evidence"
    assert out.events[-1][1]["skipped"] == 4  # cumulative over the waves started
    assert sim.rollout.current_wave == 1
    assert sim.states() == {"skipped": 4, "queued": 4}


def test_one_healthy_canary_is_evidence_enough():
    the_plan = plan(waves=[Wave(count=2), Wave(percent=100)], offline_skip_after_s=30, bake_s=60)
    devices = waved(fleet(6, stores=6), the_plan)
    gone = next(d for d in devices if d.wave == 0)
    sim = Sim(the_plan, offline(devices, gone.device_id))
    sim.step()
    sim.run_good_devices(100)
    assert sim.devices[gone.device_id].state is DeviceState.SKIPPED
    assert sim.rollout.state is RolloutState.RUNNING
    assert sim.rollout.current_wave == 1
    assert "paused" not in [kind for kind, _ in sim.events]
    wave_passed = next(detail for kind, detail in sim.events if kind == "wave_passed")
    assert wave_passed == {"wave": 0, "healthy": 1, "settled": 1}


def test_the_last_wave_all_skipped_completes():
    the_plan = plan(waves=[Wave(percent=100)], offline_skip_after_s=300)
    sim = Sim(the_plan, offline(waved(fleet(3, stores=3), the_plan)))
    sim.step()
    sim.advance(300)
    out = sim.step()
    assert out.state is RolloutState.COMPLETED  # nothing moved; the skipped are reported
    assert out.events == [("completed", {"healthy": 0, "failed": 0, "skipped": 3})]
    assert sim.states() == {"skipped": 3}


def test_store_cap_and_known_good_hold_back_the_last_till():
    # One store, three tills, cap 50 % → one in flight; and one must stay known-good.
    the_plan = plan(waves=[Wave(percent=100)], store_cap_percent=50, bake_s=10)
    sim = Sim(the_plan, waved(fleet(3, stores=1), the_plan))
    sim.step()
    assert len(sim.sent_now()) == 1
    first = sim.sent_now()[0]
    sim.apply(first)
    sim.step()
    sim.step()
    assert sim.sent_now() == []  # the first is applied but not proven: still in flight
    sim.advance(11)
    sim.report_health(first)
    sim.step()
    assert sim.devices[first].state is DeviceState.HEALTHY
    assert len(sim.sent_now()) == 1


def test_keep_known_good_never_moves_every_till_of_a_store_at_once():
    the_plan = plan(waves=[Wave(percent=100)], store_cap_percent=100)
    sim = Sim(the_plan, waved(fleet(3, stores=1), the_plan))
    sim.step()
    assert len(sim.sent_now()) == 2  # the third waits until one of them is proven healthy
    single = Sim(the_plan, waved(fleet(1, stores=1), the_plan))
    single.step()
    assert len(single.sent_now()) == 1  # a store's only device of a role cannot wait for a peer


def test_plan_validation():
    hours = Plan(maintenance_hours={"mon-fri": "01:00-05:00", "sat-sun": "closed"}).maintenance_hours
    assert hours is not None
    assert hours["mon"] == [["01:00", "05:00"]]
    assert hours["sun"] == []
    with pytest.raises(ValueError, match="maintenance_hours"):
        Plan(maintenance_hours={"mon": "01:00-05:00"})  # the other days are not said
    with pytest.raises(ValueError, match="last wave must be percent 100"):
        Plan(waves=[Wave(count=1), Wave(percent=50)])
    with pytest.raises(ValueError, match="must not decrease"):
        Plan(waves=[Wave(percent=50), Wave(percent=25), Wave(percent=100)])
    with pytest.raises(ValueError, match="per applies to count waves"):
        Wave(percent=10, per="region")
