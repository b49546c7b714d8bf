"""peer.policy.peerstats: the measurements, the prediction made from them, and the failure rules
that drop or suspend a peer."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from policy_cases import CHUNK, PEERS, peer_stats

from peer.policy.peerstats import (
    CHUNK_FAILURES_TO_DROP,
    POLL_FAILURES_TO_SUSPEND,
    PeerStats,
    stat_of,
)


@pytest.mark.parametrize(
    ("stats", "nbytes", "seconds"),
    [
        (PeerStats(), CHUNK, 0.005 + CHUNK / 50e6),  # the LAN prior
        (PeerStats(bps=1e6, latency=0.1), 1_000_000, 1.1),
        (PeerStats(bps=1e6, latency=0.1, inflight=3), 1_000_000, 4.1),  # queued behind three
        (PeerStats(bps=1e6, latency=0.1, failures=2), 1_000_000, 2.1),  # half a second per failure
        (PeerStats(bps=0.0, latency=0.0), 10, 10.0),  # no throughput measured: 1 B/s floor
        (PeerStats(bps=1e6, latency=0.0), 0, 0.0),
    ],
)
def test_predicted_time(stats: PeerStats, nbytes: int, seconds: float) -> None:
    assert stats.predicted(nbytes) == pytest.approx(seconds)


def test_observe_folds_a_sample_into_the_averages() -> None:
    st_ = PeerStats(bps=10e6, latency=0.1, failures=2)
    st_.observe(1_000_000, 0.5)
    assert st_.bps == pytest.approx(0.7 * 10e6 + 0.3 * 2e6)
    assert st_.latency == pytest.approx(0.8 * 0.1 + 0.2 * 0.5)
    assert st_.failures == 0


def test_one_pathological_answer_moves_latency_by_at_most_the_cap() -> None:
    st_ = PeerStats(latency=0.0)
    st_.observe(1, 3600.0)
    assert st_.latency == pytest.approx(0.2 * 5.0)


def test_an_instant_answer_does_not_divide_by_zero() -> None:
    st_ = PeerStats(bps=0.0)
    st_.observe(1, 0.0)
    assert math.isfinite(st_.bps) and st_.bps == pytest.approx(0.3 * 1e6)


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


def test_chunk_and_poll_failures_share_one_streak() -> None:
    """One failed chunk request and one unanswered poll suspend a peer: both say it is not there."""
    st_ = PeerStats()
    st_.chunk_failed()
    assert st_.poll_failed()


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


@given(peer_stats(), st.integers(1, 1 << 24), st.integers(1, 10))
def test_a_longer_queue_or_more_failures_or_more_bytes_predict_longer(
    stats: PeerStats, nbytes: int, more: int
) -> None:
    base = stats.predicted(nbytes)
    assert PeerStats(stats.bps, stats.latency, stats.inflight + more, stats.failures).predicted(nbytes) > base
    assert PeerStats(stats.bps, stats.latency, stats.inflight, stats.failures + more).predicted(nbytes) > base
    assert stats.predicted(nbytes + more) > base


@given(peer_stats(), st.floats(1.5, 100.0), st.integers(1, 1 << 24))
def test_a_faster_peer_predicts_sooner(stats: PeerStats, factor: float, nbytes: int) -> None:
    faster = PeerStats(stats.bps * factor, stats.latency, stats.inflight, stats.failures)
    assert faster.predicted(nbytes) < stats.predicted(nbytes)


@given(peer_stats(), st.integers(1 << 10, 1 << 22), st.floats(0.001, 4.0))
def test_steady_samples_converge_on_the_truth(stats: PeerStats, nbytes: int, seconds: float) -> None:
    for _ in range(200):
        stats.observe(nbytes, seconds)
    assert stats.bps == pytest.approx(nbytes / seconds, rel=1e-6)
    assert stats.latency == pytest.approx(seconds, rel=1e-6, abs=1e-9)
    assert stats.failures == 0
