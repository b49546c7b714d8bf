"""The tracker index (`peer.policy.index`): holdings, candidate sets, origin leases, replicas.

Table cases for each rule, hypothesis properties for the invariants the module docstring promises:
never two live leases on one chunk, a burst of lease requests covering each chunk exactly once,
staggered arrivals never leased a held or leased chunk, candidates bounded and never the asker, a
dead member leaving nothing behind. Plain values, time passed in: no clock, no network."""

from __future__ import annotations

from random import Random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peer.policy.index import (
    Announcement,
    Index,
    IndexConfig,
    bitmap_to_int,
    int_to_bitmap,
    runs_of,
    subnet_of,
)

D = "sha256:" + "ab" * 32
E = "sha256:" + "cd" * 32
CS = 1 << 20
N = 20  # chunks of D


def ann(
    *add: tuple[int, int],
    n: int = N,
    filling: bool = True,
    complete: bool = False,
    drop: bool = False,
    fetching: tuple[tuple[int, int], ...] | None = None,
    digest: str = D,
) -> Announcement:
    return Announcement(digest, n * CS, CS, tuple(add), filling, complete, drop, fetching)


WINDOWS = {"gather": IndexConfig.gather, "adopt_wait": IndexConfig.adopt_wait}  # the defaults


def member(i: int) -> str:
    return f"m{i:03d}"


def index_with(members: int, net_of: dict[int, int] | None = None, **cfg: float) -> Index:
    """An index knowing `members` members. Its blobs skip the gathering and adopting windows
    unless `gather` or `adopt_wait` is given: most table cases are about the rules that follow
    them; the windows have cases of their own, and the properties run with the defaults."""
    cfg.setdefault("gather", 0.0)
    cfg.setdefault("adopt_wait", 0.0)
    idx = Index(IndexConfig(**cfg))  # type: ignore[arg-type]
    for i in range(members):
        net = (net_of or {}).get(i, 1)
        idx.set_member(member(i), f"http://10.0.{net}.{i + 1}:5381")
    return idx


# -- holdings -------------------------------------------------------------------------------------


def test_announcements_accumulate_ranges_and_complete_moves_a_member_to_the_holders() -> None:
    idx = index_with(2)
    assert idx.apply(member(0), ann((0, 2)), 0.0)
    assert idx.apply(member(0), ann((5, 5), (7, 8)), 1.0)
    assert idx.holdings(D, member(0)) == 0b110100111
    assert idx.filling(D) == {member(0)}
    assert idx.replicas(D) == 0
    idx.apply(member(0), ann(complete=True), 2.0)
    assert idx.replicas(D) == 1
    assert idx.filling(D) == set()
    assert idx.holdings(D, member(0)) == (1 << N) - 1


def test_a_drop_forgets_the_blob_of_that_member_and_an_empty_blob_is_gone() -> None:
    idx = index_with(1)
    idx.apply(member(0), ann((0, 3)), 0.0)
    idx.apply(member(0), ann(drop=True), 1.0)
    assert idx.holdings(D, member(0)) is None
    assert idx.size_of(D) is None
    assert idx.blobs_of(member(0)) == set()


