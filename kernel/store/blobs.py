"""Complete blobs: verified, read-only files in blobs/ with their records and chunk tables.

This is what containerd sees of the store (`snapshotter.content` reads, lists, labels and deletes
through it) and what a peer is served chunk by chunk (`open_chunk`). Partial blobs are invisible
here (`record`, `exists`, `iter_records`, `read`, `update_labels`, `delete` all ignore them):
containerd never sees half a blob.

Reads go through a cache of open read-only fds, so the hot path of containerd's many small
sequential Reads costs one pread: no path, no LMDB lookup, no open(). Entries are refcounted so
that eviction (or a Delete) never closes an fd while a reader still uses it.

New blobs come in by `install` (the tail of an ingest commit) through `commit.Committer`; a
delete unlinks first and drops the record second; `recover` reconciles files and records after a
crash (`kernel.store.schema` spells the cases out).

Thread safety: methods may be called from the event loop and from worker threads at once; LMDB
transactions are per call, and the fd cache has its own mutex.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import structlog

from kernel.errors import InvalidArgument, NotFound
from kernel.store import schema
from kernel.store.commit import Committer
from kernel.store.fsutil import HASH_LEN, fsync_dir, hash_file, remove_path
from kernel.store.schema import BlobRecord, is_sha256, parse_digest

log = structlog.get_logger(__name__)

FD_CACHE_SIZE = 64
LIST_BATCH = 256  # records per LMDB transaction when listing (read at call time: tests shrink it)


@dataclass
class _Fd:
    fd: int
    size: int
    refs: int = 0
    evicted: bool = False


class _FdCache:
    """LRU of open read-only blob fds, refcounted so that eviction (or a Delete) never closes an
    fd while a pread on it is in flight; fd numbers are reused by the kernel, so closing early
    could make a reader read some other file."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Fd] = OrderedDict()

    def acquire(self, key: str, path: Path) -> _Fd:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                entry.refs += 1
                return entry
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # outside the lock: may touch the disk
        entry = _Fd(fd, os.fstat(fd).st_size, refs=1)
        with self._lock:
            if key in self._entries:  # another thread opened it meanwhile: use theirs
                os.close(fd)
                entry = self._entries[key]
                entry.refs += 1
                return entry
            self._entries[key] = entry
            while len(self._entries) > self._capacity:
                _, old = self._entries.popitem(last=False)
                self._retire(old)
            return entry

    def pread_cached(self, key: str, offset: int, size: int) -> tuple[int, bytes] | None:
        """(file size, bytes) from an fd already in the cache, or None if `key` is not cached.

        The hot path of containerd's many small sequential Reads: no path, no LMDB, no open."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            entry.refs += 1
        try:
            return entry.size, os.pread(entry.fd, size, offset)
        finally:
            self.release(entry)

    def release(self, entry: _Fd) -> None:
        with self._lock:
            entry.refs -= 1
            if entry.evicted and entry.refs == 0:
                os.close(entry.fd)

    def evict(self, key: str) -> None:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._retire(entry)

    def clear(self) -> None:
        with self._lock:
            while self._entries:
                self._retire(self._entries.popitem()[1])

    def _retire(self, entry: _Fd) -> None:
        entry.evicted = True
        if entry.refs == 0:
            os.close(entry.fd)


class BlobHandle:
    """A borrowed open fd of a complete blob: cheap positional reads, and the fd for sendfile."""

    def __init__(self, cache: _FdCache, entry: _Fd, record_size: int) -> None:
        self._cache = cache
        self._entry: _Fd | None = entry
        self.size = record_size

    @property
    def fd(self) -> int:
        """The open fd (for sendfile); ValueError once closed, since the number may then already
        belong to another file."""
        if self._entry is None:
            raise ValueError("blob handle is closed")
        return self._entry.fd

    def pread(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) clipped to the blob's end; one syscall in the common case."""
        length = max(0, min(length, self.size - offset))
        data = os.pread(self.fd, length, offset)
        while len(data) < length:  # only if the kernel splits a huge read
            more = os.pread(self.fd, length - len(data), offset + len(data))
            if not more:
                raise OSError(errno.EIO, f"blob shorter than recorded ({offset + len(data)} < {self.size})")
            data += more
        return data

    def close(self) -> None:
        """Give the fd back to the cache (idempotent); it is closed once evicted and unused."""
        if self._entry is not None:
            self._cache.release(self._entry)
            self._entry = None

    def __enter__(self) -> BlobHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class ChunkView:
    """Where chunk `index` of a blob lives: for `os.sendfile(out, fd, offset, length)`.

    The same for a complete blob and for a present chunk of a partial one, so that a peer is
    served either way by the same code. `sha256` is the chunk's table entry (or, for a partial
    blob without a table yet, the hash of the bytes as written); `fd` is valid only inside the
    `open_chunk` block that produced the view."""

    digest: str
    index: int
    offset: int
    length: int
    sha256: bytes
    fd: int




