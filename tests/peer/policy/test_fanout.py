"""peer.policy.fanout: the peers polled without a tracker: bounded, the same groups on every node
(cliques, so the nodes of a group agree on stripe owners), independent of list order."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from peer.policy.fanout import fanout

NODES = [f"http://10.0.{i // 200}.{i % 200 + 1}:5381" for i in range(64)]


def test_a_small_site_asks_everyone_in_order() -> None:
    assert fanout(NODES[1:9], NODES[0], 8) == NODES[1:9]


@given(st.integers(1, 64), st.integers(1, 12), st.randoms(use_true_random=False))
def test_groups_are_bounded_cliques_that_cover_the_site(n: int, k: int, rng) -> None:  # type: ignore[no-untyped-def]
    site = NODES[:n]
    polled = {me: fanout([p for p in site if p != me], me, k) for me in site}
    for me, chosen in polled.items():
        assert len(chosen) <= k and me not in chosen
        for p in chosen:  # symmetric, and the same group seen from every member of it
            assert me in polled[p]
            assert set(polled[p]) | {p} == set(chosen) | {me}
        shuffled = [p for p in site if p != me]
        rng.shuffle(shuffled)
        assert set(fanout(shuffled, me, k)) == set(chosen)
    groups = {frozenset([me, *chosen]) for me, chosen in polled.items()}
    assert len(groups) == (1 if n - 1 <= k else -(-n // (k + 1)))


def test_a_32_node_site_is_four_groups_of_eight() -> None:
    site = NODES[:32]
    sizes = sorted(len(fanout([p for p in site if p != me], me, 8)) + 1 for me in site)
    assert sizes == [8] * 32
