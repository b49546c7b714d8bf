"""The node's store as one object: `ChunkStore`, what `snapshotter/`, `peer/` and `peersync/` hold.

It owns the three sides of the content store and the commit primitives they share, builds them in
dependency order, and is the only place that knows all of them:

    ChunkStore
      ├── the complete blobs   (`kernel.store.blobs`: its methods below are theirs)
      ├── .partials            (`kernel.store.partial.Partials`: blobs filled chunk by chunk)
      ├── .ingests             (`kernel.store.ingest.Ingests`: containerd's in-progress writes)
      └── .owners              (`kernel.store.ownership.Ownership`: who keeps each blob)
      all on `kernel.store.commit.Committer` and `kernel.store.schema`

The complete-blob interface is on the store itself, because it is what both sides use most
(containerd's content API and a peer serving chunks); the two other sides are reached by name.
Three operations span sides, so they live here: `open_chunk` serves a chunk of a complete blob or
a present chunk of a partial one alike, `install` (an ingest commit) also retires a partial copy
of the same blob that was arriving chunk by chunk, and `evict` deletes a complete blob only if its
ownership says it is cache-only (checked and done under the ownership lock). `usage` is what the
cache manager measures the store by. `recover` runs every side's recovery in the one
order that is correct (`kernel.store.schema` spells out the crash states).

The layout on disk, the LMDB records and the crash-safety invariants are described once, in
`kernel.store.schema`.

Thread safety: methods may be called from the event loop and from worker threads at once; LMDB
transactions are per call, the fd cache, the partial blobs and the ref locks have their own
mutexes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from kernel.errors import FailedPrecondition, InvalidArgument, NotFound
from kernel.store import schema
from kernel.store.blobs import FD_CACHE_SIZE, BlobHandle, Blobs, ChunkView
from kernel.store.commit import Committer
from kernel.store.ingest import Ingests
from kernel.store.meta import Meta
from kernel.store.ownership import Ownership
from kernel.store.partial import Partials
from kernel.store.schema import BlobRecord, Layout

# Chosen with bench/chunksize.py (200 MiB blob, 2-core VM): ingest+commit ran at ~470 MiB/s with
# 1 and 4 MiB chunks but ~390-430 MiB/s with 256 KiB (per-chunk hashing overhead), and the chunk
# table costs 32 bytes per chunk. Smaller chunks spread faster through a swarm, so take the
# smallest size that costs nothing measurable: 1 MiB.
DEFAULT_CHUNK_SIZE = 1 << 20


@dataclass(frozen=True)
class Usage:
    """The store's bytes by side, as the cache budget counts them: complete blobs, partial blobs
    at their full size (a download's room is reserved when it is claimed, so a store filling up
    never overshoots by more than what is already written) and ingests (the larger of what is
    written and the total containerd announced)."""

    complete_bytes: int = 0
    complete_blobs: int = 0
    partial_bytes: int = 0
    partial_blobs: int = 0
    ingest_bytes: int = 0
    ingests: int = 0

    @property
    def total(self) -> int:
        """Every byte the budget counts."""
        return self.complete_bytes + self.partial_bytes + self.ingest_bytes


class ChunkStore:
    """The content store under `<root>/content` with its metadata in `meta` (the caller's: it is
    shared with the snapshotter and closed by whoever opened it).

    `chunk_size` cuts blobs committed from now on (each record keeps its own); `fd_cache_size`
    bounds the open read-only blob fds. Lifecycle: construct (which upgrades a store of an older
    schema version, `schema.upgrade`), `recover()` before serving, then `close()`."""

    def __init__(self, root: Path, meta: Meta, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 fd_cache_size: int = FD_CACHE_SIZE) -> None:
        if chunk_size <= 0:
            raise InvalidArgument(f"chunk size must be positive, got {chunk_size}")
        self.root = Path(root)
        self.meta = meta
        self.chunk_size = chunk_size
        layout = Layout(self.root)
        layout.create()
        schema.upgrade(meta)
        self.owners = Ownership(meta)
        self.blob_dir = layout.blobs
        self.ingest_dir = layout.ingest
        committer = Committer(meta, layout)
        self._committer = committer
        self._blobs = Blobs(committer, chunk_size, fd_cache_size)
        self.partials = Partials(self._blobs, committer)
        self.ingests = Ingests(meta, layout.ingest, chunk_size, target=self)

    # -- complete blobs: paths and records ---------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        """Where a complete blob's file lives (InvalidArgument for a malformed digest)."""
        return self._blobs.blob_path(digest)

    def record(self, digest: str) -> BlobRecord:
        """The complete blob's record; NotFound if absent or only partial."""
        return self._blobs.record(digest)

    def exists(self, digest: str) -> bool:
        """True if the blob is complete here: its record, or (mid-commit) its file."""
        return self._blobs.exists(digest)

    def chunk_hashes(self, digest: str) -> list[bytes]:
        """The blob's per-chunk SHA-256 digests, in chunk order."""
        return self._blobs.chunk_hashes(digest)

    def chunk_hash(self, digest: str, index: int) -> bytes:
        """One chunk's SHA-256 without decoding the whole table."""
        return self._blobs.chunk_hash(digest, index)

    def iter_records(self, after: str = "", limit: int | None = None) -> list[BlobRecord]:
        """Up to `limit` complete records with digest > `after`, in digest order (batched walks)."""
        return self._blobs.iter_records(after, limit)

    def iter_blobs(self) -> Iterator[BlobRecord]:
        """Every complete record, read in batches so no transaction stays open across yields."""
        return self._blobs.iter_blobs()

    def update_labels(self, digest: str, labels: Mapping[str, str], replace_all: bool) -> BlobRecord:
        """Replace all labels, or merge `labels` (an empty value deletes that key)."""
        return self._blobs.update_labels(digest, labels, replace_all)

    # -- complete blobs: reading -------------------------------------------------------------

    def open_blob(self, digest: str) -> BlobHandle:
        """A handle on a complete blob (close it, or use `with`); NotFound if absent."""
        return self._blobs.open_blob(digest)

    def read_cached(self, digest: str, offset: int, size: int) -> tuple[int, bytes] | None:
        """(blob size, bytes) if the blob's fd is open in the cache, else None (then `read`)."""
        return self._blobs.read_cached(digest, offset, size)

    def read(self, digest: str, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of a complete blob, clipped to its end."""
        return self._blobs.read(digest, offset, size)

    @contextlib.contextmanager
    def open_chunk(self, digest: str, index: int) -> Iterator[ChunkView]:
        """Chunk `index` as (fd, offset, length, sha256) for zero-copy serving; the fd stays
        valid until the block exits, even if the blob is deleted meanwhile.

        A present chunk of a partial blob is served the same way (its `sha256` is the announced
        table's entry, or the hash of the bytes as written if no table is known yet); an absent
        one raises `partial.ChunksMissing`. NotFound if the blob is neither complete nor partial."""
        try:
            self._blobs.record(digest)
            side = self._blobs.open_chunk
        except NotFound:
            side = self.partials.open_chunk
        with side(digest, index) as view:
            yield view

    # -- committing and deleting -------------------------------------------------------------

    def install(self, source: Path, digest: str, size: int, hashes: bytes,
                labels: Mapping[str, str], ingest_key: str | None = None) -> BlobRecord:
        """Move a verified, fsynced file into place and record it (the tail of an ingest commit).

        Order: read-only, rename, fsync the directory, then one LMDB transaction writing the blob
        record and chunk table and dropping the ingest record (`commit.Committer.publish`); a
        crash before the transaction leaves a verified file without record, which `recover`
        adopts. Then any partial copy of the same blob is retired (its waiters see it complete).
        AlreadyExists if the blob is complete already."""
        rec = self._blobs.install(source, digest, size, hashes, labels, ingest_key)
        self.partials.superseded(digest)  # the same blob may have been arriving chunk by chunk
        return rec

    def delete(self, digest: str) -> None:
        """Remove a complete blob, file first and record second (a crash in between leaves a
        record without file, which `recover` drops); NotFound if there was none."""
        self._blobs.delete(digest)

    def evict(self, digest: str) -> int:
        """Delete a cache-only complete blob (`kernel.store.ownership`) and its ownership record;
        the bytes freed. FailedPrecondition (nothing deleted) if anything protects it; NotFound
        if it is not complete here. The check and the delete happen under the ownership lock, so
        a concurrent adopt or pin either comes first (and the blob stays) or finds it gone."""
        with self.owners.lock:
            why = self.owners.reasons(digest)
            if why:
                raise FailedPrecondition(f"content {digest}: not evictable ({', '.join(why)})")
            rec = self._blobs.record(digest)
            self._blobs.delete(digest)
            self.owners.forget(digest)
        return rec.size

    def usage(self) -> Usage:
        """What the store holds, by side (one read transaction over the blob records, then the
        ingest records)."""
        complete = [0, 0]
        partial = [0, 0]
        with self.meta.txn() as txn:
            for rec in schema.iter_blobs(txn, self.meta):
                side = complete if rec.state == "complete" else partial
                side[0] += rec.size
                side[1] += 1
        ingests = self.ingests.list()
        written = sum(max(st.offset, st.total) for st in ingests)
        return Usage(complete[0], complete[1], partial[0], partial[1], written, len(ingests))

    # -- lifecycle ---------------------------------------------------------------------------

    def recover(self) -> None:
        """Reconcile files and records after a crash (run before serving; not concurrent-safe).

        Complete blobs first (adopting interrupted promotions), so that the partial side then
        sees only blobs that really are partial; orphan chunk keys after both; ingests last."""
        self._blobs.recover()
        self.partials.recover()
        self._committer.drop_orphan_keys()
        self.ingests.recover()

    def close(self) -> None:
        """Close cached fds and open partial blobs, write the last uses not yet written (the Meta
        belongs to the caller)."""
        self.owners.flush()
        self.partials.close()
        self._blobs.close()


__all__ = ["DEFAULT_CHUNK_SIZE", "ChunkStore", "Usage"]
