"""Who fetches which chunk from the origin: striping the uplink among the nodes of a burst.

When several nodes of a site pull the same blob at the same moment, none of them holds it yet, and
each fetching the whole blob from the origin would carry it over the slow uplink once per node.
Instead the nodes filling the blob (the *interested* nodes: ourselves plus every usable peer whose
view is not complete) split it into stripes of `stripe_chunks` consecutive chunks, dealt
round-robin over the sorted interested nodes; each node fetches its own stripes from the origin
and the rest from the peers that fetched them (they announce chunks as they land). The deal starts
at an offset taken from the digest, so the first stripes of different blobs go to different
nodes instead of all to the node with the smallest URL.

Rules, and what each protects against:

- *Agreement.* Ownership is a pure function of (interested nodes, digest, chunk index): two nodes
  with the same view of who is interested agree on every owner, so every chunk is fetched by
  exactly one node. Views differ while nodes are still joining; `gathering` waits for the burst to
  assemble before the first deal for that reason.
- *Not twice.* A chunk some usable peer holds (with our chunk size), one a peer announced it is
  fetching from the origin, or one we already have in flight is never an origin candidate. A
  stalled peer's announced fetch does not count: a node that died mid-fetch leaves its last
  announcement behind, and if it held its chunks back from everyone, nobody would fetch them.
- *Stalled owners.* An owner that is dead, partitioned or very slow would leave its stripes
  unfetched forever. A node whose holdings have not grown for `grace` seconds is *stalled* (5x as
  long while it announces an origin fetch, which may just be a slow uplink); we never consider
  ourselves stalled. A stalled owner's stripe passes to its *heir*: the first node after it in the
  ring of interested nodes that is not stalled. Exactly one node is the heir (every node computes
  the same ring and, from the same sightings, the same stalled set), so an inheritance does not
  turn into every node fetching the stripe at once. The heir chain skips stalled nodes, and since
  we are never stalled to ourselves, every stalled stripe has an heir.
- *Run length.* One origin Range request covers a run of consecutive candidates starting at the
  first one (a wanted chunk first): short (`batch_chunks`, one stripe) when other nodes are
  filling the blob, so ownership is re-planned often as nodes join, stall or finish; long
  (`solo_batch_chunks`) when we are alone, where there is nothing to re-plan and fewer, longer
  requests are cheaper.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import NamedTuple

from peer.policy.holdings import BlobView

BUSY_GRACE_FACTOR = 5  # an owner announcing an origin fetch gets this many graces before it stalls


class Sighting(NamedTuple):
    """When a peer's holdings of a blob were last seen to change."""

    held: int  # chunks it held (`BlobView.count()`)
    since: float  # when it was first seen holding that many


def track_progress(
    progress: Mapping[str, Sighting], views: Mapping[str, BlobView], now: float
) -> dict[str, Sighting]:
    """`progress` updated with `views` seen at `now`: a peer whose count of held chunks changed
    (or that is new) is sighted now; the others keep the time their count last changed. Peers
    absent from `views` keep their last sighting."""
    updated = dict(progress)
    for peer, view in views.items():
        held = view.count()
        before = updated.get(peer)
        if before is None or held != before.held:
            updated[peer] = Sighting(held, now)
    return updated


def stalled(seen: Sighting | None, fetching: bool, now: float, grace: float) -> bool:
    """Whether a node filling the blob has made no progress for too long: its holdings have not
    grown for `grace` seconds (`BUSY_GRACE_FACTOR` x `grace` while it announces an origin fetch).
    A node never sighted is not stalled: it has not had its chance yet."""
    if seen is None:
        return False
    idle = now - seen.since
    return idle > (BUSY_GRACE_FACTOR * grace if fetching else grace)


def interested(me: str, views: Mapping[str, BlobView]) -> tuple[str, ...]:
    """The nodes filling the blob right now, sorted: us, and every peer whose view is not complete
    (a peer holding the blob whole serves it, it does not share the origin work)."""
    return tuple(sorted({me, *(p for p, v in views.items() if not v.complete)}))


def stripe_offset(digest: str) -> int:
    """Where the deal of a blob's stripes starts: from its digest (`sha256:` + hex), so different
    blobs' first stripes land on different nodes."""
    return int(digest[7:15], 16)


