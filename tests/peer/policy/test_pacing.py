"""The tracker's pace: a site's periodic syncs per second stay within the budget, whatever its size."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peer.policy.pacing import MAX_PACE, MISSED, SYNC_BUDGET, member_interval, member_timeout, sync_pace


def test_a_small_site_is_not_slowed_down() -> None:
    """500 members or fewer at the default budget: a pace below the busy interval (0.25 s)."""
    assert sync_pace(500) == pytest.approx(0.25)
    assert member_interval(0.25, sync_pace(100)) == 0.25


def test_ten_thousand_members_sync_every_five_seconds() -> None:
    assert sync_pace(10_000) == pytest.approx(5.0)
    assert member_interval(0.25, sync_pace(10_000)) == pytest.approx(5.0)


@given(st.integers(0, 1_000_000), st.floats(1.0, 1e5))
def test_the_site_stays_within_the_budget(members: int, budget: float) -> None:
    pace = sync_pace(members, budget)
    interval = member_interval(0.25, pace)
    if pace < MAX_PACE:
        assert members / interval <= budget * (1 + 1e-9)
    assert interval <= MAX_PACE


def test_no_budget_means_no_pace() -> None:
    assert sync_pace(10_000, 0.0) == 0.0
    assert member_interval(0.25, 0.0) == 0.25


def test_an_absurd_pace_is_cut_and_never_speeds_a_member_up() -> None:
    assert member_interval(0.25, 1e9) == MAX_PACE
    assert member_interval(1.0, 0.1) == 1.0


def test_the_member_timeout_stretches_with_the_pace() -> None:
    assert member_timeout(3.0, 0.25) == 3.0
    assert member_timeout(3.0, sync_pace(10_000)) == pytest.approx(MISSED * 5.0)
    assert SYNC_BUDGET * sync_pace(10_000) == pytest.approx(10_000)
