import random

import pytest

from agent.backoff import backoff_delay


def delays(attempt, *, minimum=0.5, maximum=30.0, n=500, seed=1):
    rng = random.Random(seed)
    return [backoff_delay(attempt, minimum=minimum, maximum=maximum, rng=rng) for _ in range(n)]


def test_first_retry_waits_between_minimum_and_twice_minimum():
    values = delays(1)
    assert all(0.5 <= v <= 1.0 for v in values)


def test_cap_grows_exponentially_then_stops_at_maximum():
    assert max(delays(3)) <= 4.0
    assert max(delays(4)) > 4.0  # the window really widened
    assert all(0.5 <= v <= 30.0 for v in delays(10))
    assert max(delays(10)) > 25.0


def test_jitter_spreads_a_fleet_out():
    values = delays(5)
    assert len({round(v, 3) for v in values}) > 400
    assert min(values) < 2.0
    assert max(values) > 14.0


def test_same_seed_same_delays():
    assert delays(6, seed=42) == delays(6, seed=42)


def test_huge_attempt_numbers_do_not_overflow():
    assert 0.5 <= backoff_delay(10_000, minimum=0.5, maximum=30.0, rng=random.Random(0)) <= 30.0


def test_equal_bounds_give_a_fixed_delay():
    assert delays(3, minimum=2.0, maximum=2.0, n=5) == [2.0] * 5


@pytest.mark.parametrize(("attempt", "minimum", "maximum"), [(0, 0.5, 30.0), (1, 0.0, 1.0), (1, 2.0, 1.0)])
def test_invalid_arguments_are_refused(attempt, minimum, maximum):
    with pytest.raises(ValueError):
        backoff_delay(attempt, minimum=minimum, maximum=maximum, rng=random.Random(0))
