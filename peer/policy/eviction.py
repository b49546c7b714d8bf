"""Which cache-only blobs go when the store is over its budget, and in what order.

Only cache-only blobs are candidates (`kernel.store.ownership`: containerd's, held, pinned and
in-flight blobs are protected and never chosen). Each candidate gets a *score*, the value of
keeping it here; the lowest score goes first:

    score = (1 + heat) * 2 ** (-age / half_life) / (1 + replicas)

    heat      = local + site_weight * max(0, site - local)          (`popularity.heat`)
                local: this node's requests of the blob within the popularity window;
                site: the site-wide requests (ours included), from the tracker; 0 if unknown
    age       = now - last use (seconds; a blob never used has age `now`: it goes first)
    replicas  = how many *other* members hold a complete copy (from the tracker); unknown = 0

Why this shape: recency is the base (a blob used a moment ago is worth twice one used a half-life
ago: the LRU order when nothing else is known); each request in the window adds the worth of one
fresh use, so a blob the site keeps asking for outlives one used once a little later; and a blob
other members hold costs little to lose (the LAN serves it again at LAN speed), so its worth is
divided among the copies. Defaults: half-life one hour (the popularity window's span), another
member's request worth half of ours, hot at 2 site-wide requests in the window.

The last copy of a hot blob. A candidate whose site-wide count (or ours, when the site's is not
known) reaches `hot`, and which no other member holds (replicas 0 or unknown: a node that cannot
ask assumes it holds the last copy), is in the second tier: it is evicted only when every first-
tier candidate is gone and the store is still over the budget itself, not merely over the high
watermark. Ties within a tier go to the older last use, then the bigger blob (fewer evictions),
then the digest, so the order is total and every node computes the same one.

`plan` applies the watermarks: first-tier candidates go in order while usage is above `target`
(the low watermark), second-tier ones while it is above `budget`; it says whether the store then
fits. The cache manager (`peer.cache`) measures, calls it and evicts; admission of a new download
calls it with the download's size added and refuses the download if the plan does not fit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from peer.policy.popularity import SITE_WEIGHT, heat

HALF_LIFE = 3600.0  # seconds
HOT = 2  # site-wide requests within the window that make a blob hot


@dataclass(frozen=True)
class Weights:
    """The score's constants (the module docstring says why these defaults)."""

    half_life: float = HALF_LIFE
    site_weight: float = SITE_WEIGHT
    hot: int = HOT


@dataclass(frozen=True)
class Candidate:
    """What the score needs of one blob. `last_use` is in seconds (Unix time, 0: never)."""

    digest: str
    size: int
    last_use: float
    local: int = 0
    site: int = 0
    replicas: int | None = None
    protected: bool = False


@dataclass(frozen=True)
class Plan:
    """What to evict, in order, and where that leaves the store."""

    evict: tuple[str, ...]
    freed: int
    usage: int  # after the evictions
    fits: bool  # usage <= budget


def score(c: Candidate, now: float, w: Weights = Weights()) -> float:
    """The value of keeping `c` (the module docstring's formula); lowest is evicted first."""
    age = max(0.0, now - c.last_use)
    replicas = max(0, c.replicas or 0)
    recency: float = 2.0 ** (-age / w.half_life)
    return (1.0 + heat(c.local, c.site, w.site_weight)) * recency / (1 + replicas)


def last_hot_copy(c: Candidate, w: Weights = Weights()) -> bool:
    """True if `c` is hot and no other member is known to hold it (the second tier)."""
    return max(c.site, c.local) >= w.hot and not c.replicas


def eviction_key(c: Candidate, now: float, w: Weights = Weights()) -> tuple[int, float, float, int, str]:
    """The sort key of the eviction order: (tier, score, last use, -size, digest)."""
    return (int(last_hot_copy(c, w)), score(c, now, w), c.last_use, -c.size, c.digest)


def order(candidates: Iterable[Candidate], now: float, w: Weights = Weights()) -> list[Candidate]:
    """The evictable candidates (never a protected one), first to evict first."""
    return sorted((c for c in candidates if not c.protected), key=lambda c: eviction_key(c, now, w))


def plan(
    candidates: Iterable[Candidate], usage: int, target: int, budget: int, now: float, w: Weights = Weights()
) -> Plan:
    """Evictions that bring `usage` to `target` (first tier) and in any case within `budget`
    (second tier too, as a last resort); see the module docstring."""
    target = min(target, budget)
    chosen: list[str] = []
    freed = 0
    for c in order(candidates, now, w):
        limit = budget if last_hot_copy(c, w) else target
        if usage - freed <= limit:
            if limit == target:
                continue  # the first tier is done; a second-tier blob may still be needed
            break
        chosen.append(c.digest)
        freed += c.size
    after = usage - freed
    return Plan(tuple(chosen), freed, after, after <= budget)


__all__ = ["HALF_LIFE", "HOT", "Candidate", "Plan", "Weights", "eviction_key", "last_hot_copy", "order",
           "plan", "score"]
