"""The per-device window that recognises a health report delivered twice."""

from __future__ import annotations

import pytest

from control_plane.health.replay import SeenSequences


def test_in_order_reports_are_new_and_a_repeat_is_not():
    seen = SeenSequences(width=8)
    assert [seen.first_time("d", seq) for seq in (1, 2, 3)] == [True, True, True]
    assert [seen.first_time("d", seq) for seq in (3, 2, 1)] == [False, False, False]
    assert seen.first_time("other", 3) is True  # per device


def test_a_late_report_inside_the_window_is_new_once():
    seen = SeenSequences(width=8)
    for seq in (10, 12, 15):
        assert seen.first_time("d", seq)
    assert seen.first_time("d", 11) is True  # a gap filled late
    assert seen.first_time("d", 11) is False
    assert seen.first_time("d", 13) is True
    assert seen.first_time("d", 10) is False


def test_older_than_the_window_is_taken_as_new():
    # A restarted sequence (state wiped) looks like this; so does a very late report.
    seen = SeenSequences(width=8)
    seen.first_time("d", 100)
    assert seen.first_time("d", 92) is True
    assert seen.first_time("d", 92) is True  # outside the window: not remembered
    assert seen.first_time("d", 93) is True
    assert seen.first_time("d", 93) is False


def test_a_jump_wider_than_the_window_forgets_what_was_below_it():
    seen = SeenSequences(width=8)
    seen.first_time("d", 1)
    seen.first_time("d", 50)
    assert seen.first_time("d", 50) is False
    assert seen.first_time("d", 45) is True
    assert seen.first_time("d", 45) is False
    assert seen.first_time("d", 51) is True
    assert seen.first_time("d", 50) is False  # bits shifted with the window


def test_forget_and_clear_judge_afresh():
    seen = SeenSequences(width=8)
    seen.first_time("a", 1)
    seen.first_time("b", 1)
    seen.forget("a")
    assert seen.first_time("a", 1) is True
    assert seen.first_time("b", 1) is False
    seen.clear()
    assert len(seen) == 0
    assert seen.first_time("b", 1) is True


def test_width_must_be_positive():
    with pytest.raises(ValueError, match="at least one"):
        SeenSequences(width=0)
