"""Proactive replication: which site-hot blob an idle node fetches from its peers, if any.

A blob many nodes of the site request but few hold is one whose holders serve everyone: their
links are the bottleneck of the next wave of pulls, and if they evict it (or die) the next pull
crosses the uplink again. An idle node with room in its budget takes a copy, from peers only.

The trigger, all of which must hold (`pick`):

- the node is idle: no download of its own ran or started for `idle_for` seconds (replication
  only ever uses capacity nothing else wants), and the last replication started at least
  `interval` seconds ago;
- the blob is hot site-wide: at least `hot` requests within the popularity window (the tracker's
  `hottest` list, which is bounded);
- it is scarce but available: at least one other member holds a complete copy (so it comes from
  peers, never from the origin: replication must not add uplink traffic) and fewer than
  `target_replicas` do;
- it is not here already (complete or partial), and not *shunned*: evicted by this node recently
  or failed recently (fetching back what the cache just let go would churn);
- it fits the room below the low watermark (`room`: low watermark x budget - usage; None when
  there is no budget), so a replica never causes an eviction.

Among those, the one with the most requests per existing copy, then the smaller, then by digest.
The bound: one replication at a time per node (the caller waits for it to end), at most one start
per `interval`, never more bytes than the room; a site of N idle nodes adds at most N copies per
interval, and a blob stops qualifying once `target_replicas` members hold it (the tracker's
replica counts catch up within a sync or two, so a burst may overshoot by the nodes that picked it
in the same interval).

The size of a hot blob is the one members took from the manifests that name it (they report it
with their requests); the download still verifies every chunk and the whole digest.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from dataclasses import dataclass

HOT = 3  # site-wide requests within the window
TARGET_REPLICAS = 2  # complete copies in the site that are enough
IDLE_FOR = 30.0  # seconds without a download of our own
INTERVAL = 60.0  # seconds between two replications started


@dataclass(frozen=True)
class HotBlob:
    """A site-hot blob as the tracker reports it: site-wide requests, size (from manifests), and
    how many members hold a complete copy (None: the tracker does not know)."""

    digest: str
    requests: int
    size: int
    replicas: int | None


@dataclass(frozen=True)
class Limits:
    """The trigger's thresholds and bounds (the module docstring)."""

    hot: int = HOT
    target_replicas: int = TARGET_REPLICAS
    idle_for: float = IDLE_FOR
    interval: float = INTERVAL


def idle(busy_until: float, last_started: float, now: float, limits: Limits = Limits()) -> bool:
    """True if no download ran after `busy_until` for `idle_for` seconds and the last replication
    started `interval` seconds ago or more."""
    return now - busy_until >= limits.idle_for and now - last_started >= limits.interval


def pick(
    hot: Iterable[HotBlob],
    here: Container[str],
    shunned: Container[str],
    room: int | None,
    limits: Limits = Limits(),
) -> HotBlob | None:
    """The blob to replicate now, or None (the caller checked `idle`)."""
    eligible = [
        h
        for h in hot
        if h.requests >= limits.hot
        and h.replicas is not None
        and 1 <= h.replicas < limits.target_replicas
        and h.size >= 0
        and (room is None or h.size <= room)
        and h.digest not in here
        and h.digest not in shunned
    ]
    if not eligible:
        return None
    return min(eligible, key=lambda h: (-h.requests / (1 + (h.replicas or 0)), h.size, h.digest))


__all__ = ["HOT", "INTERVAL", "IDLE_FOR", "TARGET_REPLICAS", "HotBlob", "Limits", "idle", "pick"]
