"""peer.policy.hedging: which straggling requests get a second request, and to whom, within the
window and the engine-wide cap."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st
from policy_cases import CHUNK, PEERS, measured, peer_stats

from peer.policy.choice import Picker, Rule
from peer.policy.hedging import (
    SLACK,
    STRAGGLER_FACTOR,
    FlightView,
    Hedge,
    InFlight,
    hedges,
    late_at_bound,
    late_by_ewma,
)
from peer.policy.peerstats import HEDGE_QUANTILE, PeerStats
from peer.policy.schedule import Slots

A, B, C = PEERS[:3]
NOW = 1000.0
AFTER = 2.0
FLOOR = 0.05


def decide(
    flights: dict[int, Sequence[InFlight]],
    held: dict[int, list[str]],
    stats: dict[str, PeerStats] | None = None,
    room: int = 100,
    wanted: frozenset[int] = frozenset(),
) -> list[Hedge]:
    stats = stats if stats is not None else {}
    picker = Picker(stats, CHUNK, NOW, random.Random(3))
    return hedges(flights, held, lambda f: late_at_bound(f, stats, NOW, CHUNK, FLOOR), picker, room, wanted)


# -- when a request is late (the bound rule) -----------------------------------------------------------


def test_a_request_within_its_bound_is_not_late() -> None:
    stats = {A: measured(0.5)}
    assert not late_at_bound(FlightView(A, NOW - 0.5), stats, NOW, CHUNK, FLOOR)


def test_a_request_past_its_bound_with_slack_is_late() -> None:
    stats = {A: measured(0.5)}
    bound = stats[A].bound(CHUNK, 0, HEDGE_QUANTILE, NOW)
    assert not late_at_bound(FlightView(A, NOW - SLACK * bound * 0.99), stats, NOW, CHUNK, FLOOR)
    assert late_at_bound(FlightView(A, NOW - SLACK * bound * 1.01), stats, NOW, CHUNK, FLOOR)


def test_a_known_slow_peer_is_not_hedged_for_being_its_usual_self() -> None:
    stats = {A: measured(4.0)}
    assert not late_at_bound(FlightView(A, NOW - 4.5), stats, NOW, CHUNK, FLOOR)
    assert late_at_bound(FlightView(A, NOW - 6.0), stats, NOW, CHUNK, FLOOR)


def test_the_bound_is_taken_at_the_queue_the_request_shares() -> None:
    """Launched behind three others, a request of a 1 s-per-chunk peer may take 4 s; and if more
    requests joined after it, the larger queue now counts."""
    stats = {A: measured(1.0, latency=0.0)}
    assert late_at_bound(FlightView(A, NOW - 3.0), stats, NOW, CHUNK, FLOOR)
    assert not late_at_bound(FlightView(A, NOW - 3.0, queue=3), stats, NOW, CHUNK, FLOOR)
    stats[A].inflight = 4  # it and three launched after it
    assert not late_at_bound(FlightView(A, NOW - 3.0), stats, NOW, CHUNK, FLOOR)


def test_a_probe_of_a_peer_never_measured_is_hedged_soon() -> None:
    """Exploration is cheap: the prior says 10 ms, so a probe still running at 100 ms is hedged."""
    assert late_at_bound(FlightView(A, NOW - 0.1), {}, NOW, CHUNK, FLOOR)


@pytest.mark.parametrize(("age", "is_late"), [(FLOOR - 0.01, False), (FLOOR, False), (FLOOR + 0.01, True)])
def test_nothing_is_hedged_before_the_floor(age: float, is_late: bool) -> None:
    assert late_at_bound(FlightView(A, NOW - age), {}, NOW, CHUNK, FLOOR) is is_late


# -- when a request is late (the EWMA rule, as it was) ----------------------------------------------------


def test_the_ewma_rule_gives_a_known_slow_peer_four_times_its_usual_time() -> None:
    slow = {A: PeerStats(bps=CHUNK / 2.0, latency=0.0)}  # a chunk takes it 2 s
    assert late_by_ewma(FlightView(A, NOW - 7.9), slow, NOW, AFTER, CHUNK) is False
    assert late_by_ewma(FlightView(A, NOW - 8.1), slow, NOW, AFTER, CHUNK) is True
    assert STRAGGLER_FACTOR == 4


@pytest.mark.parametrize(("age", "is_late"), [(AFTER - 0.01, False), (AFTER, False), (AFTER + 0.01, True)])
def test_the_ewma_rule_hedges_a_fast_peer_after_hedge_after(age: float, is_late: bool) -> None:
    assert late_by_ewma(FlightView(A, NOW - age), {}, NOW, AFTER, CHUNK) is is_late


# -- which hedges -------------------------------------------------------------------------------------


def test_a_young_request_is_not_hedged() -> None:
    assert decide({0: [FlightView(A, NOW - 0.01)]}, {0: [A, B]}) == []


def test_a_late_request_is_hedged_to_another_holder() -> None:
    assert decide({0: [FlightView(A, NOW - 3.0)]}, {0: [A, B]}) == [Hedge(0, A, B)]


def test_a_straggler_is_hedged_once() -> None:
    assert decide({0: [FlightView(A, NOW - 30.0, hedged=True)]}, {0: [A, B]}) == []


def test_a_chunk_with_two_requests_gets_no_third() -> None:
    flights = {0: [FlightView(A, NOW - 30.0), FlightView(B, NOW - 30.0)]}
    assert decide(flights, {0: [A, B, C]}) == []


def test_nobody_else_holds_it_no_hedge() -> None:
    assert decide({0: [FlightView(A, NOW - 30.0)]}, {0: [A]}) == []


def test_a_chunk_no_longer_missing_is_not_hedged() -> None:
    assert decide({0: [FlightView(A, NOW - 30.0)]}, {}) == []


def test_the_hedge_goes_to_the_best_other_holder() -> None:
    stats = {B: measured(1.0), C: measured(0.05)}
    assert decide({0: [FlightView(A, NOW - 30.0)]}, {0: [A, B, C]}, stats) == [Hedge(0, A, C)]


def test_hedges_spread_like_any_round() -> None:
    """The picker counts its hedges: four stragglers of A go two to B, two to C."""
    stats = {B: measured(0.1), C: measured(0.1)}
    flights: dict[int, Sequence[InFlight]] = {i: [FlightView(A, NOW - 30.0)] for i in range(4)}
    got = decide(flights, {i: [A, B, C] for i in range(4)}, stats)
    assert sorted(h.peer for h in got) == [B, B, C, C]


@pytest.mark.parametrize("room", [0, 1, 2])
def test_no_more_hedges_than_the_room_left(room: int) -> None:
    flights: dict[int, Sequence[InFlight]] = {i: [FlightView(A, NOW - 30.0 + i)] for i in range(5)}
    got = decide(flights, {i: [A, B] for i in range(5)}, room=room)
    assert [h.index for h in got] == list(range(room))  # the oldest first


def test_a_wanted_chunks_straggler_goes_first() -> None:
    flights: dict[int, Sequence[InFlight]] = {5: [FlightView(A, NOW - 30.0)], 2: [FlightView(B, NOW - 3.0)]}
    got = decide(flights, {5: [A, C], 2: [B, C]}, room=1, wanted=frozenset({2}))
    assert [h.index for h in got] == [2]


def test_the_room_is_what_the_window_and_the_cap_leave() -> None:
    slots = Slots(window=8, flights=6, inflight=20, max_inflight=24, reserve=1)
    assert slots.fetch_room() == 1  # new requests leave the reserve
    assert slots.hedge_room(1) == 1  # the reserve is the hedges'
    assert Slots(window=8, flights=3, inflight=23, max_inflight=24, reserve=1).hedge_room() == 1
    assert Slots(window=8, flights=9, inflight=9, max_inflight=24, reserve=1).hedge_room() == 0


@dataclass
class EngineFlight:
    """The shape of the engine's own flight record: mutable, with more fields than hedging reads."""

    index: int
    peer: str
    started: float
    task: object
    queue: int = 0
    hedge: bool = False
    hedged: bool = False


