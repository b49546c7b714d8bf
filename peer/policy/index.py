"""The tracker's index: who holds which chunks of which blob, who fetches what from the origin.

The tracker keeps soft state only (docs/control-plane.md, "The tracker index"), rebuilt from the
members' announcements after a failover. Per blob: its size and chunk size, the members holding it
whole (*complete*) and the members filling it (*partial*, each with a presence bitmap, possibly
empty: a member that announced it started), and the **origin leases**: which member fetches which
run of chunks from the origin right now, granted when, and when that run last made progress. Per
member: its subnet and URL and the blobs it announced (so a dead member is dropped in time
proportional to what it held, not to the site).

Operations, each a method of `Index`, time passed in as `now`, randomness as a `random.Random`:

- `apply(member, Announcement, now)`: a delta from one member (chunk ranges that arrived, the blob
  started, completed or dropped, the runs it is fetching from the origin).
- `drop_member(member)`: the member left the site (or fell silent); its holdings and candidacy
  vanish at once, its leases live on their own clock (below) until they expire or it comes back.
- `candidates(digest, asker, now, rng)`: a bounded set of holders (`candidates`, 16) for a member
  filling the blob. Complete holders and the partial holders with the most chunks, the asker's
  subnet first, a random spread among equals (so that one seed is not everyone's first choice),
  never the asker, and members holding nothing are left out. A *cover* pass makes sure a chunk the
  asker misses and only a few members hold is offered by someone (a chunk held only by a member
  ranked below the top 16 would otherwise never reach anyone, and could never be leased either).
  A partial holder is in the current candidate set of at most `offer_cap` (32) askers, or of as
  many as it serves chunks in the time an asker uses a set (`offer_rate` x the blob's mean
  interval between one asker's asks: 64 at the 0.5 s pace of 1,000 members), whichever is more
  (an asker's set is current until its next ask, its completion or departure, at most
  `offer_ttl`); past that it is *offered out*: skipped, and the next-ranked holders are offered
  instead. Why: in a flash crowd the first holders of a fresh chunk are the few members fetching it from
  the origin, every asker was offered them at once, and each queued a request there (the engine
  caps a partial holder at one of its requests, `choice.FILLING_CAP`, but N askers still make a
  queue N deep): a site's whole download ran through the up links of its five or six origin
  leaseholders, 18x the physical limit at 1,000 nodes (bench/SIMULATION.md). With the cap, a
  holder's queue is about what its up link moves before its askers hear of other holders, and the
  askers it was not offered to are pointed at the members that got the chunk a moment earlier:
  each generation of holders serves the next. The rate is a site-wide figure (1 MiB chunks at
  1 Gbit/s), not each holder's own link. Complete holders are not capped, as
  `choice.FILLING_CAP` does not cap them: a site pulling from one seed is offered that seed.
- `grant(digest, member, want, max_chunks, now)`: an origin lease, a run of consecutive chunks that
  nobody holds and nobody has leased: the first free chunk the member wants (in its order), else
  the lowest free chunk; `lease_chunks` (4) long while others fill the blob, so the origin work is
  spread and re-planned often, `solo_lease_chunks` (32) when the member is alone. Two windows in a
  blob's life bend that, both counted from when the index first heard of the blob (`now` passed in):
  - *gathering* (`gather`, 0.5 s) for a blob first announced with nothing held: the start of a
    burst. The first member's syncs reach the tracker before the others have announced the blob,
    and a member whose syncs are fast (the tracker's own node) asks again every 50 ms: with long
    or many leases that one member got the whole image from the origin, the rest of the site
    queued behind it with nothing to trade (the scale simulator, bench/SIMULATION.md: 100 nodes
    17.9 s against 4.9 s), and when it died mid-pull most of what the uplink had carried died with
    it (the tracker-dies test, 1.39x the image on the uplink). So while the blob gathers a member
    holds one live lease of it, `gather_lease_chunks` (1) long; a member still alone after it gets
    the long runs.
  - *adopting* (`adopt_wait`, 1 s) for a blob first announced with chunks held or origin runs in
    flight: a tracker that has just taken over (or a member re-announcing after it was dropped).
    The members re-announce what they fetch from the origin in their first sync to the new
    tracker, one by one; a lease granted before the last of them has was a run someone is
    already fetching, fetched twice. No leases of it in that second.
  A lease whose holder announced no progress on its runs for `lease_grace` (6 s) is expired and its
  run is free again (re-granted); progress on any of a member's leases, of any blob, counts for all
  of them: the member's runs share its part of the uplink, and the one whose turn has not come
  (the next run of a blob, or a run of the next layer while the first one fills: a Go client or
  CRI pull downloads an image's layers at once) must not expire, be re-granted and be fetched
  twice (1.12x the image on the uplink in 2 of 6 8-node Debian bursts before this). A member
  stuck on one run while others progress keeps it until those are done; the members waiting for
  its chunks fetch them themselves after the engine's rescue delay. A dropped member's leases are
  not freed with it: the tracker drops a member after `member_timeout` (3 s) without a sync, and on
  a crowded host a member that is alive and fetching its run can be that late (a 32-node burst on
  2 cores: the run re-granted at once was fetched twice, 1.11x the image on the uplink). So its
  leases expire by `lease_grace` from their last progress as any other, which for a member that
  really died costs at most that much before its run is re-granted; when it comes back, its first
  announcement of the blob replaces them by the runs it says it is fetching (`_adopt`).
  A member holds at most `leases_per_member`
  (2: the batch in flight and the next one) live leases per blob.
- `release(digest, member, first, last)`: the member finished (or gave up) a run.
- `replicas(digest)`: members holding a complete copy; `complete_holders(digest, excluding)`: the
  same less one member (the popularity section's replica counts, for the cache manager).

Invariants (tested by hypothesis in tests/peer/policy/test_index.py): at most one live lease covers
any chunk; a lease never covers a chunk that is held (at grant time) or leased; a burst of members
asking for leases covers every chunk exactly once; the asker is never its own candidate and the set
is bounded; a dropped member leaves no holdings, and its leases only until they expire.

Complexity, for the scale simulator (10,000 members): bitmaps are Python ints (bit i = chunk i);
`apply` costs O(chunks that changed); `drop_member` O(chunks the member held); `grant` O(leases of
the blob + run length) and a few bit operations over the blob's bitmaps; `candidates` O(k) plus a
re-ranking of the blob's holders, O(H log H), at most once per `rank_ttl` of `now` while the
holdings change (asks in between use the ranking as it was, minus members that left); skipping
offered-out holders costs what is read past them (`_spread` draws lazily), at most
members x `candidates` / `offer_cap` holders are offered out at once, and an ask's bookkeeping of
the sets it replaces is O(`candidates`). Memory: one
bitmap per (member, partial blob), one holder count and at most `seeds` member ids per chunk.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from random import Random
from urllib.parse import urlsplit


@dataclass(frozen=True)
class IndexConfig:
    """The index's tunables (docs/control-plane.md)."""

    candidates: int = 16  # holders offered per blob and ask
    lease_chunks: int = 4  # run length of a lease while others fill the blob
    solo_lease_chunks: int = 32  # ... when the requester is the only member filling it
    gather: float = 0.5  # a new blob's first seconds: one short lease per member (a burst forms)
    gather_lease_chunks: int = 1  # ... this long
    adopt_wait: float = 1.0  # a blob first heard of in progress: no leases this long (runs in flight
    # are re-announced to a new tracker first)
    lease_grace: float = 6.0  # seconds without progress after which a lease is re-granted
    leases_per_member: int = 2  # live leases per member and blob: the run in flight and the next
    rank_ttl: float = 0.5  # how long a blob's ranking of holders is reused while holdings change
    seeds: int = 4  # members remembered per chunk, for the cover pass
    cover_reserve: int = 4  # candidate slots kept for the cover pass
    offer_cap: int = 32  # askers whose current set may hold one partial holder, at least (0: no cap)
    offer_rate: float = 128.0  # ... or as many as a holder serves chunks in one ask interval: 1 MiB
    # chunks per second at 1 Gbit/s
    offer_ttl: float = 30.0  # an asker's set counts this long at most (pacing.MAX_PACE)


