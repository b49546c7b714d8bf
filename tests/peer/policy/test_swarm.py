"""The bound rule in a simulated swarm (`swarm_sim`): the policy composed as the engine composes
it, one downloader and peers on processor-sharing links, in simulated seconds (deterministic; no
wall-clock time is measured or asserted). What issue 9 asks of peer choice: a peer 10x slower gets a
small, bounded share; a peer that slows mid-transfer loses its share within a bounded number of
chunks; new and recovered peers get tried; hedges stay within the caps; and the tail is shorter than
under the baselines."""

from __future__ import annotations

import pytest
from swarm_sim import MB, SimPeer, Swarm

from peer.policy.choice import Rule

A, B, C = "http://10.0.0.1:5381", "http://10.0.0.2:5381", "http://10.0.0.3:5381"
FAST, SLOW = 200 * MB, 20 * MB  # 10x apart, as the benchmark shapes them with tbf
WINDOW = 8


def steady(peers: list[SimPeer], chunks: int = 300, seed: int = 0, rule: Rule = Rule.BOUND) -> Swarm:
    return Swarm(peers, chunks, rule=rule, seed=seed, window=WINDOW)


@pytest.mark.parametrize("seed", range(4))
def test_a_peer_ten_times_slower_gets_a_small_bounded_share(seed: int) -> None:
    """Its share stays under its share of the capacity (20 / 220 = 9%) plus a little: it is used at
    most one request at a time, when the fast peer's queue is long enough for that to pay."""
    res = steady([SimPeer(A, [(0, FAST)]), SimPeer(B, [(0, SLOW)])], seed=seed).run()
    assert res.share(B) <= 0.1
    assert res.launched(B) <= 0.12 * res.launched(A)


@pytest.mark.parametrize("seed", range(4))
def test_beside_two_fast_peers_the_slow_one_gets_almost_nothing(seed: int) -> None:
    peers = [SimPeer(A, [(0, FAST)]), SimPeer(B, [(0, FAST)]), SimPeer(C, [(0, SLOW)])]
    res = steady(peers, seed=seed).run()
    assert res.share(C) <= 0.03
    assert abs(res.share(A) - res.share(B)) <= 0.05  # the fast ones split the work


@pytest.mark.parametrize("seed", range(4))
def test_a_peer_that_slows_mid_transfer_loses_its_share_within_a_bounded_number_of_chunks(
    seed: int,
) -> None:
    """A and B share the work until A's link drops to a tenth at t = 2 s. Counting from then, A is
    asked for at most a window's worth of chunks more (the requests its last fast answers made
    room for, and a probe or two), and its share of what lands after the first second is small."""
    peers = [SimPeer(A, [(0, FAST), (2.0, SLOW)]), SimPeer(B, [(0, FAST)])]
    res = steady(peers, chunks=500, seed=seed).run()
    assert 0.4 <= res.share(A, until=2.0) <= 0.6
    assert res.launched(A, since=2.0) <= WINDOW
    assert res.share(A, since=3.0) <= 0.1


@pytest.mark.parametrize("seed", range(3))
def test_a_new_peer_is_tried_at_once(seed: int) -> None:
    peers = [SimPeer(A, [(0, FAST)]), SimPeer(B, [(0, FAST)]), SimPeer(C, [(0, FAST)], joins=2.0)]
    res = steady(peers, chunks=400, seed=seed).run()
    first = min(x.t for x in res.launches if x.peer == C)
    assert 2.0 <= first < 2.0 + 0.1
    assert res.share(C, since=3.0) >= 0.25  # and, being as fast, takes its third


@pytest.mark.parametrize("seed", range(3))
def test_a_recovered_peer_is_tried_again_and_wins_its_share_back(seed: int) -> None:
    """A is slow for the first 10 s (little is asked of it), then as fast as B: exploration (its
    evidence fading toward the optimistic prior) tries it again, and it earns its share back."""
    peers = [SimPeer(A, [(0, SLOW), (10.0, FAST)]), SimPeer(B, [(0, FAST)])]
    res = steady(peers, chunks=2000, seed=seed).run()
    assert res.share(A, since=1.0, until=10.0) <= 0.12
    retried = min(x.t for x in res.launches if x.peer == A and x.t >= 10.0)
    assert retried <= 10.0 + 30.0
    assert res.share(A, since=retried + 20.0) >= 0.3


@pytest.mark.parametrize(
    "peers",
    [
        [SimPeer(A, [(0, FAST)]), SimPeer(B, [(0, SLOW)])],
        [SimPeer(A, [(0, FAST), (1.0, 1 * MB)]), SimPeer(B, [(0, FAST)]), SimPeer(C, [(0, SLOW)])],
        [SimPeer(A, [(0, FAST), (1.0, 0.01 * MB), (4.0, FAST)]), SimPeer(B, [(0, SLOW)])],
    ],
    ids=["slow", "stall", "near-dead"],
)
@pytest.mark.parametrize("rule", list(Rule))
def test_hedges_never_exceed_the_window(peers: list[SimPeer], rule: Rule) -> None:
    res = steady(peers, chunks=150, rule=rule).run()
    assert res.peak_flights <= WINDOW
    assert len(res.landings) == 150


def test_a_seed_replays_the_download() -> None:
    def run() -> list[tuple[float, int, str, bool]]:
        peers = [SimPeer(A, [(0, FAST), (1.0, SLOW)]), SimPeer(B, [(0, FAST)]), SimPeer(C, [(0, SLOW)])]
        return [(x.t, x.index, x.peer, x.hedge) for x in steady(peers, chunks=120, seed=9).run().launches]

    assert run() == run()


@pytest.mark.parametrize(
    "peers",
    [
        [SimPeer(A, [(0, FAST)]), SimPeer(B, [(0, SLOW)])],
        [SimPeer(A, [(0, FAST)]), SimPeer(B, [(0, FAST)]), SimPeer(C, [(0, SLOW)])],
        [SimPeer(A, [(0, FAST), (2.0, SLOW)]), SimPeer(B, [(0, FAST)])],
    ],
    ids=["fast+slow", "2fast+slow", "slowing"],
)
def test_the_bound_rule_has_the_shortest_tail(peers: list[SimPeer]) -> None:
    """p99 chunk latency (from a chunk's first request to its bytes), bound vs the baselines."""
    p99 = {rule: steady(peers, chunks=300, seed=1, rule=rule).run().chunk_quantile(0.99) for rule in Rule}
    assert p99[Rule.BOUND] < 0.75 * p99[Rule.EWMA]
    assert p99[Rule.BOUND] < 0.75 * p99[Rule.RANDOM]