@dataclass(frozen=True)
class Stripes:
    """The origin work of one blob as this node sees it at one moment."""

    me: str
    interested: tuple[str, ...]  # sorted, unique, includes `me`
    stalled: frozenset[str]  # interested nodes that stalled; never `me`
    offset: int  # `stripe_offset(digest)`
    stripe_chunks: int

    def __post_init__(self) -> None:
        if self.me not in self.interested:
            raise ValueError(f"{self.me!r} must be among the interested nodes")
        if list(self.interested) != sorted(set(self.interested)):
            raise ValueError("interested nodes must be sorted and unique")
        if self.me in self.stalled:
            raise ValueError("a node never considers itself stalled")
        if self.stripe_chunks < 1:
            raise ValueError("stripe_chunks must be at least 1")

    @classmethod
    def of(
        cls,
        me: str,
        digest: str,
        views: Mapping[str, BlobView],
        progress: Mapping[str, Sighting],
        now: float,
        grace: float,
        stripe_chunks: int,
    ) -> Stripes:
        """The stripes of `digest` given the usable peers' `views` and their sightings."""
        nodes = interested(me, views)
        stuck = frozenset(
            p
            for p in nodes
            if p != me and stalled(progress.get(p), p in views and bool(views[p].fetching), now, grace)
        )
        return cls(me, nodes, stuck, stripe_offset(digest), stripe_chunks)

    @property
    def solo(self) -> bool:
        """Nobody else is filling the blob: all of the origin work is ours."""
        return len(self.interested) == 1

    def owner(self, index: int) -> str:
        """Who fetches chunk `index` from the origin: stripes dealt round-robin from `offset`."""
        return self.interested[(index // self.stripe_chunks + self.offset) % len(self.interested)]

    def heir(self, owner: str) -> str | None:
        """Who takes over `owner`'s stripes if it is stalled: the first node after it in the ring
        that is not stalled (None only if every other node is stalled and `owner` is not us)."""
        at = self.interested.index(owner)
        ring = self.interested[at + 1 :] + self.interested[:at]
        return next((p for p in ring if p not in self.stalled), None)

    def due(self, index: int) -> bool:
        """Chunk `index` is ours to fetch from the origin: we own its stripe, or its owner stalled
        and we are its heir."""
        owner = self.owner(index)
        if owner == self.me:
            return True
        return owner in self.stalled and self.heir(owner) == self.me


def origin_candidates(
    missing: Iterable[int],
    busy: Set[int],
    views: Mapping[str, BlobView],
    chunk_size: int,
    stripes: Stripes,
) -> list[int]:
    """The missing chunks we should fetch from the origin, in `missing`'s order: not in flight
    here (`busy`), not announced as being fetched by a peer that has not stalled, not held by any
    usable peer with our chunk size, and due to us (`Stripes.due`)."""
    elsewhere = {i for p, v in views.items() if p not in stripes.stalled for i in v.fetching}
    same = [v for v in views.values() if v.chunk_size == chunk_size]
    return [
        i
        for i in missing
        if i not in busy and i not in elsewhere and not any(v.has(i) for v in same) and stripes.due(i)
    ]


@dataclass(frozen=True)
class OriginRun:
    """One origin Range request: chunks `first`..`last`, and why they were ours (for counters)."""

    first: int
    last: int
    solo_chunks: int  # chunks fetched because nobody else was filling the blob
    heir_chunks: int  # chunks of a stalled owner's stripe that we inherited

    @property
    def chunks(self) -> range:
        """The chunks the request covers, in order."""
        return range(self.first, self.last + 1)


def origin_run(
    candidates: Sequence[int],
    wanted: Set[int],
    stripes: Stripes,
    batch_chunks: int,
    solo_batch_chunks: int,
) -> OriginRun | None:
    """The next origin request among `candidates`: it starts at the first wanted candidate (the
    lowest candidate if none is wanted) and extends over consecutive candidates, up to
    `batch_chunks` chunks (`solo_batch_chunks` when we are alone). None without candidates."""
    if not candidates:
        return None
    first = min(candidates, key=lambda i: (i not in wanted, i))
    pool = set(candidates)
    limit = solo_batch_chunks if stripes.solo else batch_chunks
    last = first
    while last - first + 1 < limit and last + 1 in pool:
        last += 1
    run = range(first, last + 1)
    if stripes.solo:
        return OriginRun(first, last, len(run), 0)
    return OriginRun(first, last, 0, sum(stripes.owner(i) != stripes.me for i in run))
