"""What this node measured of one peer, across blobs, and what it predicts from it.

The model is deliberately small: exponentially weighted moving averages of throughput (bytes per
second, weight 0.3 for a new sample) and of latency (weight 0.2, each sample capped at 5 s so one
pathological request does not poison the estimate for minutes), the number of requests we have
queued on the peer, and the failures since its last success. A new peer starts with an optimistic
LAN prior, so it gets tried (exploration) rather than starved by peers we already measured.

The predicted time to receive `nbytes` is latency + the transfer of everything queued on the peer
plus this request + half a second per recent failure: a busy or flaky peer looks slower, so work
spreads away from it before it has to be dropped.

Failures drop a peer (`dropped_until`): three failed chunk requests in a row (it is broken for us),
or two unanswered `/have` polls in a row (dead or partitioned; suspended for a short while and
retried). A dropped peer is not asked for anything until `dropped_until` (`holdings.usable_views`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

CHUNK_FAILURES_TO_DROP = 3  # failed chunk requests in a row that drop a peer
POLL_FAILURES_TO_SUSPEND = 2  # unanswered /have polls in a row that suspend a peer
FAILURE_PENALTY = 0.5  # seconds added to a peer's prediction per failure since its last success
LATENCY_SAMPLE_CAP = 5.0  # seconds: one very slow answer moves the latency estimate by at most this


@dataclass
class PeerStats:
    """What we measured of one peer, across blobs."""

    bps: float = 50e6  # optimistic prior: a LAN peer
    latency: float = 0.005
    inflight: int = 0
    failures: int = 0
    dropped_until: float = 0.0

    def usable(self, now: float) -> bool:
        """Not dropped at `now`."""
        return now >= self.dropped_until

    def predicted(self, nbytes: int) -> float:
        """Predicted seconds to receive `nbytes` given the queue we already put on this peer."""
        return (
            self.latency + (self.inflight + 1) * nbytes / max(self.bps, 1.0) + self.failures * FAILURE_PENALTY
        )

    def observe(self, nbytes: int, seconds: float) -> None:
        """A request for `nbytes` completed in `seconds`: fold it into the averages; the failure
        streak ends."""
        self.bps = 0.7 * self.bps + 0.3 * (nbytes / max(seconds, 1e-6))
        self.latency = 0.8 * self.latency + 0.2 * min(seconds, LATENCY_SAMPLE_CAP)
        self.failures = 0

    def chunk_failed(self) -> bool:
        """A chunk request failed; True when the peer should be dropped (`CHUNK_FAILURES_TO_DROP`
        in a row). The streak is not reset: every further failure drops it again."""
        self.failures += 1
        return self.failures >= CHUNK_FAILURES_TO_DROP

    def poll_failed(self) -> bool:
        """A `/have` poll went unanswered; True when the peer should be suspended
        (`POLL_FAILURES_TO_SUSPEND` in a row). The streak restarts after a suspension, so a peer
        that comes back gets the same two chances."""
        self.failures += 1
        if self.failures >= POLL_FAILURES_TO_SUSPEND:
            self.failures = 0
            return True
        return False

    def poll_answered(self) -> None:
        """A `/have` poll was answered: the peer is alive, its failure streak ends."""
        self.failures = 0

    def drop(self, now: float, seconds: float) -> None:
        """Ignore the peer for `seconds` from `now`."""
        self.dropped_until = now + seconds


def stat_of(stats: Mapping[str, PeerStats], peer: str) -> PeerStats:
    """`peer`'s stats, or the prior for a peer never measured (a fresh object: the caller may
    not change the shared mapping through it)."""
    st = stats.get(peer)
    return st if st is not None else PeerStats()
