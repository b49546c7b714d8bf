"""peer.policy.choice: the peer a chunk is asked from. The bound rule's `Picker` (smallest upper
bound at the queue the request would join, counting this round's own assignments, subnet
preference, tie-breaking jitter) and the two baselines, the EWMA rule as it was and uniform random."""

from __future__ import annotations

import copy
import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st
from policy_cases import CHUNK, PEERS, measured, peer_stats

from peer.policy.choice import EWMA_JITTER, JITTER, PROBES, Picker, Rule, ewma_peer, random_peer, score
from peer.policy.peerstats import PeerStats
from peer.policy.subnet import Locality

SPREAD = (1 + EWMA_JITTER) / (1 - EWMA_JITTER)  # the most jitter can reorder two predictions by


class Flat(random.Random):
    """Randomness whose every uniform draw is the midpoint: choices without jitter."""

    def uniform(self, a: float, b: float) -> float:
        return (a + b) / 2


# -- the EWMA rule (the baseline, as the engine chose before the bound) ------------------------------


def test_no_candidate_no_choice() -> None:
    assert ewma_peer([], {}, CHUNK, random.Random(1)) is None


def test_a_single_candidate_is_chosen_however_bad() -> None:
    stats = {PEERS[0]: PeerStats(bps=1.0, chunk_failures=4)}
    assert ewma_peer([PEERS[0]], stats, CHUNK, random.Random(1)) == PEERS[0]


@pytest.mark.parametrize("seed", range(20))
def test_a_clearly_faster_peer_wins_whatever_the_jitter(seed: int) -> None:
    stats = {PEERS[0]: PeerStats(bps=10e6), PEERS[1]: PeerStats(bps=100e6)}
    assert ewma_peer([PEERS[0], PEERS[1]], stats, CHUNK, random.Random(seed)) == PEERS[1]


@pytest.mark.parametrize("seed", range(10))
def test_a_peer_with_a_long_queue_loses_to_an_idle_one(seed: int) -> None:
    stats = {PEERS[0]: PeerStats(inflight=8), PEERS[1]: PeerStats()}
    assert ewma_peer([PEERS[0], PEERS[1]], stats, CHUNK, random.Random(seed)) == PEERS[1]


@pytest.mark.parametrize("seed", range(10))
def test_a_failing_peer_loses_to_a_healthy_one(seed: int) -> None:
    stats = {PEERS[0]: PeerStats(chunk_failures=2), PEERS[1]: PeerStats()}
    assert ewma_peer([PEERS[0], PEERS[1]], stats, CHUNK, random.Random(seed)) == PEERS[1]


def test_a_peer_never_measured_is_predicted_from_the_prior() -> None:
    slow = {PEERS[0]: PeerStats(bps=1e6)}
    assert ewma_peer([PEERS[0], PEERS[1]], slow, CHUNK, Flat()) == PEERS[1]
    fast = {PEERS[0]: PeerStats(bps=1e9, latency=0.0)}
    assert ewma_peer([PEERS[0], PEERS[1]], fast, CHUNK, Flat()) == PEERS[0]


def test_equal_predictions_go_to_the_smaller_url() -> None:
    assert ewma_peer([PEERS[3], PEERS[1], PEERS[2]], {}, CHUNK, Flat()) == PEERS[1]


def test_a_peer_slower_than_the_jitter_can_hide_never_wins() -> None:
    """1.1 / 0.9 = 1.22: a peer predicted 1.25x slower than another is never chosen over it."""
    stats = {PEERS[0]: PeerStats(bps=1e6, latency=0.0), PEERS[1]: PeerStats(bps=1.25e6, latency=0.0)}
    rng = random.Random(11)
    assert {ewma_peer([PEERS[0], PEERS[1]], stats, CHUNK, rng) for _ in range(5000)} == {PEERS[1]}


def test_a_peer_slightly_slower_still_gets_some_requests() -> None:
    """Exploration: 1.1x slower is within the jitter, so it is chosen now and then, not starved."""
    stats = {PEERS[0]: PeerStats(bps=1e6, latency=0.0), PEERS[1]: PeerStats(bps=1.1e6, latency=0.0)}
    rng = random.Random(11)
    picks = Counter(ewma_peer([PEERS[0], PEERS[1]], stats, CHUNK, rng) for _ in range(5000))
    assert 100 < picks[PEERS[0]] < 2500


def test_jitter_shares_the_load_between_equal_peers() -> None:
    rng = random.Random(7)
    picks = Counter(ewma_peer([PEERS[0], PEERS[1]], {}, CHUNK, rng) for _ in range(2000))
    assert 800 < picks[PEERS[0]] < 1200 and picks[PEERS[0]] + picks[PEERS[1]] == 2000


