"""The chunked blob store: blob files on disk, their chunk index and hashes in LMDB.

This is where the containerd-facing content store (`snapshotter.content`) and the network side
(`peer/`, which serves and fetches single chunks) meet. A blob is addressed by its digest
(`sha256:<hex>`) and logically cut into fixed-size chunks: chunk `i` covers bytes
`[i * chunk_size, min((i + 1) * chunk_size, size))`. Every chunk has its own SHA-256, so a chunk
received from a peer can be verified before the whole blob is.

Layout on disk (`<root>/content/`):

    blobs/sha256/<hex>        a complete, verified blob; read-only (0444), never modified
    partial/sha256/<hex>      a blob being filled chunk by chunk: a sparse file of the final
                              size, written with pwrite at chunk offsets (`kernel.store.partial`)
    ingest/<sha256(ref)>/data an ingest (containerd's Writer), see `kernel.store.ingest`

Records in LMDB (`kernel.store.meta`, schema version 1), keys are the digest string:

    blobs   "<digest>"          JSON {digest, size, chunk_size, state, created_ns, updated_ns,
                                labels[, media_type, source]}; state is "complete" (file in
                                blobs/) or "partial" (file in partial/)
    chunks  "<digest>"          the chunk hash table: chunk_count(size) SHA-256 digests of 32
                                bytes each, concatenated in chunk order (of a partial blob: the
                                announced table, absent until it is known)
    chunks  "<digest>/present"  (partial blobs only) presence bitmap, bit i (LSB first in byte
                                i // 8) set once chunk i is written, fdatasynced and checked
    chunks  "<digest>/seen/<i>" (partial blobs without a table only) SHA-256 of chunk i as
                                written, 32 bytes, i as 8 hex digits; cross-checked against the
                                table when it arrives
    ingests "<sha256(ref)>"     JSON {ref, total, expected, started_ns, updated_ns}

The chunk size is stored per blob, so a store can change its default without rewriting blobs,
and a partial blob keeps the chunking of the table it was announced with.

Partial blobs (`kernel.store.partial`, reached as `ChunkStore.partials`): the file is
created sparse at full size, each chunk is written with pwrite, fdatasynced, and only then marked
in the bitmap, so the bitmap never claims bytes that are not durably on disk. The hash table may
come first or later (from a peer or the tracker; it is only trusted once the whole-blob digest
verifies). When every bit is set the whole file is re-hashed (streaming), made read-only, renamed
into blobs/, and the record flips to "complete" with the partial keys deleted, in one LMDB
transaction. A chunk whose bit is set can be served with `open_chunk` exactly like a chunk of a
complete blob. Partial blobs are invisible to the complete-blob API (`record`, `exists`,
`iter_records`, `read`, `update_labels`, `delete`): containerd never sees half a blob.

Crash safety. Blob files appear only by `rename` of an fsynced, verified, read-only file, and the
directory is fsynced before the LMDB record is written; deletion unlinks (and fsyncs) before the
record goes. So every crash leaves one of: file and record (consistent), file without record
(verified content whose record was lost: `recover` re-hashes it and adopts it, or deletes it if it
does not match its name), or record without file (`recover` drops it). A blob file whose record
still says "partial" (crash inside a promotion) is adopted like one without a record. Ingest
directories, partial files and their records are reconciled the same way. `recover` must run
before the store serves requests.

Thread safety: methods may be called from the event loop and from worker threads at once; LMDB
transactions are per call, the fd cache and the ref locks have their own mutexes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import lmdb
import structlog

from kernel.errors import AlreadyExists, InvalidArgument, NotFound
from kernel.store import ingest as ingestmod
from kernel.store.fsutil import HASH_LEN, fsync_dir, hash_file, remove_path
from kernel.store.meta import Meta, dumps, loads

log = structlog.get_logger(__name__)

# Chosen with bench/chunksize.py (200 MiB blob, 2-core VM): ingest+commit ran at ~470 MiB/s with
# 1 and 4 MiB chunks but ~390-430 MiB/s with 256 KiB (per-chunk hashing overhead), and the chunk
# table costs 32 bytes per chunk. Smaller chunks spread faster through a swarm, so take the
# smallest size that costs nothing measurable: 1 MiB.
DEFAULT_CHUNK_SIZE = 1 << 20
FD_CACHE_SIZE = 64
LIST_BATCH = 256

_DIGEST_RE = re.compile(r"^(sha256|sha384|sha512):([a-f0-9]+)$")
_HEX_LEN = {"sha256": 64, "sha384": 96, "sha512": 128}


def parse_digest(digest: str) -> tuple[str, str]:
    """Split a digest into (algorithm, hex); InvalidArgument if it is not a valid OCI digest."""
    match = _DIGEST_RE.match(digest)
    if match is None or len(match.group(2)) != _HEX_LEN[match.group(1)]:
        raise InvalidArgument(f"invalid digest {digest!r}: want <algorithm>:<lowercase hex>")
    return match.group(1), match.group(2)


def chunk_count(size: int, chunk_size: int) -> int:
    return (size + chunk_size - 1) // chunk_size


@dataclass(frozen=True)
class BlobRecord:
    """A blob's metadata as kept in db `blobs`."""

    digest: str
    size: int
    chunk_size: int
    created_ns: int
    updated_ns: int
    labels: dict[str, str] = field(default_factory=dict)
    state: str = "complete"
    media_type: str = ""
    source: dict[str, str] | None = None  # where it can be fetched from, e.g. {registry, repository}

    @property
    def chunks(self) -> int:
        return chunk_count(self.size, self.chunk_size)

    def chunk_range(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk `index`."""
        if not 0 <= index < self.chunks:
            raise InvalidArgument(f"chunk {index} out of range for {self.digest} ({self.chunks} chunks)")
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)

    def encode(self) -> bytes:
        fields = dict(self.__dict__)
        for optional in ("media_type", "source"):  # unset: keep records readable by older code
            if not fields[optional]:
                del fields[optional]
        return dumps(fields)

    @classmethod
    def decode(cls, raw: bytes) -> BlobRecord:
        return cls(**loads(raw))


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
        if self._entry is not None:
            self._cache.release(self._entry)
            self._entry = None

    def __enter__(self) -> BlobHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class ChunkView:
    """Where chunk `index` of a blob lives: for `os.sendfile(out, fd, offset, length)`."""

    digest: str
    index: int
    offset: int
    length: int
    sha256: bytes
    fd: int


class ChunkStore:
    """Complete blobs under `<root>/content/blobs`, chunk hash tables in LMDB, and ingests."""

    def __init__(self, root: Path, meta: Meta, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 fd_cache_size: int = FD_CACHE_SIZE) -> None:
        if chunk_size <= 0:
            raise InvalidArgument(f"chunk size must be positive, got {chunk_size}")
        self.root = Path(root)
        self.meta = meta
        self.chunk_size = chunk_size
        self.blob_dir = self.root / "content" / "blobs" / "sha256"
        self.ingest_dir = self.root / "content" / "ingest"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.ingest_dir.mkdir(parents=True, exist_ok=True)
        self._fds = _FdCache(fd_cache_size)
        self._install_lock = threading.Lock()  # makes "already exists" exact between two commits
        self._blobs = meta.db("blobs")
        self._chunks = meta.db("chunks")
        self.ingests = ingestmod.Ingests(self)
        from kernel.store.partial import Partials  # builds on this module: imported late

        self.partials = Partials(self)

    # -- paths and records -------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        """Where a complete blob's file lives (InvalidArgument for a malformed digest)."""
        algorithm, hexdigest = parse_digest(digest)
        if algorithm != "sha256":
            raise NotFound(f"content {digest}: only sha256 blobs are stored")
        return self.blob_dir / hexdigest

    def record(self, digest: str) -> BlobRecord:
        """The complete blob's record; NotFound if absent or only partial."""
        parse_digest(digest)
        with self.meta.txn() as txn:
            raw = txn.get(digest.encode(), db=self._blobs)
        rec = None if raw is None else BlobRecord.decode(raw)
        if rec is None or rec.state != "complete":
            raise NotFound(f"content {digest}: not found")
        return rec

    def exists(self, digest: str) -> bool:
        """True if the blob is complete here: its record, or (mid-commit) its file."""
        try:
            path = self.blob_path(digest)
        except NotFound:
            return False
        with self.meta.txn() as txn:
            raw = txn.get(digest.encode(), db=self._blobs)
        if raw is not None and BlobRecord.decode(raw).state == "complete":
            return True
        return path.exists()

    def chunk_hashes(self, digest: str) -> list[bytes]:
        """The blob's per-chunk SHA-256 digests, in chunk order."""
        parse_digest(digest)
        with self.meta.txn() as txn:
            raw = txn.get(digest.encode(), db=self._chunks)
        if raw is None:
            raise NotFound(f"content {digest}: no chunk table")
        return [bytes(raw[i:i + HASH_LEN]) for i in range(0, len(raw), HASH_LEN)]

    def chunk_hash(self, digest: str, index: int) -> bytes:
        """One chunk's SHA-256 without decoding the whole table."""
        with self.meta.txn() as txn:
            raw = txn.get(digest.encode(), db=self._chunks)
            if raw is None:
                raise NotFound(f"content {digest}: no chunk table")
            if not 0 <= index < len(raw) // HASH_LEN:
                raise InvalidArgument(f"chunk {index} out of range for {digest}")
            return bytes(raw[index * HASH_LEN:(index + 1) * HASH_LEN])

    def iter_records(self, after: str = "", limit: int = LIST_BATCH) -> list[BlobRecord]:
        """Up to `limit` complete records with digest > `after`, in digest order (batched walks)."""
        out: list[BlobRecord] = []
        with self.meta.txn() as txn, txn.cursor(db=self._blobs) as cur:
            found = cur.set_range(after.encode())
            while found and len(out) < limit:
                key, raw = cur.item()
                if key.decode() != after:
                    rec = BlobRecord.decode(raw)
                    if rec.state == "complete":
                        out.append(rec)
                found = cur.next()
        return out

    def iter_blobs(self) -> Iterator[BlobRecord]:
        """Every blob record, read in batches so no transaction stays open across yields."""
        after = ""
        while batch := self.iter_records(after):
            yield from batch
            after = batch[-1].digest

    def update_labels(self, digest: str, labels: Mapping[str, str], replace_all: bool) -> BlobRecord:
        """Replace all labels, or merge `labels` (an empty value deletes that key)."""
        with self.meta.txn(write=True) as txn:
            raw = txn.get(digest.encode(), db=self._blobs)
            rec = None if raw is None else BlobRecord.decode(raw)
            if rec is None or rec.state != "complete":
                raise NotFound(f"content {digest}: not found")
            merged = {} if replace_all else dict(rec.labels)
            for key, value in labels.items():
                if value:
                    merged[key] = value
                else:
                    merged.pop(key, None)
            rec = replace(rec, labels=merged, updated_ns=time.time_ns())
            txn.put(digest.encode(), rec.encode(), db=self._blobs)
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
        """Chunk `index` as (fd, offset, length, sha256) for zero-copy serving; the fd stays
        valid until the block exits, even if the blob is deleted meanwhile.

        A present chunk of a partial blob is served the same way (its `sha256` is the announced
        table's entry, or the hash of the bytes as written if no table is known yet); an absent
        one raises `partial.ChunksMissing`."""
        try:
            rec = self.record(digest)
        except NotFound:
            with self.partials.open_chunk(digest, index) as view:
                yield view
            return
        offset, length = rec.chunk_range(index)
        sha = self.chunk_hash(digest, index)
        with self.open_blob(digest) as handle:
            yield ChunkView(digest, index, offset, length, sha, handle.fd)

    # -- committing and deleting -------------------------------------------------------------

    def install(self, source: Path, digest: str, size: int, hashes: bytes,
                labels: Mapping[str, str], ingest_key: bytes | None = None) -> BlobRecord:
        """Move a verified, fsynced file into place and record it (the tail of a commit).

        Order: read-only, rename, fsync the directory, then one LMDB transaction writing the blob
        record and chunk table and dropping the ingest record. A crash before the transaction
        leaves a verified file without record, which `recover` adopts."""
        target = self.blob_path(digest)
        with self._install_lock:
            if self.exists(digest):
                raise AlreadyExists(f"content {digest}: already exists")
            os.chmod(source, 0o444)  # before the rename: a visible blob is never writable
            os.rename(source, target)
            fsync_dir(self.blob_dir)
            now = time.time_ns()
            rec = BlobRecord(digest, size, self.chunk_size, now, now, dict(labels))
            _commit_record(self, rec, hashes, ingest_key)
        self.partials.superseded(digest)  # the same blob may have been arriving chunk by chunk
        return rec

    def delete(self, digest: str) -> None:
        """Remove a complete blob: unlink (durably) first, then the record, so that a crash in
        between leaves a record without file, which `recover` drops, and never resurrects it."""
        path = self.blob_path(digest)
        self._fds.evict(digest)
        try:
            path.unlink()
            unlinked = True
            fsync_dir(self.blob_dir)
        except FileNotFoundError:
            unlinked = False
        had_record = _drop_record(self, digest)
        if not (unlinked or had_record):
            raise NotFound(f"content {digest}: not found")

    # -- recovery ----------------------------------------------------------------------------

    def recover(self) -> None:
        """Reconcile files and records after a crash (run before serving; not concurrent-safe)."""
        self._recover_records()
        self._recover_files()
        self.partials.recover()
        self._drop_orphan_chunk_tables()
        self.ingests.recover()

    def _recover_records(self) -> None:
        for rec in list(self.iter_blobs()):
            if rec.state != "complete":
                continue
            path = self.blob_path(rec.digest)
            try:
                ok = path.stat().st_size == rec.size
            except FileNotFoundError:
                ok = False
            if not ok:
                log.warning("dropping blob record whose file is missing or resized", digest=rec.digest)
                _drop_record(self, rec.digest)

    def _recover_files(self) -> None:
        for path in sorted(self.blob_dir.iterdir()):
            digest = f"sha256:{path.name}"
            if not _is_sha256(digest) or not path.is_file():
                log.warning("removing stray file in blob directory", path=str(path))
                remove_path(path)
                continue
            with self.meta.txn() as txn:
                raw = txn.get(digest.encode(), db=self._blobs)
            prior = None if raw is None else BlobRecord.decode(raw)
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
            fsync_dir(self.blob_dir)
            return
        os.chmod(path, 0o444)
        now = time.time_ns()
        rec = BlobRecord(digest, size, chunk_size, now, now)
        if prior is not None:
            rec = replace(prior, size=size, state="complete", updated_ns=now)
        _commit_record(self, rec, hashes, None)
        log.info("adopted blob without record", digest=digest, size=size)

    def _drop_orphan_chunk_tables(self) -> None:
        with self.meta.txn(write=True) as txn, txn.cursor(db=self._chunks) as cur:
            orphans = [key for key in cur.iternext(values=False)
                       if txn.get(key.split(b"/")[0], db=self._blobs) is None]
            for key in orphans:
                txn.delete(key, db=self._chunks)

    def close(self) -> None:
        """Close cached fds and open partial blobs (the Meta belongs to the caller)."""
        self.partials.close()
        self._fds.clear()


def _commit_record(store: ChunkStore, rec: BlobRecord, hashes: bytes, ingest_key: bytes | None) -> None:
    """The LMDB half of an install (module-level so crash tests can interrupt it)."""
    if len(hashes) != rec.chunks * HASH_LEN:
        raise ValueError(f"chunk table of {len(hashes)} bytes for {rec.chunks} chunks of {rec.digest}")
    with store.meta.txn(write=True) as txn:
        txn.put(rec.digest.encode(), rec.encode(), db=store._blobs)
        txn.put(rec.digest.encode(), hashes, db=store._chunks)
        drop_partial_keys(txn, store._chunks, rec.digest)
        if ingest_key is not None:
            txn.delete(ingest_key, db=store.meta.db("ingests"))


def _drop_record(store: ChunkStore, digest: str) -> bool:
    """The LMDB half of a delete; True if there was a complete record (a partial record is left
    alone: partial blobs are dropped with `partials.abandon`)."""
    with store.meta.txn(write=True) as txn:
        raw = txn.get(digest.encode(), db=store._blobs)
        if raw is None or BlobRecord.decode(raw).state != "complete":
            return False
        txn.delete(digest.encode(), db=store._blobs)
        txn.delete(digest.encode(), db=store._chunks)
    return True


def present_key(digest: str) -> bytes:
    """Key (db chunks) of a partial blob's presence bitmap."""
    return f"{digest}/present".encode()


def seen_key(digest: str, index: int) -> bytes:
    """Key (db chunks) of the hash of chunk `index` as written, while no table is known."""
    return f"{digest}/seen/{index:08x}".encode()


def drop_partial_keys(txn: lmdb.Transaction, chunks_db: object, digest: str) -> None:
    """Delete a blob's bitmap and seen-hash keys (inside the caller's transaction)."""
    txn.delete(present_key(digest), db=chunks_db)
    prefix = f"{digest}/seen/".encode()
    with txn.cursor(db=chunks_db) as cur:
        found = cur.set_range(prefix)
        while found and cur.key().startswith(prefix):
            found = cur.delete()


def _is_sha256(digest: str) -> bool:
    try:
        return parse_digest(digest)[0] == "sha256"
    except InvalidArgument:
        return False


__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "BlobHandle",
    "BlobRecord",
    "ChunkStore",
    "ChunkView",
    "chunk_count",
    "parse_digest",
]
# Partial blobs (`ChunkStore.partials`) and their errors live in `kernel.store.partial`.
