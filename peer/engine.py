"""The download engine: fills blobs chunk by chunk from peers, and from the origin only when needed.

One `Download` per blob runs in the background until the blob is complete and verified (a claimed
blob is always finished, whoever asked for it). Each round of its loop it:

1. learns which peers hold which chunks: from the site's tracker, whose index answers each sync
   with a bounded candidate set per blob (`Coordination`, implemented by
   `peer.control.index_sections.IndexMember`), or, with no tracker, by polling up to `fanout`
   peers' `POST /have` while downloads run (`policy.fanout`); either way a chunk a peer got a
   moment ago is fetched from it, not from the uplink: announce-while-downloading;
2. fetches chunks that peers hold, keeping a window of requests in flight; per chunk it picks the
   peer with the smallest predicted upper bound on its response time given its queue (learned
   online from every chunk request's outcome, with exploration and a same-subnet preference:
   `peer.policy.peerstats`, `peer.policy.choice`), chunks a reader is waiting for first, then
   rarest first; a request still running past its peer's p99 bound is hedged to a second peer,
   within the same window and cap;
3. fetches from the origin the chunks no peer holds, but only its share of them. With a tracker,
   only the runs it leased us (the tracker grants each chunk to one member at a time and
   re-grants the run of a holder that makes no progress), so the uplink carries each chunk once
   in bursts and staggered arrivals alike. Without one, the nodes downloading the same blob at
   the same moment split it into stripes, so in a burst the uplink carries each chunk about
   once; the stripes of an owner that makes no progress (dead, slow, gone) pass to exactly one
   heir.

Every decision in these steps (peer choice, window, chunk order, stripes and heirs, origin runs,
hedges, gathering) is made by the pure functions of `peer.policy`, which take the state this
module holds and return choices; this module does the I/O: tasks, HTTP, store writes, counters.

Room: a new download is admitted by the cache manager before it claims its blob (`Cache.admit`:
evictions to make room, or `ResourceExhausted` when the blob cannot fit the budget), counts as a
request of the blob toward its popularity, and tells the cache manager when it ends. A download
may be *peers only* (proactive replication, `peer.replication`): it never asks the origin, and
gives up (dropping its partial blob) after `peers_only_stall` seconds without a chunk; a reader
that needs the blob meanwhile turns it into an ordinary download.

Integrity: every chunk is checked before it is stored: against the blob's verified chunk table
when one is known (fetched from a peer that holds the complete, digest-verified blob, cross-checked
with a second such peer when there is one), otherwise against the serving peer's own hash of the
chunk, which it computed when it received the chunk (from the origin or a verified source). A
chunk that fails its check drops the peer that sent it. The blob is committed only when its whole
digest verifies; if it does not (a peer lied consistently about a chunk and its hash), every peer
whose unverified chunks went into it is dropped and the blob is fetched again from the origin and
from the remaining peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol

import structlog

from kernel.errors import AlreadyExists, NotFound, PeerSyncError, Unavailable
from kernel.logging import in_transfer
from kernel.store.chunkstore import ChunkStore
from kernel.store.partial import ChunkCorrupt, ChunksMissing, DigestMismatch
from peer.catalog import Catalog, Source
from peer.exchange import PeerClient, PeerError
from peer.origin import OriginClient
from peer.peers import PeerSource
from peer.policy.choice import Picker, Rule
from peer.policy.fanout import fanout
from peer.policy.gathering import gather
from peer.policy.hedging import RESERVE, InFlight, hedges, late_at_bound, late_by_ewma, oldest_requests
from peer.policy.holdings import BlobView, filling, holders, usable_views
from peer.policy.peerstats import PeerFigures, PeerStats
from peer.policy.schedule import Slots, schedule, wanted_chunks
from peer.policy.striping import Sighting, Stripes, origin_candidates, origin_run, stalled, track_progress
from peer.policy.subnet import Locality
from peer.policy.window import window

log = structlog.get_logger(__name__)

MAX_STORE_BATCH = 4  # origin chunks held in memory while the previous batch is being stored
RECENT_TRANSFERS = 4096  # chunk requests kept for `Engine.transfers()`


@dataclass
class EngineConfig:
    """Tunables; the defaults suit a LAN of small nodes behind one slow uplink."""

    peer_window: int = 8  # chunk requests in flight to peers, per blob (grows with measured BDP)
    max_peer_window: int = 32
    poll_interval: float = 0.25  # how often peers' holdings are refreshed while downloading
    stripe_chunks: int = 4  # origin work is split among downloading nodes in stripes of this size
    origin_batch_chunks: int = 4  # chunks per origin Range request (one stripe: re-plan often)
    solo_batch_chunks: int = 32  # ... when no other node is filling the blob: nothing to re-plan
    owner_grace: float = 6.0  # an owner whose holdings have not grown for this long is stalled
    gather_delay: float = 0.5  # after claiming, how long to look for other nodes filling the blob
    gather_max: float = 2.0  # ... and how long at most to wait for the rest of the site to join
    hedge_after: float = 2.0  # ewma/random rules: hedge a request older than this and 4x typical
    hedge_floor: float = 0.05  # bound rule: hedge past the p99 bound, never sooner than this
    choice: Rule = Rule.BOUND  # how peers are chosen; "ewma", "random": baselines for benchmarks
    subnets: tuple[str, ...] = ()  # our subnets (CIDR) for the subnet preference; (): the /24 or /64
    drop_for: float = 300.0  # seconds a misbehaving peer (bad chunks) is ignored
    unreachable_for: float = 20.0  # seconds an unresponsive peer is left alone before it is retried
    max_inflight: int = 24  # chunk requests to peers in flight over all blobs: bounds buffer memory
    read_timeout: float = 600.0  # a reader blocked this long without progress gets an error
    max_attempts: int = 3  # full-blob attempts before a download fails
    plan_wait: float = 1.0  # how long an origin plan waits for peers' fresh holdings (late ones still count)
    fanout: int = 8  # peers polled directly when there is no tracker (docs/control-plane.md)
    lease_stuck: float = 12.0  # tracked, no lease and no progress this long: fetch unheld chunks anyway
    peers_only_stall: float = 30.0  # seconds a peers-only download waits for a chunk before it gives up


class Coordination(Protocol):
    """What the engine needs of the site's tracker index; the engine owns this seam and
    `peer.control.index_sections.IndexMember` implements it.

    While `tracking()` is true, views of who holds what come from the tracker's candidate sets
    (the index section writes them with `Engine.set_views`; nobody's `/have` is polled) and origin
    chunks are fetched only under the tracker's leases (`Download.lease_request`,
    `Download.grant_lease`). `sync_soon()` asks for the next sync to be sent now rather than at
    the next interval: a download calls it when it needs a lease and has nothing of its own to
    fetch from the origin (at most once per lease granted).

    `untracked()` names the peers whose holdings the candidate sets do not cover: static
    `[peer] peers` entries that are no member of the control plane (the tracker knows nothing of
    them). The engine still polls those directly beside the candidate sets, as it would without a
    tracker: an operator's static peers are used whether or not discovery found a tracker."""

    def tracking(self) -> bool: ...

    def sync_soon(self) -> None: ...

    def untracked(self) -> list[str]: ...


