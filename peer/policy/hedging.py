"""Which straggling peer requests get a second request, and to whom.

A peer can be slow for reasons its measurements have not caught up with yet (a busy CPU unpacking
layers, a congested link, a half-dead process); the chunk it holds up may be the one a reader is
blocked on. A request is a straggler when it has run longer than `hedge_after` seconds and longer
than 4x the time its peer is predicted to need for a chunk (a peer known to be slow is not hedged
for being its usual self). A straggler is hedged once: a second request for the same chunk goes to
the best *other* peer holding it, and whichever answers first wins (the engine cancels the twin).

Hedges are bounded: only a chunk with exactly one request in flight is hedged, so a chunk never
has more than two; a chunk nobody else holds is not hedged (there is no one to ask).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from peer.policy.choice import best_peer
from peer.policy.peerstats import PeerStats, stat_of

STRAGGLER_FACTOR = 4  # a request this many times its peer's predicted time is late


class InFlight(Protocol):
    """What hedging reads of a peer request in flight (the engine's own flight record fits)."""

    @property
    def peer(self) -> str: ...

    @property
    def started(self) -> float: ...

    @property
    def hedged(self) -> bool: ...


@dataclass(frozen=True)
class FlightView:
    """A peer request in flight, as a plain value (for callers without flight objects of their own)."""

    peer: str
    started: float
    hedged: bool = False


@dataclass(frozen=True, slots=True)
class Hedge:
    """Ask `peer` for chunk `index` too; `straggler` is the peer whose request is late."""

    index: int
    straggler: str
    peer: str


def late(
    flight: InFlight, stats: Mapping[str, PeerStats], now: float, hedge_after: float, nbytes: int
) -> bool:
    """Whether `flight` (a request for `nbytes`) has run too long: over `hedge_after` seconds and
    over `STRAGGLER_FACTOR` x its peer's predicted time."""
    typical = stat_of(stats, flight.peer).predicted(nbytes)
    return now - flight.started > max(hedge_after, STRAGGLER_FACTOR * typical)


def hedges(
    flights: Mapping[int, Sequence[InFlight]],
    holders: Mapping[int, Sequence[str]],
    stats: Mapping[str, PeerStats],
    now: float,
    hedge_after: float,
    nbytes: int,
    rng: random.Random,
) -> list[Hedge]:
    """The hedges to launch now, in `flights` order: for each chunk with a single, unhedged, late
    request, the best peer among the chunk's other `holders` (`choice.best_peer`, one draw of
    `rng` per candidate). The caller marks the straggler hedged."""
    out: list[Hedge] = []
    for index, inflight in flights.items():
        if len(inflight) != 1 or inflight[0].hedged:
            continue
        f = inflight[0]
        if late(f, stats, now, hedge_after, nbytes):
            others = [p for p in holders.get(index, []) if p != f.peer]
            peer = best_peer(others, stats, nbytes, rng)
            if peer:
                out.append(Hedge(index, f.peer, peer))
    return out