class Blobs:
    """The complete blobs of one store (the module docstring is the contract)."""

    def __init__(self, committer: Committer, chunk_size: int, fd_cache_size: int = FD_CACHE_SIZE) -> None:
        self._committer = committer
        self._meta = committer.meta
        self._layout = committer.layout
        self.chunk_size = chunk_size  # of blobs installed from now on; each record keeps its own
        self.dir = committer.layout.blobs
        self._fds = _FdCache(fd_cache_size)

    # -- paths and records -------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        """Where a complete blob's file lives (InvalidArgument for a malformed digest, NotFound
        for another algorithm than sha256)."""
        return self._layout.blob_path(digest)

    def record(self, digest: str) -> BlobRecord:
        """The complete blob's record; NotFound if absent or only partial."""
        parse_digest(digest)
        with self._meta.txn() as txn:
            rec = schema.get_blob(txn, self._meta, digest, "complete")
        if rec is None:
            raise NotFound(f"content {digest}: not found")
        return rec

    def exists(self, digest: str) -> bool:
        """True if the blob is complete here: its record, or (mid-commit) its file."""
        return self._committer.exists(digest)

    def chunk_hashes(self, digest: str) -> list[bytes]:
        """The blob's per-chunk SHA-256 digests, in chunk order (what a peer verifies against)."""
        parse_digest(digest)
        with self._meta.txn() as txn:
            raw = schema.get_table(txn, self._meta, digest)
        if raw is None:
            raise NotFound(f"content {digest}: no chunk table")
        return [bytes(raw[i:i + HASH_LEN]) for i in range(0, len(raw), HASH_LEN)]

    def chunk_hash(self, digest: str, index: int) -> bytes:
        """One chunk's SHA-256 without decoding the whole table (serving one chunk)."""
        with self._meta.txn() as txn:
            raw = schema.get_table(txn, self._meta, digest)
            if raw is None:
                raise NotFound(f"content {digest}: no chunk table")
            if not 0 <= index < len(raw) // HASH_LEN:
                raise InvalidArgument(f"chunk {index} out of range for {digest}")
            return bytes(raw[index * HASH_LEN:(index + 1) * HASH_LEN])

    def iter_records(self, after: str = "", limit: int | None = None) -> list[BlobRecord]:
        """Up to `limit` (default LIST_BATCH) complete records with digest > `after`, in digest
        order: one short read transaction per batch, so a walk over a large store never holds a
        transaction across the caller's awaits."""
        limit = LIST_BATCH if limit is None else limit
        out: list[BlobRecord] = []
        with self._meta.txn() as txn:
            for rec in schema.iter_blobs(txn, self._meta, after):
                if len(out) >= limit:
                    break
                if rec.state == "complete":
                    out.append(rec)
        return out

    def iter_blobs(self) -> Iterator[BlobRecord]:
        """Every complete record, read in batches so no transaction stays open across yields."""
        after = ""
        while batch := self.iter_records(after):
            yield from batch
            after = batch[-1].digest

    def update_labels(self, digest: str, labels: Mapping[str, str], replace_all: bool) -> BlobRecord:
        """Replace all labels, or merge `labels` (an empty value deletes that key), in one write
        transaction so that concurrent updates never lose each other's keys."""
        with self._meta.txn(write=True) as txn:
            rec = schema.get_blob(txn, self._meta, digest, "complete")
            if rec is None:
                raise NotFound(f"content {digest}: not found")
            merged = {} if replace_all else dict(rec.labels)
            for key, value in labels.items():
                if value:
                    merged[key] = value
                else:
                    merged.pop(key, None)
            rec = replace(rec, labels=merged, updated_ns=time.time_ns())
            schema.put_blob(txn, self._meta, rec)
        return rec

    # -- reading -----------------------------------------------------------------------------

    def open_blob(self, digest: str) -> BlobHandle:
        """A handle on a complete blob (close it, or use `with`); NotFound if absent.

        Served from the fd cache: no LMDB lookup and no open() on the hot path."""
        path = self.blob_path(digest)
        try:
            entry = self._fds.acquire(digest, path)
        except FileNotFoundError:
            raise NotFound(f"content {digest}: not found") from None
        return BlobHandle(self._fds, entry, entry.size)

    def read_cached(self, digest: str, offset: int, size: int) -> tuple[int, bytes] | None:
        """(blob size, bytes) if the blob's fd is open in the cache (it is after any read), else
        None; the caller falls back to `read`. Clipped to the end like `read`."""
        return self._fds.pread_cached(digest, offset, size)

    def read(self, digest: str, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of a complete blob, clipped to its end.

        The caller bounds `size` (it is allocated at once)."""
        with self.open_blob(digest) as handle:
            return handle.pread(offset, size)

    @contextlib.contextmanager
    def open_chunk(self, digest: str, index: int) -> Iterator[ChunkView]:
        """Chunk `index` of a complete blob as (fd, offset, length, sha256) for zero-copy serving;
        the fd stays valid until the block exits, even if the blob is deleted meanwhile. NotFound
        if the blob is not complete here; InvalidArgument for an index outside it."""
        rec = self.record(digest)
        offset, length = rec.chunk_range(index)
        sha = self.chunk_hash(digest, index)
        with self.open_blob(digest) as handle:
            yield ChunkView(digest, index, offset, length, sha, handle.fd)

    # -- committing and deleting -------------------------------------------------------------

    def install(self, source: Path, digest: str, size: int, hashes: bytes,
                labels: Mapping[str, str], ingest_key: str | None = None) -> BlobRecord:
        """Make a verified, fsynced file the complete blob `digest` (the tail of an ingest commit):
        `Committer.publish`, with the store's chunk size and dropping the ingest record
        `ingest_key` in the same transaction. AlreadyExists if the blob is complete already."""
        now = time.time_ns()
        rec = BlobRecord(digest, size, self.chunk_size, now, now, dict(labels))
        self._committer.publish(source, rec, hashes, ingest_key)
        return rec

    def delete(self, digest: str) -> None:
        """Remove a complete blob: unlink (durably) first, then the record, so that a crash in
        between leaves a record without file, which `recover` drops, and never resurrects it.
        NotFound if there was neither file nor complete record."""
        path = self.blob_path(digest)
        self._fds.evict(digest)
        try:
            path.unlink()
            unlinked = True
            fsync_dir(self.dir)
        except FileNotFoundError:
            unlinked = False
        had_record = self._committer.drop(digest)
        if not (unlinked or had_record):
            raise NotFound(f"content {digest}: not found")

    # -- recovery ----------------------------------------------------------------------------

    def recover(self) -> None:
        """After a crash, before serving (not concurrent-safe): drop complete records whose file
        is missing or has the wrong size, then adopt or delete blob files without a complete
        record. Runs before the partial side's recovery, which then sees only blobs that really
        are partial."""
        self._recover_records()
        self._recover_files()

    def _recover_records(self) -> None:
        for rec in list(self.iter_blobs()):
            path = self.blob_path(rec.digest)
            try:
                ok = path.stat().st_size == rec.size
            except FileNotFoundError:
                ok = False
            if not ok:
                log.warning("dropping blob record whose file is missing or resized", digest=rec.digest)
                self._committer.drop(rec.digest)

    def _recover_files(self) -> None:
        for path in sorted(self.dir.iterdir()):
            digest = f"sha256:{path.name}"
            if not is_sha256(digest) or not path.is_file():
                log.warning("removing stray file in blob directory", path=str(path))
                remove_path(path)
                continue
            with self._meta.txn() as txn:
                prior = schema.get_blob(txn, self._meta, digest)
            if prior is not None and prior.state == "complete":
                continue
            self._adopt(path, digest, prior)  # no record, or a promotion cut short

    def _adopt(self, path: Path, digest: str, prior: BlobRecord | None = None) -> None:
        """Re-verify a blob file that has no complete record; adopt it or delete it. A partial
        record left by an interrupted promotion lends its labels, media type and source."""
        chunk_size = prior.chunk_size if prior is not None else self.chunk_size
        state = hash_file(path, chunk_size)
        actual, size, hashes = state.digest(), state.size, state.table()
        if actual != digest:
            log.warning("deleting blob file that does not match its name", path=str(path), actual=actual)
            path.unlink()
            fsync_dir(self.dir)
            return
        now = time.time_ns()
        rec = BlobRecord(digest, size, chunk_size, now, now)
        if prior is not None:
            rec = replace(prior, size=size, state="complete", updated_ns=now)
        self._committer.adopt(path, rec, hashes)
        log.info("adopted blob without record", digest=digest, size=size)

    def close(self) -> None:
        """Close the cached fds (handles still borrowed keep theirs open until released)."""
        self._fds.clear()


__all__ = ["FD_CACHE_SIZE", "LIST_BATCH", "BlobHandle", "Blobs", "ChunkView"]
