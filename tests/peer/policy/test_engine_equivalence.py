"""The policy, composed the way `peer.engine` composes it, makes exactly the decisions the engine
made before the policy was taken out of it.

The reference below is the engine's own decision code as of commit 6d08a69 (`Download._schedule`,
`_best_peer`, `_window`, `_hedge`, `_track_progress`, `_origin_candidates`, `_stalled`,
`_origin_due`, `_launch_origin`'s run and counters, `want`, `_gather`'s condition and the failure
streaks of `_from_peer`/`_ask`), transcribed line for line with two substitutions: `now` instead of
`time.monotonic()`, a `random.Random` instead of the global one. Hypothesis drives both with the
same state, including the corners (dropped peers, views of another size or chunk size, complete
peers, announced origin fetches, stalled owners, hedged flights, a self URL among the peers).

This file pins "no behaviour change" for the extraction. When a rule changes on purpose, change the
reference with it in the same commit (or delete this file once the policy has moved on).

Changed on purpose since (issue 9, peer choice), and changed here with it:

- the default peer choice is now the bound rule (`choice.Picker`, tested by `test_choice.py` and
  `test_swarm.py`); the reference's `_best_peer` is the EWMA rule, which the engine still runs
  with `[peer] choice = "ewma"`, so the composition below uses `Picker(rule=Rule.EWMA)`;
- hedges count against the blob's window and the engine-wide cap: new requests stop
  `hedging.RESERVE` short of either limit (never below one request), hedges take what is left,
  stragglers of wanted chunks first, then the oldest (they used to bypass both limits, in flight
  order);
- chunk failures and poll failures are separate streaks (one of each used to suspend a peer)."""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field

from hypothesis import given
from hypothesis import strategies as st
from policy_cases import CHUNK, ME, PEERS, bitmap, digests

from peer.policy.choice import Picker, Rule
from peer.policy.gathering import gather
from peer.policy.hedging import RESERVE, hedges, late_by_ewma
from peer.policy.holdings import BlobView, holders, usable_views
from peer.policy.peerstats import PeerStats
from peer.policy.schedule import Slots, schedule, wanted_chunks
from peer.policy.striping import Sighting, Stripes, origin_candidates, origin_run, track_progress
from peer.policy.window import window

NOW = 1000.0


@dataclass
class Cfg:
    peer_window: int
    max_peer_window: int
    stripe_chunks: int
    origin_batch_chunks: int
    solo_batch_chunks: int
    owner_grace: float
    hedge_after: float
    max_inflight: int


@dataclass
class Flight:
    index: int
    peer: str
    started: float
    hedged: bool = False
    queue: int = 0


@dataclass
class State:
    """What a Download and its Engine hold that the decisions read."""

    me: str
    digest: str
    size: int
    chunk_size: int
    nchunks: int
    views: dict[str, BlobView]  # engine.views[digest]: every peer's last answer
    stats: dict[str, PeerStats]
    progress: dict[str, Sighting]
    flights: dict[int, list[Flight]]
    origin_chunks: set[int]
    wanted: set[int]
    missing: list[int]
    inflight: int  # engine-wide
    origin_only: bool
    cfg: Cfg
    hedges: int = 0
    solo: int = 0
    heir: int = 0
    launches: list[tuple[int, str, bool]] = field(default_factory=list)
    origin: tuple[int, int] | None = None


# -- the engine's decisions before the extraction (commit 6d08a69), time and randomness passed in --


