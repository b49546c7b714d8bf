"""What this node measured of one peer, across blobs, and the upper bound on its response time.

## The model

The idea is the Tail-Learning seed (Zhang et al., "Tail-Learning: Adaptive Learning Method for
Mitigating Tail Latency in Autonomous Edge Systems", arXiv 2312.16883), applied to peers instead of
edge servers: choose the server by a learned *upper bound* on its response time rather than by an
average, because a request's cost is its tail. What we took: an upper bound per server, conditioned
on the server's queue, learned online from observed response times, and used both to pick a server
and to decide when a request has taken too long. What we changed: the paper derives the bound from
a queueing model's Laplace transform and feeds it to a reinforcement learner; here the bound comes
straight from weighted empirical quantiles of a short window of recent transfers (`history`), under
a processor-sharing view of the peer's link, and exploration comes from optimistic priors whose weight
returns as evidence goes stale. Every piece is a few lines of arithmetic a simulator can replay.

For a request of `n` bytes to a peer with `k` of our requests already in flight (those started and
those this round already assigned, see `choice`), at quantile `p` (`CHOICE_QUANTILE` = 0.95 to
choose, `HEDGE_QUANTILE` = 0.99 to hedge):

    bound = L_p + (k + 1) * n * X_p + FAILURE_COST * f / (1 - f)

- `L_p` is the `p`-quantile of the time to the first byte (round trip plus queueing at the peer and
  on its link) over the window;
- `X_p` is the `p`-quantile of the per-byte time of a transfer *normalised by the queue it saw*
  (`Transfer.per_byte`: the seconds after the first byte, divided by the bytes and by the requests
  that shared the link with it, the mean of those in flight at its launch and at its end). Under
  processor sharing `k + 1` requests each get `1/(k+1)` of the link, so multiplying back by `k + 1`
  conditions the bound on the queue the new request will see; the bound is monotone in the queue
  and in `n` by construction. Summing two marginal quantiles over-covers the joint one: an upper
  bound, as intended. Requests still in flight are evidence too: when the caller passes the oldest
  one's age (`waiting`), `X_p` is at least what that age implies (a request in flight for a second
  says the peer's tail is at least that long, before it has answered: without this, a peer we just
  sent its first requests to would keep its optimistic prior, and more requests, until one
  answered);
- `f` is the weighted share of failed chunk requests in the window (timeouts, errors, bad bytes),
  each costing about a retry elsewhere (`FAILURE_COST` seconds); capped at `MAX_FAILURE_SHARE`.

**Learned online, with exploration.** Each estimate (`L_p`, `X_p`, `f`) is blended with a prior
by evidence: `(E * estimate + PRIOR_WEIGHT * prior) / (E + PRIOR_WEIGHT)`, where `E` is the summed
weight of the window (`History.evidence`: recent and fresh transfers weigh most). The prior is
optimistic (a 1 Gbit/s LAN peer, `PRIOR_BPS`, 2 ms to the first byte, no failures), so a peer never
measured is tried at once, and a peer measured slow drifts back toward the prior as its evidence ages
(half-life `history.HALF_LIFE`) until it is tried again: that is the exploration, and it is bounded
by cost. A peer `r` times slower than the best alternative is retried only when its evidence has
faded enough for the blend to undercut that alternative's bound at its queue; a single new sample
restores the evidence and pushes it back. What a probe may cost is capped twice: a peer that has
never answered holds at most `choice.PROBES` requests, and a probe that runs past its (optimistic)
bound is hedged to another peer (`hedging`).

**Failures.** Chunk failures and `/have` poll failures are separate streaks: `CHUNK_FAILURES_TO_DROP`
failed chunk requests in a row drop a peer (it is broken for us; it also pays `f` in the bound),
`POLL_FAILURES_TO_SUSPEND` unanswered polls in a row suspend it (dead or partitioned; retried after
a while). One of each no longer suspends a peer: a chunk timeout on a saturated link says the peer
is slow, not gone. A dropped or suspended peer is not asked for anything until `dropped_until`
(`holdings.usable_views`).

**Also kept:** the exponentially weighted moving averages of throughput (weight 0.3 per new sample)
and latency (0.2, each sample capped at 5 s) that the engine chose peers by before this model
(`predicted`, the `ewma` rule of `choice`, kept as a benchmark baseline) and that size the window
(`window.window`, the bandwidth-delay product).

Parameters, and why: `WINDOW` 32 transfers and `DECAY` 0.9 (`history`): about 19 effective samples,
enough for a p95 to mean something yet reacting to one slow answer; `HALF_LIFE` 10 s: a burst's
evidence lasts the burst, a peer untried for half a minute is mostly prior again; `PRIOR_WEIGHT`
0.5: half a fresh sample, so the first measurement dominates at once; `FAILURE_COST` 2 s: about a
hedge's delay plus a second request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypedDict

from peer.policy.history import History, Transfer

CHUNK_FAILURES_TO_DROP = 3  # failed chunk requests in a row that drop a peer
POLL_FAILURES_TO_SUSPEND = 2  # unanswered /have polls in a row that suspend a peer
FAILURE_PENALTY = 0.5  # EWMA rule: seconds added to a peer's prediction per failure in a row
LATENCY_SAMPLE_CAP = 5.0  # EWMA rule: one very slow answer moves the latency estimate by at most this

CHOICE_QUANTILE = 0.95  # the bound a chunk's peer is chosen by
HEDGE_QUANTILE = 0.99  # the bound past which a request is hedged
PRIOR_BPS = 125e6  # optimistic prior: a 1 Gbit/s LAN peer ...
PRIOR_LATENCY = 0.002  # ... answering its first byte in 2 ms ...
PRIOR_WEIGHT = 0.5  # ... believed as much as half a fresh sample
FAILURE_COST = 2.0  # seconds a failed request costs (a hedge's delay and a second request)
MAX_FAILURE_SHARE = 0.9  # a peer failing more than this is as bad as one failing this much


@dataclass
class PeerStats:
    """What we measured of one peer, across blobs (see the module docstring)."""

    bps: float = 50e6  # EWMA of throughput (the ewma rule's prior: a LAN peer)
    latency: float = 0.005  # EWMA of latency
    inflight: int = 0  # our requests to it in flight, counted from their launch
    chunk_failures: int = 0  # failed chunk requests since its last successful one
    poll_failures: int = 0  # unanswered /have polls since its last answer
    dropped_until: float = 0.0
    dropped_why: str = ""  # "dropped" (misbehaved) or "suspended" (unreachable) while dropped
    history: History = field(default_factory=History)
    chunks: int = 0  # chunk requests it answered, ever
    bytes: int = 0  # ... and their bytes
    # estimates at (history version, quantile, now): a round asks for the same ones many times
    _estimates: dict[tuple[int, float, float], Estimate] = field(
        default_factory=dict, compare=False, repr=False
    )

    def usable(self, now: float) -> bool:
        """Not dropped at `now`."""
        return now >= self.dropped_until

    # -- measurements -------------------------------------------------------------------------

    def observe(
        self,
        nbytes: int,
        seconds: float,
        *,
        latency: float | None = None,
        queue: float = 0,
        now: float = 0.0,
    ) -> None:
        """A request for `nbytes` completed in `seconds` (first byte after `latency`, launched
        sharing the peer with `queue` of our other requests on average; ended at `now`): fold it into
        the window and the averages; the chunk failure streak ends."""
        self.bps = 0.7 * self.bps + 0.3 * (nbytes / max(seconds, 1e-6))
        self.latency = 0.8 * self.latency + 0.2 * min(seconds, LATENCY_SAMPLE_CAP)
        self.chunk_failures = 0
        self.chunks += 1
        self.bytes += nbytes
        first = seconds if latency is None else min(max(latency, 0.0), seconds)
        self.history.add(Transfer(now, nbytes, seconds, first, queue))

    def chunk_failed(
        self, *, nbytes: int = 0, seconds: float = 0.0, queue: float = 0, now: float = 0.0
    ) -> bool:
        """A chunk request failed after `seconds` (launched with `queue` in flight; ended at `now`);
        True when the peer should be dropped (`CHUNK_FAILURES_TO_DROP` in a row). The streak is not
        reset: every further failure drops it again."""
        self.chunk_failures += 1
        self.history.add(Transfer(now, nbytes, seconds, seconds, queue, ok=False))
        return self.chunk_failures >= CHUNK_FAILURES_TO_DROP

    def outrun(self, nbytes: int, seconds: float, *, queue: float = 0, now: float = 0.0) -> None:
        """A request was hedged and cancelled after `seconds` because its twin answered first:
        it would have taken at least that long. Recorded as a censored sample (it counts towards
        the per-byte time, not the first-byte time), so a peer that stalls is not chosen again
        just because its stalled requests never finished."""
        self.history.add(Transfer(now, nbytes, seconds, 0.0, queue, censored=True))

    def poll_failed(self) -> bool:
        """A `/have` poll went unanswered; True when the peer should be suspended
        (`POLL_FAILURES_TO_SUSPEND` in a row). The streak restarts after a suspension, so a peer
        that comes back gets the same two chances. Chunk failures are a separate streak."""
        self.poll_failures += 1
        if self.poll_failures >= POLL_FAILURES_TO_SUSPEND:
            self.poll_failures = 0
            return True
        return False

    def poll_answered(self) -> None:
        """A `/have` poll was answered: the peer is alive, its poll failure streak ends."""
        self.poll_failures = 0

    def drop(self, now: float, seconds: float, why: str = "dropped") -> None:
        """Ignore the peer for `seconds` from `now`; `why` is "dropped" (it misbehaved) or
        "suspended" (it stopped answering)."""
        self.dropped_until = now + seconds
        self.dropped_why = why

    # -- predictions --------------------------------------------------------------------------

    def predicted(self, nbytes: int) -> float:
        """The EWMA rule's predicted seconds to receive `nbytes` given the queue we already put on
        this peer (the engine's rule before the bound; `choice.ewma_peer`)."""
        return (
            self.latency
            + (self.inflight + 1) * nbytes / max(self.bps, 1.0)
            + self.chunk_failures * FAILURE_PENALTY
        )

    def bound(self, nbytes: int, queue: int, quantile: float, now: float, waiting: float = 0.0) -> float:
        """The predicted upper bound (at `quantile`) on the seconds a request for `nbytes` takes
        when launched with `queue` of our other requests in flight to this peer (module docstring).
        `waiting` is a lower bound on the per-byte time from requests still in flight
        (`waiting_per_byte`)."""
        return self.estimate(quantile, now).bound(nbytes, queue, waiting)

    def estimate(self, quantile: float, now: float) -> Estimate:
        """The parts of the bound at `quantile` that do not depend on the request (the first-byte
        time, the per-byte time, the failure share), blended with the prior; computed once per
        (window version, quantile, now) and kept until the window changes."""
        key = (self.history.added, quantile, now)
        cached = self._estimates.get(key)
        if cached is not None:
            return cached
        h = self.history
        evidence = h.evidence(now)
        first = _blend(h.quantile(quantile, now, _first_byte, censored=False), PRIOR_LATENCY, evidence)
        per_byte = _blend(h.quantile(quantile, now, _per_byte), 1.0 / PRIOR_BPS, evidence)
        est = Estimate(first, per_byte, self.failure_share(now))
        if len(self._estimates) >= 8 or any(k[0] != key[0] for k in self._estimates):
            self._estimates.clear()
        self._estimates[key] = est
        return est

    def failure_share(self, now: float) -> float:
        """The weighted share of failed chunk requests in the window, blended with the prior of
        none, at most `MAX_FAILURE_SHARE`."""
        failed = self.history.evidence(now, ok=False)
        total = self.history.evidence(now, ok=None)
        return min(MAX_FAILURE_SHARE, failed / (total + PRIOR_WEIGHT))

    def throughput(self, now: float) -> float:
        """Bytes per second the peer's link gives us when we are its only load: the inverse of the
        weighted median queue-normalised per-byte time (the prior when unmeasured)."""
        per_byte = _blend(
            self.history.quantile(0.5, now, _per_byte), 1.0 / PRIOR_BPS, self.history.evidence(now)
        )
        return 1.0 / max(per_byte, 1e-12)

    def rtt(self, now: float) -> float:
        """The weighted median seconds to the first byte (the prior when unmeasured)."""
        h = self.history
        return _blend(h.quantile(0.5, now, _first_byte, censored=False), PRIOR_LATENCY, h.evidence(now))

    def response(self, quantile: float, now: float) -> float | None:
        """The weighted `quantile` of the response times observed (launch to last byte, any queue;
        hedged-and-cancelled requests at their time so far); None when nothing was measured."""
        return self.history.quantile(quantile, now, _seconds)

    def figures(self, now: float, score: float, same_subnet: bool | None) -> PeerFigures:
        """What `Engine.peers()` shows of this peer (`PeerFigures`); `score` is `choice.score`'s."""
        return PeerFigures(
            throughput=self.throughput(now),
            rtt=self.rtt(now),
            p95=self.response(0.95, now),
            p99=self.response(0.99, now),
            score=score,
            inflight=self.inflight,
            chunk_failures=self.chunk_failures,
            poll_failures=self.poll_failures,
            failure_share=self.failure_share(now),
            chunks=self.chunks,
            bytes=self.bytes,
            samples=len(self.history),
            same_subnet=same_subnet,
            state=self.state(now),
        )

    def state(self, now: float) -> str:
        """ "dropped" or "suspended" while ignored, "new" before any chunk request ended, else "ok"."""
        if not self.usable(now):
            return self.dropped_why or "dropped"
        return "new" if not len(self.history) else "ok"


@dataclass(frozen=True, slots=True)
class Estimate:
    """A peer's bound, less the request: `bound()` adds the request's size and queue."""

    first: float  # seconds to the first byte (L_p)
    per_byte: float  # seconds per byte for us alone (X_p)
    failure: float  # the failure share (f)

    def bound(self, nbytes: int, queue: int, waiting: float = 0.0) -> float:
        """L_p + (queue + 1) * nbytes * max(X_p, waiting) + FAILURE_COST * f / (1 - f)."""
        per_byte = max(self.per_byte, waiting)
        f = self.failure
        return self.first + (max(queue, 0) + 1) * nbytes * per_byte + FAILURE_COST * f / (1 - f)


def waiting_per_byte(age: float, queue: int, nbytes: int) -> float:
    """The per-byte time (as `Transfer.per_byte` counts it) a request of `nbytes` launched `age`
    seconds ago into `queue` of our other requests has already shown, unfinished: the lower bound
    its eventual sample will respect."""
    return max(age, 0.0) / (max(nbytes, 1) * (max(queue, 0) + 1))


def _first_byte(t: Transfer) -> float:
    return t.latency


def _per_byte(t: Transfer) -> float:
    return t.per_byte


def _seconds(t: Transfer) -> float:
    return t.seconds


def _blend(estimate: float | None, prior: float, evidence: float) -> float:
    """The estimate weighed by its evidence against the prior's `PRIOR_WEIGHT`."""
    if estimate is None or evidence <= 0:
        return prior
    return (evidence * estimate + PRIOR_WEIGHT * prior) / (evidence + PRIOR_WEIGHT)


def stat_of(stats: Mapping[str, PeerStats], peer: str) -> PeerStats:
    """`peer`'s stats, or the prior for a peer never measured (a fresh object: the caller may
    not change the shared mapping through it)."""
    st = stats.get(peer)
    return st if st is not None else PeerStats()


class PeerFigures(TypedDict):
    """One peer as `Engine.peers()` (and `GET /peersync/v1/peers`, `peersync peers`) shows it.

    Times are seconds, rates bytes per second, all as this node measured them:

    - `throughput`: the peer's link to us when we are its only load (`PeerStats.throughput`)
    - `rtt`: median time to the first byte of a chunk (`PeerStats.rtt`)
    - `p95`, `p99`: observed response times of its chunk requests (None before any)
    - `score`: the bound a chunk would be chosen by now, at its current queue, subnet preference
      included (`choice.score`); lower is better
    - `inflight`: our requests to it in flight
    - `chunk_failures`, `poll_failures`: the current failure streaks; `failure_share`: the
      weighted share of failed chunk requests in the window
    - `chunks`, `bytes`: chunk requests it answered, ever, and their bytes
    - `samples`: transfers in the window; `same_subnet`: True, False, or None when unknown
    - `state`: "ok", "new" (never measured), "dropped" (misbehaved) or "suspended" (unreachable)
    """

    throughput: float
    rtt: float
    p95: float | None
    p99: float | None
    score: float
    inflight: int
    chunk_failures: int
    poll_failures: int
    failure_share: float
    chunks: int
    bytes: int
    samples: int
    same_subnet: bool | None
    state: str
