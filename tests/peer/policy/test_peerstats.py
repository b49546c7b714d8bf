"""peer.policy.peerstats: the measurements, the upper bound on response time predicted from them,
the EWMA prediction kept for the baseline rule, and the failure rules that drop or suspend a peer."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from policy_cases import CHUNK, PEERS, measured, peer_stats

from peer.policy.history import HALF_LIFE, Transfer
from peer.policy.peerstats import (
    CHOICE_QUANTILE,
    CHUNK_FAILURES_TO_DROP,
    FAILURE_COST,
    HEDGE_QUANTILE,
    MAX_FAILURE_SHARE,
    POLL_FAILURES_TO_SUSPEND,
    PRIOR_BPS,
    PRIOR_LATENCY,
    PeerFigures,
    PeerStats,
    stat_of,
    waiting_per_byte,
)

NOW = 1000.0


# -- the bound ------------------------------------------------------------------------------------


@pytest.mark.parametrize("queue", [0, 1, 5])
def test_a_peer_never_measured_is_bounded_by_the_optimistic_prior(queue: int) -> None:
    expected = PRIOR_LATENCY + (queue + 1) * CHUNK / PRIOR_BPS
    assert PeerStats().bound(CHUNK, queue, CHOICE_QUANTILE, NOW) == pytest.approx(expected)


def test_the_prior_is_optimistic_against_a_measured_lan_peer() -> None:
    """A new peer is tried: its prior beats a 200 Mbit/s peer we measured (42 ms a chunk)."""
    fast = measured(0.042)
    assert PeerStats().bound(CHUNK, 0, CHOICE_QUANTILE, NOW) < fast.bound(CHUNK, 0, CHOICE_QUANTILE, NOW)


def test_with_fresh_evidence_the_bound_is_the_measurement() -> None:
    st_ = measured(0.5, count=32, latency=0.01)
    assert st_.bound(CHUNK, 0, CHOICE_QUANTILE, NOW) == pytest.approx(0.5, rel=0.06)


def test_the_bound_is_conditioned_on_the_queue() -> None:
    """Answers that took 4 s while three others shared the link: alone it takes about 1 s, behind
    seven others about 8 s."""
    st_ = measured(4.0, count=32, latency=0.0, queue=3.0)
    assert st_.bound(CHUNK, 0, CHOICE_QUANTILE, NOW) == pytest.approx(1.0, rel=0.06)
    assert st_.bound(CHUNK, 3, CHOICE_QUANTILE, NOW) == pytest.approx(4.0, rel=0.06)
    assert st_.bound(CHUNK, 7, CHOICE_QUANTILE, NOW) == pytest.approx(8.0, rel=0.06)


def test_the_tail_sets_the_bound_not_the_mean() -> None:
    """Nine fast answers and one slow among them: the p95 bound sits at the slow one."""
    st_ = PeerStats()
    for k in range(20):
        st_.observe(CHUNK, 2.0 if k == 17 else 0.1, latency=0.0, now=NOW - (20 - k) * 0.01)
    assert st_.bound(CHUNK, 0, CHOICE_QUANTILE, NOW) > 1.5
    assert st_.response(0.5, NOW) == 0.1


def test_recent_samples_outweigh_old_ones() -> None:
    """A peer fast for twenty answers, then slow for three, is already predicted slow; slow for
    twenty, then fast for eight, is predicted fast at the median."""
    slowing = PeerStats()
    for k in range(23):
        slowing.observe(CHUNK, 1.0 if k >= 20 else 0.1, latency=0.0, now=NOW)
    assert slowing.bound(CHUNK, 0, CHOICE_QUANTILE, NOW) > 0.9
    recovering = PeerStats()
    for k in range(28):
        recovering.observe(CHUNK, 0.1 if k >= 20 else 1.0, latency=0.0, now=NOW)
    assert recovering.response(0.5, NOW) == 0.1
    assert recovering.throughput(NOW) > 5 * CHUNK


def test_stale_evidence_drifts_back_to_the_prior() -> None:
    """Exploration: a peer measured slow, then left alone, looks better and better until it is
    tried again; a fresh sample restores the evidence at once."""
    st_ = measured(2.0, count=32)
    fresh = st_.bound(CHUNK, 0, CHOICE_QUANTILE, NOW)
    later = [st_.bound(CHUNK, 0, CHOICE_QUANTILE, NOW + k * HALF_LIFE) for k in range(1, 8)]
    assert fresh > later[0] and later == sorted(later, reverse=True)
    prior = PeerStats().bound(CHUNK, 0, CHOICE_QUANTILE, NOW)
    assert later[-1] < 0.3 and later[-1] > prior
    st_.observe(CHUNK, 2.0, latency=0.001, now=NOW + 7 * HALF_LIFE)
    assert st_.bound(CHUNK, 0, CHOICE_QUANTILE, NOW + 7 * HALF_LIFE) > 1.0


def test_failed_requests_raise_the_bound() -> None:
    healthy = measured(0.1, count=10)
    flaky = measured(0.1, count=10)
    for _ in range(3):
        flaky.chunk_failed(nbytes=CHUNK, seconds=0.2, now=NOW)
    extra = flaky.bound(CHUNK, 0, CHOICE_QUANTILE, NOW) - healthy.bound(CHUNK, 0, CHOICE_QUANTILE, NOW)
    f = flaky.failure_share(NOW)
    assert 0.2 < f < 0.5
    assert extra == pytest.approx(FAILURE_COST * f / (1 - f), rel=0.05)


def test_a_peer_that_only_fails_is_bounded_at_the_failure_cap() -> None:
    st_ = PeerStats()
    for _ in range(40):
        st_.chunk_failed(nbytes=CHUNK, seconds=10.0, now=NOW)
    assert st_.failure_share(NOW) == MAX_FAILURE_SHARE
    assert math.isfinite(st_.bound(CHUNK, 0, CHOICE_QUANTILE, NOW))


def test_requests_still_in_flight_hold_the_bound_up() -> None:
    """A peer that has not answered a request launched 3 s ago is not bounded by its prior."""
    st_ = PeerStats()
    waiting = waiting_per_byte(3.0, 0, CHUNK)
    assert waiting == pytest.approx(3.0 / CHUNK)
    assert st_.bound(CHUNK, 0, CHOICE_QUANTILE, NOW, waiting) == pytest.approx(PRIOR_LATENCY + 3.0)
    assert waiting_per_byte(3.0, 2, CHUNK) == pytest.approx(1.0 / CHUNK)


def test_a_hedged_straggler_counts_as_slow_evidence() -> None:
    st_ = measured(0.1, count=10, latency=0.0)
    before = st_.bound(CHUNK, 0, CHOICE_QUANTILE, NOW)
    st_.outrun(CHUNK, 3.0, now=NOW)
    assert st_.bound(CHUNK, 0, CHOICE_QUANTILE, NOW) > 10 * before
    assert st_.chunks == 10  # it did not answer


@given(peer_stats(), st.integers(0, 30), st.integers(1, 10), st.integers(1, CHUNK))
def test_bounds_are_monotone_in_queue_depth_and_size(stats: PeerStats, queue: int, more: int, n: int) -> None:
    for q in (CHOICE_QUANTILE, HEDGE_QUANTILE):
        base = stats.bound(n, queue, q, NOW)
        assert stats.bound(n, queue + more, q, NOW) >= base
        assert stats.bound(n + more, queue, q, NOW) >= base
        assert base > 0 and math.isfinite(base)


@given(peer_stats(), st.integers(0, 30))
def test_the_hedge_bound_covers_the_choice_bound(stats: PeerStats, queue: int) -> None:
    assert stats.bound(CHUNK, queue, HEDGE_QUANTILE, NOW) >= stats.bound(CHUNK, queue, CHOICE_QUANTILE, NOW)


@given(peer_stats(), st.integers(0, 30), st.floats(0, 1e-5))
def test_waiting_never_lowers_the_bound(stats: PeerStats, queue: int, waiting: float) -> None:
    assert stats.bound(CHUNK, queue, CHOICE_QUANTILE, NOW, waiting) >= stats.bound(
        CHUNK, queue, CHOICE_QUANTILE, NOW
    )


@given(peer_stats(), st.floats(0.0, 10.0), st.floats(0.001, 5.0))
def test_a_slower_answer_never_lowers_the_bound(stats: PeerStats, seconds: float, more: float) -> None:
    a, b = PeerStats(), PeerStats()
    for t in stats.history.items:
        a.history.add(t)
        b.history.add(t)
    a.observe(CHUNK, seconds, latency=0.0, now=NOW)
    b.observe(CHUNK, seconds + more, latency=0.0, now=NOW)
    assert b.bound(CHUNK, 0, CHOICE_QUANTILE, NOW) >= a.bound(CHUNK, 0, CHOICE_QUANTILE, NOW)


# -- figures --------------------------------------------------------------------------------------


def test_figures_show_what_was_measured() -> None:
    st_ = measured(0.5, count=32, latency=0.01)
    st_.inflight = 2
    fig = st_.figures(NOW, 1.25, True)
    assert set(fig) == set(PeerFigures.__annotations__)
    assert fig["rtt"] == pytest.approx(0.01, rel=0.1)
    assert fig["throughput"] == pytest.approx(CHUNK / 0.49, rel=0.1)
    assert fig["p95"] == fig["p99"] == 0.5
    assert fig["score"] == 1.25 and fig["inflight"] == 2 and fig["same_subnet"] is True
    assert (fig["chunks"], fig["bytes"], fig["samples"], fig["state"]) == (32, 32 * CHUNK, 32, "ok")


def test_figures_of_a_peer_never_measured() -> None:
    fig = PeerStats().figures(NOW, 0.01, None)
    assert fig["p95"] is None and fig["p99"] is None and fig["state"] == "new"
    assert fig["throughput"] == pytest.approx(PRIOR_BPS)


@pytest.mark.parametrize(("why", "state"), [("dropped", "dropped"), ("suspended", "suspended")])
def test_state_says_why_a_peer_is_ignored(why: str, state: str) -> None:
    st_ = measured(0.1)
    st_.drop(NOW, 30.0, why)
    assert st_.state(NOW) == state
    assert st_.state(NOW + 30.0) == "ok"


# -- the EWMA prediction (the baseline rule) ------------------------------------------------------


@pytest.mark.parametrize(
    ("stats", "nbytes", "seconds"),
    [
        (PeerStats(), CHUNK, 0.005 + CHUNK / 50e6),  # the LAN prior
        (PeerStats(bps=1e6, latency=0.1), 1_000_000, 1.1),
        (PeerStats(bps=1e6, latency=0.1, inflight=3), 1_000_000, 4.1),  # queued behind three
        (PeerStats(bps=1e6, latency=0.1, chunk_failures=2), 1_000_000, 2.1),  # half a second per failure
        (PeerStats(bps=0.0, latency=0.0), 10, 10.0),  # no throughput measured: 1 B/s floor
        (PeerStats(bps=1e6, latency=0.0), 0, 0.0),
    ],
)
def test_predicted_time(stats: PeerStats, nbytes: int, seconds: float) -> None:
    assert stats.predicted(nbytes) == pytest.approx(seconds)


def test_observe_folds_a_sample_into_the_averages_and_the_window() -> None:
    st_ = PeerStats(bps=10e6, latency=0.1, chunk_failures=2)
    st_.observe(1_000_000, 0.5, latency=0.05, queue=2, now=NOW)
    assert st_.bps == pytest.approx(0.7 * 10e6 + 0.3 * 2e6)
    assert st_.latency == pytest.approx(0.8 * 0.1 + 0.2 * 0.5)
    assert st_.chunk_failures == 0
    assert list(st_.history.items) == [Transfer(NOW, 1_000_000, 0.5, 0.05, 2)]
    assert (st_.chunks, st_.bytes) == (1, 1_000_000)


def test_a_first_byte_time_outside_the_request_is_clamped() -> None:
    st_ = PeerStats()
    st_.observe(CHUNK, 0.5, latency=0.9, now=NOW)
    st_.observe(CHUNK, 0.5, latency=-1.0, now=NOW)
    st_.observe(CHUNK, 0.5, now=NOW)  # unknown: the whole time
    assert [t.latency for t in st_.history.items] == [0.5, 0.0, 0.5]


def test_one_pathological_answer_moves_latency_by_at_most_the_cap() -> None:
    st_ = PeerStats(latency=0.0)
    st_.observe(1, 3600.0)
    assert st_.latency == pytest.approx(0.2 * 5.0)


def test_an_instant_answer_does_not_divide_by_zero() -> None:
    st_ = PeerStats(bps=0.0)
    st_.observe(1, 0.0)
    assert math.isfinite(st_.bps) and st_.bps == pytest.approx(0.3 * 1e6)
    assert math.isfinite(st_.bound(CHUNK, 0, CHOICE_QUANTILE, 0.0))


@given(peer_stats(), st.integers(1, 1 << 24), st.integers(1, 10))
def test_a_longer_queue_or_more_failures_or_more_bytes_predict_longer(
    stats: PeerStats, nbytes: int, more: int
) -> None:
    base = stats.predicted(nbytes)
    longer = PeerStats(stats.bps, stats.latency, stats.inflight + more, stats.chunk_failures)
    assert longer.predicted(nbytes) > base
    failing = PeerStats(stats.bps, stats.latency, stats.inflight, stats.chunk_failures + more)
    assert failing.predicted(nbytes) > base
    assert stats.predicted(nbytes + more) > base


@given(peer_stats(), st.floats(1.5, 100.0), st.integers(1, 1 << 24))
def test_a_faster_peer_predicts_sooner(stats: PeerStats, factor: float, nbytes: int) -> None:
    faster = PeerStats(stats.bps * factor, stats.latency, stats.inflight, stats.chunk_failures)
    assert faster.predicted(nbytes) < stats.predicted(nbytes)


@given(peer_stats(), st.integers(1 << 10, 1 << 22), st.floats(0.001, 4.0))
def test_steady_samples_converge_on_the_truth(stats: PeerStats, nbytes: int, seconds: float) -> None:
    for _ in range(200):
        stats.observe(nbytes, seconds, now=NOW)
    assert stats.bps == pytest.approx(nbytes / seconds, rel=1e-6)
    assert stats.latency == pytest.approx(seconds, rel=1e-6, abs=1e-9)
    assert stats.chunk_failures == 0
    assert stats.response(0.99, NOW) == seconds


# -- failures -------------------------------------------------------------------------------------


def test_three_failed_chunk_requests_in_a_row_drop_a_peer() -> None:
    st_ = PeerStats()
    assert [st_.chunk_failed() for _ in range(5)] == [False, False, True, True, True]
    assert CHUNK_FAILURES_TO_DROP == 3


def test_a_success_ends_the_chunk_failure_streak() -> None:
    st_ = PeerStats()
    st_.chunk_failed()
    st_.chunk_failed()
    st_.observe(CHUNK, 0.01)
    assert not st_.chunk_failed()


def test_two_unanswered_polls_suspend_a_peer_and_restart_the_streak() -> None:
    st_ = PeerStats()
    assert [st_.poll_failed() for _ in range(5)] == [False, True, False, True, False]
    assert POLL_FAILURES_TO_SUSPEND == 2


def test_an_answered_poll_ends_the_streak() -> None:
    st_ = PeerStats()
    st_.poll_failed()
    st_.poll_answered()
    assert not st_.poll_failed()


def test_one_failed_chunk_and_one_unanswered_poll_do_not_suspend_a_peer() -> None:
    """They used to share one streak: a chunk timeout on a saturated link (slow, not gone) and one
    lost poll suspended the peer. Now each rule counts its own kind."""
    st_ = PeerStats()
    assert not st_.chunk_failed()
    assert not st_.poll_failed()
    assert (st_.chunk_failures, st_.poll_failures) == (1, 1)


def test_polls_do_not_end_a_chunk_streak_nor_chunks_a_poll_streak() -> None:
    st_ = PeerStats()
    st_.chunk_failed()
    st_.chunk_failed()
    st_.poll_answered()
    assert st_.chunk_failed()  # the third in a row
    st_.poll_failed()
    st_.observe(CHUNK, 0.1)
    assert st_.poll_failed()  # the second in a row


def test_polls_leave_the_response_time_window_alone() -> None:
    st_ = PeerStats()
    st_.poll_failed()
    st_.poll_answered()
    assert len(st_.history) == 0 and st_.failure_share(NOW) == 0.0


@given(st.lists(st.sampled_from(["chunk", "poll", "answered", "observed"]), max_size=30))
def test_the_streaks_count_their_own_kind(events: list[str]) -> None:
    st_ = PeerStats()
    chunk = poll = 0
    for e in events:
        if e == "chunk":
            chunk += 1
            assert st_.chunk_failed() is (chunk >= CHUNK_FAILURES_TO_DROP)
        elif e == "poll":
            poll += 1
            suspend = poll >= POLL_FAILURES_TO_SUSPEND
            poll = 0 if suspend else poll
            assert st_.poll_failed() is suspend
        elif e == "answered":
            poll = 0
            st_.poll_answered()
        else:
            chunk = 0
            st_.observe(CHUNK, 0.01)
        assert (st_.chunk_failures, st_.poll_failures) == (chunk, poll)


@pytest.mark.parametrize(("now", "usable"), [(99.0, False), (129.9, False), (130.0, True), (500.0, True)])
def test_a_drop_lasts_its_seconds(now: float, usable: bool) -> None:
    st_ = PeerStats()
    st_.drop(100.0, 30.0)
    assert st_.usable(now) is usable


def test_stat_of_gives_the_prior_for_a_peer_never_measured_without_recording_it() -> None:
    stats: dict[str, PeerStats] = {}
    prior = stat_of(stats, PEERS[0])
    assert prior == PeerStats()
    prior.inflight = 5
    assert stats == {} and stat_of(stats, PEERS[0]).inflight == 0


def test_stat_of_gives_the_measured_object_itself() -> None:
    stats = {PEERS[0]: PeerStats(bps=1.0)}
    assert stat_of(stats, PEERS[0]) is stats[PEERS[0]]