@given(st.lists(st.sampled_from(PEERS), min_size=1, unique=True), st.data(), st.integers(0, 2**32))
def test_the_choice_is_a_candidate_within_the_jitter_of_the_best(
    candidates: list[str], data: st.DataObject, seed: int
) -> None:
    stats = {p: data.draw(peer_stats()) for p in candidates}
    chosen = ewma_peer(candidates, stats, CHUNK, random.Random(seed))
    assert chosen in candidates
    best = min(stats[p].predicted(CHUNK) for p in candidates)
    assert stats[chosen].predicted(CHUNK) <= best * SPREAD * (1 + 1e-9)


@given(st.lists(st.sampled_from(PEERS), unique=True), st.integers(0, 2**32))
def test_one_draw_per_candidate_so_a_seed_replays_the_choice(candidates: list[str], seed: int) -> None:
    a, b = random.Random(seed), random.Random(seed)
    assert ewma_peer(candidates, {}, CHUNK, a) == ewma_peer(candidates, {}, CHUNK, b)
    reference = random.Random(seed)
    for _ in candidates:
        reference.uniform(1 - EWMA_JITTER, 1 + EWMA_JITTER)
    assert a.random() == reference.random()


@given(st.lists(st.sampled_from(PEERS), min_size=1, unique=True), st.integers(0, 2**32))
def test_best_peer_reads_stats_and_never_changes_them(candidates: list[str], seed: int) -> None:
    stats = {p: PeerStats(bps=1e6 * (i + 1)) for i, p in enumerate(candidates)}
    before = {p: PeerStats(**vars(s)) for p, s in stats.items()}
    ewma_peer(candidates, stats, CHUNK, random.Random(seed))
    assert stats == before


# -- the bound rule -----------------------------------------------------------------------------------

NOW = 1000.0
A, B, C = PEERS[:3]


def pick(stats: dict[str, PeerStats], seed: int = 0, **kw: object) -> Picker:
    return Picker(stats, CHUNK, NOW, random.Random(seed), **kw)  # type: ignore[arg-type]


def test_the_picker_takes_the_smallest_bound() -> None:
    stats = {A: measured(0.4), B: measured(0.04)}
    assert pick(stats)([A, B]) == B
    assert pick(stats)([A]) == A  # however bad, a single candidate is chosen
    assert pick(stats)([]) is None


def test_one_round_spreads_its_chunks_as_queues_grow() -> None:
    """The fix for one round sending every chunk to the same best peer: the picker counts what it
    assigned, so two equal peers split a round, and a peer twice as fast takes about two thirds."""
    equal = pick({A: measured(0.1), B: measured(0.1)})
    got = Counter(equal([A, B]) for _ in range(8))
    assert got == {A: 4, B: 4}
    twice = pick({A: measured(0.1), B: measured(0.05)})
    got = Counter(twice([A, B]) for _ in range(9))
    assert got[B] in (5, 6, 7) and got[A] == 9 - got[B]
    assert twice.assigned == got


def test_the_ewma_rule_keeps_sending_a_round_to_one_peer() -> None:
    """The baseline as it was: choices within a round do not see each other."""
    stats = {A: PeerStats(bps=50e6), B: PeerStats(bps=60e6)}
    picker = pick(stats, rule=Rule.EWMA)
    assert {picker([A, B]) for _ in range(8)} == {B}


def test_requests_in_flight_count_in_the_queue() -> None:
    busy = measured(0.05)
    busy.inflight = 6
    picker = pick({A: busy, B: measured(0.1)})
    assert picker.queue(A) == 6 and picker([A, B]) == B


def test_a_new_peer_is_tried() -> None:
    """Never measured: the optimistic prior beats a measured 200 Mbit/s peer."""
    assert pick({A: measured(0.042)})([A, B]) == B


def test_a_new_peer_gets_a_couple_of_probes_not_a_window() -> None:
    """Until it answers, a peer holds at most PROBES requests while another has room: a first round
    over two unknown peers probes both, then fills the measured one."""
    picker = pick({A: measured(0.05)})
    got = [picker([A, B]) for _ in range(8)]
    assert got.count(B) == PROBES == 2
    unknown = pick({})
    got = [unknown([A, B]) for _ in range(6)]
    assert sorted(got[:4]) == [A, A, B, B]  # both probed, then (all capped) the scores decide


def test_a_new_peer_that_does_not_answer_stops_getting_requests() -> None:
    """Its first requests still in flight after half a second hold its bound up (`oldest`)."""
    stats = {A: measured(0.042), B: PeerStats(inflight=1)}
    assert pick(stats, oldest={B: (NOW - 0.5, 0)})([A, B]) == A
    assert pick(stats, oldest={B: (NOW - 0.001, 0)})([A, B]) == B


