"""peer.policy.window: requests in flight per blob, from the peers' bandwidth-delay product."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from policy_cases import CHUNK, peer_stats

from peer.policy.peerstats import PeerStats
from peer.policy.window import window


def test_without_peers_the_base_window_is_used() -> None:
    assert window([], CHUNK, 8, 32) == 8


@pytest.mark.parametrize(
    ("stats", "expected"),
    [
        ([PeerStats()], 8),  # one LAN peer: BDP 0.24 chunk, the base wins
        ([PeerStats(bps=100e6, latency=0.1)], 15),  # 9.5 chunks * 1.5 + 1 = 15.3
        ([PeerStats(bps=100e6, latency=0.1)] * 2, 30),  # 2 * 9.5 * 1.5 + 2 = 30.6
        ([PeerStats(bps=1e9, latency=1.0)], 32),  # capped
        ([PeerStats(bps=1e9, latency=0.0)], 8),  # latency floored at 1 ms: 1.4 chunks
        ([PeerStats(bps=1e9, latency=0.0)] * 6, 14),  # 6 * 0.95 * 1.5 + 6 = 14.6 (1 ms floor each)
    ],
)
def test_window_covers_the_bandwidth_delay_product(stats: list[PeerStats], expected: int) -> None:
    assert window(stats, CHUNK, 8, 32) == expected


def test_every_peer_adds_one_request_even_with_no_bdp() -> None:
    assert window([PeerStats(bps=1.0, latency=0.0)] * 12, CHUNK, 8, 32) == 12


@given(st.lists(peer_stats(), max_size=10), st.integers(1, 16), st.integers(16, 64))
def test_window_stays_within_base_and_cap(stats: list[PeerStats], base: int, cap: int) -> None:
    assert base <= window(stats, CHUNK, base, cap) <= cap


@given(st.lists(peer_stats(), max_size=10), peer_stats())
def test_another_peer_never_shrinks_the_window(stats: list[PeerStats], more: PeerStats) -> None:
    assert window([*stats, more], CHUNK, 8, 32) >= window(stats, CHUNK, 8, 32)


@given(st.lists(peer_stats(), min_size=1, max_size=10), st.floats(1.0, 50.0))
def test_faster_peers_never_shrink_the_window(stats: list[PeerStats], factor: float) -> None:
    faster = [PeerStats(s.bps * factor, s.latency) for s in stats]
    assert window(faster, CHUNK, 8, 32) >= window(stats, CHUNK, 8, 32)
