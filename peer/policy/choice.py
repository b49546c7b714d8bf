"""Which peer a chunk is asked from: the one with the smallest predicted upper bound on its response
time, given its queue.

## The bound rule (the default)

A chunk goes to the candidate with the smallest `score`: its `PeerStats.bound` at
`CHOICE_QUANTILE` (p95) for one chunk, at the queue the request would join, times the subnet factor
(`subnet.REMOTE_FACTOR` for a peer known to be off our subnet), times a jitter in
[1 - JITTER, 1 + JITTER]. The queue is our requests in flight to the peer *plus the chunks this round
already assigned to it*: a `Picker` lives for one round and counts its own choices, so one round
spreads its chunks over the peers as their bounds grow with their queues instead of sending every
chunk to whichever peer looked best before the round began (what the EWMA rule does). The jitter is
small (5%): it only breaks near-ties, so that nodes choosing at the same moment do not all herd
onto the same peer; exploration proper is the optimistic prior of `peerstats`. What trying a peer
costs is bounded: a peer that has never answered a chunk request holds at most `PROBES` requests
(its queue, this round's assignments included) while any other candidate has room, so a first round
over unknown peers sends each a couple of probes, not a window's worth to whichever came first.

Ties after jitter go to the smaller peer URL, so a decision is a pure function of its inputs and
the random draws: one draw per candidate, in candidate order. A caller that feeds the same
`random.Random` state gets the same choices.

## Baselines (selectable for benchmarking, `[peer] choice`)

- `ewma`: the engine's rule before the bound, kept as it was: the smallest `PeerStats.predicted`
  time (EWMA throughput and latency, the queue of requests already started, half a second per
  failure in a row), jittered by 10%, with no count of this round's assignments.
- `random`: uniformly at random among the candidates (one draw per decision).
"""

from __future__ import annotations

import enum
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from peer.policy.peerstats import CHOICE_QUANTILE, PeerStats, stat_of, waiting_per_byte
from peer.policy.subnet import Locality

JITTER = 0.05  # the bound rule's tie-breaking jitter
PROBES = 2  # requests a peer that never answered may hold, while others have room
EWMA_JITTER = 0.1  # the EWMA rule's jitter (its only exploration)


class Rule(enum.StrEnum):
    """How peers are chosen: the bound (default) or a baseline to measure it against."""

    BOUND = "bound"
    EWMA = "ewma"
    RANDOM = "random"


def score(
    st: PeerStats, nbytes: int, queue: int, now: float, factor: float = 1.0, waiting: float = 0.0
) -> float:
    """The bound rule's score of a peer with stats `st` for a request of `nbytes` joining `queue`
    of our requests in flight to it, without jitter; `factor` is its subnet factor, `waiting` what
    its requests in flight have shown (`PeerStats.bound`)."""
    return st.bound(nbytes, queue, CHOICE_QUANTILE, now, waiting) * factor


@dataclass
class Picker:
    """One round's peer choices (a `schedule.Choose`): call it with a chunk's candidates.

    Under the bound rule it counts what it assigned (`assigned`), so later chunks of the same round
    see the queues earlier ones built, and it holds each peer to what its oldest request still in
    flight has shown (`oldest`: peer -> (launched at, queue it was launched into); see
    `PeerStats.bound`'s `waiting`). Reads `stats`, never changes them."""

    stats: Mapping[str, PeerStats]
    nbytes: int
    now: float
    rng: random.Random
    rule: Rule = Rule.BOUND
    locality: Locality = field(default_factory=Locality)
    oldest: Mapping[str, tuple[float, int]] = field(default_factory=dict)
    assigned: Counter[str] = field(default_factory=Counter)

    def queue(self, peer: str) -> int:
        """Our requests in flight to `peer` plus those this round assigned to it."""
        return stat_of(self.stats, peer).inflight + self.assigned[peer]

    def score(self, peer: str) -> float:
        """`peer`'s bound-rule score now, at its current queue (no jitter)."""
        st = stat_of(self.stats, peer)
        waiting = 0.0
        if peer in self.oldest:
            started, queue = self.oldest[peer]
            # it shares the peer with the requests launched after it too
            waiting = waiting_per_byte(self.now - started, max(queue, st.inflight - 1), self.nbytes)
        return score(st, self.nbytes, self.queue(peer), self.now, self.locality.factor(peer), waiting)

    def __call__(self, candidates: Sequence[str]) -> str | None:
        """The peer to ask among `candidates` (None if there is none), counted as assigned."""
        if self.rule is Rule.RANDOM:
            peer = random_peer(candidates, self.rng)
        elif self.rule is Rule.EWMA:
            peer = ewma_peer(candidates, self.stats, self.nbytes, self.rng)
        else:
            peer = self._bound(candidates)
        if peer is not None:
            self.assigned[peer] += 1
        return peer

    def probing(self, peer: str) -> bool:
        """Whether `peer` has never answered and already holds `PROBES` requests."""
        return not len(stat_of(self.stats, peer).history) and self.queue(peer) >= PROBES

    def _bound(self, candidates: Sequence[str]) -> str | None:
        if not candidates:
            return None
        scored = [
            (self.probing(p), self.score(p) * self.rng.uniform(1 - JITTER, 1 + JITTER), p) for p in candidates
        ]
        return min(scored)[2]


def ewma_peer(
    candidates: Sequence[str], stats: Mapping[str, PeerStats], nbytes: int, rng: random.Random
) -> str | None:
    """The EWMA rule: the candidate with the smallest jittered `PeerStats.predicted` time for
    `nbytes`; None if there is none. A candidate without stats is predicted from the prior."""
    if not candidates:
        return None
    scored = [
        (stat_of(stats, p).predicted(nbytes) * rng.uniform(1 - EWMA_JITTER, 1 + EWMA_JITTER), p)
        for p in candidates
    ]
    return min(scored)[1]


def random_peer(candidates: Sequence[str], rng: random.Random) -> str | None:
    """A candidate uniformly at random (one draw); None if there is none."""
    if not candidates:
        return None
    return candidates[rng.randrange(len(candidates))]
