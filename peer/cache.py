"""The cache manager: keeps the store within its disk budget, and admits downloads that fit.

It owns the *when* and the I/O; the *what* comes from pure policy (`peer.policy.eviction`, over
the popularity of `peer.policy.popularity`), and *what may go at all* from the store's ownership
model (`kernel.store.ownership`: only cache-only blobs are ever evicted).

Budget. `[cache] budget` is bytes or a share of the filesystem holding the root, resolved at each
check (`kernel.config.Budget.bytes_for`), so it follows a resized disk; "" means no budget (then
nothing is ever evicted or refused). Usage counts complete blobs, partial blobs at their full
size, ingests (`ChunkStore.usage`) and downloads admitted but not claimed yet.

When. `check` runs after every download ends, after containerd commits or Deletes a blob
(`changed`), and every `interval` seconds (`gc` every `GC_EVERY`): above `high_watermark` x budget
it evicts down to `low_watermark` x budget, in the order of the eviction score, and the last copy
of a hot blob only if nothing else can go and the budget itself is exceeded. Admission (`admit`,
called by the engine before a new download claims its blob): a download that fits below the high
watermark starts at once; otherwise the plan is computed with its size added, and it starts after
those evictions, or is refused with `ResourceExhausted` (gRPC RESOURCE_EXHAUSTED, HTTP 507 from
the mirror) naming the budget, when even evicting every evictable blob would not make room. So the
store never grows past the budget through downloads. What containerd writes itself is admitted the
same way (`admit_write`, from the content store's `CacheHooks`): a new ingest of a known size
makes room or is refused, because in full mode a download the daemon refused is fetched by
containerd from the next host in hosts.toml and written here. Only writes of unknown size, and the
manifests the mirror keeps (small), go unadmitted: the check after them evicts.

Uses. `used(digest, request)` renews a blob's last use (kept in LMDB by the store's ownership
records, written in batches every `interval`, on `stop` and before any eviction, so a restart
keeps last uses and pins) and, for a request, counts toward its popularity (`Window`). What the
site says comes in through a `SiteView` (the control plane's popularity section,
`peer.control.popularity.PopularityMember`); without one, every site count and replica count is
unknown.

Checks, admission and evictions run on the event loop: planning reads the blob records (one LMDB
pass), each eviction is an unlink, a directory fsync and one transaction, a few milliseconds.

API for the `peersync cache` CLI (over the admin socket; every call is synchronous and runs on
the event loop, like the daemon's own checks):

    cache_status()   -> dict: budget (bytes, the configured text, the filesystem size), the two
                        watermarks (ratio and bytes), usage by side (complete, partial, ingest,
                        reserved, total), blob counts by state (containerd, held, pinned, in_use,
                        cache_only, partial; a blob in several protected states counts in each),
                        cache-only bytes, evictions since start (count, bytes, the last few,
                        refused downloads), the pins, and the next evictions in score order
    pin(digest)      -> bool (False: pinned already); NotFound unless complete or partial here
    unpin(digest)    -> bool (False: was not pinned)
    pins()           -> [digest, ...]
    evict(digest)    -> bytes freed; FailedPrecondition (with why) if it is not cache-only
    gc()             -> dict {forgotten, evicted, freed}: writes the last uses, drops ownership
                        records of blobs that are not here and that nothing keeps (and, for a
                        containerd flag on a download that never finished, unused for
                        `STALE_FLAG` seconds), then runs a check
    check()          -> [digest, ...] evicted (what the daemon runs on its own)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from kernel.config import CacheConfig, parse_budget
from kernel.errors import FailedPrecondition, NotFound, PeerSyncError, ResourceExhausted
from kernel.store.chunkstore import ChunkStore, Usage
from peer.policy import eviction
from peer.policy.eviction import Candidate, Weights
from peer.policy.popularity import Window
from peer.policy.replication import HotBlob

log = structlog.get_logger(__name__)

INTERVAL = 30.0  # seconds between two periodic checks
TOUCH_EVERY = 1.0  # seconds: uses of one blob closer together than this renew its last use once
STALE_FLAG = 600.0  # seconds: gc drops a containerd flag on a digest absent and unused this long
NEXT_SHOWN = 16  # next evictions listed in cache_status
LAST_SHOWN = 16  # evictions remembered for cache_status and for replication's shunning
ASKED = 64  # eviction candidates whose replica counts are asked of the tracker
GC_EVERY = 3600.0  # seconds between two gc runs of the periodic loop


class SiteView(Protocol):
    """What the site says about blobs (the control plane's popularity section)."""

    def site_requests(self, digest: str) -> int | None:
        """Site-wide requests of `digest` within the popularity window; None if unknown."""
        ...

    def replicas(self, digest: str) -> int | None:
        """Other members holding a complete copy of `digest`; None if unknown."""
        ...

    def hot(self) -> list[HotBlob]:
        """The site's hottest blobs (for replication)."""
        ...


class NoSite:
    """The `SiteView` of a node without a tracker: nothing is known."""

    def site_requests(self, digest: str) -> int | None:
        return None

    def replicas(self, digest: str) -> int | None:
        return None

    def hot(self) -> list[HotBlob]:
        return []


@dataclass(frozen=True)
class Eviction:
    """One blob evicted: what `cache_status` and replication remember of it."""

    digest: str
    size: int
    at: float


class CacheManager:
    """The budget, admission, eviction and pins of one store (the module docstring)."""

    def __init__(
        self,
        store: ChunkStore,
        config: CacheConfig,
        site: SiteView | None = None,
        window: Window | None = None,
        weights: Weights | None = None,
        clock: Callable[[], float] = time.time,
        interval: float = INTERVAL,
        filesystem_bytes: Callable[[], int] | None = None,
    ) -> None:
        """`clock` gives Unix seconds (last uses are wall-clock times that survive restarts);
        `filesystem_bytes` the size of the filesystem holding the root (default: statvfs)."""
        self.store = store
        self.owners = store.owners
        self.config = config
        self.budget_spec = parse_budget(config.budget, "cache.budget")
        self.site: SiteView = site if site is not None else NoSite()
        self.window = window if window is not None else Window()
        self.weights = weights if weights is not None else Weights()
        self.clock = clock
        self.interval = interval
        self._fs_bytes = filesystem_bytes or self._statvfs
        self._reserved: dict[str, int] = {}  # admitted downloads, until they end
        self._writing: dict[str, int] = {}  # admitted ingests, until they exist
        self._touched: dict[str, float] = {}
        self.evictions = 0
        self.evicted_bytes = 0
        self.refused = 0
        self.recent: deque[Eviction] = deque(maxlen=LAST_SHOWN)
        self._order: list[str] = []  # the eviction order at the last check (front first)
        self._kick: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    # -- budget and usage --------------------------------------------------------------------

    def _statvfs(self) -> int:
        st = os.statvfs(self.store.root)
        return st.f_blocks * st.f_frsize

    def budget(self) -> int | None:
        """The budget in bytes now; None if there is none."""
        return self.budget_spec.bytes_for(self._fs_bytes())

    def usage(self) -> tuple[Usage, int]:
        """(the store's usage, bytes reserved for admitted downloads not yet claimed)."""
        used = self.store.usage()
        reserved = sum(self._writing.values())
        for digest, size in list(self._reserved.items()):
            if not self._claimed(digest):
                reserved += size
        return used, reserved

    def _claimed(self, digest: str) -> bool:
        if self.store.exists(digest):
            return True
        try:
            self.store.partials.record(digest)
        except NotFound:
            return False
        return True

    # -- uses --------------------------------------------------------------------------------

    def used(self, digest: str, request: bool = False) -> None:
        """A use of `digest` (a request counts toward its popularity). Cheap; never raises."""
        now = self.clock()
        if request:
            self.window.request(digest, now)
        last = self._touched.get(digest)
        if last is None or not 0.0 <= now - last < TOUCH_EVERY:
            self._touched[digest] = now
            self.owners.touch(digest, int(now * 1e9))

    def changed(self) -> None:
        """The store grew or a blob became cache-only: check soon."""
        if self._kick is not None:
            self._kick.set()

    # -- admission (the engine's `Cache`) ----------------------------------------------------

    def admit(self, digest: str, size: int) -> None:
        """Make room for a download of `size` bytes, or refuse it (the module docstring)."""
        self._make_room(f"blob {digest}", size)
        self._reserved[digest] = size

    def admit_write(self, ref: str, size: int) -> None:
        """Make room for an ingest containerd opens (it fetches a blob itself), or refuse it; the
        room is held until `wrote(ref)`, after which the ingest's record counts itself."""
        self._make_room(f"a write of {ref!r}", size)
        self._writing[ref] = size

    def wrote(self, ref: str) -> None:
        """The ingest `ref` exists now (or its opening failed)."""
        self._writing.pop(ref, None)

    def _make_room(self, what: str, size: int) -> None:
        budget = self.budget()
        if budget is None:
            return
        used, reserved = self.usage()
        total = used.total + reserved + size
        if total <= self.config.high_watermark * budget:
            return
        plan = eviction.plan(self._candidates(), total, int(self.config.low_watermark * budget), budget,
                             self.clock(), self.weights)
        if not plan.fits:
            self.refused += 1
            protected = total - size - self._evictable_bytes()
            raise ResourceExhausted(
                f"{what} ({_fmt(size)}) does not fit the cache budget of {_fmt(budget)} "
                f"(cache.budget = {self.config.budget!r}): {_fmt(protected)} of the store is protected "
                f"(containerd's, held, pinned or in flight) and cannot be evicted; raise the budget, "
                f"unpin blobs or remove images"
            )
        self._evict(plan.evict)

    def finished(self, digest: str) -> None:
        """The download of `digest` ended (complete or not): its reservation goes; check soon."""
        self._reserved.pop(digest, None)
        self.changed()

    # -- eviction ----------------------------------------------------------------------------

    def _candidates(self) -> list[Candidate]:
        now = self.clock()
        out = []
        for rec in self.store.iter_blobs():
            d = rec.digest
            out.append(Candidate(
                d, rec.size, self.owners.last_use_ns(d) / 1e9, self.window.count(d, now),
                self.site.site_requests(d) or 0, self.site.replicas(d), self.owners.protected(d),
            ))
        return out

    def _evictable_bytes(self) -> int:
        return sum(c.size for c in self._candidates() if not c.protected)

    def check(self) -> list[str]:
        """Evict down to the low watermark if usage is above the high one; the digests evicted."""
        budget = self.budget()
        candidates = self._candidates()
        now = self.clock()
        self._order = [c.digest for c in eviction.order(candidates, now, self.weights)]
        if budget is None:
            return []
        used, reserved = self.usage()
        total = used.total + reserved
        if total <= self.config.high_watermark * budget:
            return []
        plan = eviction.plan(candidates, total, int(self.config.low_watermark * budget), budget, now,
                             self.weights)
        evicted = self._evict(plan.evict)
        if not plan.fits:
            log.warning("store over its cache budget, nothing left to evict", usage=total, budget=budget)
        return evicted

    def _evict(self, digests: tuple[str, ...] | list[str]) -> list[str]:
        done = []
        self.owners.flush()
        for digest in digests:
            try:
                size = self.store.evict(digest)
            except (FailedPrecondition, NotFound):
                continue  # taken back, pinned or gone since the plan: the next check replans
            done.append(digest)
            self.evictions += 1
            self.evicted_bytes += size
            self.recent.append(Eviction(digest, size, self.clock()))
            self._order = [d for d in self._order if d != digest]
            log.info("evicted cache-only blob", digest=digest, size=size)
        return done

    def asking(self) -> list[str]:
        """The eviction candidates to ask the site's replica counts of: the front of the order."""
        return self._order[:ASKED]

    def recently_evicted(self) -> set[str]:
        """Digests this node evicted lately (replication does not fetch them back)."""
        return {e.digest for e in self.recent}

    def room(self) -> int | None:
        """Bytes free below the low watermark (None without a budget): what replication may use."""
        budget = self.budget()
        if budget is None:
            return None
        used, reserved = self.usage()
        return max(0, int(self.config.low_watermark * budget) - used.total - reserved)

    # -- the CLI's calls ---------------------------------------------------------------------

    def pin(self, digest: str) -> bool:
        """Pin a blob that is here (complete or partial); False if it was pinned already."""
        if not self._claimed(digest):
            raise NotFound(f"content {digest}: not here (pin what a pull brought, or is bringing)")
        return self.owners.pin(digest)

    def unpin(self, digest: str) -> bool:
        """Unpin; False if it was not pinned. The blob may be evicted from the next check on."""
        changed = self.owners.unpin(digest)
        if changed:
            self.changed()
        return changed

    def pins(self) -> list[str]:
        """The pinned digests."""
        return self.owners.pinned()

    def evict(self, digest: str) -> int:
        """Evict one cache-only blob now; the bytes freed. FailedPrecondition if it is protected."""
        self.owners.flush()
        size = self.store.evict(digest)
        self.evictions += 1
        self.evicted_bytes += size
        self.recent.append(Eviction(digest, size, self.clock()))
        return size

    def gc(self) -> dict[str, Any]:
        """Write last uses, forget what nothing keeps, then check (the module docstring)."""
        self.owners.flush()
        now = self.clock()
        forgotten = 0
        for rec in self.owners.records():
            if rec.held or rec.pinned or self._claimed(rec.digest) or rec.digest in self._reserved:
                continue
            if rec.containerd and now - rec.last_use_ns / 1e9 < STALE_FLAG:
                continue  # a lazy blob containerd took a moment ago: its download may start yet
            self.owners.forget_flags(rec.digest)
            forgotten += 1
        self.window.prune(now)
        before = self.evicted_bytes
        evicted = self.check()
        return {"forgotten": forgotten, "evicted": evicted, "freed": self.evicted_bytes - before}

    def cache_status(self) -> dict[str, Any]:
        """Where the cache stands (the module docstring lists the keys)."""
        fs = self._fs_bytes()
        budget = self.budget_spec.bytes_for(fs)
        used, reserved = self.usage()
        now = self.clock()
        candidates = self._candidates()
        states = {"containerd": 0, "held": 0, "pinned": 0, "in_use": 0, "cache_only": 0,
                  "partial": used.partial_blobs}
        cache_only_bytes = 0
        for c in candidates:
            rec = self.owners.record(c.digest)
            for flag in ("containerd", "held", "pinned"):
                if rec is not None and getattr(rec, flag):
                    states[flag] += 1
            if self.owners.in_use(c.digest):
                states["in_use"] += 1
            if not c.protected:
                states["cache_only"] += 1
                cache_only_bytes += c.size
        ordered = eviction.order(candidates, now, self.weights)
        return {
            "budget": budget,
            "budget_config": self.config.budget,
            "filesystem_bytes": fs,
            "high_watermark": self.config.high_watermark,
            "low_watermark": self.config.low_watermark,
            "high_bytes": None if budget is None else int(self.config.high_watermark * budget),
            "low_bytes": None if budget is None else int(self.config.low_watermark * budget),
            "usage": {"complete": used.complete_bytes, "partial": used.partial_bytes,
                      "ingest": used.ingest_bytes, "reserved": reserved, "total": used.total + reserved},
            "blobs": {**states, "complete": used.complete_blobs, "ingests": used.ingests},
            "cache_only_bytes": cache_only_bytes,
            "evictions": {
                "count": self.evictions,
                "bytes": self.evicted_bytes,
                "refused_downloads": self.refused,
                "last": [{"digest": e.digest, "size": e.size, "at": e.at} for e in self.recent],
            },
            "pins": self.pins(),
            "next": [
                {"digest": c.digest, "size": c.size, "score": eviction.score(c, now, self.weights),
                 "last_use": c.last_use, "local": c.local, "site": c.site, "replicas": c.replicas,
                 "last_hot_copy": eviction.last_hot_copy(c, self.weights)}
                for c in ordered[:NEXT_SHOWN]
            ],
        }

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the periodic check (on the running loop)."""
        self._kick = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="cache manager")

    async def _run(self) -> None:
        assert self._kick is not None
        last_gc = self.clock()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), timeout=self.interval)
            self._kick.clear()
            now = self.clock()
            try:
                if now - last_gc >= GC_EVERY:
                    self.gc()  # checks too
                    last_gc = now
                else:
                    self.check()
                self.owners.flush()
                self.window.prune(now)
                self._touched = {d: t for d, t in self._touched.items() if 0.0 <= now - t < TOUCH_EVERY}
            except (PeerSyncError, OSError) as exc:  # a failed check must not end the loop
                log.warning("cache check failed", error=str(exc))

    async def stop(self) -> None:
        """Stop the periodic check and write the last uses."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.owners.flush()


def _fmt(n: int) -> str:
    """Bytes for people: 1.5 GiB, 20 MiB, 512 B."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


__all__ = ["CacheManager", "Eviction", "NoSite", "SiteView"]