class Untracked:
    """No tracker index (a daemon without the control plane, or tests of the direct path): the
    engine polls up to `fanout` peers and stripes the origin work itself."""

    def tracking(self) -> bool:
        """Never a tracker."""
        return False

    def sync_soon(self) -> None:
        """Nothing to sync with."""

    def untracked(self) -> list[str]:
        """No candidate sets: every peer is polled directly (`Engine.usable_peers`)."""
        return []


class DownloadFailed(Unavailable):
    """A blob could not be fetched from any peer nor from the origin."""


class Cache(Protocol):
    """What the engine asks of the cache manager (`peer.cache.CacheManager` implements it).

    Why a seam: the engine is tested, and a scale simulator may run it, without a budget; the
    cache manager's own tests need no engine."""

    def admit(self, digest: str, size: int) -> None:
        """Make room for a new download of `size` bytes; ResourceExhausted if it cannot fit."""
        ...

    def used(self, digest: str, request: bool = False) -> None:
        """A use (here: a request) of `digest`, for its last use and popularity."""
        ...

    def finished(self, digest: str) -> None:
        """The download of `digest` ended, complete or not."""
        ...


class NoCache:
    """The `Cache` of an engine without a budget: admits everything, records nothing."""

    def admit(self, digest: str, size: int) -> None:
        return None

    def used(self, digest: str, request: bool = False) -> None:
        return None

    def finished(self, digest: str) -> None:
        return None


