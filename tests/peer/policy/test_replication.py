"""peer.policy.replication: when an idle node copies a site-hot blob from its peers, and which."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from peer.policy.replication import HotBlob, Limits, idle, pick

MIB = 1 << 20
LIMITS = Limits(hot=3, target_replicas=2, idle_for=30.0, interval=60.0)


def hot(name: str, requests: int = 5, size: int = MIB, replicas: int | None = 1) -> HotBlob:
    return HotBlob(name, requests, size, replicas)


def test_idle_needs_quiet_downloads_and_a_pause_since_the_last_replication() -> None:
    assert idle(busy_until=0.0, last_started=float("-inf"), now=30.0, limits=LIMITS)
    assert not idle(busy_until=1.0, last_started=float("-inf"), now=30.0, limits=LIMITS)
    assert not idle(busy_until=0.0, last_started=0.0, now=59.0, limits=LIMITS)
    assert idle(busy_until=0.0, last_started=0.0, now=60.0, limits=LIMITS)


def test_a_hot_scarce_blob_held_by_a_peer_is_picked() -> None:
    assert pick([hot("a")], set(), set(), 10 * MIB, LIMITS) == hot("a")


def test_what_is_not_picked() -> None:
    cases = [
        hot("cold", requests=2),  # not hot enough
        hot("nobody", replicas=0),  # no peer holds it: only the origin could serve it
        hot("unknown", replicas=None),  # the tracker does not know who holds it
        hot("enough", replicas=2),  # the site has enough copies
        hot("too-big", size=11 * MIB),  # would not fit below the low watermark
        hot("no-size", size=-1),  # no manifest told any member its size
        hot("here"),  # complete or partial here already
        hot("shunned"),  # evicted or failed lately
    ]
    assert pick(cases, {"here"}, {"shunned"}, 10 * MIB, LIMITS) is None


def test_the_most_requests_per_copy_first_then_smaller_then_digest() -> None:
    blobs = [hot("a", requests=6, replicas=1), hot("b", requests=4, replicas=1, size=2),
             hot("c", requests=4, replicas=1, size=1)]
    assert pick(blobs, set(), set(), None, LIMITS) == blobs[0]
    assert pick(blobs[1:], set(), set(), None, LIMITS) == blobs[2]


@given(st.lists(st.builds(HotBlob, st.sampled_from("abcdef"), st.integers(0, 9),
                          st.integers(-1, 20 * MIB), st.none() | st.integers(0, 3)), max_size=12),
       st.none() | st.integers(0, 20 * MIB), st.sets(st.sampled_from("abcdef")))
def test_a_pick_always_fits_comes_from_peers_and_is_wanted(
    blobs: list[HotBlob], room: int | None, here: set[str]
) -> None:
    chosen = pick(blobs, here, set(), room, LIMITS)
    if chosen is None:
        return
    assert chosen in blobs and chosen.digest not in here
    assert chosen.requests >= LIMITS.hot and chosen.replicas is not None
    assert 1 <= chosen.replicas < LIMITS.target_replicas
    assert room is None or 0 <= chosen.size <= room
