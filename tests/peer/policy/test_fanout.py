"""peer.policy.fanout: the peers polled without a tracker, bounded, stable and spread."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from peer.policy.fanout import fanout

NODES = [f"http://10.0.{i // 200}.{i % 200 + 1}:5381" for i in range(64)]


def test_a_small_site_asks_everyone_in_order() -> None:
    assert fanout(NODES[1:9], NODES[0], 8) == NODES[1:9]


@given(st.integers(0, 63), st.integers(1, 12), st.randoms(use_true_random=False))
def test_bounded_stable_and_independent_of_order(me: int, k: int, rng) -> None:  # type: ignore[no-untyped-def]
    peers = [p for p in NODES if p != NODES[me]]
    chosen = fanout(peers, NODES[me], k)
    assert len(chosen) == min(k, len(peers))
    assert set(chosen) <= set(peers)
    shuffled = list(peers)
    rng.shuffle(shuffled)
    assert set(fanout(shuffled, NODES[me], k)) == set(chosen)


def test_a_leaving_member_changes_only_its_own_slot() -> None:
    me, peers = NODES[0], NODES[1:]
    before = set(fanout(peers, me, 8))
    gone = sorted(before)[0]
    after = set(fanout([p for p in peers if p != gone], me, 8))
    assert len(before & after) == 7 and gone not in after


def test_no_peer_is_everyones_choice() -> None:
    counts = Counter(p for me in NODES for p in fanout([q for q in NODES if q != me], me, 8))
    assert max(counts.values()) < 20  # 64 nodes x 8 choices: 8 each on average
