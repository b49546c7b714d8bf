"""How popular each blob is: sliding-window request counts, per node and site-wide.

The model. A *request* of a blob is one demand for it: containerd's Info of it during a pull, a
registry-mirror GET of it, a commit of it, the start of its download. The reads that follow
(thousands of 32 KiB Reads during an unpack) are uses, not requests: they renew the blob's last
use (`kernel.store.ownership`), not its popularity. Requests of the same blob on one node within
`DEDUP` seconds are one request (a pull's Info and the download it starts are one demand).

`Window` counts requests per blob over the last `span` buckets of `width` seconds each (an hour
by default: a rollout reaches a site's nodes within minutes, and a window that remembers it for
an hour still knows the blob is hot when the next wave of nodes pulls). Buckets are aligned on
multiples of `width` since the epoch, so nodes whose clocks agree bucket alike; the window slides
one bucket at a time, so a count drops a whole bucket's worth at once, at most `width` late.
Memory is one small dict per blob requested within the window; `prune` drops the rest.

Site-wide counts. Each member reports the requests it recorded since its last report (`Window.
take_pending`: requests go into a pending tally too, cleared once the tracker has them, merged
back if the sync failed) and the tracker keeps a `SiteWindows`: one window per member, so a
member's numbers can be replaced in full (after a failover the new tracker starts empty and the
member sends its whole window) or dropped when it leaves. The site-wide count of a blob is the sum
over members: it includes the asking member's own requests.

Who uses this: the cache manager's eviction score (`eviction`), proactive replication of
site-hot blobs (`replication`), and the download engine's order across blobs once readers are
served (`by_heat`: the hotter blob's chunks first, since more of the site waits on it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

WIDTH = 60.0  # seconds per bucket
SPAN = 60  # buckets per window: one hour
DEDUP = 10.0  # seconds: requests of one blob on one node this close together are one request
SITE_WEIGHT = 0.5  # how much another member's request counts against one of ours (`heat`)


@dataclass
class Window:
    """Request counts per blob over a sliding window (see the module docstring); time passed in."""

    width: float = WIDTH
    span: int = SPAN
    dedup: float = DEDUP
    _buckets: dict[str, dict[int, int]] = field(default_factory=dict)
    _last: dict[str, float] = field(default_factory=dict)  # blob -> time of its last counted request
    _pending: dict[str, int] = field(default_factory=dict)  # counted, not yet reported to the tracker

    def _bucket(self, now: float) -> int:
        return int(now // self.width)

    def request(self, digest: str, now: float) -> bool:
        """Count a request of `digest` at `now`, unless one was counted less than `dedup` seconds
        ago; True if it was counted."""
        last = self._last.get(digest)
        if last is not None and 0.0 <= now - last < self.dedup:
            return False
        self._last[digest] = now
        self.add(digest, now, 1)
        self._pending[digest] = self._pending.get(digest, 0) + 1
        return True

    def add(self, digest: str, now: float, n: int) -> None:
        """Add `n` requests of `digest` at `now` (no dedup, no pending: what a tracker folds in)."""
        if n <= 0:
            return
        buckets = self._buckets.setdefault(digest, {})
        b = self._bucket(now)
        buckets[b] = buckets.get(b, 0) + n

    def count(self, digest: str, now: float) -> int:
        """Requests of `digest` within the window ending at `now`."""
        buckets = self._buckets.get(digest)
        if not buckets:
            return 0
        first = self._bucket(now) - self.span + 1
        return sum(n for b, n in buckets.items() if b >= first)

    def counts(self, now: float) -> dict[str, int]:
        """Every blob with requests within the window, and how many."""
        out = {d: self.count(d, now) for d in self._buckets}
        return {d: n for d, n in out.items() if n > 0}

    def prune(self, now: float) -> None:
        """Forget buckets that left the window, and blobs left with none."""
        first = self._bucket(now) - self.span + 1
        for digest in list(self._buckets):
            kept = {b: n for b, n in self._buckets[digest].items() if b >= first}
            if kept:
                self._buckets[digest] = kept
            else:
                del self._buckets[digest]
        for digest, last in list(self._last.items()):
            if now - last >= self.dedup:
                del self._last[digest]

    def take_pending(self) -> dict[str, int]:
        """The requests counted since the last take (and clears them): a member's report."""
        pending, self._pending = self._pending, {}
        return pending

    def restore_pending(self, pending: Mapping[str, int]) -> None:
        """Put back a report that did not reach the tracker, to go with the next one."""
        for digest, n in pending.items():
            self._pending[digest] = self._pending.get(digest, 0) + n

    def empty(self) -> bool:
        """True if nothing is counted (after `prune`, nothing within the window)."""
        return not self._buckets

    def forget(self, digest: str) -> None:
        """Drop everything counted of `digest`."""
        self._buckets.pop(digest, None)
        self._last.pop(digest, None)
        self._pending.pop(digest, None)


@dataclass
class SiteWindows:
    """The tracker's site-wide counts: one `Window` per member, summed per blob."""

    width: float = WIDTH
    span: int = SPAN
    members: dict[str, Window] = field(default_factory=dict)

    def _window(self, member: str) -> Window:
        w = self.members.get(member)
        if w is None:
            w = self.members[member] = Window(self.width, self.span, 0.0)
        return w

    def report(self, member: str, counts: Mapping[str, int], now: float, full: bool = False) -> None:
        """Fold in `member`'s report at `now`: requests since its last report, or (`full`) its
        whole window, which then replaces what we had of it (counted in the current bucket)."""
        if full:
            self.members.pop(member, None)
        w = self._window(member)
        for digest, n in counts.items():
            w.add(digest, now, int(n))

    def count(self, digest: str, now: float) -> int:
        """Site-wide requests of `digest` within the window."""
        return sum(w.count(digest, now) for w in self.members.values())

    def hottest(self, now: float, limit: int) -> list[tuple[str, int]]:
        """The `limit` most requested blobs site-wide, most first (ties by digest)."""
        totals: dict[str, int] = {}
        for w in self.members.values():
            for digest, n in w.counts(now).items():
                totals[digest] = totals.get(digest, 0) + n
        ranked = sorted(totals.items(), key=lambda item: (-item[1], item[0]))
        return ranked[:limit]

    def forget(self, member: str) -> None:
        """`member` left the site: its requests no longer count."""
        self.members.pop(member, None)

    def prune(self, now: float) -> None:
        """Drop what left the window, and members with nothing left in it."""
        for member, w in list(self.members.items()):
            w.prune(now)
            if w.empty():
                del self.members[member]


def heat(local: int, site: int, site_weight: float = SITE_WEIGHT) -> float:
    """How hot a blob is for this node: its own requests, plus the other members' (the site-wide
    count minus ours, never below zero) at `site_weight` each: another node's demand is served by
    its own copy first, ours by ours."""
    return local + site_weight * max(0, site - local)


def by_heat(digests: Iterable[str], local: Mapping[str, int], site: Mapping[str, int]) -> list[str]:
    """`digests` hottest first (`heat`), ties in the given order: the order in which the download
    engine spends spare capacity across blobs once every reader's chunks are asked for."""
    items = list(digests)
    index = {d: i for i, d in enumerate(items)}
    return sorted(items, key=lambda d: (-heat(local.get(d, 0), site.get(d, 0)), index[d]))


__all__ = ["DEDUP", "SITE_WEIGHT", "SPAN", "WIDTH", "SiteWindows", "Window", "by_heat", "heat"]