@dataclass(frozen=True)
class Announcement:
    """What one member says about one blob in one sync (a delta, or its whole state on `full`).

    `add` are inclusive chunk ranges that arrived; `filling` says the member started filling the
    blob (it may hold nothing yet); `complete` that it holds the blob whole and verified; `drop`
    that it holds none of it any more. `fetching`, when not None, are the runs it is fetching from
    the origin right now (sent after a failover so the new tracker adopts them as leases)."""

    digest: str
    size: int
    chunk_size: int
    add: tuple[tuple[int, int], ...] = ()
    filling: bool = False
    complete: bool = False
    drop: bool = False
    fetching: tuple[tuple[int, int], ...] | None = None


@dataclass
class Lease:
    """One member fetches chunks `first`..`last` of a blob from the origin."""

    digest: str
    member: str
    first: int
    last: int
    granted: float
    progress: float  # when the member last announced a chunk of the run (or `granted`)

    @property
    def mask(self) -> int:
        """The run as a bitmap."""
        return ((1 << (self.last - self.first + 1)) - 1) << self.first


@dataclass(frozen=True)
class Holder:
    """A candidate for one blob: who, and what it holds and is fetching from the origin."""

    member: str
    url: str
    complete: bool
    have: int  # presence bitmap (bit i = chunk i); 0 for a complete holder
    fetching: tuple[tuple[int, int], ...]  # its live lease runs


