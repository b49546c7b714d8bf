"""Which straggling peer requests get a second request, and to whom.

A peer can be slow for reasons its measurements have not caught up with yet (a busy CPU unpacking
layers, a congested link, a half-dead process); the chunk it holds up may be the one a reader is
blocked on. A straggler is hedged once: a second request for the same chunk goes to the best *other*
peer holding it, and whichever answers first wins (the engine cancels the twin).

**When a request is late** (`late_at_bound`, the bound rule): once it has run past `SLACK` times
its peer's predicted upper bound at `HEDGE_QUANTILE` (p99, `PeerStats.bound`) for the queue it
shares the peer with (the larger of the queue it was launched into and the peer's queue now:
requests launched after it slow it down too), and past a small floor (`floor`,
`EngineConfig.hedge_floor`: a LAN round trip is not worth a second request). That is hedging at the
bound: a request past the p99 of its peer's recent answers is, by the model's own account, not
behaving like them, so asking another peer is worth the bytes. The slack (25%) is there because
the bound is blended with an optimistic prior and drawn from about 19 effective samples: without it
a well-measured peer answering exactly as usual would be hedged whenever it is a hair slower than
its best recent answers, and every hedge costs a chunk's bytes. A peer known to be slow is not
hedged for being its usual self (its bound is high), and a probe of a peer we have little evidence
about (optimistic prior, see `peerstats`) is hedged soon if it disappoints, which is what makes
exploration cheap. The EWMA and random baselines keep the rule the engine had before
(`late_by_ewma`): over `hedge_after` seconds and over `STRAGGLER_FACTOR` x the EWMA prediction.

**Bounds.** Only a chunk with exactly one request in flight is hedged, so a chunk never has more
than two; a chunk nobody else holds is not hedged; the hedge never goes to the straggler. Hedges
count against the blob's window and the engine-wide cap like any request (`schedule.Slots`;
new requests leave `RESERVE` of room for them): at most `room` hedges start in a round, wanted
chunks' stragglers first, then the oldest.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Protocol

from peer.policy.peerstats import HEDGE_QUANTILE, PeerStats, stat_of
from peer.policy.schedule import Choose

STRAGGLER_FACTOR = 4  # EWMA rule: a request this many times its peer's predicted time is late
RESERVE = 1  # room under the window and the cap that new requests leave for hedges
SLACK = 1.25  # bound rule: a request is late past this many times its p99 bound


class InFlight(Protocol):
    """What hedging reads of a peer request in flight (the engine's own flight record fits)."""

    @property
    def peer(self) -> str: ...

    @property
    def started(self) -> float: ...

    @property
    def hedged(self) -> bool: ...

    @property
    def queue(self) -> int: ...


@dataclass(frozen=True)
class FlightView:
    """A peer request in flight, as a plain value (for callers without flight objects of their own)."""

    peer: str
    started: float
    hedged: bool = False
    queue: int = 0  # our other requests in flight to `peer` when it was launched


@dataclass(frozen=True, slots=True)
class Hedge:
    """Ask `peer` for chunk `index` too; `straggler` is the peer whose request is late."""

    index: int
    straggler: str
    peer: str


Late = Callable[[InFlight], bool]


def late_at_bound(
    flight: InFlight, stats: Mapping[str, PeerStats], now: float, nbytes: int, floor: float
) -> bool:
    """Whether `flight` (a request for `nbytes`) has run past its peer's p99 bound for the queue
    it shares the peer with (launched into, or now if larger) times `SLACK`, and past `floor`
    seconds."""
    st = stat_of(stats, flight.peer)
    bound = st.bound(nbytes, max(flight.queue, st.inflight - 1), HEDGE_QUANTILE, now)
    return now - flight.started > max(floor, SLACK * bound)


def late_by_ewma(
    flight: InFlight, stats: Mapping[str, PeerStats], now: float, hedge_after: float, nbytes: int
) -> bool:
    """The EWMA rule: whether `flight` has run over `hedge_after` seconds and over
    `STRAGGLER_FACTOR` x its peer's EWMA-predicted time."""
    typical = stat_of(stats, flight.peer).predicted(nbytes)
    return now - flight.started > max(hedge_after, STRAGGLER_FACTOR * typical)


def hedges(
    flights: Mapping[int, Sequence[InFlight]],
    holders: Mapping[int, Sequence[str]],
    late: Late,
    choose: Choose,
    room: int,
    wanted: Set[int] = frozenset(),
) -> list[Hedge]:
    """The hedges to launch now: for chunks with a single, unhedged, `late` request, the peer
    `choose` picks among the chunk's other `holders`; at most `room` of them, stragglers of
    `wanted` chunks first, then the oldest, then by chunk. `choose` is called once per hedge
    considered, in that order (a `choice.Picker` counts what it assigns). The caller marks the
    straggler hedged."""
    stragglers = [
        (index, fl[0]) for index, fl in flights.items() if len(fl) == 1 and not fl[0].hedged and late(fl[0])
    ]
    stragglers.sort(key=lambda s: (s[0] not in wanted, s[1].started, s[0]))
    out: list[Hedge] = []
    for index, f in stragglers:
        if len(out) >= room:
            break
        others = [p for p in holders.get(index, []) if p != f.peer]
        peer = choose(others) if others else None
        if peer:
            out.append(Hedge(index, f.peer, peer))
    return out
