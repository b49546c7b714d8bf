"""peer.policy.holdings: what a peer's view says it holds, which views are worth planning with,
and who holds each chunk."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st
from policy_cases import CHUNK, DIGEST, PEERS, peer_stats, view, views_of

from peer.policy.holdings import BlobView, filling, holders, usable_views
from peer.policy.peerstats import PeerStats

NOW = 1000.0


# -- BlobView ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("have", "index", "expected"),
    [
        (b"\x01", 0, True),
        (b"\x01", 1, False),
        (b"\x80", 7, True),
        (b"\x80", 6, False),
        (b"\x00\x01", 8, True),
        (b"\x00\x01", 0, False),
        (b"\xff", 8, False),  # past the bitmap: not held
        (b"", 0, False),
        (b"\x05", 2, True),  # LSB first: 0b101 is chunks 0 and 2
        (b"\x05", 1, False),
    ],
)
def test_has_reads_the_bitmap_lsb_first(have: bytes, index: int, expected: bool) -> None:
    assert BlobView(DIGEST, 16 * CHUNK, CHUNK, False, have).has(index) is expected


@pytest.mark.parametrize("index", [0, 1, 7, 8, 1000])
def test_a_complete_view_holds_every_chunk_whatever_its_bitmap(index: int) -> None:
    assert BlobView(DIGEST, CHUNK, CHUNK, True, b"").has(index)


@pytest.mark.parametrize(
    ("have", "count"),
    [(b"", 0), (b"\x00", 0), (b"\x01", 1), (b"\xff", 8), (b"\xff\x03", 10), (b"\x11\x11", 4)],
)
def test_count_is_the_number_of_chunks_held(have: bytes, count: int) -> None:
    assert BlobView(DIGEST, 16 * CHUNK, CHUNK, False, have).count() == count


def test_a_complete_view_counts_minus_one_so_it_never_looks_like_progress() -> None:
    assert view(4, complete=True).count() == -1


@given(st.integers(1, 200).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1)))))
def test_has_and_count_agree_with_the_chunks_put_in_the_bitmap(case: tuple[int, set[int]]) -> None:
    nchunks, held = case
    v = view(nchunks, held)
    assert {i for i in range(nchunks + 8) if v.has(i)} == held
    assert v.count() == len(held)


def test_from_json_decodes_the_have_answer() -> None:
    obj = {
        "digest": DIGEST,
        "size": "3145728",
        "chunk_size": CHUNK,
        "complete": 0,
        "have": base64.b64encode(b"\x05").decode(),
    }
    assert BlobView.from_json(obj) == BlobView(DIGEST, 3 * CHUNK, CHUNK, False, b"\x05")


def test_from_json_keeps_the_announced_origin_fetches() -> None:
    """Regression: the `fetching` field was dropped, so no peer ever saw another node's origin
    fetch and `striping.origin_candidates` could pick the same chunks."""
    obj = {
        "digest": DIGEST,
        "size": 8 * CHUNK,
        "chunk_size": CHUNK,
        "complete": False,
        "have": base64.b64encode(b"\x01").decode(),
        "fetching": [4, 5],
    }
    assert BlobView.from_json(obj).fetching == frozenset({4, 5})


def test_blob_view_is_frozen() -> None:
    v = view(4, {1})
    with pytest.raises(AttributeError):
        v.complete = True  # type: ignore[misc]


# -- usable_views ----------------------------------------------------------------------------------


def test_a_dropped_peer_is_not_planned_with() -> None:
    views = {PEERS[0]: view(4, {0}), PEERS[1]: view(4, {1})}
    stats = {PEERS[0]: PeerStats(dropped_until=NOW + 1)}
    assert usable_views(views, stats, NOW, 4 * CHUNK) == {PEERS[1]: views[PEERS[1]]}


def test_a_drop_ends_at_its_deadline() -> None:
    views = {PEERS[0]: view(4, {0})}
    assert usable_views(views, {PEERS[0]: PeerStats(dropped_until=NOW)}, NOW, 4 * CHUNK) == views


def test_a_peer_never_measured_is_usable() -> None:
    views = {PEERS[0]: view(4, {0})}
    assert usable_views(views, {}, NOW, 4 * CHUNK) == views


def test_a_view_of_a_different_size_describes_another_blob() -> None:
    views = {PEERS[0]: view(4, {0}, size=4 * CHUNK - 1), PEERS[1]: view(4, {0})}
    assert list(usable_views(views, {}, NOW, 4 * CHUNK)) == [PEERS[1]]


def test_usable_views_keep_the_order_peers_were_heard_in() -> None:
    order = [PEERS[3], PEERS[0], PEERS[2]]
    views = {p: view(4, {0}) for p in order}
    assert list(usable_views(views, {}, NOW, 4 * CHUNK)) == order


@given(views_of(8), st.dictionaries(st.sampled_from(PEERS), peer_stats(NOW)), st.sampled_from([8, 7]))
def test_usable_views_are_exactly_the_usable_peers_of_the_right_size(
    views: dict[str, BlobView], stats: dict[str, PeerStats], nchunks: int
) -> None:
    size = nchunks * CHUNK
    got = usable_views(views, stats, NOW, size)
    for p, v in views.items():
        ok = (p not in stats or stats[p].dropped_until <= NOW) and v.size == size
        assert (p in got) is ok
        if ok:
            assert got[p] is v


# -- holders ----------------------------------------------------------------------------------------


def test_holders_lists_who_holds_each_chunk_in_view_order() -> None:
    views = {PEERS[2]: view(4, {0, 1}), PEERS[0]: view(4, {1}), PEERS[1]: view(4, complete=True)}
    assert holders(views, [0, 1, 3], CHUNK) == {
        0: [PEERS[2], PEERS[1]],
        1: [PEERS[2], PEERS[0], PEERS[1]],
        3: [PEERS[1]],
    }


def test_a_peer_that_cut_the_blob_differently_holds_nothing_we_can_ask_for() -> None:
    views = {PEERS[0]: view(8, complete=True, chunk_size=CHUNK // 2, size=4 * CHUNK)}
    assert holders(views, range(4), CHUNK) == {0: [], 1: [], 2: [], 3: []}


@given(views_of(12), st.sets(st.integers(0, 11)))
def test_holders_property(views: dict[str, BlobView], chunks: set[int]) -> None:
    got = holders(views, sorted(chunks), CHUNK)
    assert set(got) == chunks
    for i, who in got.items():
        assert who == [p for p, v in views.items() if v.has(i)]


def test_filling_names_the_peers_whose_copy_is_partial() -> None:
    views = {
        PEERS[0]: BlobView(DIGEST, 4 * CHUNK, CHUNK, True, b""),
        PEERS[1]: BlobView(DIGEST, 4 * CHUNK, CHUNK, False, b"\x03"),
        PEERS[2]: BlobView(DIGEST, 4 * CHUNK, CHUNK, False, b""),
    }
    assert filling(views) == {PEERS[1], PEERS[2]}
    assert filling({}) == frozenset()