def test_the_engine_flight_records_fit() -> None:
    flights = {3: [EngineFlight(3, A, NOW - 10.0, object())]}
    assert decide(flights, {3: [A, B]}) == [Hedge(3, A, B)]  # type: ignore[arg-type]


@st.composite
def in_flight(
    draw: st.DrawFn,
) -> tuple[dict[int, list[FlightView]], dict[int, list[str]], dict[str, PeerStats]]:
    indices = draw(st.sets(st.integers(0, 30), max_size=12))
    flights = {
        i: [
            FlightView(
                draw(st.sampled_from(PEERS)),
                NOW - draw(st.floats(0.0, 60.0)),
                draw(st.booleans()),
                draw(st.integers(0, 8)),
            )
            for _ in range(draw(st.integers(1, 2)))
        ]
        for i in indices
    }
    held = {i: draw(st.lists(st.sampled_from(PEERS), unique=True, max_size=4)) for i in indices}
    stats = {p: draw(peer_stats(NOW)) for p in PEERS if draw(st.booleans())}
    return flights, held, stats


Case = tuple[dict[int, list[FlightView]], dict[int, list[str]], dict[str, PeerStats]]


@given(in_flight(), st.integers(0, 2**32), st.integers(0, 12), st.sampled_from(list(Rule)))
def test_hedges_never_exceed_the_room_nor_go_to_the_straggler(
    case: Case, seed: int, room: int, rule: Rule
) -> None:
    flights, held, stats = case
    picker = Picker(stats, CHUNK, NOW, random.Random(seed), rule)
    got = hedges(flights, held, lambda f: late_at_bound(f, stats, NOW, CHUNK, FLOOR), picker, room)
    assert len(got) <= room
    assert len({h.index for h in got}) == len(got)
    for h in got:
        (f,) = flights[h.index]
        assert not f.hedged and f.peer == h.straggler
        assert late_at_bound(f, stats, NOW, CHUNK, FLOOR)
        assert h.peer != h.straggler and h.peer in held[h.index]


@given(in_flight(), st.integers(0, 2**32))
def test_with_room_every_late_lone_request_with_another_holder_is_hedged(case: Case, seed: int) -> None:
    flights, held, stats = case
    picker = Picker(stats, CHUNK, NOW, random.Random(seed))
    late = lambda f: late_by_ewma(f, stats, NOW, AFTER, CHUNK)  # noqa: E731
    got = {h.index for h in hedges(flights, held, late, picker, 100)}
    for i, fl in flights.items():
        expected = len(fl) == 1 and not fl[0].hedged and late(fl[0]) and any(p != fl[0].peer for p in held[i])
        assert (i in got) is expected


@given(in_flight(), st.integers(0, 2**32), st.integers(0, 12))
def test_a_cut_round_takes_the_head_of_the_full_order(case: Case, seed: int, room: int) -> None:
    flights, held, stats = case
    late = lambda f: late_at_bound(f, stats, NOW, CHUNK, FLOOR)  # noqa: E731
    full = hedges(flights, held, late, Picker(stats, CHUNK, NOW, random.Random(seed)), 100)
    cut = hedges(flights, held, late, Picker(stats, CHUNK, NOW, random.Random(seed)), room)
    assert cut == full[: len(cut)] and len(cut) == min(room, len(full))