class Engine:
    """All downloads of one node."""

    def __init__(
        self,
        store: ChunkStore,
        catalog: Catalog,
        origin: OriginClient,
        peers: PeerSource,
        client: PeerClient,
        self_url: str,
        config: EngineConfig | None = None,
        rng: random.Random | None = None,
        coordination: Coordination | None = None,
        cache: Cache | None = None,
    ) -> None:
        """`rng` draws the jitter of peer choice and the order chunk tables are fetched in (a
        seeded one makes a simulated site repeatable); by default a fresh `random.Random`.
        `coordination` is the tracker index's member side (settable later, as the attribute
        `coordination`: the index section is built over the engine); by default `Untracked`.
        `cache` admits new downloads (default: no budget)."""
        self.store = store
        self.catalog = catalog
        self.origin = origin
        self.peer_source = peers
        self.client = client
        self.self_url = self_url
        self.config = config or EngineConfig()
        self.rng = rng if rng is not None else random.Random()
        self.coordination: Coordination = coordination if coordination is not None else Untracked()
        self.cache: Cache = cache if cache is not None else NoCache()
        self.busy_until = 0.0  # monotonic time a download last ran (replication waits for idle)
        self.stats: dict[str, PeerStats] = {}
        self.views: dict[str, dict[str, BlobView]] = {}  # digest -> peer -> view
        self.downloads: dict[str, Download] = {}
        self._poller: asyncio.Task[None] | None = None
        self._closed = False
        self.counters = {
            "peer_bytes": 0,
            "origin_bytes": 0,
            "corrupt_chunks": 0,
            "hedges": 0,
            # why origin chunks were ours to fetch: nobody else was filling the blob (solo), or
            # we inherited the stripe of an owner that stalled (heir); the rest were our stripes;
            # striped: every chunk fetched by striping, i.e. without a tracker's lease
            "origin_solo_chunks": 0,
            "origin_heir_chunks": 0,
            "origin_striped_chunks": 0,
            # origin chunks fetched under a tracker's lease, and without one because the download
            # was stuck (`lease_stuck`) with chunks no usable peer holds
            "origin_lease_chunks": 0,
            "origin_rescue_chunks": 0,
            "leases": 0,  # leases the tracker granted us
            # control messages this node sent (`/have` polls; tracker syncs are added by the
            # control plane's index section): what must stay flat as the site grows
            "control_requests": 0,
            "dropped_peers": 0,  # times a peer was dropped (failures, corrupt chunks, bad tables)
        }
        self.inflight = 0  # chunk requests to peers in flight, all blobs together
        self._asking: set[asyncio.Task[None]] = set()  # /have requests still running
        # told True when downloads start running and False when the last one ends (the control
        # plane syncs more often while this node downloads)
        self.on_busy: Callable[[bool], None] | None = None
        self.locality = Locality.of(self_url, self.config.subnets)
        self.recent: deque[TransferRecord] = deque(maxlen=RECENT_TRANSFERS)
        # told (source, seconds, bytes) for every chunk stored, source "peer" or "origin": the
        # admin endpoint's latency histograms (`peersync.admin.metrics`); for the origin, the
        # seconds since the previous chunk of the same range arrived (its first: since the request)
        self.on_chunk: Callable[[str, float, int], None] | None = None

    # -- public API --------------------------------------------------------------------------

    def fetching(self, digest: str) -> list[int]:
        """Chunks of `digest` this node is fetching from the origin (announced to peers)."""
        dl = self.downloads.get(digest)
        return sorted(dl.origin_chunks) if dl is not None and not dl.task.done() else []

    def known_size(self, digest: str) -> int | None:
        """The size of a blob this node can produce (present, being filled, or catalogued).

        Records are consulted, not files: during a promotion the file is renamed before the
        record flips to complete, and one of the two records is always there."""
        for lookup in (self.store.record, self.store.partials.record):
            with contextlib.suppress(NotFound):
                return lookup(digest).size
        src = self.catalog.lookup(digest)
        return src.size if src else None

    def ensure(self, digest: str, peers_only: bool = False, source: Source | None = None) -> Download | None:
        """Start (or join) the background download of `digest`; None if it is complete already.

        NotFound if the blob is neither held nor catalogued (nobody told us where it lives) and
        no `source` is given; ResourceExhausted if a new download cannot fit the cache budget.
        `peers_only` (replication) never asks the origin; joining a peers-only download without
        it lifts that."""
        if self.store.exists(digest):
            return None
        dl = self.downloads.get(digest)
        if dl is not None and not dl.task.done():
            if not peers_only and dl.peers_only:
                dl.peers_only = False  # a reader needs it: the origin may serve it now
                dl.wake.set()
            return dl
        src = self.catalog.lookup(digest)
        claimed = None
        with contextlib.suppress(NotFound):
            claimed = self.store.partials.record(digest)
        if src is None and claimed is not None and claimed.source:
            where = claimed.source
            src = Source(digest, claimed.size, claimed.media_type, where["registry"], where["repository"])
        if src is None:
            src = source
        if src is None:
            raise NotFound(f"blob {digest}: not held here and no origin known for it")
        if claimed is None:
            self.cache.admit(digest, src.size)  # room is reserved before the claim makes the file
        self.cache.used(digest, request=True)
        dl = Download(self, src, peers_only=peers_only)
        self.downloads[digest] = dl
        with in_transfer(blob=digest):  # the download's lines: the caller's transfer, or its own
            dl.task = asyncio.create_task(dl.run(), name=f"download {digest[:19]}")
        dl.task.add_done_callback(functools.partial(self._ended, digest))
        self.busy_until = time.monotonic()
        self._ensure_poller()
        return dl

    def _ended(self, digest: str, _task: asyncio.Task[None]) -> None:
        self.busy_until = time.monotonic()
        self.cache.finished(digest)

    def idle_since(self) -> float:
        """Monotonic time since which no download has run (now, while one runs)."""
        if any(not dl.task.done() for dl in self.downloads.values()):
            return time.monotonic()
        return self.busy_until

    async def read(self, digest: str, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of a blob, waiting (with priority) for missing chunks."""
        self.cache.used(digest)  # renews its last use (cheap: the cache manager coalesces)
        while True:
            with contextlib.suppress(NotFound):
                if self.store.exists(digest):
                    return self.store.read(digest, offset, size)
            dl = self.ensure(digest)
            if dl is None:
                continue
            dl.want(offset, size)
            try:
                await self.store.partials.wait_for(digest, offset, size, timeout=self.config.read_timeout)
                return self.store.partials.read_partial(digest, offset, size)
            except NotFound:
                if dl.error is not None:
                    raise DownloadFailed(str(dl.error)) from dl.error
                if dl.task.done() and not self.store.exists(digest):
                    raise DownloadFailed(f"blob {digest}: download ended without the blob") from None
                await asyncio.sleep(0)  # promoted or re-claimed: look again
            except ChunksMissing:
                if dl.error is not None:
                    raise DownloadFailed(str(dl.error)) from dl.error
                raise

    async def stream(self, digest: str, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        """The blob's bytes in order from `offset`, each piece as soon as its chunk arrives."""
        size = self.known_size(digest)
        if size is None:
            raise NotFound(f"blob {digest}: unknown")
        end = size if length is None else min(size, offset + length)
        piece = self.store.chunk_size
        pos = offset
        while pos < end:
            n = min(piece - pos % piece, end - pos)
            yield await self.read(digest, pos, n)
            pos += n

    async def wait_complete(self, digest: str) -> None:
        dl = self.ensure(digest)
        if dl is not None:
            await asyncio.shield(dl.task)
            if dl.error is not None:
                raise DownloadFailed(str(dl.error)) from dl.error

    async def close(self) -> None:
        self._closed = True
        tasks = [d.task for d in self.downloads.values() if not d.task.done()]
        tasks += [t for t in self._asking if not t.done()]
        if self._poller:
            tasks.append(self._poller)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    def resume(self) -> None:
        """Restart the downloads of partial blobs left by a previous run."""
        for rec in self.store.partials.records():
            if rec.source or self.catalog.lookup(rec.digest):
                with contextlib.suppress(PeerSyncError):
                    self.ensure(rec.digest)

    # -- peers -------------------------------------------------------------------------------

    def stat(self, peer: str) -> PeerStats:
        return self.stats.setdefault(peer, PeerStats())

    def peers(self) -> dict[str, PeerFigures]:
        """Every peer we know of (listed by the peer source or measured), with what we measured of
        it: throughput, RTT, p95/p99 response time, score, in flight, failures, state. The keys
        are `peer.policy.peerstats.PeerFigures`'s (documented there); what `peersync peers` and
        `GET /peersync/v1/peers` show."""
        now = time.monotonic()
        names = dict.fromkeys([*self.peer_source.peers(), *self.stats])
        out: dict[str, PeerFigures] = {}
        picker = Picker(
            self.stats, self.store.chunk_size, now, self.rng, locality=self.locality, oldest=self.oldest()
        )
        for peer in names:
            st = self.stats.get(peer) or PeerStats()
            out[peer] = st.figures(now, picker.score(peer), self.locality.same(peer))
        return out

    def oldest(self) -> dict[str, tuple[float, int]]:
        """Per peer, its oldest request in flight over all blobs: (launched at, the queue it was
        launched into). What a peer has not answered yet is evidence too (`PeerStats.bound`)."""
        return oldest_requests(f for dl in self.downloads.values() for fl in dl.flights.values() for f in fl)

    def transfers(self) -> list[dict[str, object]]:
        """The last `RECENT_TRANSFERS` chunk requests to peers, oldest first (`TransferRecord`)."""
        return [asdict(r) for r in self.recent]

    def drop(self, peer: str, why: str, seconds: float | None = None, kind: str = "dropped") -> None:
        """Ignore `peer` for a while: not polled, not asked for chunks, not counted as interested.
        `kind` is "dropped" (it misbehaved) or "suspended" (it stopped answering)."""
        st = self.stat(peer)
        seconds = self.config.drop_for if seconds is None else seconds
        st.drop(time.monotonic(), seconds, kind)
        self.counters["dropped_peers"] += 1
        for views in self.views.values():
            views.pop(peer, None)
        log.warning("peer dropped", peer=peer, why=why, seconds=seconds, kind=kind)

    def usable_peers(self) -> list[str]:
        """The peers polled directly (no tracker): at most `fanout` of the site's members
        (`policy.fanout`, chosen from all of them, so that every node computes the same groups),
        less those dropped or suspended."""
        now = time.monotonic()
        chosen = fanout(self.peer_source.peers(), self.self_url, self.config.fanout)
        return [p for p in chosen if self.stat(p).usable(now)]

    def polled_peers(self) -> list[str]:
        """The peers whose `/have` we poll: with a tracker, only those its candidate sets do not
        cover (`Coordination.untracked`), less those dropped or suspended; else `usable_peers`."""
        if not self.coordination.tracking():
            return self.usable_peers()
        now = time.monotonic()
        return [p for p in self.coordination.untracked() if p != self.self_url and self.stat(p).usable(now)]

    def set_views(self, digest: str, views: dict[str, BlobView]) -> None:
        """The holders of `digest` as the tracker answered (its candidate set replaces what we
        knew of the members; what the untracked peers we poll said is kept); wakes the blob's
        download."""
        outside = set(self.coordination.untracked())
        kept = {p: v for p, v in self.views.get(digest, {}).items() if p in outside}
        self.views[digest] = kept | {p: v for p, v in views.items() if p != self.self_url}
        dl = self.downloads.get(digest)
        if dl is not None:
            dl.wake.set()

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            if self.on_busy is not None:
                self.on_busy(True)
            self._poller = asyncio.create_task(self._poll(), name="peer poller")

    async def _poll(self) -> None:
        """While downloads run: refresh every peer's holdings of the blobs we are filling."""
        while not self._closed:
            active = [d for d, dl in self.downloads.items() if not dl.task.done()]
            if not active:
                if self.on_busy is not None:
                    self.on_busy(False)
                return
            await self.refresh(active)  # with a tracker, only the peers its candidate sets miss
            await asyncio.sleep(self.config.poll_interval)

    async def refresh(self, digests: list[str], wait: float | None = None) -> None:
        """Ask every polled peer (`polled_peers`) what it holds of `digests`; wait at most `wait`
        seconds (None: for all answers). Answers that come later still update the views when they arrive: a
        peer slowed down by a busy CPU must not hold up planning."""
        self._forget_departed()
        tasks = [asyncio.create_task(self._ask(peer, digests)) for peer in self.polled_peers()]
        if not tasks:
            return
        self._asking.update(tasks)
        for t in tasks:
            t.add_done_callback(self._asking.discard)
        await asyncio.wait(tasks, timeout=wait)

    def _forget_departed(self) -> None:
        """Forget the origin fetches announced by nodes the peer source no longer names (they left
        the site: a tracker that died, a member its tracker dropped). Nobody polls them any more,
        so nothing would ever correct what they last said, and an announced fetch keeps its
        chunks out of every other node's origin plan. Their holdings stay: holdings only grow, so
        they are still safe to plan with (a request to a dead node fails and drops it), and the
        stripes they owned pass to an heir once they stall, as a dead member's always did."""
        members = set(self.peer_source.peers())
        for views in self.views.values():
            for peer, view in list(views.items()):
                if view.fetching and peer not in members:
                    views[peer] = dataclasses.replace(view, fetching=frozenset())

    async def _ask(self, peer: str, digests: list[str]) -> None:
        """One peer's holdings. A failed answer keeps its last view (holdings only grow); two
        unanswered polls in a row suspend the peer (dead or partitioned), which drops its views.
        Poll failures are counted apart from failed chunk requests (`PeerStats`)."""
        st = self.stat(peer)
        self.counters["control_requests"] += 1
        try:
            res = await self.client.have(peer, digests)
        except (PeerError, ValueError, KeyError, TypeError) as exc:
            if st.poll_failed():
                for d in digests:
                    self.views.setdefault(d, {}).pop(peer, None)
                self.drop(peer, f"not answering: {exc}", self.config.unreachable_for, "suspended")
            return
        st.poll_answered()
        for d in digests:
            if d in res:
                self.views.setdefault(d, {})[peer] = res[d]
            else:
                self.views.setdefault(d, {}).pop(peer, None)
            dl = self.downloads.get(d)
            if dl:
                dl.wake.set()


@dataclass
class _Flight:
    """One chunk request to a peer (a `peer.policy.hedging.InFlight`)."""

    index: int
    peer: str
    started: float  # launched (time.monotonic()); its response time is measured from here
    task: asyncio.Task[None] = field(init=False)
    queue: int = 0  # our other requests in flight to `peer` when it was launched
    hedge: bool = False  # it is the second request for a straggler
    hedged: bool = False  # it is a straggler with a second request, or a hedge (never hedged)
    received: bool = False  # its bytes are in: cancelling it now would save nothing and lose its bookkeeping


@dataclass(frozen=True)
class TransferRecord:
    """One chunk request to a peer as it ended (`Engine.transfers()`): for operators and benchmarks.

    `started`, `ended` and `seconds` are time.monotonic() based: `seconds` runs from the launch to
    the last byte or the failure, `ended` is when the request was done with (its chunk stored or
    not); `queue` is our other requests in flight to the peer at its launch; `outcome` is "ok",
    "failed", "corrupt", "outrun" (hedged and cancelled: its twin answered first) or "cancelled";
    `chunk_seconds`, for the request whose bytes were stored, is the time from the chunk's first
    request to then (what a reader waiting for the chunk saw), else None."""

    started: float
    ended: float
    digest: str
    index: int
    peer: str
    seconds: float
    queue: int
    hedge: bool
    outcome: str
    chunk_seconds: float | None = None


@dataclass
class Download:
    """The background fill of one blob (see the module docstring)."""

    engine: Engine
    source: Source
    peers_only: bool = False
    task: asyncio.Task[None] = field(init=False)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    wanted: set[int] = field(default_factory=set)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.digest = self.source.digest
        self.chunk_size = self.engine.store.chunk_size  # what claim() cuts a new blob with
        self.nchunks = max(1, -(-self.source.size // self.chunk_size))
        self.flights: dict[int, list[_Flight]] = {}
        self.origin_task: asyncio.Task[None] | None = None
        self.origin_chunks: set[int] = set()
        self.provenance: dict[int, str] = {}  # chunk -> peer that supplied it unverified
        self.table_verified = False
        self.table_from: list[str] = []
        self.origin_only = False
        self.started = time.monotonic()
        self.last_progress = self.started
        self.peer_progress: dict[str, Sighting] = {}  # peer -> (chunks held, when that changed)
        # origin leases from the tracker: granted runs (the head one is being fetched, in sub-runs
        # of consecutive missing chunks), and runs we are done with, to report
        self.leases: list[tuple[int, int]] = []
        self.leases_done: list[tuple[int, int]] = []
        self._asked_early = False  # sync_soon was called and no lease has been granted since
        self._rescue = False  # stuck without a lease: fetching unheld chunks from the origin anyway
        self._polled = False  # the peers we poll were asked once: until then no lease is asked for
        self.asked: dict[int, float] = {}  # chunk -> when its first peer request was launched

    # -- API for readers ---------------------------------------------------------------------

    def want(self, offset: int, size: int) -> None:
        """A reader needs these bytes now: fetch their chunks (and a little read-ahead) first."""
        self.wanted.update(wanted_chunks(offset, size, self.chunk_size, self.nchunks))
        self.wake.set()

    # -- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        src = self.source
        store = self.engine.store
        attempt = 0
        while True:
            attempt += 1
            try:
                store.partials.claim(self.digest, src.size, media_type=src.media_type, source=src.as_dict())
            except AlreadyExists:
                return
            rec = store.partials.record(self.digest)
            self.chunk_size, self.nchunks = rec.chunk_size, rec.chunks
            if self._tracked():
                await self._poll_untracked()
                self.engine.coordination.sync_soon()  # announce the blob and ask for a lease now
            elif attempt == 1 and self.engine.peer_source.peers() and not self.peers_only:
                await self._gather()
            self._polled = True
            try:
                await self._fill()
                await store.partials.acomplete(self.digest)
                log.info(
                    "blob complete", digest=self.digest, seconds=round(time.monotonic() - self.started, 2)
                )
                if self._tracked():  # announce the whole copy now, not at the idle pace (1 s):
                    self.engine.coordination.sync_soon()  # a pull starting next asks the tracker
                return
            except AlreadyExists:
                return
            except DigestMismatch as exc:
                suspects = set(self.provenance.values()) | set(self.table_from)
                for peer in suspects:
                    self.engine.drop(peer, f"blob {self.digest} failed its digest after using its chunks")
                log.warning(
                    "blob failed its digest; refetching", digest=self.digest, suspects=sorted(suspects)
                )
                self._reset()
                if attempt >= self.engine.config.max_attempts:
                    self._fail(exc)
                    return
            except asyncio.CancelledError:
                self._cancel_flights()
                raise
            except PeerSyncError as exc:
                self._cancel_flights()
                if attempt >= self.engine.config.max_attempts or self.peers_only:
                    self._fail(exc)
                    return
                log.warning(
                    "download attempt failed; retrying", digest=self.digest, error=str(exc), attempt=attempt
                )
                await asyncio.sleep(min(2.0 * attempt, 10.0))

    async def _poll_untracked(self) -> None:
        """With a tracker, ask the static peers its candidate sets do not cover what they hold
        (at most `plan_wait`) before the first lease request: else the lease would be granted,
        and its chunks fetched from the origin, before their holdings were seen."""
        if self.engine.polled_peers():
            await self.engine.refresh([self.digest], wait=self.engine.config.plan_wait)

    async def _gather(self) -> None:
        """Let the nodes of a burst see each other before dealing out stripes: wait
        `gather_delay`, then refresh holdings every `poll_interval` until `policy.gathering` says
        the burst has assembled (or there is no burst), at most `gather_max`."""
        cfg = self.engine.config
        deadline = time.monotonic() + cfg.gather_max
        await self.engine.refresh([self.digest])
        await asyncio.sleep(cfg.gather_delay)
        while True:
            await self.engine.refresh([self.digest], wait=cfg.poll_interval)
            seen = self.engine.views.get(self.digest, {})
            if gather(seen, self.engine.usable_peers(), time.monotonic(), deadline).done:
                return
            await asyncio.sleep(cfg.poll_interval)

    def _fail(self, exc: BaseException) -> None:
        self.error = DownloadFailed(f"blob {self.digest} could not be fetched: {exc}")
        log.error("download failed", digest=self.digest, error=str(exc))
        with contextlib.suppress(PeerSyncError):
            self.engine.store.partials.abandon(self.digest)  # wakes blocked readers

    def _reset(self) -> None:
        self._cancel_flights()
        self.asked.clear()
        self.provenance.clear()
        self.table_verified = False
        self.table_from = []
        self.origin_only = True

    def _cancel_flights(self) -> None:
        for flights in self.flights.values():
            for f in flights:
                f.task.cancel()
        self.flights.clear()
        if self.origin_task:
            self.origin_task.cancel()
            self.origin_task = None
        self.origin_chunks.clear()
        self.leases_done += self.leases  # given up: the tracker may lease them to someone else
        self.leases.clear()

    async def _fill(self) -> None:
        partials = self.engine.store.partials
        while True:
            missing = partials.missing(self.digest)
            if not missing:
                return
            if self.origin_task is not None and self.origin_task.done():
                exc = self.origin_task.exception()
                self.origin_task = None
                self.origin_chunks.clear()
                if exc is not None:
                    raise exc if isinstance(exc, PeerSyncError) else Unavailable(f"origin: {exc}")
            if not self.table_verified and not self.origin_only:
                await self._maybe_fetch_table()
            self._schedule(missing)
            if self.origin_task is None:
                if self._tracked():
                    self._lease_origin(missing)
                else:
                    await self._plan_origin()
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=self.engine.config.poll_interval)
            stall = self.engine.config.peers_only_stall if self.peers_only else 120.0
            if time.monotonic() - self.last_progress > stall:
                raise Unavailable(f"blob {self.digest}: no progress for {stall:.0f} s")

    # -- leases (with a tracker) -----------------------------------------------------------

    def _tracked(self) -> bool:
        """Origin work is coordinated by the tracker's leases (not after peers disagreed on the
        chunk table: then every chunk comes from the origin, ours to fetch)."""
        return self.engine.coordination.tracking() and not self.origin_only

    def lease_request(self) -> tuple[list[int], int] | None:
        """What to ask the tracker for in the next sync: (wanted chunks first, most chunks per
        run), or None when no lease is needed: not tracked, the static peers outside the
        membership not asked yet (`_poll_untracked`), a download that never asks the origin
        (peers only, or no origin known: a lease it held would keep those chunks from everyone),
        two leases held already (the run in flight and the next: the uplink never idles between
        them), or every missing chunk is held by a usable candidate, in flight, or under a lease
        we hold."""
        if not self._tracked() or not self._polled or self.task.done() or len(self.leases) >= 2:
            return None
        if self.peers_only or not self.source.registry:
            return None
        try:
            missing = self.engine.store.partials.missing(self.digest)
        except PeerSyncError:
            return None
        views = self._views()
        held = holders(views, missing, self.chunk_size)
        busy = {i for i, fl in self.flights.items() if fl} | self.origin_chunks
        leased = {i for a, b in self.leases for i in range(a, b + 1)}
        need = {i for i in missing if not held[i] and i not in busy and i not in leased}
        if not need:
            return None
        want = [i for i in sorted(self.wanted) if i in need][:16]
        return want, self.engine.config.solo_batch_chunks

    def grant_lease(self, first: int, last: int) -> None:
        """The tracker leased us chunks `first`..`last` of this blob: ours to fetch from the origin
        (a download that never asks the origin gives it back at once)."""
        if not 0 <= first <= last < self.nchunks or (first, last) in self.leases:
            return
        if self.peers_only or not self.source.registry:
            self.leases_done.append((first, last))
            return
        self.leases.append((first, last))
        self.engine.counters["leases"] += 1
        self._asked_early = False
        self._rescue = False
        self.wake.set()

    def drop_leases(self) -> None:
        """The tracker that granted our leases is gone (a new one starts empty): forget the runs
        not yet started; the run in flight finishes and is announced as an origin fetch."""
        self.leases.clear()
        self.leases_done.clear()

    def _lease_origin(self, missing: list[int]) -> None:
        """Fetch the next run of consecutive missing chunks of our head lease; a lease with
        nothing left to fetch is done. Without a lease, ask for one now if we have nothing to
        fetch from the origin (once per grant), and fetch unheld chunks anyway if the download
        has been stuck for `lease_stuck` (a holder we cannot use, a tracker that cannot help)."""
        todo = set(missing)
        busy = {i for i, fl in self.flights.items() if fl}
        while self.leases:
            first, last = self.leases[0]
            run = [i for i in range(first, last + 1) if i in todo and i not in busy]
            if run:
                end = run[0]
                while end + 1 <= last and end + 1 in todo and end + 1 not in busy:
                    end += 1
                self._start_origin(run[0], end, "origin_lease_chunks")
                return
            self.leases_done.append(self.leases.pop(0))
        if self.lease_request() is None:
            return
        if not self._asked_early:
            self._asked_early = True
            self.engine.coordination.sync_soon()
        cfg = self.engine.config
        if not self._rescue and not busy and time.monotonic() - self.last_progress > cfg.lease_stuck:
            self._rescue = True  # until the tracker grants us a lease again
            log.info("no lease and no progress: fetching unheld chunks from the origin", digest=self.digest)
        if self._rescue:
            views = self._views()
            held = holders(views, missing, self.chunk_size)
            elsewhere = {i for v in views.values() for i in v.fetching}  # other members' leases
            busy |= elsewhere
            unheld = [i for i in missing if not held[i] and i not in busy]
            if unheld:
                end = unheld[0]
                while (
                    end + 1 in todo
                    and not held.get(end + 1)
                    and end + 1 not in busy
                    and end + 1 - unheld[0] < cfg.origin_batch_chunks
                ):
                    end += 1
                self._start_origin(unheld[0], end, "origin_rescue_chunks")

    def _start_origin(self, first: int, last: int, counter: str) -> None:
        self.origin_chunks = set(range(first, last + 1))
        self.engine.counters[counter] += last - first + 1
        self.origin_task = asyncio.create_task(self._from_origin(first, last))
        self.origin_task.add_done_callback(lambda _t: self.wake.set())

    # -- planning ----------------------------------------------------------------------------

    def _views(self) -> dict[str, BlobView]:
        """Usable peers' views of this blob (none once we fetch from the origin only)."""
        if self.origin_only:
            return {}
        views = self.engine.views.get(self.digest, {})
        return usable_views(views, self.engine.stats, time.monotonic(), self.source.size)

    def _picker(self, now: float, views: dict[str, BlobView]) -> Picker:
        """This round's peer choices (`policy.choice`): it counts what it assigns, so one round
        spreads chunks over peers as their queues grow, and caps peers still filling the blob."""
        engine = self.engine
        cfg = engine.config
        return Picker(
            engine.stats,
            self.chunk_size,
            now,
            engine.rng,
            cfg.choice,
            engine.locality,
            engine.oldest(),
            filling=filling(views),
        )

    def _schedule(self, missing: list[int]) -> None:
        """Start this round's peer requests (`policy.schedule`) and hedges (`policy.hedging`),
        both within the blob's window and the engine-wide cap."""
        engine, cfg = self.engine, self.engine.config
        views = self._views()
        now = time.monotonic()
        in_flight = {i for i, fl in self.flights.items() if fl} | self.origin_chunks
        held = holders(views, missing, self.chunk_size)
        slots = Slots(
            window=self._window(views),
            flights=sum(len(fl) for fl in self.flights.values()),
            inflight=engine.inflight,
            max_inflight=cfg.max_inflight,
            reserve=RESERVE,
        )
        picker = self._picker(now, views)
        fetches = schedule(missing, held, self.wanted, in_flight, slots, picker)
        for fetch in fetches:
            self._launch(fetch.index, fetch.peer)
        stats, nbytes = engine.stats, self.chunk_size

        def late(f: InFlight) -> bool:
            if cfg.choice is Rule.BOUND:
                return late_at_bound(f, stats, now, nbytes, cfg.hedge_floor)
            return late_by_ewma(f, stats, now, cfg.hedge_after, nbytes)

        room = slots.hedge_room(len(fetches))
        for h in hedges(self.flights, held, late, picker, room, self.wanted):
            self.flights[h.index][0].hedged = True
            engine.counters["hedges"] += 1
            self._launch(h.index, h.peer, hedge=True)
        self.peer_progress = track_progress(self.peer_progress, views, now)

    async def _plan_origin(self) -> None:
        """Fetch from the origin the chunks that are ours to fetch (`policy.striping`): nobody
        holds them, nobody else is fetching them, and we own their stripe (or inherit it from a
        stalled owner). Peers' holdings are refreshed first, so a fetch another node started a
        moment ago is seen. Never for a peers-only download (nor one with no origin known)."""
        if self.peers_only or not self.source.registry:
            return
        if not self._origin_plan(time.monotonic())[0]:
            return
        if not self.origin_only:
            await self.engine.refresh([self.digest], wait=self.engine.config.plan_wait)
        take, stripes, views = self._origin_plan(time.monotonic())
        if take and self.origin_task is None:
            self._launch_origin(take, stripes, views)

    def _origin_plan(self, now: float) -> tuple[list[int], Stripes, dict[str, BlobView]]:
        """The origin candidates (in chunk order), the stripes they were chosen by, and the views
        both were computed from."""
        cfg = self.engine.config
        views = self._views()
        self.peer_progress = track_progress(self.peer_progress, views, now)
        stripes = Stripes.of(
            self.engine.self_url,
            self.digest,
            views,
            self.peer_progress,
            now,
            cfg.owner_grace,
            cfg.stripe_chunks,
        )
        try:
            missing = self.engine.store.partials.missing(self.digest)
        except PeerSyncError:
            return [], stripes, views
        busy = {i for i, fl in self.flights.items() if fl} | self.origin_chunks
        return origin_candidates(missing, busy, views, self.chunk_size, stripes), stripes, views

    def _window(self, views: dict[str, BlobView]) -> int:
        """Requests in flight: enough to cover the bandwidth-delay product of our usable peers."""
        cfg = self.engine.config
        stats = [self.engine.stat(p) for p in views]
        return window(stats, self.chunk_size, cfg.peer_window, cfg.max_peer_window)

    # -- fetching ----------------------------------------------------------------------------

    def _launch(self, index: int, peer: str, hedge: bool = False) -> None:
        """Start a request for chunk `index` from `peer`. It counts in the peer's queue from now
        (not from when its task first runs), so the next round's choices see it."""
        st = self.engine.stat(peer)
        now = time.monotonic()
        flight = _Flight(index, peer, now, queue=st.inflight, hedge=hedge, hedged=hedge)
        self.engine.inflight += 1
        st.inflight += 1
        self.asked.setdefault(index, now)
        flight.task = asyncio.create_task(self._from_peer(flight))
        self.flights.setdefault(index, []).append(flight)
        flight.task.add_done_callback(functools.partial(self._landed, flight))

    def _landed(self, flight: _Flight, _task: asyncio.Task[None] | None = None) -> None:
        self.engine.inflight -= 1
        self.engine.stat(flight.peer).inflight -= 1
        for dl in self.engine.downloads.values():  # a slot is free: any blob may use it
            dl.wake.set()
        flights = self.flights.get(flight.index, [])
        if flight in flights:
            flights.remove(flight)
        if not flights:
            self.flights.pop(flight.index, None)
        if flight.task.cancelled():
            return
        if self.engine.store.partials.missing(self.digest) == [] or flight.index not in self._missing_set():
            for other in list(self.flights.get(flight.index, [])):  # a hedge's twin is not needed now
                if not other.received:
                    other.task.cancel()
        self.wake.set()

    def _missing_set(self) -> set[int]:
        try:
            return set(self.engine.store.partials.missing(self.digest))
        except PeerSyncError:
            return set()

    def _record(self, f: _Flight, seconds: float, outcome: str, chunk_seconds: float | None = None) -> None:
        self.engine.recent.append(
            TransferRecord(
                f.started,
                time.monotonic(),
                self.digest,
                f.index,
                f.peer,
                seconds,
                f.queue,
                f.hedge,
                outcome,
                chunk_seconds,
            )
        )

    async def _from_peer(self, f: _Flight) -> None:
        """Fetch one chunk and feed its outcome to the peer's model (`PeerStats`): bytes, seconds
        from launch, first-byte time, the queue it shared the peer with (the mean of our other
        requests in flight to it at its launch and at its end); success, failure (bad bytes count
        as failures) or, for a hedged straggler cancelled because its twin won, a censored sample
        of the time it had taken so far."""
        engine, st, index, peer = self.engine, self.engine.stat(f.peer), f.index, f.peer

        def shared() -> float:  # st.inflight still counts this request: it drops in _landed
            return (f.queue + max(st.inflight - 1, 0)) / 2

        offset = index * self.chunk_size
        length = min(self.chunk_size, self.source.size - offset)
        try:
            reply = await engine.client.chunk(peer, self.digest, offset, length)
        except (PeerError, PeerSyncError) as exc:
            seconds = time.monotonic() - f.started
            self._record(f, seconds, "failed")
            if st.chunk_failed(nbytes=length, seconds=seconds, queue=shared(), now=time.monotonic()):
                engine.drop(peer, f"{st.chunk_failures} failed chunk requests in a row: {exc}")
            return
        except asyncio.CancelledError:
            seconds = time.monotonic() - f.started
            outrun = f.hedged and not f.hedge
            if outrun:
                st.outrun(length, seconds, queue=shared(), now=time.monotonic())
            self._record(f, seconds, "outrun" if outrun else "cancelled")
            raise
        f.received = True  # from here on it is not cancelled for its twin's sake (`_landed`)
        data, claim = reply.data, reply.claim
        now = time.monotonic()
        seconds = now - f.started
        queue = shared()
        # With a verified table the store checks the chunk against it; otherwise the serving peer's
        # own hash of the chunk is what we hold it to. The store hashes the chunk anyway, so it
        # checks the claim in the same pass (`claims`): one SHA-256 of the bytes, not two.
        announced = f"chunk {index} of {self.digest} does not match the hash it announced"
        claims: dict[int, bytes] | None = None
        if not self.table_verified:
            if claim is None:
                self._corrupt(f, length, seconds, queue, announced)
                return
            claims = {index: claim}
        missing = index in self._missing_set()
        if not missing and claims and claim != await asyncio.to_thread(_sha256, data):
            self._corrupt(f, length, seconds, queue, announced)  # not stored, but still a lie
            return
        st.observe(length, seconds, latency=reply.headers_at - f.started, queue=queue, now=now)
        if not missing:
            self._record(f, seconds, "ok")
            return
        try:
            await engine.store.partials.aput_chunks(self.digest, [(index, data)], claims=claims)
        except ChunkCorrupt as exc:
            self._corrupt(f, length, seconds, queue, str(exc))
            return
        except (NotFound, AlreadyExists):
            self._record(f, seconds, "ok")
            return
        except PeerSyncError as exc:
            self._record(f, seconds, "ok")
            log.info("chunk not stored", digest=self.digest, index=index, error=str(exc))
            return
        # A hedge and its twin may both get here with the same chunk (both saw it missing before
        # either store finished, and a request whose bytes are in is not cancelled): the first to
        # come back pops `asked`, and only its bytes count, once.
        asked = self.asked.pop(index, None)  # None: its twin's bytes were stored a moment ago
        if asked is not None:
            engine.counters["peer_bytes"] += length
            if engine.on_chunk is not None:
                engine.on_chunk("peer", seconds, length)
        if not self.table_verified:
            self.provenance[index] = peer
        self._record(f, seconds, "ok", None if asked is None else time.monotonic() - asked)
        self._progress(index)

    def _corrupt(self, f: _Flight, nbytes: int, seconds: float, queue: float, why: str) -> None:
        """Bad bytes from `f.peer`: a failure in its model, and the peer is dropped."""
        engine = self.engine
        engine.counters["corrupt_chunks"] += 1
        engine.stat(f.peer).chunk_failed(nbytes=nbytes, seconds=seconds, queue=queue, now=time.monotonic())
        self._record(f, seconds, "corrupt")
        engine.drop(f.peer, why)

    def _progress(self, index: int) -> None:
        self.last_progress = time.monotonic()
        self.wanted.discard(index)
        self.asked.pop(index, None)

    def _launch_origin(self, candidates: list[int], stripes: Stripes, views: dict[str, BlobView]) -> None:
        """One Range request for the run of consecutive candidates `policy.striping.origin_run`
        picks (a wanted chunk first)."""
        cfg = self.engine.config
        run = origin_run(candidates, self.wanted, stripes, cfg.origin_batch_chunks, cfg.solo_batch_chunks)
        if run is None:
            return
        self.origin_chunks = set(run.chunks)
        self.engine.counters["origin_solo_chunks"] += run.solo_chunks
        self.engine.counters["origin_heir_chunks"] += run.heir_chunks
        self.engine.counters["origin_striped_chunks"] += len(run.chunks)
        now = time.monotonic()
        log.debug(
            "origin fetch",
            digest=self.digest[:19],
            chunks=f"{run.first}-{run.last}",
            interested=len(stripes.interested),
            owner=stripes.owner(run.first),
            stalled=[
                p
                for p, v in views.items()
                if stalled(self.peer_progress.get(p), bool(v.fetching), now, cfg.owner_grace)
            ],
            seen={p[-9:-5]: (v.count(), sorted(v.fetching)) for p, v in views.items()},
        )
        self.origin_task = asyncio.create_task(self._from_origin(run.first, run.last))
        self.origin_task.add_done_callback(lambda _t: self.wake.set())

    async def _from_origin(self, first: int, last: int) -> None:
        """Read the Range and store its chunks while the next ones arrive: each store (one
        fdatasync and one LMDB commit) takes every chunk that came in during the previous one."""
        engine, src, cs = self.engine, self.source, self.chunk_size
        start = first * cs
        end = min(src.size, (last + 1) * cs)
        buf = bytearray()
        index = first
        batch: list[tuple[int, bytes]] = []
        storing: asyncio.Task[None] | None = None
        mark = time.monotonic()
        try:
            pieces = engine.origin.read_blob(
                src.registry, src.repository, self.digest, start, end - start, src.size
            )
            async with contextlib.aclosing(pieces):
                async for piece in pieces:
                    buf += piece
                    while index <= last and len(buf) >= min(cs, src.size - index * cs):
                        n = min(cs, src.size - index * cs)
                        if engine.on_chunk is not None:
                            now = time.monotonic()
                            engine.on_chunk("origin", now - mark, n)
                            mark = now
                        batch.append((index, bytes(buf[:n])))
                        del buf[:n]
                        index += 1
                    if storing is not None and len(batch) >= MAX_STORE_BATCH:
                        await storing  # back-pressure: bounded memory when the disk lags
                    if batch and (storing is None or storing.done()):
                        if storing is not None:
                            await storing  # raises what the previous store raised
                        storing = asyncio.create_task(self._store_origin_chunks(batch))
                        batch = []
            if storing is not None:
                await storing
                storing = None
            if batch:
                await self._store_origin_chunks(batch)
        finally:
            if storing is not None and not storing.done():
                storing.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await storing
        if index <= last:
            raise Unavailable(f"origin ended early for {self.digest} at chunk {index}")

    async def _store_origin_chunks(self, chunks: list[tuple[int, bytes]]) -> None:
        engine = self.engine
        for index, _ in chunks:
            self.origin_chunks.discard(index)
        missing = self._missing_set()
        todo = [(i, data) for i, data in chunks if i in missing]
        if not todo:
            return
        try:
            await engine.store.partials.aput_chunks(self.digest, todo)
        except ChunkCorrupt:
            # The origin is the authority: a table that disagrees with it is wrong.
            for peer in self.table_from:
                engine.drop(peer, f"its chunk table for {self.digest} disagrees with the origin")
            raise DigestMismatch(f"chunk table for {self.digest} disagrees with the origin") from None
        except (NotFound, AlreadyExists):
            return
        for index, data in todo:
            engine.counters["origin_bytes"] += len(data)
            self.provenance.pop(index, None)
            self._progress(index)
            for f in self.flights.pop(index, []):
                if not f.received:
                    f.task.cancel()

    async def _maybe_fetch_table(self) -> None:
        """Adopt the verified chunk table of peers holding the complete blob (two must agree when
        two exist)."""
        complete = [p for p, v in self._views().items() if v.complete and v.chunk_size == self.chunk_size]
        if not complete:
            return
        self.engine.rng.shuffle(complete)
        tables: list[tuple[str, list[bytes]]] = []
        for peer in complete[:2]:
            with contextlib.suppress(PeerSyncError):
                tables.append((peer, await self.engine.client.table(peer, self.digest, self.nchunks)))
        if not tables:
            return
        if len(tables) == 2 and tables[0][1] != tables[1][1]:
            log.warning(
                "peers disagree on a chunk table; using the origin",
                digest=self.digest,
                peers=[t[0] for t in tables],
            )
            self.origin_only = True
            return
        try:
            dropped = self.engine.store.partials.set_hashes(self.digest, tables[0][1])
        except PeerSyncError as exc:
            log.warning("chunk table refused", digest=self.digest, error=str(exc))
            return
        for i in dropped:
            peer = self.provenance.pop(i, "")
            if peer:
                self.engine.drop(peer, f"its chunk {i} of {self.digest} disagrees with the verified table")
        self.table_verified = True
        self.table_from = [t[0] for t in tables]


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
