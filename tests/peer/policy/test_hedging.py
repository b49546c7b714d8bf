"""peer.policy.hedging: which straggling requests get a second request, and to whom."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st
from policy_cases import CHUNK, PEERS, peer_stats

from peer.policy.hedging import STRAGGLER_FACTOR, FlightView, Hedge, InFlight, hedges, late
from peer.policy.peerstats import PeerStats

A, B, C = PEERS[:3]
NOW = 1000.0
AFTER = 2.0


def decide(
    flights: dict[int, Sequence[InFlight]],
    held: dict[int, list[str]],
    stats: dict[str, PeerStats] | None = None,
) -> list[Hedge]:
    return hedges(flights, held, stats or {}, NOW, AFTER, CHUNK, random.Random(3))


def test_a_young_request_is_not_hedged() -> None:
    assert decide({0: [FlightView(A, NOW - 1.0)]}, {0: [A, B]}) == []


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


def test_a_known_slow_peer_is_given_four_times_its_usual_time() -> None:
    slow = {A: PeerStats(bps=CHUNK / 2.0, latency=0.0)}  # a chunk takes it 2 s
    assert late(FlightView(A, NOW - 7.9), slow, NOW, AFTER, CHUNK) is False
    assert late(FlightView(A, NOW - 8.1), slow, NOW, AFTER, CHUNK) is True
    assert STRAGGLER_FACTOR == 4


@pytest.mark.parametrize(("age", "is_late"), [(AFTER - 0.01, False), (AFTER, False), (AFTER + 0.01, True)])
def test_a_fast_peer_is_hedged_after_hedge_after(age: float, is_late: bool) -> None:
    assert late(FlightView(A, NOW - age), {}, NOW, AFTER, CHUNK) is is_late


def test_the_hedge_goes_to_the_best_other_holder() -> None:
    stats = {B: PeerStats(bps=1e6), C: PeerStats(bps=1e9)}
    assert decide({0: [FlightView(A, NOW - 30.0)]}, {0: [A, B, C]}, stats) == [Hedge(0, A, C)]


def test_hedges_follow_the_flights_order() -> None:
    flights: dict[int, Sequence[InFlight]] = {5: [FlightView(A, 0.0)], 2: [FlightView(B, 0.0)]}
    assert [h.index for h in decide(flights, {5: [A, C], 2: [B, C]})] == [5, 2]


@dataclass
class EngineFlight:
    """The shape of the engine's own flight record: mutable, with more fields than hedging reads."""

    index: int
    peer: str
    started: float
    task: object
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
            FlightView(draw(st.sampled_from(PEERS)), NOW - draw(st.floats(0.0, 60.0)), draw(st.booleans()))
            for _ in range(draw(st.integers(1, 2)))
        ]
        for i in indices
    }
    held = {i: draw(st.lists(st.sampled_from(PEERS), unique=True, max_size=4)) for i in indices}
    stats = {p: draw(peer_stats(NOW)) for p in PEERS if draw(st.booleans())}
    return flights, held, stats


@given(in_flight(), st.integers(0, 2**32))
def test_hedges_go_to_a_different_holder_of_a_late_lone_request(
    case: tuple[dict[int, list[FlightView]], dict[int, list[str]], dict[str, PeerStats]], seed: int
) -> None:
    flights, held, stats = case
    got = hedges(flights, held, stats, NOW, AFTER, CHUNK, random.Random(seed))
    assert len({h.index for h in got}) == len(got)
    for h in got:
        (f,) = flights[h.index]
        assert not f.hedged and f.peer == h.straggler
        assert late(f, stats, NOW, AFTER, CHUNK)
        assert h.peer != h.straggler and h.peer in held[h.index]


@given(in_flight(), st.integers(0, 2**32))
def test_every_late_lone_request_with_another_holder_is_hedged(
    case: tuple[dict[int, list[FlightView]], dict[int, list[str]], dict[str, PeerStats]], seed: int
) -> None:
    flights, held, stats = case
    got = {h.index for h in hedges(flights, held, stats, NOW, AFTER, CHUNK, random.Random(seed))}
    for i, fl in flights.items():
        expected = (
            len(fl) == 1
            and not fl[0].hedged
            and late(fl[0], stats, NOW, AFTER, CHUNK)
            and any(p != fl[0].peer for p in held[i])
        )
        assert (i in got) is expected
