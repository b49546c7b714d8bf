"""peer.policy.schedule: which missing chunks go to which peer this round (wanted first, then
rarest first, within the blob's window and the engine-wide cap), and a reader's read-ahead."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st
from policy_cases import CHUNK, PEERS, peer_stats, views_of

from peer.policy.choice import Picker
from peer.policy.holdings import BlobView, holders, usable_views
from peer.policy.peerstats import PeerStats
from peer.policy.schedule import READ_AHEAD, Fetch, Slots, peer_order, schedule, wanted_chunks

A, B, C = PEERS[:3]
OPEN = Slots(window=100, flights=0, inflight=0, max_inflight=100)


def first(candidates: Sequence[str]) -> str | None:
    """A peer choice that takes the first holder (chunk order is what these tests look at)."""
    return candidates[0] if candidates else None


# -- wanted_chunks -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "size", "nchunks", "expected"),
    [
        (0, 1, 10, [0, 1, 2]),
        (0, CHUNK, 10, [0, 1, 2]),
        (0, CHUNK + 1, 10, [0, 1, 2, 3]),
        (CHUNK - 1, 2, 10, [0, 1, 2, 3]),  # straddles a boundary
        (5 * CHUNK, 3 * CHUNK, 10, [5, 6, 7, 8, 9]),
        (9 * CHUNK, 100, 10, [9]),  # the last chunk: no read-ahead past the end
        (8 * CHUNK, 100, 10, [8, 9]),
        (3 * CHUNK + 7, 0, 10, [3, 4, 5]),  # an empty read still wants its chunk
        (0, 1, 1, [0]),
    ],
)
def test_wanted_chunks(offset: int, size: int, nchunks: int, expected: list[int]) -> None:
    assert list(wanted_chunks(offset, size, CHUNK, nchunks)) == expected


@given(
    st.integers(1, 64).flatmap(
        lambda n: st.tuples(st.just(n), st.integers(0, n * 4096 - 1), st.integers(0, 20_000))
    )
)
def test_wanted_chunks_cover_the_read_and_at_most_the_read_ahead(case: tuple[int, int, int]) -> None:
    nchunks, offset, size = case
    cs = 4096
    got = list(wanted_chunks(offset, size, cs, nchunks))
    needed = set(range(offset // cs, min(nchunks, (offset + max(size, 1) - 1) // cs + 1)))
    assert needed <= set(got)
    assert got == list(range(min(got), max(got) + 1))  # one run
    assert max(got) <= min(nchunks - 1, max(needed) + READ_AHEAD)
    assert min(got) == offset // cs


# -- peer_order --------------------------------------------------------------------------------------


def test_wanted_chunks_come_first() -> None:
    held = {0: [A], 1: [A], 2: [A], 3: [A]}
    assert peer_order([0, 1, 2, 3], held, {3, 2}, set()) == [2, 3, 0, 1]


def test_then_rarest_first() -> None:
    held = {0: [A, B, C], 1: [A], 2: [A, B], 3: [B]}
    assert peer_order([0, 1, 2, 3], held, set(), set()) == [1, 3, 2, 0]


def test_rarity_orders_the_wanted_chunks_too() -> None:
    held = {0: [A, B], 1: [A], 2: [A, B], 3: [C]}
    assert peer_order([0, 1, 2, 3], held, {0, 1}, set()) == [1, 0, 3, 2]


def test_chunks_nobody_holds_or_already_in_flight_are_not_peer_work() -> None:
    held = {0: [], 1: [A], 2: [A], 3: [A]}
    assert peer_order([0, 1, 2, 3], held, {0}, {2}) == [1, 3]


def test_chunks_without_a_holders_entry_are_skipped() -> None:
    assert peer_order([0, 1], {1: [A]}, set(), set()) == [1]


# -- schedule ----------------------------------------------------------------------------------------


def test_the_window_bounds_one_round() -> None:
    held = {i: [A] for i in range(10)}
    got = schedule(
        range(10), held, set(), set(), Slots(window=4, flights=1, inflight=1, max_inflight=24), first
    )
    assert got == [Fetch(0, A), Fetch(1, A), Fetch(2, A)]


def test_the_engine_wide_cap_bounds_one_round() -> None:
    held = {i: [A] for i in range(10)}
    got = schedule(
        range(10), held, set(), set(), Slots(window=8, flights=0, inflight=22, max_inflight=24), first
    )
    assert got == [Fetch(0, A), Fetch(1, A)]


@pytest.mark.parametrize(
    "slots",
    [
        Slots(window=4, flights=4, inflight=4, max_inflight=24),
        Slots(window=4, flights=6, inflight=6, max_inflight=24),  # hedges pushed past the window
        Slots(window=8, flights=0, inflight=24, max_inflight=24),
        Slots(window=0, flights=0, inflight=0, max_inflight=24),
    ],
)
def test_nothing_starts_when_a_limit_is_reached(slots: Slots) -> None:
    assert schedule([0, 1], {0: [A], 1: [A]}, set(), set(), slots, first) == []


def test_new_requests_leave_the_reserve_for_hedges() -> None:
    held = {i: [A] for i in range(10)}
    got = schedule(range(10), held, set(), set(), Slots(8, 2, 2, 24, reserve=1), first)
    assert len(got) == 5  # 8 - 1 - 2
    got = schedule(range(10), held, set(), set(), Slots(8, 0, 20, 24, reserve=1), first)
    assert len(got) == 3  # 24 - 1 - 20


@pytest.mark.parametrize(("window", "cap"), [(1, 24), (8, 1)])
def test_the_reserve_never_keeps_a_limit_below_one_request(window: int, cap: int) -> None:
    got = schedule([0, 1], {0: [A], 1: [A]}, set(), set(), Slots(window, 0, 0, cap, reserve=1), first)
    assert got == [Fetch(0, A)]


def test_a_chunk_the_choice_refuses_takes_no_slot() -> None:
    held = {0: [A], 1: [B], 2: [A]}
    got = schedule([0, 1, 2], held, set(), set(), Slots(2, 0, 0, 24), lambda c: None if c == [B] else c[0])
    assert got == [Fetch(0, A), Fetch(2, A)]


def test_choose_is_asked_with_the_chunk_holders_in_order() -> None:
    asked: list[list[str]] = []

    def record(c: Sequence[str]) -> str | None:
        asked.append(list(c))
        return c[-1]

    got = schedule([0, 1], {0: [A, B], 1: [C]}, set(), set(), OPEN, record)
    assert asked == [[C], [A, B]] and got == [Fetch(1, C), Fetch(0, B)]


@st.composite
def rounds(draw: st.DrawFn) -> tuple[list[int], dict[int, list[str]], set[int], set[int], Slots]:
    nchunks = draw(st.integers(1, 40))
    missing = sorted(draw(st.sets(st.integers(0, nchunks - 1), min_size=1)))
    held = {i: draw(st.lists(st.sampled_from(PEERS), unique=True, max_size=4)) for i in missing}
    wanted = draw(st.sets(st.sampled_from(missing)))
    busy = draw(st.sets(st.sampled_from(missing)))
    flights = draw(st.integers(0, 40))
    slots = Slots(
        draw(st.integers(0, 32)), flights, flights + draw(st.integers(0, 30)), draw(st.integers(0, 40))
    )
    return missing, held, wanted, busy, slots


@given(rounds())
def test_schedule_never_exceeds_the_window_or_the_engine_cap(
    case: tuple[list[int], dict[int, list[str]], set[int], set[int], Slots],
) -> None:
    missing, held, wanted, busy, slots = case
    got = schedule(missing, held, wanted, busy, slots, first)
    assert slots.flights + len(got) <= max(slots.window, slots.flights)
    assert slots.inflight + len(got) <= max(slots.max_inflight, slots.inflight)


@given(rounds())
def test_schedule_fills_every_free_slot_it_can(
    case: tuple[list[int], dict[int, list[str]], set[int], set[int], Slots],
) -> None:
    missing, held, wanted, busy, slots = case
    got = schedule(missing, held, wanted, busy, slots, first)
    free = min(slots.window - slots.flights, slots.max_inflight - slots.inflight)
    assert len(got) == max(0, min(free, len(peer_order(missing, held, wanted, busy))))


@given(rounds())
def test_each_request_is_for_a_missing_idle_chunk_from_one_of_its_holders(
    case: tuple[list[int], dict[int, list[str]], set[int], set[int], Slots],
) -> None:
    missing, held, wanted, busy, slots = case
    got = schedule(missing, held, wanted, busy, slots, first)
    assert len({f.index for f in got}) == len(got)
    for f in got:
        assert f.index in missing and f.index not in busy and f.peer in held[f.index]


@given(rounds())
def test_wanted_chunks_always_come_first_then_the_rarest(
    case: tuple[list[int], dict[int, list[str]], set[int], set[int], Slots],
) -> None:
    missing, held, wanted, busy, slots = case
    got = [f.index for f in schedule(missing, held, wanted, busy, OPEN, first)]
    keys = [(i not in wanted, len(held[i])) for i in got]
    assert keys == sorted(keys)
    # and a round cut short by its limits took the head of that order
    cut = [f.index for f in schedule(missing, held, wanted, busy, slots, first)]
    assert cut == got[: len(cut)]


@given(
    st.integers(2, 16).flatmap(lambda n: st.tuples(st.just(n), views_of(n))), st.data(), st.integers(0, 2**32)
)
def test_a_dropped_peer_is_never_chosen(
    case: tuple[int, dict[str, BlobView]], data: st.DataObject, seed: int
) -> None:
    """The engine's composition: usable views -> holders -> schedule with the best-peer choice."""
    nchunks, views = case
    now = 1000.0
    stats: dict[str, PeerStats] = {p: data.draw(peer_stats(now)) for p in views}
    usable = usable_views(views, stats, now, nchunks * CHUNK)
    held = holders(usable, range(nchunks), CHUNK)
    rng = random.Random(seed)
    got = schedule(range(nchunks), held, set(), set(), OPEN, Picker(stats, CHUNK, now, rng))
    for f in got:
        assert stats[f.peer].usable(now)
        assert views[f.peer].has(f.index)
    assert {f.index for f in got} == {i for i in range(nchunks) if held[i]}


@given(rounds(), st.integers(0, 3))
def test_fetches_and_hedges_together_never_exceed_the_window_or_the_cap(
    case: tuple[list[int], dict[int, list[str]], set[int], set[int], Slots], reserve: int
) -> None:
    missing, held, wanted, busy, s = case
    slots = Slots(s.window, s.flights, s.inflight, s.max_inflight, reserve)
    got = schedule(missing, held, wanted, busy, slots, first)
    total = len(got) + slots.hedge_room(len(got))
    assert slots.flights + total <= max(slots.window, slots.flights)
    assert slots.inflight + total <= max(slots.max_inflight, slots.inflight)
