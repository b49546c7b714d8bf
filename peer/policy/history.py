"""What a peer's recent chunk requests did: a sliding window of transfers, the newest weighing most.

A `Transfer` is one chunk request's outcome as the engine measured it: bytes, seconds from launch
to the last byte (or to the failure), seconds to the first byte (the response headers: the
round trip plus the peer's and the link's queueing), how many of our other requests shared the peer
with it (the mean of those in flight when it was launched and when it ended), and whether it
succeeded. `History` keeps the last `WINDOW` of
them and answers weighted questions about them: quantiles, shares, sums.

Why weights, and why these:

- **Newest first.** The published PeerSync prototype kept a window whose oldest entries weighed
  most; a peer's recent behaviour is what predicts its next answer (a link that just got congested,
  a node that just started unpacking), so here the newest transfer weighs 1, the one before it
  `DECAY`, then `DECAY**2`, ... (`DECAY` = 0.9: the newest sample carries about a tenth of the
  window's weight, so one slow answer moves a p95 at once and is forgotten after about twenty more).
- **Fresh first.** Evidence also fades with time: every weight is further halved for each
  `HALF_LIFE` seconds since the transfer ended. Within one burst this barely matters; for a peer
  nobody asked for a while it means the total weight (the *evidence*, `evidence()`) shrinks, and
  `peerstats` blends a peer's estimates toward the optimistic prior as its evidence fades. That is
  how a peer measured slow once gets tried again later (exploration): stale evidence is weak
  evidence.

A weighted quantile is the smallest value whose samples at or below it carry at least that share of
the weight (`weighted_quantile`). With these weights the effective sample size is about 19, so a
p99 is close to the worst recent answer: meant as an upper bound, not a statistic.

Time comes in as `now` (the caller's clock, the one it stamped `Transfer.at` with); nothing here
reads a clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

WINDOW = 32  # transfers kept per peer
DECAY = 0.9  # weight of a transfer relative to the next newer one
HALF_LIFE = 10.0  # seconds after which a transfer's weight has halved


@dataclass(frozen=True, slots=True)
class Transfer:
    """One chunk request's outcome."""

    at: float  # when it ended (the caller's clock)
    nbytes: int  # bytes asked for
    seconds: float  # launch to the last byte, or to the failure
    latency: float  # launch to the first byte (response headers); `seconds` when unknown
    queue: float = 0.0  # our other requests in flight to the peer while it ran (launch and end, averaged)
    ok: bool = True  # False: it failed (error, timeout, bad bytes)
    censored: bool = False  # cancelled while still running (it was hedged and lost): at least `seconds`

    @property
    def per_byte(self) -> float:
        """Seconds per byte of the transfer after the first byte, times the requests that shared
        the peer's link with it (`queue + 1`): the peer's time per byte for us alone, under a
        processor-sharing view of its link. This is what lets a sample taken at one queue depth
        predict another (`peerstats`)."""
        transfer = self.seconds if self.censored else max(self.seconds - self.latency, 0.0)
        return transfer / (max(self.nbytes, 1) * (max(self.queue, 0.0) + 1))


@dataclass
class History:
    """The last `WINDOW` transfers of one peer, newest last."""

    items: deque[Transfer] = field(default_factory=lambda: deque(maxlen=WINDOW))
    added: int = 0  # transfers ever added: a version number for caches of what is derived from it

    def add(self, transfer: Transfer) -> None:
        """Record `transfer` (the oldest one falls out of a full window)."""
        self.items.append(transfer)
        self.added += 1

    def __len__(self) -> int:
        return len(self.items)

    def weighted(self, now: float) -> Iterator[tuple[Transfer, float]]:
        """Every transfer with its weight at `now`, newest first: `DECAY` per newer transfer
        times a halving per `HALF_LIFE` seconds of age (a transfer stamped after `now` has age 0)."""
        w = 1.0
        for t in reversed(self.items):
            yield t, w * 0.5 ** (max(now - t.at, 0.0) / HALF_LIFE)
            w *= DECAY

    def evidence(self, now: float, ok: bool | None = True) -> float:
        """The summed weight at `now` of the successful transfers (`ok=True`), the failed ones
        (`ok=False`) or all (`None`): how much the estimates rest on."""
        return sum(w for t, w in self.weighted(now) if ok is None or t.ok is ok)

    def quantile(
        self, q: float, now: float, value: Callable[[Transfer], float], censored: bool = True
    ) -> float | None:
        """The weighted `q`-quantile of `value` over the successful transfers (and, with
        `censored`, the hedged-and-cancelled ones, whose value is a lower bound); None when
        there are none."""
        pairs = [(value(t), w) for t, w in self.weighted(now) if t.ok and (censored or not t.censored)]
        return weighted_quantile(pairs, q)

    def mean(self, now: float, value: Callable[[Transfer], float]) -> float | None:
        """The weighted mean of `value` over the successful, uncensored transfers; None if none."""
        pairs = [(value(t), w) for t, w in self.weighted(now) if t.ok and not t.censored]
        total = sum(w for _, w in pairs)
        return sum(v * w for v, w in pairs) / total if total > 0 else None


def weighted_quantile(pairs: Iterable[tuple[float, float]], q: float) -> float | None:
    """The smallest value whose pairs at or below it carry at least `q` of the total weight
    (`pairs` are (value, weight)); None when the total weight is zero. Ties in value are merged,
    so the answer does not depend on input order."""
    ordered = sorted(pairs)
    total = sum(w for _, w in ordered)
    if total <= 0:
        return None
    target = q * total
    acc = 0.0
    for value, w in ordered:
        acc += w
        if acc >= target * (1 - 1e-12):
            return value
    return ordered[-1][0]
