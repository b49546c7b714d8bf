"""One simulated node: its store, its downloads, its engine, as the real index section sees them.

`SimEngine` is what `peer.control.index_sections.IndexMember` needs of an engine (its
`EngineSide` seam): the real member side of the index section runs over it unchanged, so the sync
payloads (incremental announcements, queries, lease requests, releases) and the handling of the
tracker's answers (candidate sets turned into views, leases granted) are the product's own code.

`SimDownload` composes the engine's decisions the way `peer.engine.Download` does, from the same
pure modules: `holdings.usable_views` / `holdings.holders`, `window.window`, `schedule.schedule`
with a `choice.Picker` (the bound rule, the subnet factor of `subnet.Locality`), `hedging.hedges`
at `hedging.late_at_bound`, every outcome fed back into `peerstats.PeerStats` (success, and the
censored sample of a hedged straggler whose twin won). Its origin work follows the tracker's leases
as `Download._lease_origin` and `Download.lease_request` do. The I/O those methods do (tasks, HTTP,
store writes) is replaced by the simulated network (`testbed.sim.network`) and a chunk set; what is
re-composed here is the glue, never a decision.

Not modelled: chunk verification failures, the direct (no tracker) path's `/have` polling and
striping, readers waiting on particular chunks (a pull reads nothing until the layer is whole).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from random import Random

from kernel.errors import NotFound
from kernel.store.schema import BlobRecord
from peer.engine import Coordination, Untracked
from peer.policy.choice import Picker, Rule
from peer.policy.hedging import RESERVE, hedges, late_at_bound, oldest_requests
from peer.policy.holdings import BlobView, filling, holders, usable_views
from peer.policy.peerstats import PeerStats
from peer.policy.schedule import Slots, schedule
from peer.policy.subnet import Locality
from peer.policy.window import window

PEER_WINDOW, MAX_PEER_WINDOW, MAX_INFLIGHT = 8, 32, 24  # peer.engine.EngineConfig's defaults
SOLO_BATCH = 32
HEDGE_FLOOR = 0.05


@dataclass
class Blob:
    """A blob of the image: digest, size, chunk size."""

    digest: str
    size: int
    chunk_size: int = 1 << 20

    @property
    def nchunks(self) -> int:
        return max(1, -(-self.size // self.chunk_size))

    def chunk_bytes(self, i: int) -> int:
        """The size of chunk `i` (the last one may be short)."""
        return min(self.chunk_size, self.size - i * self.chunk_size)


class SimPartials:
    """The partial blobs of a node's store (`index_sections.PartialsSide`)."""

    def __init__(self) -> None:
        self.blobs: dict[str, Blob] = {}
        self.bits: dict[str, int] = {}

    def records(self) -> list[BlobRecord]:
        return [self.record(d) for d in self.blobs]

    def record(self, digest: str) -> BlobRecord:
        blob = self.blobs.get(digest)
        if blob is None:
            raise NotFound(f"no partial blob {digest}")
        return BlobRecord(digest, blob.size, blob.chunk_size, 0, 0, state="partial")

    def have(self, digest: str) -> bytes:
        blob = self.blobs[digest]
        return self.bits[digest].to_bytes(-(-blob.nchunks // 8), "little")


class SimStore:
    """A node's store: partial blobs and complete ones (`index_sections.StoreSide`)."""

    def __init__(self) -> None:
        self._partials = SimPartials()
        self.complete: dict[str, Blob] = {}

    @property
    def partials(self) -> SimPartials:
        return self._partials

    def iter_blobs(self) -> Iterator[BlobRecord]:
        return (BlobRecord(b.digest, b.size, b.chunk_size, 0, 0) for b in self.complete.values())

    def record(self, digest: str) -> BlobRecord:
        blob = self.complete.get(digest)
        if blob is None:
            raise NotFound(f"no blob {digest}")
        return BlobRecord(digest, blob.size, blob.chunk_size, 0, 0)

    def exists(self, digest: str) -> bool:
        return digest in self.complete


@dataclass
class Flight:
    """A chunk request to a peer in flight (a `hedging.InFlight`)."""

    index: int
    peer: str
    started: float
    queue: int
    hedge: bool = False
    hedged: bool = False
    first_byte: float = 0.0
    cancelled: bool = False


class _Task:
    """A download's task as the index section looks at it."""

    def __init__(self) -> None:
        self.finished = False

    def done(self) -> bool:
        return self.finished


Launch = Callable[["SimDownload", int, str, bool], None]
Origin = Callable[["SimDownload", int, int], None]


@dataclass
class SimDownload:
    """One blob being filled (`index_sections.DownloadSide`; see the module docstring)."""

    engine: SimEngine
    blob: Blob
    started: float
    missing: set[int] = field(default_factory=set)
    flights: dict[int, list[Flight]] = field(default_factory=dict)
    origin_chunks: set[int] = field(default_factory=set)
    leases: list[tuple[int, int]] = field(default_factory=list)
    leases_done: list[tuple[int, int]] = field(default_factory=list)
    wanted: set[int] = field(default_factory=set)
    task: _Task = field(default_factory=_Task)
    asked_early: bool = False
    ended: float | None = None

    def __post_init__(self) -> None:
        self.missing = set(range(self.blob.nchunks))

    # -- DownloadSide ---------------------------------------------------------------------------

    def lease_request(self) -> tuple[list[int], int] | None:
        """As `peer.engine.Download.lease_request`."""
        if not self.engine.coordination.tracking() or self.task.done() or len(self.leases) >= 2:
            return None
        missing = sorted(self.missing)
        held = holders(self.views(), missing, self.blob.chunk_size)
        busy = {i for i, fl in self.flights.items() if fl} | self.origin_chunks
        leased = {i for a, b in self.leases for i in range(a, b + 1)}
        need = {i for i in missing if not held[i] and i not in busy and i not in leased}
        if not need:
            return None
        return [i for i in sorted(self.wanted) if i in need][:16], SOLO_BATCH

    def grant_lease(self, first: int, last: int) -> None:
        """As `peer.engine.Download.grant_lease`."""
        if not 0 <= first <= last < self.blob.nchunks or (first, last) in self.leases:
            return
        self.leases.append((first, last))
        self.engine.counters["leases"] += 1
        self.asked_early = False
        self.engine.wake(self)

    def drop_leases(self) -> None:
        self.leases.clear()
        self.leases_done.clear()

    # -- one planning round ---------------------------------------------------------------------

    def views(self) -> dict[str, BlobView]:
        views = self.engine.views.get(self.blob.digest, {})
        return usable_views(views, self.engine.stats, self.engine.now(), self.blob.size)

    def plan(self, launch: Launch, origin: Origin) -> None:
        """`Download._schedule` then, with no origin run in flight, `Download._lease_origin`."""
        eng, blob = self.engine, self.blob
        now = eng.now()
        views = self.views()
        missing = sorted(self.missing)
        in_flight = {i for i, fl in self.flights.items() if fl} | self.origin_chunks
        held = holders(views, missing, blob.chunk_size)
        slots = Slots(
            window=window([eng.stat(p) for p in views], blob.chunk_size, PEER_WINDOW, MAX_PEER_WINDOW),
            flights=sum(len(fl) for fl in self.flights.values()),
            inflight=eng.inflight,
            max_inflight=MAX_INFLIGHT,
            reserve=RESERVE,
        )
        oldest = eng.oldest()
        picker = Picker(
            eng.stats, blob.chunk_size, now, eng.rng, Rule.BOUND, eng.locality, oldest, filling=filling(views)
        )
        fetches = schedule(missing, held, self.wanted, in_flight, slots, picker)
        for f in fetches:
            launch(self, f.index, f.peer, False)
        stats, nbytes = eng.stats, blob.chunk_size
        room = slots.hedge_room(len(fetches))
        late = lambda f: late_at_bound(f, stats, now, nbytes, HEDGE_FLOOR)  # noqa: E731
        for h in hedges(self.flights, held, late, picker, room, self.wanted):
            self.flights[h.index][0].hedged = True
            eng.counters["hedges"] += 1
            launch(self, h.index, h.peer, True)
        if not self.origin_chunks and eng.coordination.tracking():
            self._lease_origin(origin)

    def _lease_origin(self, origin: Origin) -> None:
        busy = {i for i, fl in self.flights.items() if fl}
        while self.leases:
            first, last = self.leases[0]
            run = [i for i in range(first, last + 1) if i in self.missing and i not in busy]
            if run:
                end = run[0]
                while end + 1 <= last and end + 1 in self.missing and end + 1 not in busy:
                    end += 1
                self.origin_chunks = set(range(run[0], end + 1))
                self.engine.counters["origin_lease_chunks"] += end - run[0] + 1
                origin(self, run[0], end)
                return
            self.leases_done.append(self.leases.pop(0))
        if self.lease_request() is not None and not self.asked_early:
            self.asked_early = True
            self.engine.coordination.sync_soon()


class SimEngine:
    """A node's engine as the index section and the policy see it (see the module docstring)."""

    def __init__(
        self, self_url: str, now: Callable[[], float], rng: Random, wake: Callable[[SimDownload], None]
    ) -> None:
        self.self_url = self_url
        self.now = now
        self.rng = rng
        self.wake = wake
        self.coordination: Coordination = Untracked()
        self._store = SimStore()
        self._downloads: dict[str, SimDownload] = {}
        self._counters: dict[str, int] = {
            "control_requests": 0,
            "leases": 0,
            "hedges": 0,
            "origin_lease_chunks": 0,
            "origin_bytes": 0,
            "peer_bytes": 0,
        }
        self.stats: dict[str, PeerStats] = {}
        self.views: dict[str, dict[str, BlobView]] = {}
        self.inflight = 0
        self.locality = Locality.of(self_url)

    @property
    def store(self) -> SimStore:
        return self._store

    @property
    def downloads(self) -> dict[str, SimDownload]:
        return self._downloads

    @property
    def counters(self) -> dict[str, int]:
        return self._counters

    def stat(self, peer: str) -> PeerStats:
        return self.stats.setdefault(peer, PeerStats())

    def oldest(self) -> dict[str, tuple[float, int]]:
        """As `Engine.oldest`."""
        return oldest_requests(f for dl in self._downloads.values() for fl in dl.flights.values() for f in fl)

    def fetching(self, digest: str) -> list[int]:
        dl = self._downloads.get(digest)
        return sorted(dl.origin_chunks) if dl is not None and not dl.task.done() else []

    def set_views(self, digest: str, views: dict[str, BlobView]) -> None:
        self.views[digest] = views
        dl = self._downloads.get(digest)
        if dl is not None:
            self.wake(dl)

    def start(self, blob: Blob) -> SimDownload:
        """Start filling `blob` (`Engine.ensure`): a partial blob, announced at the next sync."""
        dl = SimDownload(self, blob, self.now())
        self._downloads[blob.digest] = dl
        self._store.partials.blobs[blob.digest] = blob
        self._store.partials.bits[blob.digest] = 0
        if self.coordination.tracking():
            self.coordination.sync_soon()
        return dl

    def landed(self, dl: SimDownload, index: int) -> bool:
        """Chunk `index` of `dl`'s blob is stored; True if that completed the blob."""
        if index not in dl.missing:
            return False
        dl.missing.discard(index)
        d = dl.blob.digest
        self._store.partials.bits[d] |= 1 << index
        if dl.missing:
            return False
        del self._store.partials.blobs[d]
        del self._store.partials.bits[d]
        self._store.complete[d] = dl.blob
        dl.task.finished = True
        dl.ended = self.now()
        dl.leases_done += dl.leases
        dl.leases.clear()
        return True