@dataclass
class _Member:
    """What the index knows of one member: where it serves, its subnet, the blobs it announced."""

    url: str = ""
    subnet: str = ""
    blobs: set[str] = field(default_factory=set)
    origin_progress: float = float("-inf")  # when a chunk last landed on one of its leases, any blob


@dataclass
class _Ranking:
    """A blob's holders ranked at `at`: all of them, and split by subnet."""

    at: float
    groups: list[list[str]]  # members of equal score, best score first
    by_subnet: dict[str, list[list[str]]]


class _Blob:
    """One blob's holdings and leases."""

    def __init__(self, size: int, chunk_size: int, gather_until: float, hold_until: float) -> None:
        self.size = size
        self.chunk_size = chunk_size
        self.nchunks = max(1, -(-size // chunk_size))
        self.full = (1 << self.nchunks) - 1
        self.complete: set[str] = set()
        self.have: dict[str, int] = {}  # partial members (filling), with their bitmaps
        self.counts = [0] * self.nchunks  # partial holders per chunk
        self.held = 0  # bits with counts > 0
        self.seeds: list[list[str]] = [[] for _ in range(self.nchunks)]
        self.leases: list[Lease] = []
        self.gather_until = gather_until  # short leases, one per member, before (gathering)
        self.hold_until = hold_until  # no leases before (adopting)
        self.ranking: _Ranking | None = None
        self.dirty = True
        self.sets: dict[str, tuple[float, list[str]]] = {}  # asker -> (asked at, partial holders)
        self.asks: deque[tuple[float, str]] = deque()  # (asked at, asker), oldest first: the ttl
        self.load: dict[str, int] = {}  # partial holder -> askers whose current set holds it
        self.asked: dict[str, float] = {}  # asker -> when it last asked
        self.interval = 0.0  # seconds between one asker's asks (EWMA): how long a set is used

    @property
    def empty(self) -> bool:
        """Nobody holds or fills the blob any more: the index forgets it."""
        return not self.complete and not self.have

    def drop_leases(self, member: str) -> None:
        """Forget every lease `member` holds of this blob (live or not)."""
        self.leases = [le for le in self.leases if le.member != member]

    def leased(self) -> int:
        """The chunks under a lease (live or not: the caller expires them first)."""
        mask = 0
        for lease in self.leases:
            mask |= lease.mask
        return mask

    def add_bits(self, member: str, new: int, seeds: int) -> None:
        """`member` now holds chunks `new` too."""
        for i in _bits(new):
            self.counts[i] += 1
            if len(self.seeds[i]) < seeds:
                self.seeds[i].append(member)
        self.held |= new

    def remove_bits(self, member: str, bits: int) -> None:
        """`member` no longer holds (or no longer counts as partial holder of) chunks `bits`."""
        for i in _bits(bits):
            self.counts[i] -= 1
            if not self.counts[i]:
                self.held &= ~(1 << i)
            if member in self.seeds[i]:
                self.seeds[i].remove(member)

    def offered_out(self, member: str, cfg: IndexConfig) -> bool:
        """Whether partial holder `member` is in as many askers' current sets as it may be."""
        if cfg.offer_cap <= 0 or member in self.complete:
            return False
        return self.load.get(member, 0) >= max(cfg.offer_cap, int(cfg.offer_rate * self.interval))

    def offer(self, asker: str, chosen: Iterable[str], now: float, ttl: float) -> None:
        """`asker`'s current set is now `chosen` (its previous one no longer counts); the time
        since its last ask feeds `interval`."""
        self.retire(asker)
        partial = [m for m in chosen if m not in self.complete]
        last = self.asked.get(asker)
        if last is not None:
            gap = min(now - last, ttl)
            self.interval = gap if not self.interval else 0.9 * self.interval + 0.1 * gap
        self.asked[asker] = now
        self.sets[asker] = (now, partial)
        self.asks.append((now, asker))
        for m in partial:
            self.load[m] = self.load.get(m, 0) + 1

    def retire(self, asker: str) -> None:
        """`asker`'s current set no longer counts (it asked again, completed, or left)."""
        _at, partial = self.sets.pop(asker, (0.0, []))
        for m in partial:
            left = self.load.get(m, 0) - 1
            if left > 0:
                self.load[m] = left
            else:
                self.load.pop(m, None)

    def expire_sets(self, now: float, ttl: float) -> None:
        """Retire the sets older than `ttl` (an asker that stopped asking without completing)."""
        while self.asks and now - self.asks[0][0] > ttl:
            at, asker = self.asks.popleft()
            current = self.sets.get(asker)
            if current is not None and current[0] == at:
                self.retire(asker)

    def seeds_of(self, i: int, seeds: int) -> list[str]:
        """Members holding chunk `i` (up to `seeds`), refilled by a scan if all seeds left."""
        if not self.seeds[i] and self.counts[i]:
            self.seeds[i] = [m for m, h in self.have.items() if h >> i & 1][:seeds]
        return self.seeds[i]


class Index:
    """The tracker's index of one site (see the module docstring)."""

    def __init__(self, config: IndexConfig | None = None) -> None:
        self.config = config or IndexConfig()
        self._blobs: dict[str, _Blob] = {}
        self._members: dict[str, _Member] = {}

    # -- members -------------------------------------------------------------------------------

    def set_member(self, member: str, url: str, subnet: str | None = None) -> None:
        """Where `member` serves chunks, and its subnet (by default `subnet_of(url)`)."""
        rec = self._members.setdefault(member, _Member())
        if subnet is None and rec.url == url and rec.subnet:
            return  # every sync names the member's URL: parse it once
        rec.url = url
        rec.subnet = subnet_of(url) if subnet is None else subnet

    def members(self) -> list[str]:
        """Members the index knows of."""
        return list(self._members)

    def blobs_of(self, member: str) -> set[str]:
        """Blobs `member` announced (held whole or in part, or filling)."""
        rec = self._members.get(member)
        return set(rec.blobs) if rec else set()

    def drop_member(self, member: str) -> None:
        """`member` left the site: its holdings and candidacy vanish; its leases expire on their
        own clock (see the module docstring: a silent member may only be slow)."""
        rec = self._members.pop(member, None)
        if rec is None:
            return
        for digest in rec.blobs:
            blob = self._blobs.get(digest)
            if blob is not None:
                self._remove(digest, blob, member, leases=False)

    # -- announcements ---------------------------------------------------------------------------

    def apply(self, member: str, ann: Announcement, now: float) -> bool:
        """Apply one announcement; False if it was refused (a size or chunk size that differs from
        what the index holds for that digest: another object under the same name, or a lie)."""
        blob = self._blobs.get(ann.digest)
        if blob is not None and (blob.size, blob.chunk_size) != (ann.size, ann.chunk_size):
            return False
        if ann.size < 0 or ann.chunk_size <= 0:
            return False
        rec = self._members.setdefault(member, _Member())
        if blob is not None and ann.digest not in rec.blobs:
            # back after being dropped: what it fetches now is in this announcement (`_adopt`)
            blob.drop_leases(member)
        if ann.drop:
            if blob is not None:
                self._remove(ann.digest, blob, member)
            rec.blobs.discard(ann.digest)
            return True
        if blob is None:
            blob = self._blobs[ann.digest] = self._new_blob(ann, now)
        rec.blobs.add(ann.digest)
        blob.dirty = True
        if ann.complete:
            old = blob.have.pop(member, None)
            if old is not None:
                blob.remove_bits(member, old)
            blob.complete.add(member)
            blob.retire(member)
            blob.asked.pop(member, None)
            blob.drop_leases(member)
            return True
        if member in blob.complete:  # a complete holder's holdings cannot grow; ignore the rest
            return True
        old = blob.have.get(member, 0)
        add = 0
        for first, last in ann.add:
            add |= _run_mask(first, last, blob.nchunks)
        new = add & ~old
        blob.have[member] = old | new
        if new:
            blob.add_bits(member, new, self.config.seeds)
            self._progress(blob, member, new, now)
        if ann.fetching is not None:
            self._adopt(ann.digest, blob, member, ann.fetching, now)
        return True

    def _new_blob(self, ann: Announcement, now: float) -> _Blob:
        """The index's record of a blob it first hears of in `ann`: one in progress (chunks held,
        origin runs in flight) is adopted, a new one gathers (see the module docstring)."""
        if ann.add or ann.fetching or ann.complete:
            return _Blob(ann.size, ann.chunk_size, now, now + self.config.adopt_wait)
        return _Blob(ann.size, ann.chunk_size, now + self.config.gather, now)

    def _progress(self, blob: _Blob, member: str, new: int, now: float) -> None:
        """Chunks `new` arrived at `member`: if they progressed one of its leases, all its leases
        of the blob progressed (the next run waits behind the one in flight: a long run on a slow
        uplink must not let the next one expire, be re-granted and be fetched twice); leases whose
        whole run is held now are done."""
        mine = [le for le in blob.leases if le.member == member]
        if any(le.mask & new for le in mine):
            for lease in mine:
                lease.progress = now
            rec = self._members.get(member)
            if rec is not None:
                rec.origin_progress = now
        blob.leases = [le for le in blob.leases if le.mask & ~blob.held]

    def _adopt(
        self, digest: str, blob: _Blob, member: str, runs: Iterable[tuple[int, int]], now: float
    ) -> None:
        """Record the origin fetches a member announced as its leases, where no live lease (its
        own included) covers them yet: the one-lease-per-chunk invariant wins over the announcement."""
        cfg = self.config
        blob.leases = [le for le in blob.leases if self._live(le, now)]
        taken = blob.leased()
        for first, last in runs:
            free = _run_mask(first, last, blob.nchunks) & ~taken & ~blob.held
            for lo, hi in _runs(free):
                blob.leases.append(Lease(digest, member, lo, hi, now, now))
            taken |= free

    def _remove(self, digest: str, blob: _Blob, member: str, leases: bool = True) -> None:
        blob.complete.discard(member)
        old = blob.have.pop(member, None)
        if old is not None:
            blob.remove_bits(member, old)
        if leases:
            blob.drop_leases(member)
        blob.retire(member)
        blob.load.pop(member, None)
        blob.asked.pop(member, None)
        blob.dirty = True
        if blob.empty:
            del self._blobs[digest]

    # -- questions -------------------------------------------------------------------------------

    def size_of(self, digest: str) -> tuple[int, int] | None:
        """(size, chunk size) the index holds for `digest`, or None if nobody announced it."""
        blob = self._blobs.get(digest)
        return None if blob is None else (blob.size, blob.chunk_size)

    def replicas(self, digest: str) -> int:
        """How many members hold a complete copy of `digest`."""
        blob = self._blobs.get(digest)
        return len(blob.complete) if blob else 0

    def complete_holders(self, digest: str, excluding: str) -> int:
        """How many members other than `excluding` hold a complete copy of `digest` (0 for a blob
        nobody announced: the index hears every member's holdings)."""
        blob = self._blobs.get(digest)
        return len(blob.complete - {excluding}) if blob else 0

    def filling(self, digest: str) -> set[str]:
        """The members filling `digest` (announced it, not complete)."""
        blob = self._blobs.get(digest)
        return set(blob.have) if blob else set()

    def holdings(self, digest: str, member: str) -> int | None:
        """`member`'s bitmap of `digest` (all ones when complete); None if it announced none."""
        blob = self._blobs.get(digest)
        if blob is None:
            return None
        if member in blob.complete:
            return blob.full
        return blob.have.get(member)

    def leases(self, digest: str, now: float) -> list[Lease]:
        """The live leases of `digest`."""
        blob = self._blobs.get(digest)
        if blob is None:
            return []
        return [le for le in blob.leases if self._live(le, now)]

    def candidates(self, digest: str, asker: str, now: float, rng: Random) -> list[Holder]:
        """Up to `candidates` holders of `digest` for `asker` (see the module docstring)."""
        blob = self._blobs.get(digest)
        cfg = self.config
        if blob is None or asker in blob.complete:
            return []
        ranking = self._ranking(blob, now)
        blob.expire_sets(now, cfg.offer_ttl)
        blob.retire(asker)  # its previous set is replaced by this one
        me = self._members.get(asker)
        subnet = me.subnet if me else ""
        chosen: dict[str, None] = {}  # insertion-ordered set
        self._fill(blob, ranking, subnet, asker, chosen, cfg.candidates - cfg.cover_reserve, rng)
        self._cover(blob, asker, chosen, cfg.candidates, rng)
        self._fill(blob, ranking, subnet, asker, chosen, cfg.candidates, rng)
        if cfg.offer_cap > 0:
            blob.offer(asker, chosen, now, cfg.offer_ttl)
        return [self._holder(digest, blob, m, now) for m in chosen]

    def _live(self, lease: Lease, now: float) -> bool:
        """Its member made progress on one of its leases, of any blob, within `lease_grace`."""
        rec = self._members.get(lease.member)
        last = lease.progress if rec is None else max(lease.progress, rec.origin_progress)
        return now - last <= self.config.lease_grace

    def _holder(self, digest: str, blob: _Blob, member: str, now: float) -> Holder:
        rec = self._members.get(member)
        fetching = tuple(
            (le.first, le.last)
            for le in blob.leases
            if le.member == member and self._live(le, now)
        )
        complete = member in blob.complete
        have = 0 if complete else blob.have[member]
        return Holder(member, rec.url if rec else "", complete, have, fetching)

    def _ranking(self, blob: _Blob, now: float) -> _Ranking:
        """The blob's holders in groups of equal score (complete first, then most chunks), overall
        and per subnet; rebuilt when holdings changed and the last one is `rank_ttl` old."""
        r = blob.ranking
        if r is not None and (not blob.dirty or now - r.at < self.config.rank_ttl):
            return r
        scored: dict[int, list[str]] = {}
        top = blob.nchunks + 1
        for m in blob.complete:
            scored.setdefault(top, []).append(m)
        for m, have in blob.have.items():
            n = have.bit_count()
            if n:
                scored.setdefault(n, []).append(m)
        groups = [sorted(scored[s]) for s in sorted(scored, reverse=True)]  # sorted: repeatable
        by_subnet: dict[str, list[list[str]]] = {}
        for group in groups:
            split: dict[str, list[str]] = {}
            for m in group:
                rec = self._members.get(m)
                split.setdefault(rec.subnet if rec else "", []).append(m)
            for net, members in split.items():
                by_subnet.setdefault(net, []).append(members)
        blob.ranking = _Ranking(now, groups, by_subnet)
        blob.dirty = False
        return blob.ranking

    def _fill(
        self,
        blob: _Blob,
        ranking: _Ranking,
        subnet: str,
        asker: str,
        chosen: dict[str, None],
        upto: int,
        rng: Random,
    ) -> None:
        """Add the best-ranked holders to `chosen` until it has `upto`: the asker's subnet first,
        equals sampled at random, offered-out partial holders skipped."""
        for groups in (ranking.by_subnet.get(subnet, []), ranking.groups):
            for group in groups:
                if len(chosen) >= upto:
                    return
                for m in _spread(group, upto + 1, rng):
                    if len(chosen) >= upto:
                        return
                    if m == asker or m in chosen or not (m in blob.have or m in blob.complete):
                        continue
                    if not blob.offered_out(m, self.config):
                        chosen[m] = None

    def _cover(self, blob: _Blob, asker: str, chosen: dict[str, None], upto: int, rng: Random) -> None:
        """Add holders of chunks the asker misses that no chosen holder has (rarest first), not
        those offered out."""
        covered = 0
        for m in chosen:
            covered |= blob.full if m in blob.complete else blob.have.get(m, 0)
        if covered == blob.full:
            return
        missing = blob.full & ~blob.have.get(asker, 0)
        todo = missing & blob.held & ~covered
        for i in sorted(_bits(todo), key=lambda i: (blob.counts[i], i)):
            if len(chosen) >= upto:
                return
            if covered >> i & 1:
                continue
            seeds = [
                m
                for m in blob.seeds_of(i, self.config.seeds)
                if m != asker and m not in chosen and not blob.offered_out(m, self.config)
            ]
            if not seeds:
                continue
            m = rng.choice(seeds)
            chosen[m] = None
            covered |= blob.have.get(m, 0)

    # -- leases ----------------------------------------------------------------------------------

    def grant(
        self, digest: str, member: str, want: Sequence[int], max_chunks: int, now: float
    ) -> Lease | None:
        """A new origin lease of `digest` for `member`, or None (nothing free, or it holds its
        share of live leases already). `want` are chunks it needs first, in its order."""
        blob = self._blobs.get(digest)
        cfg = self.config
        if blob is None or blob.complete or member not in blob.have or max_chunks < 1:
            return None
        if now < blob.hold_until:
            return None
        blob.leases = [le for le in blob.leases if self._live(le, now)]
        gathering = now < blob.gather_until
        mine = sum(le.member == member for le in blob.leases)
        if mine >= (1 if gathering else cfg.leases_per_member):
            return None
        free = blob.full & ~blob.held & ~blob.leased()
        if not free:
            return None
        first = next((i for i in want if 0 <= i < blob.nchunks and free >> i & 1), None)
        if first is None:
            first = (free & -free).bit_length() - 1
        if gathering:
            run = cfg.gather_lease_chunks
        else:
            run = cfg.solo_lease_chunks if len(blob.have) == 1 else cfg.lease_chunks
        limit = min(max_chunks, run)
        last = first
        while last - first + 1 < limit and last + 1 < blob.nchunks and free >> (last + 1) & 1:
            last += 1
        lease = Lease(digest, member, first, last, now, now)
        blob.leases.append(lease)
        return lease

    def release(self, digest: str, member: str, first: int, last: int) -> None:
        """`member` is done with its lease over `first`..`last` (fetched, or given up): the
        chunks it did not announce are free for someone else."""
        blob = self._blobs.get(digest)
        if blob is None:
            return
        mask = _run_mask(first, last, blob.nchunks)
        blob.leases = [le for le in blob.leases if le.member != member or not le.mask & mask]


def subnet_of(url: str) -> str:
    """The subnet a member's URL is in: the /24 of an IPv4 address, the /64 of an IPv6 one, the
    host name itself otherwise (members on one host name share a "subnet")."""
    host = urlsplit(url if "://" in url else f"http://{url}").hostname or ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    prefix = 24 if ip.version == 4 else 64
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def bitmap_to_int(have: bytes) -> int:
    """A presence bitmap as the wire carries it (bit i LSB first in byte i // 8) as an int."""
    return int.from_bytes(have, "little")


def int_to_bitmap(bits: int, nchunks: int) -> bytes:
    """The wire form of a presence bitmap of `nchunks` chunks."""
    return bits.to_bytes(-(-nchunks // 8), "little")


def runs_of(bits: int) -> list[tuple[int, int]]:
    """The set bits as inclusive ranges, lowest first (how announcements carry chunk sets)."""
    return list(_runs(bits))


def _run_mask(first: int, last: int, nchunks: int) -> int:
    first, last = max(0, first), min(last, nchunks - 1)
    if last < first:
        return 0
    return ((1 << (last - first + 1)) - 1) << first


def _spread(group: list[str], first: int, rng: Random) -> Iterator[str]:
    """`group` in a random order, drawn lazily: `first` members sampled (the whole group shuffled
    when it is not much larger), then more drawn one at a time while the caller reads on (when
    the first ones were offered out). The cost is what the caller reads, not the group's size:
    in a flash crowd of 10,000 members most of a group may be offered out, and an ask must not
    pay O(group) for it; past half the group the rest is shuffled at once."""
    if len(group) <= first:
        pick = list(group)
        rng.shuffle(pick)
        yield from pick
        return
    pick = rng.sample(group, first)
    yield from pick
    seen = set(pick)
    while 2 * len(seen) < len(group):
        m = group[rng.randrange(len(group))]
        if m not in seen:
            seen.add(m)
            yield m
    rest = [m for m in group if m not in seen]
    rng.shuffle(rest)
    yield from rest


def _bits(bits: int) -> Iterator[int]:
    while bits:
        low = bits & -bits
        yield low.bit_length() - 1
        bits ^= low


def _runs(bits: int) -> Iterator[tuple[int, int]]:
    while bits:
        first = (bits & -bits).bit_length() - 1
        # the run of ones from `first`: add its lowest bit and look where the carry lands
        end = ((bits >> first) + 1) & ~(bits >> first)
        length = end.bit_length() - 1
        yield first, first + length - 1
        bits &= ~(((1 << length) - 1) << first)