def test_a_peer_known_to_be_off_our_subnet_must_be_clearly_better() -> None:
    near, far = "http://10.0.0.5:5381", "http://10.9.0.5:5381"
    loc = Locality.of("http://10.0.0.100:5381")
    stats = {near: measured(0.1), far: measured(0.08)}  # 1.25x better: not enough
    assert pick(stats, locality=loc)([far, near]) == near
    assert pick(stats)([far, near]) == far  # without a locality, no preference
    stats[far] = measured(0.05)  # 2x better: worth the extra hop
    assert pick(stats, locality=loc)([far, near]) == far


def test_new_peers_prefer_our_subnet() -> None:
    near, far = "http://10.0.0.5:5381", "http://10.9.0.5:5381"
    picker = pick({}, locality=Locality.of("http://10.0.0.100:5381"))
    assert Counter(picker([far, near]) for _ in range(10))[near] >= 6


def test_the_score_is_the_p95_bound_at_the_queue_times_the_factor() -> None:
    st_ = measured(0.2, queue=1.0)
    st_.inflight = 2
    picker = pick({A: st_}, assigned=Counter({A: 1}))
    assert picker.score(A) == pytest.approx(score(st_, CHUNK, 3, NOW))
    assert score(st_, CHUNK, 3, NOW, 1.5) == pytest.approx(1.5 * st_.bound(CHUNK, 3, 0.95, NOW))


@pytest.mark.parametrize("seed", range(10))
def test_jitter_only_breaks_near_ties(seed: int) -> None:
    """A peer 15% worse never wins through the 5% jitter; equal peers share."""
    stats = {A: measured(0.115), B: measured(0.1)}
    assert pick(stats, seed)([A, B]) == B
    assert JITTER == 0.05


def test_equal_peers_share_a_round_whatever_the_order() -> None:
    stats = {p: measured(0.1) for p in (A, B, C)}
    picker = pick(stats, 3)
    got = Counter(picker([C, A, B]) for _ in range(9))
    assert got == {A: 3, B: 3, C: 3}


def test_the_random_rule_is_uniform() -> None:
    rng = random.Random(5)
    got = Counter(random_peer([A, B, C], rng) for _ in range(3000))
    assert all(900 < got[p] < 1100 for p in (A, B, C))
    assert random_peer([], rng) is None
    assert pick({A: measured(0.01)}, rule=Rule.RANDOM)([A, B]) in (A, B)


def test_config_choices_are_the_rules() -> None:
    from kernel.config import PEER_CHOICES

    assert set(PEER_CHOICES) == {r.value for r in Rule}


@given(
    st.lists(st.sampled_from(PEERS), min_size=1, unique=True),
    st.data(),
    st.integers(0, 2**32),
    st.sampled_from(list(Rule)),
)
def test_a_seed_replays_the_choices_and_stats_are_never_changed(
    candidates: list[str], data: st.DataObject, seed: int, rule: Rule
) -> None:
    stats = {p: data.draw(peer_stats(NOW)) for p in candidates}
    before = copy.deepcopy(stats)
    a = Picker(stats, CHUNK, NOW, random.Random(seed), rule)
    b = Picker(copy.deepcopy(stats), CHUNK, NOW, random.Random(seed), rule)
    assert [a(candidates) for _ in range(6)] == [b(candidates) for _ in range(6)]
    assert stats == before


@given(st.lists(st.sampled_from(PEERS), min_size=1, unique=True), st.data(), st.integers(0, 2**32))
def test_the_choice_is_within_the_jitter_of_the_smallest_score(
    candidates: list[str], data: st.DataObject, seed: int
) -> None:
    stats = {p: data.draw(peer_stats(NOW)) for p in candidates}
    picker = Picker(stats, CHUNK, NOW, random.Random(seed))
    open_ = [p for p in candidates if not picker.probing(p)] or candidates
    scores = {p: picker.score(p) for p in open_}
    chosen = picker(candidates)
    assert chosen in open_
    assert scores[chosen] <= min(scores.values()) * (1 + JITTER) / (1 - JITTER) * (1 + 1e-9)


@given(st.lists(st.sampled_from(PEERS), min_size=2, unique=True), st.integers(0, 2**32), st.integers(1, 30))
def test_assignments_only_ever_raise_a_peers_score(candidates: list[str], seed: int, rounds: int) -> None:
    stats = {p: measured(0.05 * (i + 1)) for i, p in enumerate(candidates)}
    picker = Picker(stats, CHUNK, NOW, random.Random(seed))
    before = {p: picker.score(p) for p in candidates}
    for _ in range(rounds):
        picker(candidates)
    assert all(picker.score(p) >= before[p] for p in candidates)
    assert sum(picker.assigned.values()) == rounds