class Before:
    def __init__(self, s: State, rng: random.Random) -> None:
        self.s, self.rng = s, rng

    def stat(self, p: str) -> PeerStats:
        return self.s.stats.setdefault(p, PeerStats())

    def _views(self, now: float) -> dict[str, BlobView]:
        if self.s.origin_only:
            return {}
        return {p: v for p, v in self.s.views.items() if self.stat(p).usable(now) and v.size == self.s.size}

    def _launch(self, index: int, peer: str, now: float, hedge: bool = False) -> None:
        self.s.inflight += 1
        self.s.flights.setdefault(index, []).append(Flight(index, peer, now, hedge))
        self.s.launches.append((index, peer, hedge))

    def _schedule(self, missing: list[int], now: float) -> None:
        views = self._views(now)
        in_flight = {i for i, fl in self.s.flights.items() if fl} | self.s.origin_chunks
        holders = {
            i: [p for p, v in views.items() if v.chunk_size == self.s.chunk_size and v.has(i)]
            for i in missing
        }
        peer_todo = [i for i in missing if holders[i] and i not in in_flight]
        peer_todo.sort(key=lambda i: (i not in self.s.wanted, len(holders[i]), i))
        window = self._window(now)
        busy = sum(len(fl) for fl in self.s.flights.values())
        # changed on purpose: new requests leave RESERVE of room under both limits for hedges
        fetch_window = max(min(window, 1), window - RESERVE)
        fetch_cap = max(min(self.s.cfg.max_inflight, 1), self.s.cfg.max_inflight - RESERVE)
        for i in peer_todo:
            if busy >= fetch_window or self.s.inflight >= fetch_cap:
                break
            peer = self._best_peer(holders[i])
            if peer:
                self._launch(i, peer, now)
                busy += 1
        room = max(0, min(window - busy, self.s.cfg.max_inflight - self.s.inflight))
        self._hedge(holders, now, room)
        self._track_progress(views, now)

    def _window(self, now: float) -> int:
        cfg = self.s.cfg
        stats = [self.stat(p) for p in self._views(now)]
        if not stats:
            return cfg.peer_window
        bdp = sum(s.bps * max(s.latency, 0.001) for s in stats) / self.s.chunk_size
        return int(min(cfg.max_peer_window, max(cfg.peer_window, bdp * 1.5 + len(stats))))

    def _best_peer(self, candidates: list[str]) -> str | None:
        if not candidates:
            return None
        scored = [
            (self.stat(p).predicted(self.s.chunk_size) * self.rng.uniform(0.9, 1.1), p) for p in candidates
        ]
        return min(scored)[1]

    def _interested(self, views: dict[str, BlobView]) -> list[str]:
        return sorted({self.s.me, *(p for p, v in views.items() if not v.complete)})

    def _owner(self, index: int, interested: list[str]) -> str:
        stripe = index // self.s.cfg.stripe_chunks
        return interested[(stripe + int(self.s.digest[7:15], 16)) % len(interested)]

    def _track_progress(self, views: dict[str, BlobView], now: float) -> None:
        for peer, view in views.items():
            held = view.count()
            before = self.s.progress.get(peer)
            if before is None or held != before[0]:
                self.s.progress[peer] = (held, now)

    def _stalled(self, peer: str, now: float) -> bool:
        seen = self.s.progress.get(peer)
        if seen is None:
            return False
        idle = now - seen[1]
        view = self.s.views.get(peer)
        busy = view is not None and bool(view.fetching)
        grace = self.s.cfg.owner_grace
        return idle > (5 * grace if busy else grace)

    def _origin_due(self, index: int, views: dict[str, BlobView], now: float) -> bool:
        if self.s.origin_only or not views:
            return True
        interested = self._interested(views)
        owner = self._owner(index, interested)
        if owner == self.s.me:
            return True
        if not self._stalled(owner, now):
            return False
        ring = interested[interested.index(owner) + 1 :] + interested[: interested.index(owner)]
        heir = next((p for p in ring if p == self.s.me or not self._stalled(p, now)), None)
        return heir == self.s.me

    def _hedge(self, holders: dict[int, list[str]], now: float, room: int) -> None:
        cfg = self.s.cfg
        late = []
        for index, flights in list(self.s.flights.items()):
            if len(flights) != 1 or flights[0].hedged:
                continue
            f = flights[0]
            typical = self.stat(f.peer).predicted(self.s.chunk_size)
            if now - f.started > max(cfg.hedge_after, 4 * typical):
                late.append((index, f))
        # changed on purpose: at most `room` hedges, wanted chunks' stragglers first, then the oldest
        late.sort(key=lambda x: (x[0] not in self.s.wanted, x[1].started, x[0]))
        launched = 0
        for index, f in late:
            if launched >= room:
                break
            others = [p for p in holders.get(index, []) if p != f.peer]
            peer = self._best_peer(others)
            if peer:
                f.hedged = True
                self.s.hedges += 1
                launched += 1
                self._launch(index, peer, now, hedge=True)

    def _origin_candidates(self, now: float) -> list[int]:
        views = self._views(now)
        self._track_progress(views, now)
        missing = self.s.missing
        busy = {i for i, fl in self.s.flights.items() if fl} | self.s.origin_chunks
        # changed on purpose with policy.striping: a stalled peer's announced fetch no longer counts
        elsewhere = {
            i
            for p, v in views.items()
            if p == self.s.me or v.complete or not self._stalled(p, now)
            for i in v.fetching
        }
        held = {
            i for i in missing if any(v.has(i) for v in views.values() if v.chunk_size == self.s.chunk_size)
        }
        return [
            i
            for i in missing
            if i not in busy and i not in elsewhere and i not in held and self._origin_due(i, views, now)
        ]

    def _plan_origin(self, now: float) -> None:  # after the refresh; the launch part of the old method
        take = self._origin_candidates(now)
        if take:
            take.sort(key=lambda i: (i not in self.s.wanted, i))
            self._launch_origin(take, now)

    def _launch_origin(self, candidates: list[int], now: float) -> None:
        first = candidates[0]
        run = [first]
        cand = set(candidates)
        views = self._views(now)
        cfg = self.s.cfg
        interested = self._interested(views)
        limit = cfg.origin_batch_chunks if len(interested) > 1 else cfg.solo_batch_chunks
        while len(run) < limit and run[-1] + 1 in cand:
            run.append(run[-1] + 1)
        self.s.origin_chunks = set(run)
        if len(interested) == 1:
            self.s.solo += len(run)
        else:
            self.s.heir += sum(self._owner(i, interested) != self.s.me for i in run)
        self.s.origin = (run[0], run[-1])

    def want(self, offset: int, size: int) -> None:
        cs = self.s.chunk_size
        first = offset // cs
        last = max(first, (offset + max(size, 1) - 1) // cs)
        self.s.wanted.update(range(first, min(last + 3, self.s.nchunks)))


# -- the same decisions from the policy, composed as peer.engine now composes them ------------------


class After:
    def __init__(self, s: State, rng: random.Random) -> None:
        self.s, self.rng = s, rng

    def _views(self, now: float) -> dict[str, BlobView]:
        if self.s.origin_only:
            return {}
        return usable_views(self.s.views, self.s.stats, now, self.s.size)

    def _launch(self, index: int, peer: str, now: float, hedge: bool = False) -> None:
        self.s.inflight += 1
        self.s.flights.setdefault(index, []).append(Flight(index, peer, now, hedge))
        self.s.launches.append((index, peer, hedge))

    def _schedule(self, missing: list[int], now: float) -> None:
        s, cfg = self.s, self.s.cfg
        views = self._views(now)
        in_flight = {i for i, fl in s.flights.items() if fl} | s.origin_chunks
        held = holders(views, missing, s.chunk_size)
        slots = Slots(
            window=window(
                [s.stats.setdefault(p, PeerStats()) for p in views],
                s.chunk_size,
                cfg.peer_window,
                cfg.max_peer_window,
            ),
            flights=sum(len(fl) for fl in s.flights.values()),
            inflight=s.inflight,
            max_inflight=cfg.max_inflight,
            reserve=RESERVE,
        )
        choose = Picker(s.stats, s.chunk_size, now, self.rng, Rule.EWMA)
        fetches = schedule(missing, held, s.wanted, in_flight, slots, choose)
        for fetch in fetches:
            self._launch(fetch.index, fetch.peer, now)
        late = lambda f: late_by_ewma(f, s.stats, now, cfg.hedge_after, s.chunk_size)  # noqa: E731
        for h in hedges(s.flights, held, late, choose, slots.hedge_room(len(fetches)), s.wanted):
            s.flights[h.index][0].hedged = True
            s.hedges += 1
            self._launch(h.index, h.peer, now, hedge=True)
        s.progress = track_progress(s.progress, views, now)

    def _plan_origin(self, now: float) -> None:
        s, cfg = self.s, self.s.cfg
        views = self._views(now)
        s.progress = track_progress(s.progress, views, now)
        stripes = Stripes.of(s.me, s.digest, views, s.progress, now, cfg.owner_grace, cfg.stripe_chunks)
        busy = {i for i, fl in s.flights.items() if fl} | s.origin_chunks
        take = origin_candidates(s.missing, busy, views, s.chunk_size, stripes)
        run = origin_run(take, s.wanted, stripes, cfg.origin_batch_chunks, cfg.solo_batch_chunks)
        if run is not None:
            s.origin_chunks = set(run.chunks)
            s.solo += run.solo_chunks
            s.heir += run.heir_chunks
            s.origin = (run.first, run.last)

    def want(self, offset: int, size: int) -> None:
        self.s.wanted.update(wanted_chunks(offset, size, self.s.chunk_size, self.s.nchunks))


# -- states ---------------------------------------------------------------------------------------


@st.composite
def states(draw: st.DrawFn) -> State:
    nchunks = draw(st.integers(1, 48))
    chunk_size = CHUNK
    size = nchunks * chunk_size - draw(st.integers(0, chunk_size - 1))
    me = draw(st.sampled_from([ME, PEERS[0]]))  # PEERS[0]: a peer list that names us
    names = draw(st.lists(st.sampled_from(PEERS), unique=True, max_size=7))
    views: dict[str, BlobView] = {}
    for p in names:
        kind = draw(st.sampled_from(["partial", "partial", "partial", "complete", "other-size", "other-cut"]))
        held = draw(st.sets(st.integers(0, nchunks - 1)))
        fetching = frozenset(draw(st.sets(st.integers(0, nchunks - 1), max_size=4)) - held)
        if kind == "complete":
            views[p] = BlobView("d", size, chunk_size, True, b"")
        elif kind == "other-size":
            views[p] = BlobView("d", size + 1, chunk_size, False, bitmap(held, nchunks), fetching)
        elif kind == "other-cut":
            views[p] = BlobView("d", size, chunk_size // 2, False, bitmap(held, 2 * nchunks))
        else:
            views[p] = BlobView("d", size, chunk_size, False, bitmap(held, nchunks), fetching)
    missing = sorted(draw(st.sets(st.integers(0, nchunks - 1), min_size=1)))
    flights: dict[int, list[Flight]] = {}
    for i in draw(st.sets(st.sampled_from(missing), max_size=10)):
        flights[i] = [
            Flight(
                i,
                draw(st.sampled_from(PEERS)),
                NOW - draw(st.sampled_from([0.0, 1.0, 3.0, 30.0])),
                draw(st.booleans()),
            )
            for _ in range(draw(st.integers(1, 2)))
        ]
    # The engine holds stats for every peer it heard from or sent a request to (Engine._ask and
    # Download._from_peer create them), some of them still the prior.
    known = set(views) | {f.peer for fl in flights.values() for f in fl}
    stats = {}
    for p in sorted(known | draw(st.sets(st.sampled_from(PEERS)))):
        if draw(st.booleans()):
            stats[p] = PeerStats()
            continue
        stats[p] = PeerStats(
            bps=draw(st.sampled_from([1e5, 5e6, 50e6, 1e9])),
            latency=draw(st.sampled_from([0.0, 0.005, 0.2, 1.5])),
            inflight=draw(st.integers(0, 6)),
            chunk_failures=draw(st.integers(0, 3)),
            dropped_until=draw(st.sampled_from([0.0, NOW, NOW + 5])),
        )
    grace = draw(st.sampled_from([1.0, 6.0]))
    progress = {
        p: Sighting(
            draw(st.sampled_from([-1, 0, 3])),
            NOW - draw(st.sampled_from([0.0, 0.5 * grace, 2 * grace, 4.5 * grace, 6 * grace])),
        )
        for p in draw(st.sets(st.sampled_from(PEERS)))
    }
    cfg = Cfg(
        peer_window=draw(st.integers(1, 10)),
        max_peer_window=draw(st.integers(8, 32)),
        stripe_chunks=draw(st.integers(1, 6)),
        origin_batch_chunks=draw(st.integers(1, 6)),
        solo_batch_chunks=draw(st.integers(1, 40)),
        owner_grace=grace,
        hedge_after=draw(st.sampled_from([0.3, 2.0])),
        max_inflight=draw(st.integers(1, 30)),
    )
    return State(
        me=me,
        digest=draw(digests),
        size=size,
        chunk_size=chunk_size,
        nchunks=nchunks,
        views=views,
        stats=stats,
        progress=progress,
        flights=flights,
        origin_chunks=set(draw(st.sets(st.sampled_from(missing), max_size=4))),
        wanted=set(draw(st.sets(st.sampled_from(missing), max_size=5))),
        missing=missing,
        inflight=sum(len(f) for f in flights.values()) + draw(st.integers(0, 20)),
        origin_only=draw(st.integers(0, 7)) == 0,
        cfg=cfg,
    )


def outcome(s: State) -> tuple:
    flights = {i: [(f.peer, f.started, f.hedged) for f in fl] for i, fl in s.flights.items()}
    progress = {p: tuple(v) for p, v in s.progress.items()}
    stats = {p: {k: v for k, v in vars(st).items() if not k.startswith("_")} for p, st in s.stats.items()}
    return (
        s.launches,
        flights,
        s.inflight,
        s.hedges,
        progress,
        stats,
        s.origin,
        s.origin_chunks,
        s.solo,
        s.heir,
    )


@given(states(), st.integers(0, 2**32))
def test_a_scheduling_round_decides_as_the_engine_did(state: State, seed: int) -> None:
    before, after = copy.deepcopy(state), copy.deepcopy(state)
    Before(before, random.Random(seed))._schedule(list(before.missing), NOW)
    After(after, random.Random(seed))._schedule(list(after.missing), NOW)
    assert outcome(after) == outcome(before)


@given(states())
def test_an_origin_plan_decides_as_the_engine_did(state: State) -> None:
    before, after = copy.deepcopy(state), copy.deepcopy(state)
    Before(before, random.Random(0))._plan_origin(NOW)
    After(after, random.Random(0))._plan_origin(NOW)
    assert outcome(after) == outcome(before)


@given(states(), st.integers(0, 2**32), st.lists(st.sampled_from(["schedule", "plan", "tick"]), max_size=8))
def test_rounds_in_sequence_decide_as_the_engine_did(state: State, seed: int, steps: list[str]) -> None:
    """Several rounds on evolving state: flights accumulate, sightings age, origin runs go out."""
    before, after = copy.deepcopy(state), copy.deepcopy(state)
    b, a = Before(before, random.Random(seed)), After(after, random.Random(seed))
    now = NOW
    for step in steps:
        if step == "tick":
            now += 2.5
        elif step == "schedule":
            b._schedule(list(before.missing), now)
            a._schedule(list(after.missing), now)
        else:
            b._plan_origin(now)
            a._plan_origin(now)
        assert outcome(after) == outcome(before)


@given(st.integers(1, 64), st.integers(0, 64 * CHUNK), st.integers(0, 5 * CHUNK))
def test_wanted_chunks_are_what_want_marked(nchunks: int, offset: int, size: int) -> None:
    cfg = Cfg(8, 32, 4, 4, 32, 6.0, 2.0, 24)
    template = State(
        ME, "d", nchunks * CHUNK, CHUNK, nchunks, {}, {}, {}, {}, set(), set(), [0], 0, False, cfg
    )
    before, after = copy.deepcopy(template), copy.deepcopy(template)
    Before(before, random.Random(0)).want(offset, size)
    After(after, random.Random(0)).want(offset, size)
    assert after.wanted == before.wanted


@given(
    st.dictionaries(st.sampled_from(PEERS), st.booleans()),
    st.lists(st.sampled_from(PEERS), unique=True),
    st.floats(0.0, 4.0),
)
def test_gathering_stops_when_the_engine_stopped(
    complete: dict[str, bool], usable: list[str], now: float
) -> None:
    seen = {p: BlobView("d", CHUNK, CHUNK, c, b"") for p, c in complete.items()}
    deadline = 2.0
    stopped = not seen or any(v.complete for v in seen.values())
    stopped = stopped or all(p in seen for p in usable) or now >= deadline
    assert gather(seen, usable, now, deadline).done is stopped


@given(st.lists(st.sampled_from(["chunk", "poll", "answered", "observed"]), max_size=20))
def test_failure_streaks_drop_and_suspend_as_the_engine_did(events: list[str]) -> None:
    """The engine's streaks of `_from_peer`/`_ask`, changed on purpose: each kind counts alone (the
    reference kept one counter for both, so one of each suspended a peer)."""
    chunk = poll = 0
    new = PeerStats()
    for e in events:
        if e == "chunk":  # _from_peer
            chunk += 1
            assert new.chunk_failed() is (chunk >= 3)
        elif e == "poll":  # _ask
            poll += 1
            suspend = poll >= 2
            if suspend:
                poll = 0
            assert new.poll_failed() is suspend
        elif e == "answered":
            poll = 0
            new.poll_answered()
        else:
            chunk = 0
            new.observe(CHUNK, 0.01)
        assert (new.chunk_failures, new.poll_failures) == (chunk, poll)


def test_the_reference_is_not_vacuous() -> None:
    """The generated states do make decisions: requests, hedges and origin runs all happen."""
    s = State(
        ME,
        "sha256:" + "0" * 64,
        8 * CHUNK,
        CHUNK,
        8,
        {
            PEERS[1]: BlobView("d", 8 * CHUNK, CHUNK, False, bitmap({0, 1, 2}, 8)),
            PEERS[2]: BlobView("d", 8 * CHUNK, CHUNK, False, bitmap({2}, 8)),
        },
        {},
        {},
        {2: [Flight(2, PEERS[1], NOW - 30.0)]},
        set(),
        set(),
        list(range(8)),
        1,
        False,
        Cfg(8, 32, 2, 2, 32, 6.0, 2.0, 24),
    )
    before, after = copy.deepcopy(s), copy.deepcopy(s)
    b, a = Before(before, random.Random(1)), After(after, random.Random(1))
    b._schedule(list(before.missing), NOW)
    a._schedule(list(after.missing), NOW)
    b._plan_origin(NOW)
    a._plan_origin(NOW)
    assert outcome(after) == outcome(before)
    assert before.launches == [(0, PEERS[1], False), (1, PEERS[1], False), (2, PEERS[2], True)]
    assert before.origin is not None


@dataclass
class PeerStatsBefore:
    """engine.PeerStats as of commit 6d08a69."""

    bps: float = 50e6
    latency: float = 0.005
    inflight: int = 0
    failures: int = 0
    dropped_until: float = 0.0

    def usable(self, now: float) -> bool:
        return now >= self.dropped_until

    def predicted(self, nbytes: int) -> float:
        return self.latency + (self.inflight + 1) * nbytes / max(self.bps, 1.0) + self.failures * 0.5

    def observe(self, nbytes: int, seconds: float) -> None:
        self.bps = 0.7 * self.bps + 0.3 * (nbytes / max(seconds, 1e-6))
        self.latency = 0.8 * self.latency + 0.2 * min(seconds, 5.0)
        self.failures = 0


@given(
    st.integers(0, 8),
    st.integers(0, 4),
    st.floats(0.0, 2000.0),
    st.lists(st.tuples(st.integers(0, 1 << 24), st.floats(0.0, 30.0)), max_size=10),
    st.integers(0, 1 << 24),
    st.floats(0.0, 2000.0),
)
def test_peer_measurements_and_predictions_are_the_engines(
    inflight: int,
    failures: int,
    dropped_until: float,
    samples: list[tuple[int, float]],
    nbytes: int,
    now: float,
) -> None:
    old = PeerStatsBefore(inflight=inflight, failures=failures, dropped_until=dropped_until)
    new = PeerStats(inflight=inflight, chunk_failures=failures, dropped_until=dropped_until)
    assert new.predicted(nbytes) == old.predicted(nbytes)
    for n, seconds in samples:
        old.observe(n, seconds)
        new.observe(n, seconds)
        legacy = (new.bps, new.latency, new.inflight, new.chunk_failures, new.dropped_until)
        assert legacy == (old.bps, old.latency, old.inflight, old.failures, old.dropped_until)
        assert new.predicted(nbytes) == old.predicted(nbytes)
        assert new.usable(now) is old.usable(now)
