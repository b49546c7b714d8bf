"""A small discrete-event simulation of one node downloading a blob from peers, in simulated time,
driving the policy as `peer.engine` composes it: `schedule` with a `choice.Picker`, `hedging`
within the same slots, every outcome fed back into `PeerStats` (success, and the censored sample
of a hedged straggler cancelled because its twin won).

The peers' links are processor sharing: the requests in transfer at a peer share its rate equally
(what TCP flows through one tbf-shaped link roughly do). A request first waits its peer's latency
(to its first byte), then transfers its bytes. A peer's rate is piecewise constant over time (so a
peer can slow down or recover mid-download), and a peer may join the holders late.

Deterministic: the only randomness is the seeded `random.Random` the policy draws from. The policy
tests use it to check shares, reactions and tails in simulated seconds (never wall-clock time)."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from peer.policy.choice import Picker, Rule
from peer.policy.hedging import RESERVE, InFlight, hedges, late_at_bound, late_by_ewma
from peer.policy.peerstats import PeerStats
from peer.policy.schedule import Slots, schedule

MB = 1e6 / 8  # bytes per second in one Mbit/s


@dataclass
class SimPeer:
    """A peer holding the whole blob: rates [(from time, bytes per second), ...], a latency."""

    name: str
    rates: list[tuple[float, float]]
    latency: float = 0.001
    joins: float = 0.0  # when it starts to hold the blob (is offered as a candidate)

    def rate(self, t: float) -> float:
        current = self.rates[0][1]
        for start, r in self.rates:
            if start <= t + 1e-12:
                current = r
        return current

    def changes(self) -> list[float]:
        return [start for start, _ in self.rates[1:]] + [self.joins]


@dataclass
class Request:
    """A request in flight (a `hedging.InFlight`)."""

    index: int
    peer: str
    started: float
    queue: int
    nbytes: int
    hedge: bool = False
    hedged: bool = False
    first_byte: float = 0.0
    remaining: float = 0.0


@dataclass
class Launch:
    t: float
    index: int
    peer: str
    hedge: bool


@dataclass
class Landing:
    t: float
    index: int
    peer: str
    seconds: float  # the request's response time
    chunk_seconds: float  # from the chunk's first request


@dataclass
class Result:
    launches: list[Launch] = field(default_factory=list)
    landings: list[Landing] = field(default_factory=list)  # requests whose bytes were used
    stats: dict[str, PeerStats] = field(default_factory=dict)
    end: float = 0.0
    hedges: int = 0
    peak_flights: int = 0

    def share(self, peer: str, since: float = 0.0, until: float = float("inf")) -> float:
        """The share of stored chunks `peer` delivered among those landed in [since, until)."""
        got = [x for x in self.landings if since <= x.t < until]
        return sum(x.peer == peer for x in got) / max(len(got), 1)

    def launched(self, peer: str, since: float = 0.0, until: float = float("inf")) -> int:
        return sum(1 for x in self.launches if x.peer == peer and since <= x.t < until)

    def chunk_quantile(self, q: float) -> float:
        values = sorted(x.chunk_seconds for x in self.landings)
        return values[min(len(values) - 1, int(q * len(values)))]

    def counts(self) -> Counter[str]:
        return Counter(x.peer for x in self.landings)


class Swarm:
    """One downloader, `peers` holding the blob of `nchunks` chunks of `chunk` bytes."""

    def __init__(
        self,
        peers: Sequence[SimPeer],
        nchunks: int,
        chunk: int = 1 << 20,
        rule: Rule = Rule.BOUND,
        seed: int = 0,
        window: int = 8,
        max_inflight: int = 24,
        tick: float = 0.05,
        floor: float = 0.05,
        hedge_after: float = 2.0,
        stats: dict[str, PeerStats] | None = None,
        start: float = 0.0,
    ) -> None:
        self.peers = {p.name: p for p in peers}
        self.nchunks, self.chunk, self.rule = nchunks, chunk, rule
        self.rng = random.Random(seed)
        self.window, self.max_inflight, self.tick = window, max_inflight, tick
        self.floor, self.hedge_after = floor, hedge_after
        self.stats: dict[str, PeerStats] = stats if stats is not None else {}
        self.t = start

    def stat(self, peer: str) -> PeerStats:
        return self.stats.setdefault(peer, PeerStats())

    def run(self, max_seconds: float = 3600.0) -> Result:
        res = Result(stats=self.stats)
        missing = set(range(self.nchunks))
        asked: dict[int, float] = {}
        flights: dict[int, list[Request]] = {}
        t0 = self.t
        while missing:
            t = self.t
            if t - t0 > max_seconds:
                raise AssertionError(f"download did not finish in {max_seconds} simulated seconds")
            self._plan(t, missing, flights, asked, res)
            res.peak_flights = max(res.peak_flights, sum(len(f) for f in flights.values()))
            active = [r for fl in flights.values() for r in fl]
            # The next event: a first byte, a completion, a rate change, a join, or a planning tick.
            events = [t0 + (math.floor((t - t0) / self.tick + 1e-9) + 1) * self.tick]
            events += [c for p in self.peers.values() for c in p.changes() if c > t + 1e-12]
            for r in active:
                if r.first_byte > t + 1e-12:
                    events.append(r.first_byte)
            for name, sharing in self._transferring(active, t).items():
                rate = self.peers[name].rate(t) / len(sharing)
                events += [t + r.remaining / rate for r in sharing]
            nxt = min(events)
            for name, sharing in self._transferring(active, t).items():
                rate = self.peers[name].rate(t) / len(sharing)
                for r in sharing:
                    r.remaining -= rate * (nxt - t)
            self.t = t = nxt
            for r in active:
                if r.first_byte <= t + 1e-12 and r.remaining <= 1e-3:
                    self._land(r, t, missing, flights, asked, res)
        res.end = self.t
        return res

    def _transferring(self, active: list[Request], t: float) -> dict[str, list[Request]]:
        out: dict[str, list[Request]] = {}
        for r in active:
            if r.first_byte <= t + 1e-12 and r.remaining > 1e-3:
                out.setdefault(r.peer, []).append(r)
        return out

    def _plan(
        self,
        t: float,
        missing: set[int],
        flights: dict[int, list[Request]],
        asked: dict[int, float],
        res: Result,
    ) -> None:
        holders = [p.name for p in self.peers.values() if p.joins <= t + 1e-12]
        held = {i: holders for i in missing}
        busy = {i for i, fl in flights.items() if fl}
        n = sum(len(fl) for fl in flights.values())
        slots = Slots(self.window, n, n, self.max_inflight, RESERVE)
        oldest: dict[str, tuple[float, int]] = {}
        for r in sorted((r for fl in flights.values() for r in fl), key=lambda r: -r.started):
            oldest[r.peer] = (r.started, r.queue)
        picker = Picker(self.stats, self.chunk, t, self.rng, self.rule, oldest=oldest)
        fetches = schedule(sorted(missing), held, set(), busy, slots, picker)
        for f in fetches:
            self._launch(f.index, f.peer, t, False, flights, asked, res)
        stats, chunk = self.stats, self.chunk

        def late(f: InFlight) -> bool:
            if self.rule is Rule.BOUND:
                return late_at_bound(f, stats, t, chunk, self.floor)
            return late_by_ewma(f, stats, t, self.hedge_after, chunk)

        for h in hedges(flights, held, late, picker, slots.hedge_room(len(fetches))):
            flights[h.index][0].hedged = True
            res.hedges += 1
            self._launch(h.index, h.peer, t, True, flights, asked, res)

    def _launch(
        self,
        index: int,
        peer: str,
        t: float,
        hedge: bool,
        flights: dict[int, list[Request]],
        asked: dict[int, float],
        res: Result,
    ) -> None:
        st = self.stat(peer)
        r = Request(index, peer, t, st.inflight, self.chunk, hedge, hedge)
        r.first_byte = t + self.peers[peer].latency
        r.remaining = float(self.chunk)
        st.inflight += 1
        asked.setdefault(index, t)
        flights.setdefault(index, []).append(r)
        res.launches.append(Launch(t, index, peer, hedge))

    def _land(
        self,
        r: Request,
        t: float,
        missing: set[int],
        flights: dict[int, list[Request]],
        asked: dict[int, float],
        res: Result,
    ) -> None:
        if r not in flights.get(r.index, []):
            return  # cancelled earlier in this same event
        st = self.stat(r.peer)
        shared = (r.queue + st.inflight - 1) / 2  # launch and end, as the engine counts it
        st.inflight -= 1
        st.observe(r.nbytes, t - r.started, latency=r.first_byte - r.started, queue=shared, now=t)
        flights[r.index].remove(r)
        if r.index in missing:
            missing.discard(r.index)
            res.landings.append(Landing(t, r.index, r.peer, t - r.started, t - asked.pop(r.index)))
            for twin in flights.pop(r.index, []):
                tw = self.stat(twin.peer)
                tw.inflight -= 1
                if twin.hedged and not twin.hedge:
                    tw.outrun(twin.nbytes, t - twin.started, queue=twin.queue, now=t)
        if not flights.get(r.index):
            flights.pop(r.index, None)
