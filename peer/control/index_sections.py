"""The tracker index as a section of the sync message (`peer.control.sections`): member and tracker.

`IndexMember` (every node) tells the tracker what this node holds and fetches, incrementally, and
feeds the answers into the download engine: the candidate holders of each blob it fills become the
engine's views (`Engine.set_views`: nobody's `/have` is polled while a tracker answers), and the
origin leases become the runs the downloads fetch from the origin (`Download.grant_lease`). It is
the engine's `Coordination`: `tracking()` is true while syncs carrying this section get answers.

`IndexTracker` (the tracker) wraps the pure index (`peer.policy.index.Index`): it applies each
member's announcements, grants leases, and answers with candidate sets; it is
also the popularity section's `ReplicaCounts` (how many other members hold a blob whole, for the
cache manager's eviction score and the replication of hot blobs).

Payloads (JSON, under the section name "index"; docs/control-plane.md, "Sync"):

    member -> tracker
    {"url": "http://10.0.0.12:5381",                      where this node serves chunks
     "announce": [{"d": digest, "size": n, "cs": chunk size,
                   "add": [[first, last], ...],            chunk ranges that arrived since the last sync
                   "filling": true,                        started filling the blob (first announce)
                   "complete": true,                       holds it whole, digest verified
                   "drop": true,                           holds none of it any more
                   "fetching": [[first, last], ...]}],     its origin runs, when they changed
     "query": [digest, ...],                              blobs it fills: send their holders
     "lease": [{"d": digest, "want": [index, ...], "max": n}],  needs origin chunks of these
     "done": [{"d": digest, "first": a, "last": b}]}      leases it finished or gave up

    tracker -> member
    {"holders": {digest: [{"id", "url", "size", "cs", "complete",
                           "have": base64 bitmap (bit i LSB first in byte i // 8),
                           "fetching": [[first, last], ...]}]},
     "leases": {digest: {"first": a, "last": b} | null}}

(Replica counts for the cache manager ride on the popularity section, `peer.control.popularity`,
from this section's tracker side: `IndexTracker.complete_holders`.)

Incremental: the member remembers what the tracker acknowledged (a reply came back); `failed()`
forgets the unacknowledged round, so the next sync carries it again. `full=True` (a new tracker,
which starts empty) sends everything: every partial blob with its whole bitmap, every complete
blob, the origin runs in flight (the new tracker adopts them as leases); leases of the old tracker
not yet started are dropped (its epoch is over). Besides the blobs being downloaded, the store's
blob list is rescanned every `rescan_interval` seconds for blobs that arrived or went by other means
(an ingest commit, containerd deleting content, the cache manager evicting); `changed(digest)`
announces one at the next sync without waiting for that.

What this section needs of the control plane (`ControlLink`, the consumer-owned seam): a way to
send the next sync now. The control plane calls `outgoing` once per sync round and then exactly one
of `incoming` or `failed`, never two rounds at once; on the tracker node itself it drives the
member side too, in process, like any member's.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from random import Random
from typing import Any, Protocol

import structlog

from kernel.errors import NotFound, PeerSyncError
from kernel.store.schema import BlobRecord
from peer.engine import Coordination
from peer.policy.holdings import BlobView
from peer.policy.index import (
    Announcement,
    Holder,
    Index,
    IndexConfig,
    bitmap_to_int,
    int_to_bitmap,
    runs_of,
)

log = structlog.get_logger(__name__)

NAME = "index"
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
MAX_ITEMS = 4096  # entries per list in one payload (more is refused as malformed)
MAX_RANGES = 4096  # ranges per announcement


class ControlLink(Protocol):
    """What the index section needs from the control plane (`peer.control`'s sync loop)."""

    def sync_soon(self) -> None:
        """Send the next sync now instead of at the next interval (coalesced: many calls before
        it goes out make one sync)."""
        ...

    def patience(self) -> float:
        """How long the sync being built now may wait for its answer before the control plane
        counts it failed (its learned timeout, `peer.policy.timeout`, and a TLS handshake)."""
        ...


class PartialsSide(Protocol):
    """What the member side reads of the store's partial blobs (`kernel.store.partial.Partials`)."""

    def records(self) -> Iterable[BlobRecord]: ...

    def record(self, digest: str) -> BlobRecord:
        """The partial blob's record; a `PeerSyncError` if `digest` is not being filled."""
        ...

    def have(self, digest: str) -> bytes:
        """Its presence bitmap (bit i LSB first in byte i // 8)."""
        ...


class StoreSide(Protocol):
    """What the member side reads of the node's store (`kernel.store.chunkstore.ChunkStore`)."""

    @property
    def partials(self) -> PartialsSide: ...

    def iter_blobs(self) -> Iterable[BlobRecord]: ...

    def record(self, digest: str) -> BlobRecord:
        """A complete blob's record; `NotFound` if the store does not hold it whole."""
        ...

    def exists(self, digest: str) -> bool: ...


class TaskSide(Protocol):
    """A download's task, as far as the member side looks at it (an `asyncio.Task`)."""

    def done(self) -> bool: ...


class DownloadSide(Protocol):
    """What the member side needs of one download (`peer.engine.Download`): its lease requests,
    the leases granted to it, and the runs it finished."""

    leases_done: list[tuple[int, int]]

    @property
    def task(self) -> TaskSide: ...

    def lease_request(self) -> tuple[list[int], int] | None: ...

    def grant_lease(self, first: int, last: int) -> None: ...

    def drop_leases(self) -> None: ...


class EngineSide(Protocol):
    """What the member side needs of the download engine (`peer.engine.Engine`).

    Why a seam: the index section is the only code that turns a node's holdings into sync
    payloads and the tracker's answers into views and leases, and the scale simulator
    (`testbed.sim`) drives this very code over simulated nodes instead of re-writing it."""

    coordination: Coordination
    self_url: str

    @property
    def store(self) -> StoreSide: ...

    @property
    def downloads(self) -> Mapping[str, DownloadSide]: ...

    @property
    def counters(self) -> MutableMapping[str, int]: ...

    def fetching(self, digest: str) -> list[int]:
        """The chunks of `digest` this node is fetching from the origin right now."""
        ...

    def set_views(self, digest: str, views: dict[str, BlobView]) -> None:
        """Who holds what of `digest`, from the tracker's candidate set."""
        ...


class NoLink:
    """A control plane that has no early sync (the section then waits for the next interval)."""

    def sync_soon(self) -> None:
        """Nothing to hurry."""

    def patience(self) -> float:
        """No timeout of its own: `IndexMember.stale_after` alone bounds a sync in flight."""
        return 0.0


@dataclass
class _Told:
    """What the tracker acknowledged of one blob."""

    size: int
    cs: int
    bits: int = 0
    complete: bool = False
    fetching: tuple[tuple[int, int], ...] = ()


@dataclass
class _Round:
    """One sync's worth of changes, applied to `_told` when the reply comes back."""

    told: dict[str, _Told | None] = field(default_factory=dict)  # None: dropped
    done: list[dict[str, Any]] = field(default_factory=list)
    rescanned: bool = False
    sent: float = 0.0  # when `outgoing` built it (the member's clock)
    patience: float = 0.0  # how long it may be in flight before it fails (`ControlLink.patience`)


class IndexMember:
    """The member side of the index section, over this node's engine (and its store)."""

    name = NAME

    def __init__(
        self,
        engine: EngineSide,
        link: ControlLink | None = None,
        stale_after: float = 3.0,
        rescan_interval: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        untracked: Callable[[], list[str]] = list,
    ) -> None:
        """`stale_after`: seconds after the last answer when the tracker counts as gone; so does
        a second failed sync in a row (as in docs/control-plane.md, one failure is a blip).
        `untracked()`: the peers no candidate set covers (`ControlPlane.untracked`: static peers
        that are no member). The section makes itself the engine's `coordination`."""
        self.engine = engine
        self.link: ControlLink = link or NoLink()
        self.stale_after = stale_after
        self.rescan_interval = rescan_interval
        self.clock = clock
        self._untracked = untracked
        self._told: dict[str, _Told] = {}
        self._round: _Round | None = None
        self._dirty: set[str] = set()
        self._last_answer: float | None = None
        self._failures = 0  # failed syncs in a row
        self._tracked = False  # what `tracking` said last (its change to False is logged)
        self._next_rescan = 0.0
        engine.coordination = self

    # -- Coordination (for the engine) -----------------------------------------------------------

    def tracking(self) -> bool:
        """A tracker answered our last sync recently, or the sync it has not answered yet went out
        recently: slow is not gone.

        A sync that fails (its timeout, a refusal) counts, and two in a row end the tracking; so
        does `stale_after` with no answer and no sync on its way (a control loop that stopped). A
        tracker busy for a while on a crowded host answers late, and a member that gave up on it
        after `stale_after` from the last answer, with its next sync still in flight, went back
        to striping the origin itself while the tracker's leases were still out, and a run it
        fetched could be one the tracker had leased to someone else: fetched twice. A sync on its
        way counts for as long as the control plane lets it wait (`ControlLink.patience`: its
        learned timeout reaches 4 s under load, past `stale_after`), so the engine never stops
        trusting the tracker before the control plane has counted that sync as failed."""
        now, rnd = self.clock(), self._round
        if self._last_answer is None or self._failures >= 2:
            tracked = False
        else:
            tracked = now - self._last_answer < self.stale_after or (
                rnd is not None and now - rnd.sent < max(self.stale_after, rnd.patience)
            )
        if self._tracked and not tracked:
            since = None if self._last_answer is None else round(now - self._last_answer, 2)
            log.info("no tracker answers: origin fetches striped without it", failures=self._failures,
                     since_answer=since)
        self._tracked = tracked
        return tracked

    def sync_soon(self) -> None:
        """Pass the engine's request for an early sync on to the control plane."""
        self.link.sync_soon()

    def untracked(self) -> list[str]:
        """The peers the engine polls directly beside the candidate sets (see `__init__`)."""
        return self._untracked()

    def changed(self, digest: str) -> None:
        """`digest` arrived or went by other means than a download: announce it next sync."""
        self._dirty.add(digest)

    def active(self) -> bool:
        """Downloads are running (the control plane syncs more often then)."""
        return any(not dl.task.done() for dl in self.engine.downloads.values())

    # -- MemberSection ---------------------------------------------------------------------------

    def outgoing(self, full: bool) -> dict[str, Any] | None:
        """The next sync's payload (see the module docstring)."""
        engine, store = self.engine, self.engine.store
        self.engine.counters["control_requests"] += 1
        now = self.clock()
        rnd = _Round(sent=now, patience=self.link.patience())
        if full:
            self._told.clear()
            for dl in engine.downloads.values():
                dl.drop_leases()
        # the blobs that can change without telling us: partial ones (complete ones only go by
        # deletion, found by the rescan or `changed`), and the ones being downloaded
        digests = {d for d, t in self._told.items() if not t.complete} | self._dirty
        active = {d: dl for d, dl in engine.downloads.items() if not dl.task.done()}
        digests |= set(active)
        if full or now >= self._next_rescan:
            rnd.rescanned = True
            digests |= {rec.digest for rec in store.partials.records()}
            digests |= {rec.digest for rec in store.iter_blobs()}
        announce = []
        for d in sorted(digests):
            announce += self._announcement(d, rnd)
        query = sorted(d for d in active if not store.exists(d))
        leases = []
        for d, dl in sorted(active.items()):
            req = dl.lease_request()
            if req is not None:
                leases.append({"d": d, "want": req[0], "max": req[1]})
        for d, dl in engine.downloads.items():
            rnd.done += [{"d": d, "first": a, "last": b} for a, b in dl.leases_done]
            dl.leases_done.clear()
        payload: dict[str, Any] = {"url": engine.self_url}
        for key, value in (("announce", announce), ("query", query), ("lease", leases), ("done", rnd.done)):
            if value:
                payload[key] = value
        self._round = rnd
        return payload

    def _announcement(self, digest: str, rnd: _Round) -> list[dict[str, Any]]:
        """What changed of `digest` since the tracker last acknowledged it (nothing: [])."""
        store = self.engine.store
        told = self._told.get(digest)
        complete = False
        try:
            rec = store.partials.record(digest)
            bits = bitmap_to_int(store.partials.have(digest))
        except PeerSyncError:
            try:
                rec = store.record(digest)
            except NotFound:
                if told is None:
                    return []
                rnd.told[digest] = None
                return [{"d": digest, "size": told.size, "cs": told.cs, "drop": True}]
            complete, bits = True, 0
        now_told = _Told(rec.size, rec.chunk_size, bits, complete, self._fetching(digest))
        before: list[dict[str, Any]] = []
        if told is not None and (
            (told.complete and not complete) or (told.size, told.cs) != (rec.size, rec.chunk_size)
        ):
            # held whole, then deleted and being fetched again before we noticed (or another
            # object under that digest): the tracker must forget the old one first
            before = [{"d": digest, "size": told.size, "cs": told.cs, "drop": True}]
            told = None
        entry: dict[str, Any] = {"d": digest, "size": rec.size, "cs": rec.chunk_size}
        if complete:
            if told is not None and told.complete:
                return []
            entry["complete"] = True
        else:
            new = bits & ~(told.bits if told else 0)
            if told is None:
                entry["filling"] = True
            if new:
                runs = runs_of(new)[:MAX_RANGES]  # the rest in the next sync
                entry["add"] = [list(r) for r in runs]
                sent = 0
                for a, b in runs:
                    sent |= ((1 << (b - a + 1)) - 1) << a
                now_told.bits = (told.bits if told else 0) | sent
            if now_told.fetching != (told.fetching if told else ()):
                entry["fetching"] = [list(r) for r in now_told.fetching]
            if len(entry) == 3:
                return before
        rnd.told[digest] = now_told
        return [*before, entry]

    def _fetching(self, digest: str) -> tuple[tuple[int, int], ...]:
        chunks = self.engine.fetching(digest)
        return tuple(runs_of(sum(1 << i for i in chunks)))

    def incoming(self, reply: Any | None) -> None:
        """The tracker answered: what we announced is acknowledged; holders become the engine's
        views, leases the downloads' runs."""
        rnd, self._round = self._round, None
        self._last_answer = self.clock()
        self._failures = 0
        if rnd is not None:
            for d, told in rnd.told.items():
                if told is None:
                    self._told.pop(d, None)
                else:
                    self._told[d] = told
                self._dirty.discard(d)
            if rnd.rescanned:
                self._next_rescan = self._last_answer + self.rescan_interval
        if not isinstance(reply, dict):
            return
        holders = reply.get("holders")
        if isinstance(holders, dict):
            for d, entries in holders.items():
                views = _views(d, entries, self.engine.self_url)
                if views is not None:
                    self.engine.set_views(d, views)
        leases = reply.get("leases")
        if isinstance(leases, dict):
            for d, lease in leases.items():
                dl = self.engine.downloads.get(d)
                if dl is None or dl.task.done() or not isinstance(lease, dict):
                    continue
                first, last = lease.get("first"), lease.get("last")
                if isinstance(first, int) and isinstance(last, int):
                    dl.grant_lease(first, last)

    def failed(self) -> None:
        """The sync did not reach a tracker: resend its announcements and releases next time."""
        rnd, self._round = self._round, None
        self._failures += 1
        if rnd is None:
            return
        for item in rnd.done:
            dl = self.engine.downloads.get(item["d"])
            if dl is not None:
                dl.leases_done.append((item["first"], item["last"]))


def _views(digest: str, entries: Any, self_url: str) -> dict[str, BlobView] | None:
    """The engine's views from a `holders` answer (malformed entries are skipped)."""
    if not DIGEST_RE.fullmatch(digest) or not isinstance(entries, list):
        return None
    views: dict[str, BlobView] = {}
    for e in entries[:MAX_ITEMS]:
        try:
            url, size, cs = str(e["url"]), int(e["size"]), int(e["cs"])
            complete = bool(e.get("complete"))
            have = b"" if complete else base64.b64decode(e.get("have") or "")
            fetching = frozenset(i for a, b in e.get("fetching") or () for i in range(int(a), int(b) + 1))
        except (KeyError, TypeError, ValueError):
            continue
        if url and url != self_url and size >= 0 and cs > 0:
            views[url] = BlobView(digest, size, cs, complete, have, fetching)
    return views


# -- the tracker side ------------------------------------------------------------------------------


class IndexTracker:
    """The tracker side of the index section: the pure index behind the sync route."""

    name = NAME

    def __init__(self, config: IndexConfig | None = None, rng: Random | None = None) -> None:
        """`rng` spreads candidate sets (a seeded one makes a simulated site repeatable)."""
        self.config = config or IndexConfig()
        self.rng = rng or Random()
        self.index = Index(self.config)

    def reset(self) -> None:
        """This node just became tracker: start empty (members re-announce in full)."""
        self.index = Index(self.config)

    def forget(self, member: str) -> None:
        """`member` left the site: its holdings and leases vanish."""
        self.index.drop_member(member)

    def complete_holders(self, digest: str, excluding: str) -> int | None:
        """The popularity section's `ReplicaCounts` (`peer.control.popularity`): members other
        than `excluding` holding `digest` whole, from their announcements. A tracker that has
        just claimed counts what the members re-announced so far (low at first: the cache
        manager then keeps a blob it could have evicted, never the other way round)."""
        return self.index.complete_holders(digest, excluding)

    def handle(self, member: str, payload: Any, now: float) -> dict[str, Any] | None:
        """Apply `member`'s announcements and releases, grant its leases, answer its queries."""
        if not isinstance(payload, dict):
            return None
        idx = self.index
        url = payload.get("url")
        if isinstance(url, str) and url:
            idx.set_member(member, url)
        for item in _items(payload.get("announce")):
            ann = _announcement(item)
            if ann is not None:
                idx.apply(member, ann, now)
        for item in _items(payload.get("done")):
            d, first, last = item.get("d"), item.get("first"), item.get("last")
            if isinstance(d, str) and isinstance(first, int) and isinstance(last, int):
                idx.release(d, member, first, last)
        reply: dict[str, Any] = {}
        leases: dict[str, Any] = {}
        for item in _items(payload.get("lease")):
            d, want, most = item.get("d"), item.get("want") or [], item.get("max")
            if not isinstance(d, str) or not isinstance(want, list) or not isinstance(most, int):
                continue
            lease = idx.grant(d, member, [i for i in want[:64] if isinstance(i, int)], most, now)
            leases[d] = None if lease is None else {"first": lease.first, "last": lease.last}
        if leases:
            reply["leases"] = leases
        holders: dict[str, Any] = {}
        for d in _items(payload.get("query")):
            if isinstance(d, str) and (size := idx.size_of(d)) is not None:
                holders[d] = [_holder(h, *size) for h in idx.candidates(d, member, now, self.rng)]
        if holders:
            reply["holders"] = holders
        return reply


def _items(value: Any) -> list[Any]:
    return value[:MAX_ITEMS] if isinstance(value, list) else []


def _announcement(item: Any) -> Announcement | None:
    """An announcement from its JSON form, or None if malformed."""
    if not isinstance(item, dict):
        return None
    d, size, cs = item.get("d"), item.get("size"), item.get("cs")
    if not isinstance(d, str) or not DIGEST_RE.fullmatch(d):
        return None
    if not isinstance(size, int) or not isinstance(cs, int):
        return None
    fetching = item.get("fetching")
    try:
        add = tuple((int(a), int(b)) for a, b in (item.get("add") or ())[:MAX_RANGES])
        runs = None if fetching is None else tuple((int(a), int(b)) for a, b in fetching[:MAX_RANGES])
    except (TypeError, ValueError):
        return None
    return Announcement(
        d,
        size,
        cs,
        add,
        bool(item.get("filling")),
        bool(item.get("complete")),
        bool(item.get("drop")),
        runs,
    )


def _holder(h: Holder, size: int, cs: int) -> dict[str, Any]:
    nchunks = max(1, -(-size // cs))
    return {
        "id": h.member,
        "url": h.url,
        "size": size,
        "cs": cs,
        "complete": h.complete,
        "have": "" if h.complete else base64.b64encode(int_to_bitmap(h.have, nchunks)).decode(),
        "fetching": [list(r) for r in h.fetching],
    }
