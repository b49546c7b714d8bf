"""peer.policy.striping: stripe owners among the interested nodes, stalled owners and their
single heir, origin candidates and the run one origin request covers.

The site-wide properties are checked the way they matter: every node of a simulated site
computes its own decision from its own view, and the decisions are compared."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st
from policy_cases import CHUNK, ME, PEERS, digests, view, views_of

from peer.policy.holdings import BlobView
from peer.policy.striping import (
    OriginRun,
    Sighting,
    Stripes,
    interested,
    origin_candidates,
    origin_run,
    stalled,
    stripe_offset,
    track_progress,
)

NOW = 1000.0
GRACE = 6.0
D0 = "sha256:00000000" + "ab" * 28  # stripe offset 0: the deal starts at the smallest URL
D1 = "sha256:00000001" + "ab" * 28
A, B, C, D = sorted(PEERS[:4])


def stripes(me: str, nodes: list[str], stuck: set[str] | None = None, digest: str = D0) -> Stripes:
    """Stripes of 4 chunks over `nodes` as `me` sees them, with `stuck` stalled."""
    return Stripes(me, tuple(sorted(nodes)), frozenset(stuck or ()), stripe_offset(digest), 4)


# -- interested, offsets, owners ---------------------------------------------------------------------


def test_interested_is_us_and_every_peer_filling_the_blob_sorted() -> None:
    views = {C: view(8, {1}), A: view(8), B: view(8, complete=True)}
    assert interested(D, views) == (A, C, D)


def test_we_are_interested_even_with_no_views() -> None:
    assert interested(ME, {}) == (ME,)


def test_we_appear_once_even_if_a_peer_list_names_us() -> None:
    assert interested(A, {A: view(8), B: view(8)}) == (A, B)


@pytest.mark.parametrize(
    ("digest", "offset"),
    [(D0, 0), (D1, 1), ("sha256:ffffffff" + "0" * 56, 0xFFFFFFFF), ("sha256:0000000a" + "1" * 56, 10)],
)
def test_stripe_offset_comes_from_the_digest(digest: str, offset: int) -> None:
    assert stripe_offset(digest) == offset


@pytest.mark.parametrize(
    ("index", "owner"),
    [(0, A), (3, A), (4, B), (7, B), (8, C), (11, C), (12, A), (16, B), (100, B)],
)
def test_stripes_are_dealt_round_robin(index: int, owner: str) -> None:
    assert stripes(A, [A, B, C]).owner(index) == owner


@pytest.mark.parametrize(("digest", "first_owner"), [(D0, A), (D1, B), ("sha256:00000002" + "0" * 56, C)])
def test_the_deal_starts_at_a_place_the_digest_picks(digest: str, first_owner: str) -> None:
    assert stripes(A, [A, B, C], digest=digest).owner(0) == first_owner


def test_a_lone_node_owns_everything() -> None:
    s = stripes(ME, [ME])
    assert s.solo and all(s.owner(i) == ME and s.due(i) for i in range(50))


@pytest.mark.parametrize(
    ("me", "nodes", "stuck", "error"),
    [
        (ME, [A, B], set(), "among the interested"),
        (A, [A, A, B], set(), "sorted and unique"),
        (A, [A, B], {A}, "never considers itself stalled"),
    ],
)
def test_stripes_refuse_an_impossible_state(me: str, nodes: list[str], stuck: set[str], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        Stripes(me, tuple(nodes), frozenset(stuck), 0, 4)


def test_stripes_refuse_unsorted_nodes_and_empty_stripes() -> None:
    with pytest.raises(ValueError, match="sorted"):
        Stripes(A, (B, A), frozenset(), 0, 4)
    with pytest.raises(ValueError, match="stripe_chunks"):
        Stripes(A, (A, B), frozenset(), 0, 0)


@given(
    st.lists(st.sampled_from(PEERS), min_size=1, unique=True),
    digests,
    st.integers(1, 8),
    st.integers(0, 10_000),
)
def test_every_chunk_has_exactly_one_owner_among_the_interested(
    nodes: list[str], digest: str, size: int, index: int
) -> None:
    s = Stripes(nodes[0], tuple(sorted(nodes)), frozenset(), stripe_offset(digest), size)
    assert s.owner(index) in nodes
    assert s.owner(index) == s.owner(index // size * size)  # a stripe has one owner


@given(
    st.lists(st.sampled_from(PEERS), min_size=1, unique=True), digests, st.integers(1, 8), st.integers(0, 50)
)
def test_the_deal_is_fair(nodes: list[str], digest: str, size: int, round_: int) -> None:
    """Over any len(nodes) consecutive stripes every node owns exactly one."""
    s = Stripes(nodes[0], tuple(sorted(nodes)), frozenset(), stripe_offset(digest), size)
    start = round_ * len(nodes) * size
    owned = Counter(s.owner(i) for i in range(start, start + len(nodes) * size))
    assert owned == Counter({n: size for n in nodes})


# -- progress and stalls ------------------------------------------------------------------------------


def test_a_new_peer_is_sighted_now() -> None:
    assert track_progress({}, {A: view(8, {1, 2})}, NOW) == {A: Sighting(2, NOW)}


def test_unchanged_holdings_keep_the_time_they_last_changed() -> None:
    before = {A: Sighting(2, 10.0)}
    assert track_progress(before, {A: view(8, {1, 2})}, NOW) == before


def test_changed_holdings_are_sighted_again() -> None:
    assert track_progress({A: Sighting(2, 10.0)}, {A: view(8, {1, 2, 3})}, NOW) == {A: Sighting(3, NOW)}


def test_a_completed_peer_counts_as_a_change_once() -> None:
    seen = track_progress({A: Sighting(7, 10.0)}, {A: view(8, complete=True)}, NOW)
    assert seen == {A: Sighting(-1, NOW)}
    assert track_progress(seen, {A: view(8, complete=True)}, NOW + 50) == seen


def test_peers_absent_from_the_views_keep_their_sighting_and_the_input_is_not_changed() -> None:
    before = {A: Sighting(2, 10.0), B: Sighting(1, 20.0)}
    after = track_progress(before, {B: view(8, {1, 4})}, NOW)
    assert after == {A: Sighting(2, 10.0), B: Sighting(2, NOW)}
    assert before == {A: Sighting(2, 10.0), B: Sighting(1, 20.0)}


@pytest.mark.parametrize(
    ("idle", "fetching", "is_stalled"),
    [
        (0.0, False, False),
        (GRACE - 0.1, False, False),
        (GRACE, False, False),  # exactly the grace: not yet
        (GRACE + 0.1, False, True),
        (GRACE + 0.1, True, False),  # it says it is fetching from the origin: more patience
        (4.5 * GRACE, True, False),
        (5 * GRACE, True, False),
        (5 * GRACE + 0.1, True, True),
    ],
)
def test_stalled_after_the_grace(idle: float, fetching: bool, is_stalled: bool) -> None:
    assert stalled(Sighting(3, NOW - idle), fetching, NOW, GRACE) is is_stalled


def test_a_node_never_sighted_is_not_stalled() -> None:
    assert not stalled(None, False, NOW, GRACE)


def test_stripes_of_marks_the_peers_idle_for_longer_than_the_grace() -> None:
    views = {A: view(8, {1}), B: view(8, {2}), C: view(8, {3}, fetching={4})}
    old = NOW - GRACE - 1
    progress = {A: Sighting(1, old), B: Sighting(1, NOW), C: Sighting(1, old)}
    s = Stripes.of(D, D0, views, progress, NOW, GRACE, 4)
    assert s.interested == (A, B, C, D) and s.stalled == {A}  # C announces an origin fetch


def test_stripes_of_never_marks_us_stalled() -> None:
    s = Stripes.of(A, D0, {A: view(8), B: view(8)}, {A: Sighting(0, 0.0), B: Sighting(0, 0.0)}, NOW, GRACE, 4)
    assert s.stalled == {B}


def test_complete_peers_are_not_interested_so_never_stalled_owners() -> None:
    s = Stripes.of(A, D0, {B: view(8, complete=True)}, {B: Sighting(-1, 0.0)}, NOW, GRACE, 4)
    assert s.interested == (A,) and s.stalled == frozenset()


# -- heirs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("me", "stuck", "owner", "heir"),
    [
        (C, {B}, B, C),  # the next node inherits
        (D, {B, C}, B, D),  # ... skipping stalled ones
        (A, {D}, D, A),  # the ring wraps around
        (B, {C, D}, D, A),
        (D, {B}, B, C),  # someone else inherits: not us
        (A, {B, C, D}, C, A),  # everyone else stalled: we inherit it all
    ],
)
def test_the_heir_is_the_first_live_node_after_the_owner(
    me: str, stuck: set[str], owner: str, heir: str
) -> None:
    s = stripes(me, [A, B, C, D], stuck)
    assert s.heir(owner) == heir


def test_no_heir_when_every_other_node_stalled() -> None:
    """Only possible for an owner that is us... or when we are the one the others wait on."""
    assert stripes(A, [A, B], {B}).heir(A) is None


@pytest.mark.parametrize(
    ("me", "stuck", "index", "due"),
    [
        (A, set(), 0, True),  # our stripe
        (A, set(), 4, False),  # B's, and B is fine
        (C, {B}, 4, True),  # B stalled, we are its heir
        (D, {B}, 4, False),  # B stalled, C is its heir
        (D, {B, C}, 4, True),  # B and C stalled: the heir chain reaches us
        (A, {D}, 12, True),  # wraps around
        (B, {A}, 0, True),
        (C, {A}, 0, False),
    ],
)
def test_due_ours_or_inherited(me: str, stuck: set[str], index: int, due: bool) -> None:
    assert stripes(me, [A, B, C, D], stuck).due(index) is due


# -- site-wide agreement ------------------------------------------------------------------------------


@st.composite
def sites(draw: st.DrawFn) -> tuple[list[str], dict[str, set[int]], int]:
    """Nodes filling a blob of `nchunks` chunks, each with its own holdings."""
    nodes = draw(st.lists(st.sampled_from(PEERS + [ME]), min_size=1, max_size=7, unique=True))
    nchunks = draw(st.integers(1, 60))
    held = {n: draw(st.sets(st.integers(0, nchunks - 1), max_size=nchunks // 2)) for n in nodes}
    return nodes, held, nchunks


def node_views(me: str, nodes: list[str], held: dict[str, set[int]], nchunks: int) -> dict[str, BlobView]:
    return {n: view(nchunks, held[n]) for n in nodes if n != me}


@given(sites(), digests, st.integers(1, 8))
def test_nodes_with_the_same_view_agree_on_every_owner(
    site: tuple[list[str], dict[str, set[int]], int], digest: str, size: int
) -> None:
    nodes, held, nchunks = site
    each = [Stripes.of(n, digest, node_views(n, nodes, held, nchunks), {}, NOW, GRACE, size) for n in nodes]
    for i in range(nchunks):
        assert len({s.owner(i) for s in each}) == 1
        assert sum(s.due(i) for s in each) == 1  # exactly one node fetches it


@given(sites(), digests, st.integers(1, 8), st.data())
def test_exactly_one_live_node_inherits_a_stalled_stripe(
    site: tuple[list[str], dict[str, set[int]], int], digest: str, size: int, data: st.DataObject
) -> None:
    nodes, held, nchunks = site
    stuck = data.draw(st.sets(st.sampled_from(nodes), max_size=len(nodes) - 1))
    live = [n for n in nodes if n not in stuck]
    progress = {n: Sighting(len(held[n]), NOW - GRACE - 1 if n in stuck else NOW) for n in nodes}
    each = {
        n: Stripes.of(n, digest, node_views(n, nodes, held, nchunks), progress, NOW, GRACE, size)
        for n in live
    }
    assert all(s.stalled == stuck for s in each.values())
    for i in range(nchunks):
        claims = [n for n, s in each.items() if s.due(i)]
        assert len(claims) == 1
        owner = each[live[0]].owner(i)
        if owner in stuck:
            assert claims[0] == each[live[0]].heir(owner)
        else:
            assert claims == [owner]


@given(sites(), digests, st.integers(1, 8), st.data())
def test_a_stalled_owner_has_a_live_heir_never_itself(
    site: tuple[list[str], dict[str, set[int]], int], digest: str, size: int, data: st.DataObject
) -> None:
    nodes, _, _ = site
    me = data.draw(st.sampled_from(nodes))
    others = [n for n in nodes if n != me]
    stuck = data.draw(st.sets(st.sampled_from(others))) if others else set()
    s = Stripes(me, tuple(sorted(nodes)), frozenset(stuck), stripe_offset(digest), size)
    for owner in stuck:
        heir = s.heir(owner)
        assert heir is not None and heir != owner and heir not in stuck


@given(sites(), digests, st.integers(1, 8))
def test_the_site_fetches_each_chunk_nobody_holds_from_the_origin_exactly_once(
    site: tuple[list[str], dict[str, set[int]], int], digest: str, size: int
) -> None:
    nodes, held, nchunks = site
    takes = Counter[int]()
    for n in nodes:
        views = node_views(n, nodes, held, nchunks)
        missing = [i for i in range(nchunks) if i not in held[n]]
        s = Stripes.of(n, digest, views, {}, NOW, GRACE, size)
        takes.update(origin_candidates(missing, set(), views, CHUNK, s))
    nobody = {i for i in range(nchunks) if not any(i in h for h in held.values())}
    assert takes == Counter(dict.fromkeys(nobody, 1))


# -- origin candidates --------------------------------------------------------------------------------


def test_origin_candidates_skip_what_is_in_flight_held_or_fetched_elsewhere() -> None:
    views = {B: view(16, {1}, fetching={2}), C: view(16, {3}, chunk_size=CHUNK // 2, size=16 * CHUNK)}
    s = stripes(A, [A], set())  # everything is due to us: only the filters decide
    assert origin_candidates(range(6), {0}, views, CHUNK, s) == [3, 4, 5]


def test_a_stalled_peers_announced_fetch_does_not_hold_its_chunks_back() -> None:
    """A peer that announced an origin fetch and then made no progress (dead, hung) gives up its
    claim with its stripes: its heir fetches them. While it makes progress, the fetch is its own."""
    views = {B: view(16, fetching=range(16))}
    assert origin_candidates(range(16), set(), views, CHUNK, stripes(A, [A, B], {B})) == list(range(16))
    assert origin_candidates(range(16), set(), views, CHUNK, stripes(A, [A, B])) == []


def test_origin_candidates_are_only_the_chunks_due_to_us() -> None:
    views = {B: view(16)}
    assert origin_candidates(range(16), set(), views, CHUNK, stripes(A, [A, B])) == [0, 1, 2, 3, 8, 9, 10, 11]
    assert origin_candidates(range(16), set(), views, CHUNK, stripes(B, [A, B])) == [
        4,
        5,
        6,
        7,
        12,
        13,
        14,
        15,
    ]


def test_origin_candidates_keep_the_order_of_missing() -> None:
    assert origin_candidates([9, 2, 5], set(), {}, CHUNK, stripes(A, [A])) == [9, 2, 5]


def test_a_peer_holding_the_blob_whole_leaves_no_origin_work() -> None:
    views = {B: view(16, complete=True)}
    assert origin_candidates(range(16), set(), views, CHUNK, stripes(A, [A])) == []


@given(st.integers(1, 40).flatmap(lambda n: st.tuples(st.just(n), views_of(n))), st.data())
def test_origin_candidates_property(case: tuple[int, dict[str, BlobView]], data: st.DataObject) -> None:
    nchunks, views = case
    missing = sorted(data.draw(st.sets(st.integers(0, nchunks - 1))))
    busy = data.draw(st.sets(st.integers(0, nchunks - 1)))
    s = Stripes.of(ME, D0, views, {}, NOW, GRACE, 4)
    got = origin_candidates(missing, busy, views, CHUNK, s)
    assert got == [i for i in missing if i in got]  # a subsequence of missing
    for i in missing:
        expected = (
            i not in busy
            and not any(i in v.fetching for p, v in views.items() if p not in s.stalled)
            and not any(v.has(i) for v in views.values())
            and s.due(i)
        )
        assert (i in got) is expected


# -- origin runs ------------------------------------------------------------------------------------------


def test_no_candidates_no_run() -> None:
    assert origin_run([], set(), stripes(A, [A]), 4, 32) is None


def test_alone_a_run_is_long_and_counted_solo() -> None:
    assert origin_run(list(range(40)), set(), stripes(A, [A]), 4, 32) == OriginRun(0, 31, 32, 0)


def test_with_others_a_run_is_one_stripe() -> None:
    assert origin_run([0, 1, 2, 3, 8, 9], set(), stripes(A, [A, B]), 4, 32) == OriginRun(0, 3, 0, 0)


def test_a_run_stops_at_a_gap() -> None:
    assert origin_run([0, 1, 3, 4], set(), stripes(A, [A]), 4, 32) == OriginRun(0, 1, 2, 0)


def test_a_run_starts_at_the_first_wanted_candidate() -> None:
    assert origin_run(list(range(12)), {9, 5, 30}, stripes(A, [A]), 4, 32) == OriginRun(5, 11, 7, 0)


def test_a_wanted_chunk_that_is_not_a_candidate_does_not_start_a_run() -> None:
    assert origin_run([2, 3, 4], {0}, stripes(A, [A]), 4, 32) == OriginRun(2, 4, 3, 0)


def test_inherited_chunks_are_counted() -> None:
    s = stripes(C, [A, B, C], {B})  # C owns 8-11 and inherits B's 4-7
    assert origin_run([6, 7, 8, 9], set(), s, 4, 32) == OriginRun(6, 9, 0, 2)


@given(
    st.sets(st.integers(0, 100), min_size=1),
    st.sets(st.integers(0, 100)),
    st.lists(st.sampled_from(PEERS), min_size=1, max_size=4, unique=True),
    st.integers(1, 8),
    st.integers(1, 40),
)
def test_origin_run_property(
    candidates: set[int], wanted: set[int], nodes: list[str], batch: int, solo_batch: int
) -> None:
    me = nodes[0]
    s = Stripes(me, tuple(sorted(nodes)), frozenset(), 0, 4)
    run = origin_run(sorted(candidates), wanted, s, batch, solo_batch)
    assert run is not None
    chunks = list(run.chunks)
    assert set(chunks) <= candidates
    wanted_here = wanted & candidates
    assert run.first == (min(wanted_here) if wanted_here else min(candidates))
    limit = solo_batch if len(nodes) == 1 else batch
    assert 1 <= len(chunks) <= max(limit, 1)
    assert len(chunks) == limit or run.last + 1 not in candidates  # maximal
    assert run.solo_chunks == (len(chunks) if s.solo else 0)
    assert run.heir_chunks == (0 if s.solo else sum(s.owner(i) != me for i in chunks))


def test_two_nodes_never_share_a_run() -> None:
    views_a, views_b = {B: view(16)}, {A: view(16)}
    sa = Stripes.of(A, D0, views_a, {}, NOW, GRACE, 4)
    sb = Stripes.of(B, D0, views_b, {}, NOW, GRACE, 4)
    ra = origin_run(origin_candidates(range(16), set(), views_a, CHUNK, sa), set(), sa, 4, 32)
    rb = origin_run(origin_candidates(range(16), set(), views_b, CHUNK, sb), set(), sb, 4, 32)
    assert ra is not None and rb is not None
    assert not set(ra.chunks) & set(rb.chunks)