def test_an_announcement_of_another_size_is_refused() -> None:
    idx = index_with(2)
    idx.apply(member(0), ann((0, 1)), 0.0)
    assert not idx.apply(member(1), Announcement(D, 3 * CS, CS, ((0, 0),)), 0.0)
    assert not idx.apply(member(1), Announcement(D, N * CS, CS // 2, ((0, 0),)), 0.0)
    assert idx.holdings(D, member(1)) is None


def test_ranges_outside_the_blob_are_clipped() -> None:
    idx = index_with(1)
    idx.apply(member(0), ann((-5, 1), (N - 1, N + 40)), 0.0)
    assert idx.holdings(D, member(0)) == 0b11 | 1 << (N - 1)


def test_a_dead_member_leaves_no_holdings_or_candidacy_and_its_leases_expire() -> None:
    idx = index_with(3)
    idx.apply(member(0), ann((0, 9)), 0.0)
    idx.apply(member(1), ann(), 0.0)
    lease = idx.grant(D, member(0), [], 32, 0.0)
    assert lease is not None
    idx.apply(member(2), ann(complete=True, digest=E), 0.0)
    idx.drop_member(member(0))
    assert idx.holdings(D, member(0)) is None
    assert [h.member for h in idx.candidates(D, member(1), 0.0, Random(1))] == []
    assert idx.members() == [member(1), member(2)]
    # its lease is not re-granted while it may still be fetching (dropped for silence: maybe slow)
    assert idx.leases(D, 1.0) == [lease]
    after = idx.grant(D, member(1), [], 32, 1.0)
    assert after is not None and after.mask & lease.mask == 0
    idx.release(D, member(1), after.first, after.last)
    # past `lease_grace` without progress it expires: the chunks it held are free again, from 0
    later = idx.config.lease_grace + 0.1
    assert idx.leases(D, later) == []
    again = idx.grant(D, member(1), [], 32, later)
    assert again is not None and again.first == 0


def test_a_member_back_after_a_drop_keeps_the_run_it_still_fetches_and_frees_the_rest() -> None:
    """The tracker dropped a member that was only slow: nobody got its runs meanwhile, and its
    first announcement of the blob afterwards replaces its old leases by the run it says it is
    fetching (its engine forgot the runs it had not started when it re-synced in full)."""
    idx = index_with(2)
    idx.apply(member(0), ann(), 0.0)
    idx.apply(member(1), ann(), 0.0)
    first = idx.grant(D, member(0), [], 4, 0.0)
    second = idx.grant(D, member(0), [], 4, 0.0)
    assert first is not None and second is not None and first.mask & second.mask == 0
    idx.drop_member(member(0))
    taken = idx.grant(D, member(1), [], 32, 1.0)
    assert taken is not None and taken.mask & (first.mask | second.mask) == 0
    idx.set_member(member(0), "http://10.0.1.0:1")
    idx.apply(member(0), ann((first.first, first.first), fetching=((first.first + 1, first.last),)), 2.0)
    mine = [le for le in idx.leases(D, 2.0) if le.member == member(0)]
    assert [(le.first, le.last) for le in mine] == [(first.first + 1, first.last)]
    # the run it did not start is free for someone else now
    idx.release(D, member(1), taken.first, taken.last)
    regrant = idx.grant(D, member(1), [second.first], 32, 2.0)
    assert regrant is not None and regrant.first == second.first


# -- candidates -----------------------------------------------------------------------------------


def test_candidates_are_complete_holders_then_most_chunks_never_the_asker_nor_empty_members() -> None:
    idx = index_with(5)
    idx.apply(member(0), ann(), 0.0)  # the asker, holds nothing
    idx.apply(member(1), ann((0, 1)), 0.0)
    idx.apply(member(2), ann((0, 9)), 0.0)
    idx.apply(member(3), ann(complete=True), 0.0)
    idx.apply(member(4), ann(), 0.0)  # filling, nothing yet: useless as a source
    got = idx.candidates(D, member(0), 0.0, Random(0))
    assert [h.member for h in got] == [member(3), member(2), member(1)]
    assert got[0].complete and got[0].have == 0
    assert got[1].have == (1 << 10) - 1
    assert got[1].url == "http://10.0.1.3:5381"


def test_candidates_are_bounded_and_spread_at_random_among_equals() -> None:
    idx = index_with(60)
    for i in range(1, 60):
        idx.apply(member(i), ann(complete=True), 0.0)
    idx.apply(member(0), ann(), 0.0)
    firsts = set()
    for seed in range(20):
        got = idx.candidates(D, member(0), 0.0, Random(seed))
        assert len(got) == 16
        assert len({h.member for h in got}) == 16
        firsts.add(got[0].member)
    assert len(firsts) > 5


def test_the_askers_subnet_comes_first() -> None:
    nets = {i: (2 if i % 3 == 0 else 1) for i in range(40)}
    idx = index_with(40, nets)
    for i in range(1, 40):
        idx.apply(member(i), ann(complete=True), 0.0)
    idx.apply(member(0), ann(), 0.0)  # subnet 2, with 13 others there
    got = idx.candidates(D, member(0), 0.0, Random(3))
    same = [h for h in got if nets[int(h.member[1:])] == 2]
    assert len(got) == 16 and len(same) == 13
    assert got[: len(same)] == same


def test_the_cover_pass_offers_a_rare_chunk_held_only_below_the_top() -> None:
    idx = index_with(30)
    idx.apply(member(0), ann(), 0.0)
    for i in range(1, 29):  # 28 members with chunks 0..14: they outrank the lone holder of 19
        idx.apply(member(i), ann((0, 14)), 0.0)
    idx.apply(member(29), ann((19, 19)), 0.0)
    for seed in range(10):
        got = idx.candidates(D, member(0), 0.0, Random(seed))
        assert member(29) in {h.member for h in got}
        assert len(got) == 16


def test_a_complete_asker_gets_no_candidates_and_unknown_blobs_have_none() -> None:
    idx = index_with(2)
    idx.apply(member(0), ann(complete=True), 0.0)
    idx.apply(member(1), ann(complete=True), 0.0)
    assert idx.candidates(D, member(0), 0.0, Random(0)) == []
    assert idx.candidates(E, member(0), 0.0, Random(0)) == []


def test_candidates_carry_their_live_lease_runs_as_fetching() -> None:
    idx = index_with(2)
    idx.apply(member(0), ann(), 0.0)
    idx.apply(member(1), ann((0, 0)), 0.0)
    lease = idx.grant(D, member(1), [], 32, 0.0)
    assert lease is not None
    (holder,) = idx.candidates(D, member(0), 0.0, Random(0))
    assert holder.fetching == ((lease.first, lease.last),)


def test_a_stale_ranking_is_reused_within_its_ttl_but_never_offers_a_member_that_left() -> None:
    idx = index_with(4, rank_ttl=10.0)
    idx.apply(member(0), ann(), 0.0)
    idx.apply(member(1), ann((0, 3)), 0.0)
    idx.apply(member(2), ann((0, 2)), 0.0)
    assert [h.member for h in idx.candidates(D, member(0), 0.0, Random(0))] == [member(1), member(2)]
    # not ranked until the ttl passes (and not needed by the cover pass: member 2 has its chunks)
    idx.apply(member(3), ann((0, 1)), 1.0)
    idx.drop_member(member(1))
    assert [h.member for h in idx.candidates(D, member(0), 1.0, Random(0))] == [member(2)]
    assert [h.member for h in idx.candidates(D, member(0), 11.0, Random(0))] == [member(2), member(3)]


# -- leases ---------------------------------------------------------------------------------------


def test_a_lone_member_gets_long_leases_once_the_blob_has_gathered_and_others_short_ones() -> None:
    idx = index_with(3, gather=0.5)
    idx.apply(member(0), ann(n=100), 0.0)
    first = idx.grant(D, member(0), [], 64, 0.0)
    assert first is not None and (first.first, first.last) == (0, 0)  # a burst may be forming
    assert idx.grant(D, member(0), [], 64, 0.05) is None  # one lease while the blob gathers
    solo = idx.grant(D, member(0), [], 64, 0.5)
    assert solo is not None and (solo.first, solo.last) == (1, 32)  # still alone: a long run
    idx.apply(member(1), ann(n=100), 0.6)
    short = idx.grant(D, member(1), [], 64, 0.6)
    assert short is not None and (short.first, short.last) == (33, 36)
    idx.release(D, member(0), 0, 0)
    capped = idx.grant(D, member(0), [40], 2, 0.6)
    assert capped is not None and (capped.first, capped.last) == (40, 41)


def test_in_a_burst_the_first_member_does_not_get_the_whole_image() -> None:
    """The first member's syncs reach the tracker before the others announce the image's blobs,
    and it asks again every 50 ms (the tracker's own node): while a blob gathers it holds one
    one-chunk lease of each, so the members arriving a moment later share the origin work."""
    blobs = [D, E, "sha256:" + "ef" * 32, "sha256:" + "01" * 32]
    idx = index_with(8, gather=0.5)
    first: dict[str, int] = {}
    for d in blobs:
        idx.apply(member(0), ann(n=7, digest=d), 0.0)
    for step in range(8):  # its syncs every 50 ms, until the others arrive at 0.4 s
        for d in blobs:
            lease = idx.grant(D if d == D else d, member(0), [], 32, step * 0.05)
            if lease is not None:
                first[d] = first.get(d, 0) + lease.last - lease.first + 1
    assert first == {d: 1 for d in blobs}
    for m in range(1, 8):
        for d in blobs:
            idx.apply(member(m), ann(n=7, digest=d), 0.4)
    others = [idx.grant(d, member(m), [], 32, 0.4) for m in range(1, 8) for d in blobs]
    assert sum(le is not None for le in others) == 6 * len(blobs)  # 6 free chunks of each, one each
    late = [idx.grant(d, member(m), [], 32, 0.5) for m in range(8) for d in blobs]
    assert all(le is None for le in late)  # nothing left to lease


def test_a_blob_first_heard_of_in_progress_leases_nothing_until_its_runs_are_re_announced() -> None:
    """A new tracker (it starts empty) hears of a blob from members already filling it: no lease
    for `adopt_wait`, so that a run one member is fetching from the origin, re-announced in its
    first sync a moment after another member's, is adopted rather than leased to that other one."""
    idx = index_with(3, adopt_wait=1.0)
    idx.apply(member(0), ann((0, 3)), 10.0)  # the first to sync with the new tracker
    assert idx.grant(D, member(0), [8], 32, 10.0) is None
    idx.apply(member(1), ann((4, 5), fetching=((8, 11),)), 10.6)  # still fetching its old lease
    assert idx.grant(D, member(0), [8], 32, 10.9) is None
    lease = idx.grant(D, member(0), [8], 32, 11.0)
    assert lease is not None and (lease.first, lease.last) == (6, 7)  # 8-11 is member 1's
    assert [(le.member, le.first, le.last) for le in idx.leases(D, 11.0)] == [
        (member(1), 8, 11),
        (member(0), 6, 7),
    ]
    # a blob that arrives empty (a new pull) is not held
    idx.apply(member(2), ann(digest=E), 11.0)
    assert idx.grant(E, member(2), [], 32, 11.0) is not None


def test_the_requesters_wanted_chunks_come_first() -> None:
    idx = index_with(2)
    idx.apply(member(0), ann(), 0.0)
    idx.apply(member(1), ann(), 0.0)
    lease = idx.grant(D, member(0), [13, 2], 32, 0.0)
    assert lease is not None and (lease.first, lease.last) == (13, 16)
    # a wanted chunk that is taken is skipped for the next wanted one that is free
    other = idx.grant(D, member(1), [14, 2], 32, 0.0)
    assert other is not None and (other.first, other.last) == (2, 5)


def test_a_run_stops_at_held_or_leased_chunks() -> None:
    idx = index_with(3)
    idx.apply(member(0), ann(), 0.0)
    idx.apply(member(1), ann((2, 2)), 0.0)
    lease = idx.grant(D, member(0), [], 32, 0.0)
    assert lease is not None and (lease.first, lease.last) == (0, 1)


def test_no_lease_while_a_member_holds_the_blob_whole_or_when_nothing_is_free() -> None:
    idx = index_with(3)
    idx.apply(member(0), ann(n=4), 0.0)
    assert idx.grant(D, member(0), [], 32, 0.0) is not None  # all four chunks
    idx.apply(member(1), ann(n=4), 0.0)
    assert idx.grant(D, member(1), [], 32, 0.0) is None
    idx.apply(member(2), ann(complete=True, n=4), 0.0)
    idx.release(D, member(0), 0, 3)
    assert idx.grant(D, member(1), [], 32, 0.0) is None


def test_a_member_must_announce_the_blob_before_it_gets_a_lease() -> None:
    idx = index_with(1)
    assert idx.grant(D, member(0), [], 32, 0.0) is None


def test_at_most_two_live_leases_per_member_and_blob() -> None:
    idx = index_with(2)
    idx.apply(member(0), ann(), 0.0)
    idx.apply(member(1), ann(), 0.0)
    assert idx.grant(D, member(0), [], 32, 0.0) is not None
    assert idx.grant(D, member(0), [], 32, 0.0) is not None
    assert idx.grant(D, member(0), [], 32, 0.0) is None


def test_a_stalled_lease_is_regranted_and_progress_keeps_one_alive() -> None:
    idx = index_with(3)
    for i in range(3):
        idx.apply(member(i), ann(), 0.0)
    slow = idx.grant(D, member(0), [], 32, 0.0)
    busy = idx.grant(D, member(1), [], 32, 0.0)
    assert slow is not None and busy is not None
    assert (slow.first, busy.first) == (0, 4)
    for t in (2.0, 4.0, 6.0):  # member 1 lands a chunk of its run every 2 s
        idx.apply(member(1), ann((busy.first + int(t / 2) - 1,) * 2), t)
    late = 6.5
    assert idx.grant(D, member(2), [0], 32, late) is not None
    regrant = [le for le in idx.leases(D, late) if le.member == member(2)]
    assert [(le.first, le.last) for le in regrant] == [(0, 3)]
    assert any(le.member == member(1) for le in idx.leases(D, late))
    assert not any(le.member == member(0) for le in idx.leases(D, late))


def test_the_next_lease_lives_while_the_one_in_flight_progresses() -> None:
    """A lone member holds two long leases; its first run takes longer than `lease_grace` on a
    slow uplink, landing a chunk every 2 s. Its second run, not started yet, is not re-granted
    to a member that joins meanwhile (it would be fetched twice: the staggered testbed's 1.08x);
    once the member stops progressing, both runs are free again."""
    idx = index_with(2, lease_chunks=8)  # the blob's first lease is short: 8 chunks, as the second
    idx.apply(member(0), ann(), 0.0)
    first = idx.grant(D, member(0), [], 8, 0.0)
    second = idx.grant(D, member(0), [], 8, 0.0)
    assert first is not None and second is not None
    assert (first.first, first.last, second.first, second.last) == (0, 7, 8, 15)
    for t in range(2, 12, 2):
        idx.apply(member(0), ann((t // 2 - 1,) * 2), float(t))
    idx.apply(member(1), ann(), 11.0)
    joined = idx.grant(D, member(1), list(range(8, 16)), 32, 11.0)
    assert joined is not None and (joined.first, joined.last) == (16, 19)  # the only free chunks
    assert {(le.first, le.last) for le in idx.leases(D, 11.0) if le.member == member(0)} == {
        (first.first, first.last),
        (second.first, second.last),
    }
    assert not any(le.member == member(0) for le in idx.leases(D, 16.5))  # 6.5 s without progress


def test_a_lease_lives_while_its_member_progresses_on_another_blob() -> None:
    """A member downloading two layers at once: its run of the second blob waits behind the first
    blob's run (they share its part of the uplink) and lands nothing for longer than the grace.
    It is not re-granted to another member meanwhile (it would be fetched twice); once the member
    stops progressing anywhere, it is free again."""
    idx = index_with(2)
    for blob in (D, E):
        idx.apply(member(0), ann(digest=blob), 0.0)
        idx.apply(member(1), ann(digest=blob), 0.0)
    first = idx.grant(D, member(0), [], 32, 0.0)
    waiting = idx.grant(E, member(0), [], 32, 0.0)
    assert first is not None and waiting is not None
    assert (first.first, first.last, waiting.first, waiting.last) == (0, 3, 0, 3)
    for chunk in range(4):  # D's run lands a chunk every 2 s; nothing of E
        idx.apply(member(0), ann((chunk, chunk)), 2.0 * (chunk + 1))
    assert [(le.member, le.first, le.last) for le in idx.leases(E, 9.0)] == [(member(0), 0, 3)]
    other = idx.grant(E, member(1), [], 32, 9.0)
    assert other is not None and other.first > waiting.last  # not the waiting run
    assert not any(le.member == member(0) for le in idx.leases(E, 14.5))  # 6.5 s without progress


def test_a_lease_whose_run_is_held_ends_and_a_released_one_frees_what_was_not_fetched() -> None:
    idx = index_with(2)
    idx.apply(member(0), ann(), 0.0)
    idx.apply(member(1), ann(), 0.0)
    lease = idx.grant(D, member(0), [], 32, 0.0)
    assert lease is not None and (lease.first, lease.last) == (0, 3)
    idx.apply(member(0), ann((0, 3)), 1.0)
    assert idx.leases(D, 1.0) == []
    second = idx.grant(D, member(0), [], 32, 1.0)
    assert second is not None and (second.first, second.last) == (4, 7)
    idx.apply(member(0), ann((4, 5)), 2.0)
    idx.release(D, member(0), 4, 7)
    third = idx.grant(D, member(1), [], 32, 2.0)
    assert third is not None and (third.first, third.last) == (6, 9)


def test_announced_origin_fetches_are_adopted_as_leases_where_free() -> None:
    idx = index_with(2)
    idx.apply(member(0), ann(), 0.0)
    idx.apply(member(1), ann((8, 8), fetching=((4, 11),)), 0.0)
    assert [(le.member, le.first, le.last) for le in idx.leases(D, 0.0)] == [
        (member(1), 4, 7),
        (member(1), 9, 11),
    ]
    # a second announcement of the same runs does not duplicate them
    idx.apply(member(1), ann(fetching=((4, 11),)), 0.5)
    assert len(idx.leases(D, 0.5)) == 2
    # and a run someone else leased stays theirs
    idx.apply(member(0), ann(fetching=((0, 5),)), 1.0)
    mine = [(le.first, le.last) for le in idx.leases(D, 1.0) if le.member == member(0)]
    assert mine == [(0, 3)]


# -- wire helpers ---------------------------------------------------------------------------------


@given(st.sets(st.integers(0, 300)))
def test_runs_and_bitmaps_round_trip(chunks: set[int]) -> None:
    bits = sum(1 << i for i in chunks)
    runs = runs_of(bits)
    assert {i for a, b in runs for i in range(a, b + 1)} == chunks
    assert all(b2 > a1 + 1 for (_, a1), (b2, _) in zip(runs, runs[1:], strict=False))
    assert bitmap_to_int(int_to_bitmap(bits, 301)) == bits


@pytest.mark.parametrize(
    ("url", "net"),
    [
        ("http://10.231.1.12:5381", "10.231.1.0/24"),
        ("10.1.2.3:80", "10.1.2.0/24"),
        ("http://[fd00::1:2]:5381", "fd00::/64"),
        ("http://node-7.local:5381", "node-7.local"),
    ],
)
def test_subnet_of(url: str, net: str) -> None:
    assert subnet_of(url) == net


# -- properties -----------------------------------------------------------------------------------


def live_disjoint(idx: Index, digest: str, now: float) -> bool:
    seen = 0
    for le in idx.leases(digest, now):
        if seen & le.mask:
            return False
        seen |= le.mask
    return True


@given(
    nchunks=st.integers(1, 80),
    members=st.integers(1, 12),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["grant", "land", "release", "drop", "tick", "complete", "adopt"]),
            st.integers(0, 11),
            st.integers(0, 79),
            st.integers(1, 40),
        ),
        max_size=120,
    ),
)
def test_never_two_live_leases_on_one_chunk_nor_a_lease_on_a_held_chunk(
    nchunks: int, members: int, ops: list[tuple[str, int, int, int]]
) -> None:
    idx = index_with(members, **WINDOWS)
    now = 0.0
    for i in range(members):
        idx.apply(member(i), ann(n=nchunks), now)
    for op, who, chunk, k in ops:
        m = member(who % members)
        if op == "grant":
            held = 0
            for x in idx.filling(D):
                held |= idx.holdings(D, x) or 0
            leased = 0
            for le in idx.leases(D, now):
                leased |= le.mask
            lease = idx.grant(D, m, [chunk], k, now)
            if lease is not None:
                assert lease.mask & held == 0
                assert lease.mask & leased == 0
                assert idx.replicas(D) == 0
                assert lease.last - lease.first + 1 <= k
        elif op == "land":
            idx.apply(m, ann((chunk, chunk + k // 8), n=nchunks), now)
        elif op == "release":
            idx.release(D, m, chunk, chunk + k)
        elif op == "drop":
            idx.drop_member(m)
            idx.set_member(m, f"http://10.0.1.{who}:1")
            idx.apply(m, ann(n=nchunks), now)
        elif op == "tick":
            now += k / 4
        elif op == "complete":
            idx.apply(m, ann(complete=True, n=nchunks), now)
        elif op == "adopt":
            idx.apply(m, ann(fetching=((chunk, chunk + k),), n=nchunks), now)
        assert live_disjoint(idx, D, now)


@given(nchunks=st.integers(1, 120), members=st.integers(1, 40), seed=st.integers(0, 2**32))
def test_a_burst_of_lease_requests_covers_each_chunk_exactly_once(
    nchunks: int, members: int, seed: int
) -> None:
    """Every member announces the blob, then they ask for leases in random order and land their
    runs in random order (each holding at most two): every chunk is leased once, none twice."""
    rng = Random(seed)
    idx = index_with(members, **WINDOWS)
    for i in range(members):
        idx.apply(member(i), ann(n=nchunks), 0.0)
    granted = [0] * nchunks
    open_leases: list[tuple[str, int, int]] = []
    now = 0.0
    for _ in range(10 * nchunks + 10):
        m = member(rng.randrange(members))
        lease = idx.grant(D, m, [rng.randrange(nchunks)], 32, now)
        if lease is not None:
            for i in range(lease.first, lease.last + 1):
                granted[i] += 1
            open_leases.append((m, lease.first, lease.last))
        if open_leases and rng.random() < 0.5:
            who, a, b = open_leases.pop(rng.randrange(len(open_leases)))
            idx.apply(who, ann((a, b), n=nchunks), now)
        now += 0.01
    for who, a, b in open_leases:
        idx.apply(who, ann((a, b), n=nchunks), now)
    while (lease := idx.grant(D, member(0), [], 32, now)) is not None:
        for i in range(lease.first, lease.last + 1):
            granted[i] += 1
        idx.apply(member(0), ann((lease.first, lease.last), n=nchunks), now)
    assert granted == [1] * nchunks


@given(nchunks=st.integers(1, 100), members=st.integers(2, 20), seed=st.integers(0, 2**32))
def test_staggered_arrivals_never_lease_a_held_or_leased_chunk(nchunks: int, members: int, seed: int) -> None:
    """Members join one at a time while earlier ones hold some chunks and fetch others."""
    rng = Random(seed)
    idx = index_with(members, **WINDOWS)
    now = 0.0
    for i in range(members):
        m = member(i)
        held = rng.sample(range(nchunks), rng.randrange(nchunks + 1) // 2)
        idx.apply(m, ann(*((c, c) for c in held), n=nchunks), now)
        for _ in range(3):
            union = 0
            for x in idx.filling(D):
                union |= idx.holdings(D, x) or 0
            leased = 0
            for le in idx.leases(D, now):
                leased |= le.mask
            lease = idx.grant(D, m, [rng.randrange(nchunks)], rng.randrange(1, 40), now)
            if lease is not None:
                assert lease.mask & union == 0
                assert lease.mask & leased == 0
        now += rng.random()


@given(
    members=st.integers(1, 60),
    holdings=st.lists(st.sets(st.integers(0, N - 1)), min_size=1, max_size=60),
    completes=st.sets(st.integers(0, 59)),
    asker=st.integers(0, 59),
    seed=st.integers(0, 2**32),
)
def test_candidates_are_bounded_distinct_holders_and_never_the_asker(
    members: int, holdings: list[set[int]], completes: set[int], asker: int, seed: int
) -> None:
    idx = index_with(members, {i: i % 3 for i in range(members)})
    for i in range(members):
        m = member(i)
        if i in completes:
            idx.apply(m, ann(complete=True), 0.0)
        else:
            held = holdings[i % len(holdings)]
            idx.apply(m, ann(*((c, c) for c in held)), 0.0)
    me = member(asker % members)
    got = idx.candidates(D, me, 0.0, Random(seed))
    names = [h.member for h in got]
    assert me not in names
    assert len(names) == len(set(names)) <= 16
    assert all(h.complete or h.have for h in got)
    holders = [m for m in idx.members() if m != me and (idx.holdings(D, m) or 0)]
    if idx.holdings(D, me) != (1 << N) - 1:
        assert len(names) == min(16, len(holders))


@given(
    members=st.integers(2, 15),
    drop=st.integers(0, 14),
    seed=st.integers(0, 2**32),
)
def test_a_dropped_member_vanishes_from_every_answer(members: int, drop: int, seed: int) -> None:
    rng = Random(seed)
    idx = index_with(members)
    for i in range(members):
        held = rng.sample(range(N), rng.randrange(N))
        idx.apply(member(i), ann(*((c, c) for c in held)), 0.0)
        idx.grant(D, member(i), [], 8, 0.0)
    gone = member(drop % members)
    idx.drop_member(gone)
    assert all(le.member != gone for le in idx.leases(D, idx.config.lease_grace + 0.1))  # expired
    assert idx.holdings(D, gone) is None
    assert gone not in idx.filling(D)
    for i in range(members):
        assert gone not in {h.member for h in idx.candidates(D, member(i), 1.0, rng)}


# -- the offer cap (a flash crowd on the first holders) -------------------------------------------


def crowd(askers: int, **cfg: float) -> Index:
    """A leaseholder (member 1) holding chunks 0..3, members 2..4 holding chunk 0 (they got it
    from it a moment ago), and `askers` members holding nothing (5 onwards). The cap is
    `offer_cap` alone unless `offer_rate` is given."""
    cfg.setdefault("offer_rate", 0.0)
    idx = index_with(askers + 5, **cfg)
    idx.apply(member(1), ann((0, 3)), 0.0)
    for i in (2, 3, 4):
        idx.apply(member(i), ann((0, 0)), 0.0)
    for i in range(5, askers + 5):
        idx.apply(member(i), ann(), 0.0)
    return idx


def test_a_partial_holder_is_in_at_most_offer_cap_askers_current_sets() -> None:
    idx = crowd(10, offer_cap=3, candidates=2, cover_reserve=1)
    rng = Random(0)
    offered = [{h.member for h in idx.candidates(D, member(i), 0.1, rng)} for i in range(5, 15)]
    assert sum(member(1) in got for got in offered) == 3
    # the askers it was not offered to get the next generation: the members holding chunk 0
    assert all(got and got <= {member(1), member(2), member(3), member(4)} for got in offered[:6])
    assert all(sum(member(i) in got for got in offered) <= 3 for i in range(1, 5))


def test_an_askers_next_ask_completion_or_departure_frees_its_slots() -> None:
    idx = crowd(4, offer_cap=1, candidates=1, cover_reserve=1)
    assert [h.member for h in idx.candidates(D, member(5), 0.0, Random(0))] == [member(1)]
    assert member(1) not in {h.member for h in idx.candidates(D, member(6), 0.0, Random(0))}
    # member 5 asks again: its old set is replaced, so member 1 is free for it once more
    assert [h.member for h in idx.candidates(D, member(5), 1.0, Random(0))] == [member(1)]
    idx.apply(member(5), ann(complete=True), 2.0)  # done: its set no longer counts
    assert [h.member for h in idx.candidates(D, member(7), 2.0, Random(0))] == [member(1)]
    idx.drop_member(member(7))  # gone: neither does its set
    assert [h.member for h in idx.candidates(D, member(8), 2.0, Random(0))] == [member(1)]


def test_the_cap_grows_with_the_time_askers_use_their_sets() -> None:
    idx = crowd(20, offer_cap=1, offer_rate=4.0, candidates=1, cover_reserve=1)
    rng = Random(0)
    for t in (0.0, 0.5, 1.0):  # every asker asks every 0.5 s: 4 chunks/s x 0.5 s = 2 sets each
        offered = [{h.member for h in idx.candidates(D, member(i), t, rng)} for i in range(5, 25)]
    assert sum(member(1) in got for got in offered) == 2


def test_a_set_nobody_replaced_stops_counting_after_offer_ttl() -> None:
    idx = crowd(2, offer_cap=1, candidates=1, cover_reserve=1, offer_ttl=5.0)
    assert [h.member for h in idx.candidates(D, member(5), 0.0, Random(0))] == [member(1)]
    assert member(1) not in {h.member for h in idx.candidates(D, member(6), 4.0, Random(0))}
    assert [h.member for h in idx.candidates(D, member(6), 5.5, Random(0))] == [member(1)]


def test_without_the_cap_everyone_is_offered_the_leaseholder() -> None:
    idx = crowd(10, offer_cap=0)
    rng = Random(0)
    assert all(member(1) in {h.member for h in idx.candidates(D, member(i), 0.1, rng)} for i in range(5, 15))


def test_complete_holders_are_never_offered_out() -> None:
    idx = index_with(12, offer_cap=2)
    idx.apply(member(1), ann(complete=True), 0.0)
    for i in range(2, 12):
        idx.apply(member(i), ann(), 0.0)
    for i in range(2, 12):
        assert [h.member for h in idx.candidates(D, member(i), 0.0, Random(i))] == [member(1)]


def test_the_cover_pass_skips_an_offered_out_holder_of_a_rare_chunk() -> None:
    idx = crowd(4, offer_cap=1)
    first = {h.member for h in idx.candidates(D, member(5), 0.0, Random(0))}
    assert member(1) in first  # the only holder of chunks 1..3: the cover pass offers it
    second = {h.member for h in idx.candidates(D, member(6), 0.0, Random(0))}
    assert member(1) not in second and second <= {member(2), member(3), member(4)}


@given(
    askers=st.integers(1, 80),
    cap=st.integers(1, 8),
    asks=st.lists(st.integers(0, 79), min_size=1, max_size=120),
    seed=st.integers(0, 2**32),
)
def test_no_partial_holder_is_in_more_than_offer_cap_current_sets(
    askers: int, cap: int, asks: list[int], seed: int
) -> None:
    idx = crowd(askers, offer_cap=cap)
    rng = Random(seed)
    current: dict[str, set[str]] = {}
    for k, a in enumerate(asks):
        asker = member(5 + a % askers)
        got = idx.candidates(D, asker, k * 0.01, rng)
        assert len({h.member for h in got}) == len(got)
        current[asker] = {h.member for h in got}
        for i in range(1, 5):
            assert sum(member(i) in s for s in current.values()) <= cap
