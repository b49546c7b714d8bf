"""Who keeps each blob: the ownership model of the store, and the eviction metadata beside it.

Every blob in the store is either *protected* or *cache-only*. Protected blobs are never evicted;
cache-only blobs are what the cache manager (`peer.cache`) may evict to keep the store within its
disk budget, lowest score first (`peer.policy.eviction`). Nothing here decides *when* to evict or
*what*; this module says what may be, and keeps the facts the score is computed from.

A blob is protected while any of these holds (the first three are flags of its ownership record,
kept in LMDB; the last two are facts of the moment, never persisted):

    containerd   it is in containerd's content metadata: containerd committed it, was handed it
                 (an Info or Read answered, a writer expecting it) and has not Deleted it since
    held         a snapshot the daemon unpacked itself needs it (the remote-snapshot handshake,
                 `peersync.layers`): containerd never fetched it, so it is not containerd's
    pinned       an operator pinned it (`peersync cache pin`)
    in flight    it is partial (being downloaded; its full size is reserved), or a read or a
                 stream of it is running (`busy`)

A complete blob with none of them is *cache-only*: a blob fetched for the registry mirror
(mirror-only mode: containerd keeps its own copy), manifests the mirror fetched by tag, a held
blob whose last snapshot went, a blob containerd Deleted, a blob replicated because the site
wanted it. Peers may still fetch it from us, and containerd may want it again: that is why it is
kept as long as the budget allows.

Transitions (every flag change is one LMDB write, at once; `last_use_ns` is kept in memory and
written in batches by `flush`, so the hot read path never writes):

    event                                             flag change         who calls it
    ----------------------------------------------    ----------------    -------------------------
    containerd commits an ingest                      containerd on       snapshotter.content
    containerd's Info/Read answered, or a writer
      expecting a blob we keep (`adopt`)              containerd on       snapshotter.content
    containerd Deletes it (`disown`)                  containerd off      snapshotter.content
    the daemon unpacks a layer from it (`hold`)       held on             peersync.layers
    the last snapshot made from it goes (`release`)   held off            peersync.layers
    `pin` / `unpin`                                   pinned on / off     peer.cache (the CLI)
    a download, read or stream starts / ends          (in flight)         peer.cache, peer.mirror
    eviction of a cache-only blob (`ChunkStore.evict`) record dropped     peer.cache

Flags are independent: a held blob containerd adopts (a `ctr pull` of an image the CRI pull
unpacked) stays held too, so neither containerd's Delete nor the snapshot's removal alone lets it
go. A flag may be set on a digest that is not complete yet (a lazy blob containerd took at Info,
a layer held before its download) and protects the blob from the moment it completes.

What containerd sees. Only blobs with the `containerd` flag are containerd's: the content store
lists only those (its GC never sees the others, so it cannot delete blobs it does not know), and
its Info, Read, Update and Delete find only those locally. Any other blob we keep is offered to
containerd like a blob the peers have: through the content store's `BlobSource`, which answers for
blobs the daemon can deliver (a local copy is delivered at no cost); an answer hands the blob to
containerd (`adopt`), exactly as `holds` handed held blobs over in schema version 1. So a blob
containerd Deleted is NotFound to a content store without a source, and a re-pull of an image
whose blobs are still cached here downloads nothing.

Thread safety: every method may be called from the event loop and from worker threads; `lock`
(re-entrant) guards the in-memory mirror and is held across an eviction's check and delete
(`ChunkStore.evict`), so a blob cannot be adopted or pinned between the two.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import replace

from kernel.store import schema
from kernel.store.meta import Meta
from kernel.store.schema import OwnerRecord, parse_digest


class Ownership:
    """The `ownership` database with an in-memory mirror (the module docstring is the contract).

    Every record is mirrored in memory: `containerds` and `protected` sit on the content store's
    hot paths (List, Read) and must cost a dict lookup, not a transaction."""

    def __init__(self, meta: Meta) -> None:
        self._meta = meta
        self.lock = threading.RLock()
        with meta.txn() as txn:
            self._recs = {rec.digest: rec for rec in schema.iter_owners(txn, meta)}
        self._dirty: set[str] = set()  # digests whose last use changed since the last flush
        self._busy: dict[str, int] = {}

    # -- queries -----------------------------------------------------------------------------

    def record(self, digest: str) -> OwnerRecord | None:
        """The blob's ownership record, or None if nothing was ever recorded of it."""
        return self._recs.get(digest)

    def records(self) -> list[OwnerRecord]:
        """Every record, in digest order."""
        with self.lock:
            return [self._recs[d] for d in sorted(self._recs)]

    def containerds(self, digest: str) -> bool:
        """True if the blob is containerd's (visible to containerd)."""
        rec = self._recs.get(digest)
        return rec is not None and rec.containerd

    def protected(self, digest: str) -> bool:
        """True if a flag keeps the blob or it is in use right now (never evict it)."""
        rec = self._recs.get(digest)
        return (rec is not None and rec.flagged) or self._busy.get(digest, 0) > 0

    def reasons(self, digest: str) -> list[str]:
        """Why the blob is protected ("containerd", "held", "pinned", "in use"); [] if it is not."""
        rec = self._recs.get(digest)
        why = [f for f in ("containerd", "held", "pinned") if rec is not None and getattr(rec, f)]
        return why + (["in use"] if self.in_use(digest) else [])

    def in_use(self, digest: str) -> bool:
        """True while a read or stream of the blob runs (`busy`)."""
        return self._busy.get(digest, 0) > 0

    def pinned(self) -> list[str]:
        """The pinned digests, sorted."""
        with self.lock:
            return sorted(d for d, rec in self._recs.items() if rec.pinned)

    def last_use_ns(self, digest: str) -> int:
        """When the blob was last used (0: never recorded)."""
        rec = self._recs.get(digest)
        return rec.last_use_ns if rec is not None else 0

    # -- flags -------------------------------------------------------------------------------

    def adopt(self, digest: str) -> bool:
        """containerd takes the blob into its metadata. True if it was not containerd's before
        (the caller may need to undo it with `disown` if its answer fails after all)."""
        return self._set(digest, containerd=True)

    def disown(self, digest: str) -> bool:
        """containerd Deleted the blob: no longer containerd's (it stays, cache-only unless held
        or pinned). True if it was containerd's."""
        return self._set(digest, containerd=False)

    def hold(self, digest: str) -> bool:
        """A snapshot the daemon unpacks needs the blob. True if it was not held before."""
        return self._set(digest, held=True)

    def release(self, digest: str) -> bool:
        """The last snapshot made from the blob is gone. True if it was held."""
        return self._set(digest, held=False)

    def pin(self, digest: str) -> bool:
        """Keep the blob whatever the budget says. True if it was not pinned before."""
        parse_digest(digest)
        return self._set(digest, pinned=True)

    def unpin(self, digest: str) -> bool:
        """Undo `pin`. True if it was pinned."""
        parse_digest(digest)
        return self._set(digest, pinned=False)

    def _set(
        self,
        digest: str,
        containerd: bool | None = None,
        held: bool | None = None,
        pinned: bool | None = None,
    ) -> bool:
        with self.lock:
            old = self._recs.get(digest) or OwnerRecord(digest)
            new = replace(
                old,
                containerd=old.containerd if containerd is None else containerd,
                held=old.held if held is None else held,
                pinned=old.pinned if pinned is None else pinned,
            )
            if new == old:
                return False
            with self._meta.txn(write=True) as txn:
                if new.flagged or new.last_use_ns:
                    schema.put_owner(txn, self._meta, new)
                else:  # nothing left to say about it (an adopt undone for a digest never here)
                    schema.delete_owner(txn, self._meta, digest)
            if new.flagged or new.last_use_ns:
                self._recs[digest] = new
            else:
                self._recs.pop(digest, None)
            self._dirty.discard(digest)  # written whole, last use included
            return True

    # -- uses --------------------------------------------------------------------------------

    def touch(self, digest: str, now_ns: int) -> None:
        """The blob was used at `now_ns` (in memory; `flush` writes it)."""
        with self.lock:
            rec = self._recs.get(digest) or OwnerRecord(digest)
            if now_ns > rec.last_use_ns:
                self._recs[digest] = replace(rec, last_use_ns=now_ns)
                self._dirty.add(digest)

    def flush(self) -> int:
        """Write the last uses recorded since the last flush, in one transaction; how many."""
        with self.lock:
            dirty = [self._recs[d] for d in self._dirty if d in self._recs]
            if dirty:
                with self._meta.txn(write=True) as txn:
                    for rec in dirty:
                        schema.put_owner(txn, self._meta, rec)
            self._dirty.clear()
            return len(dirty)

    @contextlib.contextmanager
    def busy(self, digest: str) -> Iterator[None]:
        """The blob is being read or streamed for as long as the block runs: not evictable."""
        with self.lock:
            self._busy[digest] = self._busy.get(digest, 0) + 1
        try:
            yield
        finally:
            with self.lock:
                left = self._busy[digest] - 1
                if left:
                    self._busy[digest] = left
                else:
                    del self._busy[digest]

    # -- forgetting --------------------------------------------------------------------------

    def forget(self, digest: str) -> bool:
        """Drop the record of an evicted blob; a flagged record stays (False): a flag set meanwhile
        (containerd took the digest again, a pin) is about the digest, not the copy we evicted."""
        with self.lock:
            rec = self._recs.get(digest)
            if rec is None or rec.flagged:
                return False
            with self._meta.txn(write=True) as txn:
                schema.delete_owner(txn, self._meta, digest)
            del self._recs[digest]
            self._dirty.discard(digest)
            return True

    def forget_flags(self, digest: str) -> None:
        """Drop every flag and the record of a digest that is not here at all (the cache
        manager's `gc`: a lazy blob containerd took whose download never finished)."""
        with self.lock:
            if digest in self._recs:
                with self._meta.txn(write=True) as txn:
                    schema.delete_owner(txn, self._meta, digest)
                del self._recs[digest]
                self._dirty.discard(digest)


__all__ = ["Ownership"]
