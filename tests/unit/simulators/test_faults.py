"""The chaos fault plan is a function of the seed and the rates only."""

from __future__ import annotations

import pytest

from simulators.faults import ChaosRates, FaultKind, plan_faults

RATES = ChaosRates(
    duration_s=60.0,
    disconnects_per_device_minute=2.0,
    offline_fraction=0.2,
    offline_s=5.0,
    apply_failure_rate=0.1,
    slow_fraction=0.3,
    slow_apply_s=0.5,
)


def test_same_seed_same_plan_other_seed_other_plan():
    first, again, other = (plan_faults(200, RATES, seed, stores=20) for seed in (7, 7, 8))
    assert first == again
    assert first.digest() == again.digest()
    assert other.digest() != first.digest()


def test_plan_follows_the_rates():
    plan = plan_faults(1000, RATES, 1, stores=100)
    counts = plan.counts()
    # 1000 devices x 2/min x 1 min: about 2000 disconnects; 20 % offline; 30 % slow; a quarter
    # of the stores trading.
    assert counts["trading_stores"] == 25
    assert len(set(plan.trading_stores)) == 25
    assert all(0 <= store < 100 for store in plan.trading_stores)
    assert 1700 < counts["disconnects"] < 2300
    assert 150 < counts["offline_periods"] < 250
    assert 240 < counts["slow_devices"] < 360
    assert all(0 <= f.at_s < RATES.duration_s for f in plan.faults)
    assert all(f.at_s + f.duration_s <= RATES.duration_s for f in plan.faults if f.kind is FaultKind.OFFLINE)
    assert [f.at_s for f in plan.faults] == sorted(f.at_s for f in plan.faults)


def test_no_faults_when_rates_are_zero():
    plan = plan_faults(
        50,
        ChaosRates(
            disconnects_per_device_minute=0,
            offline_fraction=0,
            apply_failure_rate=0,
            slow_fraction=0,
            trading_fraction=0,
        ),
        3,
        stores=5,
    )
    assert plan.faults == ()
    assert plan.counts() == {
        "disconnects": 0,
        "offline_periods": 0,
        "slow_devices": 0,
        "devices_with_failing_applies": 0,
        "trading_stores": 0,
    }


def test_rates_are_validated():
    with pytest.raises(ValueError, match="apply_failure_rate"):
        ChaosRates(apply_failure_rate=1.5)
    with pytest.raises(ValueError, match="offline_s"):
        ChaosRates(offline_s=-1)
    with pytest.raises(ValueError, match="trading_fraction"):
        ChaosRates(trading_fraction=2)
