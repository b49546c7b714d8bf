"""Site-wide popularity and replica counts, riding on the control plane's sync message.

One `MemberSection`/`TrackerSection` pair (`peer.control.sections`) named "popularity". Members
report the requests they counted (`peer.policy.popularity.Window`); the tracker sums them into
site-wide windows (`SiteWindows`) and answers each member with what its cache manager and its
replication need: the site-wide counts of the blobs it reported or asked about, how many *other*
members hold a complete copy of the blobs it asked about (its eviction candidates), and the
site's hottest blobs. Payloads (JSON):

    request  {"counts": {digest: [requests, size]}, "full": bool, "ask": [digest, ...]}
    reply    {"site": {digest: requests}, "replicas": {digest: n},
              "hot": [[digest, requests, size, replicas | null], ...]}

- `counts`: requests since the last report that reached a tracker; with `full` (the first sync to
  a new tracker, or after a failed full one) the member's whole window, which replaces what the
  tracker had of it. `size` is the blob's size from the manifests this member saw (its catalog),
  or -1: the tracker passes it on with the hot list, so a replicating node never takes a size
  from anywhere but a manifest.
- `ask`: at most `ASK_LIMIT` digests per sync (the cache manager rotates through its candidates).
- `hot`: at most `HOT_LIMIT` entries, most requested first.

So the section adds O(`ASK_LIMIT` + `HOT_LIMIT` + requests) to each sync, never O(site).

Replica counts come from whatever knows the site's holdings: the tracker side takes a
`ReplicaCounts` (the tracker index implements it); the default, `NoReplicaCounts`, knows nothing,
and then every replica count is unknown (None): the eviction score treats that as no other copy.

Staleness: the member keeps the last answer for `STALE_AFTER` seconds; older facts count as
unknown (a member that lost its tracker must not keep trusting that others hold a blob).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from peer.policy.popularity import SiteWindows, Window
from peer.policy.replication import HotBlob

NAME = "popularity"
ASK_LIMIT = 64
HOT_LIMIT = 16
STALE_AFTER = 120.0  # seconds
PRUNE_EVERY = 60.0  # seconds of tracker time between two prunes of the site windows


class ReplicaCounts(Protocol):
    """How many members hold a complete copy of a blob (the tracker index, or nothing)."""

    def complete_holders(self, digest: str, excluding: str) -> int | None:
        """Members other than `excluding` (a node id) holding a complete copy; None if unknown."""
        ...


class NoReplicaCounts:
    """The default `ReplicaCounts`: knows nothing, so every count is unknown."""

    def complete_holders(self, digest: str, excluding: str) -> int | None:
        return None


# -- member side -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fact:
    value: int | None
    at: float


class PopularityMember:
    """The member side: reports `window`'s requests, keeps the tracker's answers.

    `size_of(digest)` is the blob's size from a manifest (the catalog), or None; `asking()` the
    digests to ask replica counts for (bounded here to `ASK_LIMIT`); `clock` gives seconds (the
    window's time base)."""

    name = NAME

    def __init__(
        self,
        window: Window,
        size_of: Callable[[str], int | None],
        asking: Callable[[], list[str]] = list,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.window = window
        self._size_of = size_of
        self._asking = asking
        self._clock = clock
        self._sent: dict[str, int] = {}
        self._sent_full = False
        self._need_full = True
        self._site: dict[str, _Fact] = {}
        self._replicas: dict[str, _Fact] = {}
        self._hot: list[HotBlob] = []
        self._hot_at = float("-inf")

    def outgoing(self, full: bool) -> Any | None:
        now = self._clock()
        full = full or self._need_full
        if full:
            self.window.take_pending()  # the whole window goes: it contains them
            counts = self.window.counts(now)
        else:
            counts = self.window.take_pending()
        self._sent, self._sent_full = ({} if full else counts), full
        self._need_full = False
        ask = self._asking()[:ASK_LIMIT]
        if not counts and not ask and not full:
            return None
        report = {}
        for digest, n in counts.items():
            size = self._size_of(digest)
            report[digest] = [n, -1 if size is None else size]
        return {"counts": report, "full": full, "ask": ask}

    def incoming(self, reply: Any | None) -> None:
        self._sent = {}
        if not isinstance(reply, dict):
            return
        now = self._clock()
        for digest, n in _int_map(reply.get("site")).items():
            self._site[digest] = _Fact(n, now)
        for digest, n in _int_map(reply.get("replicas")).items():
            self._replicas[digest] = _Fact(n, now)
        hot = []
        for entry in reply.get("hot") or []:
            parsed = _hot_entry(entry)
            if parsed is not None:
                hot.append(parsed)
                self._site[parsed.digest] = _Fact(parsed.requests, now)
                if parsed.replicas is not None:
                    self._replicas[parsed.digest] = _Fact(parsed.replicas, now)
        self._hot, self._hot_at = hot, now
        self._expire(now)

    def failed(self) -> None:
        if self._sent_full:
            self._need_full = True
        else:
            self.window.restore_pending(self._sent)
        self._sent = {}

    # what the cache manager and replication read (`peer.cache.SiteView`)

    def site_requests(self, digest: str) -> int | None:
        """Site-wide requests of `digest` within the window, or None if not known (lately)."""
        return self._fresh(self._site.get(digest))

    def replicas(self, digest: str) -> int | None:
        """Other members holding a complete copy of `digest`, or None if not known (lately)."""
        return self._fresh(self._replicas.get(digest))

    def hot(self) -> list[HotBlob]:
        """The site's hottest blobs as of the last answer ([] once that is stale)."""
        return list(self._hot) if self._clock() - self._hot_at < STALE_AFTER else []

    def _fresh(self, fact: _Fact | None) -> int | None:
        if fact is None or self._clock() - fact.at >= STALE_AFTER:
            return None
        return fact.value

    def _expire(self, now: float) -> None:
        for facts in (self._site, self._replicas):
            for digest in [d for d, f in facts.items() if now - f.at >= STALE_AFTER]:
                del facts[digest]


# -- tracker side ------------------------------------------------------------------------------


class PopularityTracker:
    """The tracker side: site-wide windows of the members' requests, and the answers."""

    name = NAME

    def __init__(self, replicas: ReplicaCounts | None = None, site: SiteWindows | None = None) -> None:
        self.replicas: ReplicaCounts = replicas if replicas is not None else NoReplicaCounts()
        self.site = site if site is not None else SiteWindows()
        self._sizes: dict[str, int] = {}
        self._pruned = float("-inf")

    def handle(self, member: str, payload: Any, now: float) -> Any | None:
        if not isinstance(payload, dict):
            return None
        counts: dict[str, int] = {}
        raw = payload.get("counts")
        for digest, value in (raw.items() if isinstance(raw, dict) else ()):
            if not (isinstance(digest, str) and isinstance(value, list) and len(value) == 2):
                continue
            n, size = value
            if isinstance(n, int) and n > 0:
                counts[digest] = n
            if isinstance(size, int) and size >= 0:
                self._sizes.setdefault(digest, size)
        self.site.report(member, counts, now, full=bool(payload.get("full")))
        if now - self._pruned >= PRUNE_EVERY:
            self._prune(now)
        ask = [d for d in payload.get("ask") or [] if isinstance(d, str)][:ASK_LIMIT]
        replicas = {}
        for digest in ask:
            n = self.replicas.complete_holders(digest, member)
            if n is not None:
                replicas[digest] = n
        hot = [
            [d, n, self._sizes.get(d, -1), self.replicas.complete_holders(d, member)]
            for d, n in self.site.hottest(now, HOT_LIMIT)
        ]
        return {
            "site": {d: self.site.count(d, now) for d in {*counts, *ask}},
            "replicas": replicas,
            "hot": hot,
        }

    def forget(self, member: str) -> None:
        self.site.forget(member)

    def reset(self) -> None:
        self.site = SiteWindows(self.site.width, self.site.span)
        self._sizes.clear()

    def _prune(self, now: float) -> None:
        self.site.prune(now)
        known = {d for w in self.site.members.values() for d in w.counts(now)}
        self._sizes = {d: s for d, s in self._sizes.items() if d in known}
        self._pruned = now


def _int_map(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, int) and v >= 0}


def _hot_entry(entry: Any) -> HotBlob | None:
    if not (isinstance(entry, list) and len(entry) == 4):
        return None
    digest, n, size, replicas = entry
    if not (isinstance(digest, str) and isinstance(n, int) and isinstance(size, int)):
        return None
    if replicas is not None and not isinstance(replicas, int):
        return None
    return HotBlob(digest, n, size, replicas)


__all__ = ["ASK_LIMIT", "HOT_LIMIT", "NAME", "NoReplicaCounts", "PopularityMember", "PopularityTracker",
           "ReplicaCounts", "STALE_AFTER"]
