"""peer.policy.choice: the best predicted peer for a chunk, with jitter for exploration."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st
from policy_cases import CHUNK, PEERS, peer_stats

from peer.policy.choice import JITTER, best_peer
from peer.policy.peerstats import PeerStats

SPREAD = (1 + JITTER) / (1 - JITTER)  # the most jitter can reorder two predictions by


class Flat(random.Random):
    """Randomness whose every uniform draw is the midpoint: choices without jitter."""

    def uniform(self, a: float, b: float) -> float:
        return (a + b) / 2


def test_no_candidate_no_choice() -> None:
    assert best_peer([], {}, CHUNK, random.Random(1)) is None


def test_a_single_candidate_is_chosen_however_bad() -> None:
    stats = {PEERS[0]: PeerStats(bps=1.0, failures=4)}
    assert best_peer([PEERS[0]], stats, CHUNK, random.Random(1)) == PEERS[0]


@pytest.mark.parametrize("seed", range(20))
def test_a_clearly_faster_peer_wins_whatever_the_jitter(seed: int) -> None:
    stats = {PEERS[0]: PeerStats(bps=10e6), PEERS[1]: PeerStats(bps=100e6)}
    assert best_peer([PEERS[0], PEERS[1]], stats, CHUNK, random.Random(seed)) == PEERS[1]


@pytest.mark.parametrize("seed", range(10))
def test_a_peer_with_a_long_queue_loses_to_an_idle_one(seed: int) -> None:
    stats = {PEERS[0]: PeerStats(inflight=8), PEERS[1]: PeerStats()}
    assert best_peer([PEERS[0], PEERS[1]], stats, CHUNK, random.Random(seed)) == PEERS[1]


@pytest.mark.parametrize("seed", range(10))
def test_a_failing_peer_loses_to_a_healthy_one(seed: int) -> None:
    stats = {PEERS[0]: PeerStats(failures=2), PEERS[1]: PeerStats()}
    assert best_peer([PEERS[0], PEERS[1]], stats, CHUNK, random.Random(seed)) == PEERS[1]


def test_a_peer_never_measured_is_predicted_from_the_prior() -> None:
    slow = {PEERS[0]: PeerStats(bps=1e6)}
    assert best_peer([PEERS[0], PEERS[1]], slow, CHUNK, Flat()) == PEERS[1]
    fast = {PEERS[0]: PeerStats(bps=1e9, latency=0.0)}
    assert best_peer([PEERS[0], PEERS[1]], fast, CHUNK, Flat()) == PEERS[0]


def test_equal_predictions_go_to_the_smaller_url() -> None:
    assert best_peer([PEERS[3], PEERS[1], PEERS[2]], {}, CHUNK, Flat()) == PEERS[1]


def test_a_peer_slower_than_the_jitter_can_hide_never_wins() -> None:
    """1.1 / 0.9 = 1.22: a peer predicted 1.25x slower than another is never chosen over it."""
    stats = {PEERS[0]: PeerStats(bps=1e6, latency=0.0), PEERS[1]: PeerStats(bps=1.25e6, latency=0.0)}
    rng = random.Random(11)
    assert {best_peer([PEERS[0], PEERS[1]], stats, CHUNK, rng) for _ in range(5000)} == {PEERS[1]}


def test_a_peer_slightly_slower_still_gets_some_requests() -> None:
    """Exploration: 1.1x slower is within the jitter, so it is chosen now and then, not starved."""
    stats = {PEERS[0]: PeerStats(bps=1e6, latency=0.0), PEERS[1]: PeerStats(bps=1.1e6, latency=0.0)}
    rng = random.Random(11)
    picks = Counter(best_peer([PEERS[0], PEERS[1]], stats, CHUNK, rng) for _ in range(5000))
    assert 100 < picks[PEERS[0]] < 2500


def test_jitter_shares_the_load_between_equal_peers() -> None:
    rng = random.Random(7)
    picks = Counter(best_peer([PEERS[0], PEERS[1]], {}, CHUNK, rng) for _ in range(2000))
    assert 800 < picks[PEERS[0]] < 1200 and picks[PEERS[0]] + picks[PEERS[1]] == 2000


@given(st.lists(st.sampled_from(PEERS), min_size=1, unique=True), st.data(), st.integers(0, 2**32))
def test_the_choice_is_a_candidate_within_the_jitter_of_the_best(
    candidates: list[str], data: st.DataObject, seed: int
) -> None:
    stats = {p: data.draw(peer_stats()) for p in candidates}
    chosen = best_peer(candidates, stats, CHUNK, random.Random(seed))
    assert chosen in candidates
    best = min(stats[p].predicted(CHUNK) for p in candidates)
    assert stats[chosen].predicted(CHUNK) <= best * SPREAD * (1 + 1e-9)


@given(st.lists(st.sampled_from(PEERS), unique=True), st.integers(0, 2**32))
def test_one_draw_per_candidate_so_a_seed_replays_the_choice(candidates: list[str], seed: int) -> None:
    a, b = random.Random(seed), random.Random(seed)
    assert best_peer(candidates, {}, CHUNK, a) == best_peer(candidates, {}, CHUNK, b)
    reference = random.Random(seed)
    for _ in candidates:
        reference.uniform(1 - JITTER, 1 + JITTER)
    assert a.random() == reference.random()


@given(st.lists(st.sampled_from(PEERS), min_size=1, unique=True), st.integers(0, 2**32))
def test_best_peer_reads_stats_and_never_changes_them(candidates: list[str], seed: int) -> None:
    stats = {p: PeerStats(bps=1e6 * (i + 1)) for i, p in enumerate(candidates)}
    before = {p: PeerStats(**vars(s)) for p, s in stats.items()}
    best_peer(candidates, stats, CHUNK, random.Random(seed))
    assert stats == before
