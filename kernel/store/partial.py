"""Partial blobs: a blob filled chunk by chunk, in any order, while it is read lazily.

The network side claims a blob it is about to fetch, writes chunks as they arrive from peers or
the origin, and promotes the blob once every chunk is there; containerd's reads meanwhile wait
for the chunks they need. Layout and records are described in `kernel.store.schema`.

Lifecycle (one per digest; reach it as `ChunkStore.partials`):

    claim(digest, size[, media_type, source, hashes])    -> record, state "partial"
    set_hashes(digest, hashes)                           the chunk hash table, if it comes later
    put_chunk(digest, index, data) / put_chunks(...)     -> True once every chunk is present
    have / missing / read_partial / wait_for / open_chunk   while it fills
    complete(digest[, labels])                           verify the digest, promote to blobs/
    abandon(digest)                                      or drop it

Chunks. Chunk `i` covers `[i * chunk_size, min((i + 1) * chunk_size, size))`; a chunk must have
exactly that length (the last one is shorter). With a known hash table every chunk is checked
against it before it is written (`ChunkCorrupt` otherwise, nothing is stored). Without one, the
chunk's own SHA-256 is recorded ("seen"); a second, different copy of a stored chunk is refused.

Trust in the hash table. A table is only a claim (a peer or the tracker announced it): it is
*provisional* until `complete` verifies the whole-blob digest, which is the only thing the
caller asked for by name. A table arriving after chunks is cross-checked against the seen hashes:
chunks that disagree are dropped (their bits cleared, returned to the caller so it can blame the
source and refetch), chunks that agree become verified. A table never replaces a different one
(FailedPrecondition: abandon and re-claim). If the provisional table was wrong, chunks verified
against it assemble a blob that fails its digest: `complete` then discards the partial blob,
table included, and raises `DigestMismatch`, and the caller starts over from another source.

Durability. `claim` creates the sparse file, fsyncs it and its directory, then writes the record.
`put_chunks` pwrites a batch, `fdatasync`s the file once (which also makes the block allocation
of the sparse file durable), and only then sets the bits in one LMDB transaction (LMDB syncs on
commit). So a crash can leave data on disk without its bit (the chunk is refetched: harmless) but
never a bit over data that is not on disk. Batching chunks into one `put_chunks` amortises the
two syncs. `recover` re-hashes every present chunk and clears the bit of any that fails, so a
disk that lied about a sync costs a refetch, not a corrupt blob. `complete`: fsync, verify, make
read-only, rename into blobs/, fsync both directories, then one LMDB transaction flips the record
to "complete" (with the verified table) and deletes the bitmap and seen keys (that tail is
`commit.Committer.publish`, shared with ingest commits); a crash after the rename leaves a blob
file whose record is still partial, which `ChunkStore.recover` adopts.
`abandon` drops the record first, then the file (an orphan file is removed by `recover`).

Reads. `read_partial` and `open_chunk` serve only present chunks (else `ChunksMissing`, an
Unavailable: retry after `wait_for`); a present chunk is never rewritten, so reads need no lock
and no LMDB lookup (the bitmap is mirrored in memory). Chunks of a blob whose table is not yet
known are served as written, unverified: the whole digest is checked at `complete`, and a
containerd unpack verifies the layer's diff ID. Reads of complete blobs do not come here at all.

Threads. Every method except `wait_for` is blocking (disk and LMDB) and thread-safe; from the
event loop run `put_chunk(s)` and `complete` in a worker (`aput_chunks`, `acomplete` do that).
`wait_for` is a coroutine, woken from whatever thread `put_chunks` runs in (via
`call_soon_threadsafe` on the waiter's own loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import stat
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import lmdb
import structlog

from kernel.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    Unavailable,
)
from kernel.store import schema
from kernel.store.blobs import Blobs, ChunkView
from kernel.store.commit import Committer
from kernel.store.fsutil import HASH_LEN, fsync_dir, hash_fd, remove_path
from kernel.store.meta import Meta
from kernel.store.schema import BlobRecord, chunk_count

log = structlog.get_logger(__name__)


class ChunkCorrupt(InvalidArgument):
    """A chunk's bytes do not match its hash (or another copy of it already stored)."""

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


class ChunksMissing(Unavailable):
    """A range is not (yet) present in a partial blob; `missing` lists the absent chunks."""

    def __init__(self, message: str, missing: list[int]) -> None:
        super().__init__(message)
        self.missing = missing


class DigestMismatch(FailedPrecondition):
    """The assembled blob does not match its digest; the partial blob has been discarded."""


@dataclass
class _Waiter:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
    first: int
    last: int


class _Partial:
    """In-memory state of one partial blob, mirroring LMDB; loaded on first use.

    `lock` serialises writers and lifecycle changes (held across pwrite + fdatasync + commit);
    `refs`, `retired` and `waiters` are guarded by `Partials._mutex`. `present` is replaced, never
    mutated in place, so lock-free readers see an old or a new bitmap, both true."""

    def __init__(self, rec: BlobRecord, path: Path, fd: int, present: bytes, table: bytes | None,
                 seen: dict[int, bytes]) -> None:
        self.rec = rec
        self.path = path
        self.fd = fd
        self.present = bytes(present)
        self.count = int.from_bytes(self.present, "little").bit_count()
        self.table = table
        self.seen = seen
        self.lock = threading.Lock()
        self.refs = 1  # the Partials table's own reference
        self.retired: str | None = None  # "complete" or "abandoned"
        self.waiters: list[_Waiter] = []

    def has(self, index: int) -> bool:
        return bool(self.present[index >> 3] >> (index & 7) & 1)

    def missing_in(self, first: int, last: int) -> list[int]:
        return [i for i in range(first, last + 1) if not self.has(i)]

    def expected_hash(self, index: int) -> bytes | None:
        if self.table is not None:
            return self.table[index * HASH_LEN:(index + 1) * HASH_LEN]
        return self.seen.get(index)


class Partials:
    """The partial blobs of one store (see the module docstring for the contract).

    Built on the complete side (`blobs`: a partial blob that got completed meanwhile is answered
    from there) and on the commit primitives (`committer`: its lock, and the promotion's tail)."""

    def __init__(self, blobs: Blobs, committer: Committer) -> None:
        self._blobs = blobs
        self._committer = committer
        self._meta = committer.meta
        self._layout = committer.layout
        self.dir = committer.layout.partial
        self._mutex = threading.Lock()
        self._open: dict[str, _Partial] = {}

    # -- records -----------------------------------------------------------------------------

    def path(self, digest: str) -> Path:
        """Where a partial blob's file lives (whether or not it exists): what a peer serves a
        range of present chunks from. InvalidArgument for a malformed or non-sha256 digest."""
        return self._layout.partial_path(digest)

    def record(self, digest: str) -> BlobRecord:
        """The partial blob's record; NotFound if there is no partial blob of that digest."""
        rec = self._get_record(digest)
        if rec is None:
            raise NotFound(f"partial content {digest}: not found")
        return rec

    def records(self) -> list[BlobRecord]:
        """Every partial blob's record, in digest order."""
        with self._meta.txn() as txn:
            return [rec for rec in schema.iter_blobs(txn, self._meta) if rec.state == "partial"]

    def _get_record(self, digest: str) -> BlobRecord | None:
        schema.parse_digest(digest)
        with self._meta.txn() as txn:
            return schema.get_blob(txn, self._meta, digest, "partial")

    # -- claiming ----------------------------------------------------------------------------

    def claim(self, digest: str, size: int, media_type: str = "", source: Mapping[str, str] | None = None,
              hashes: list[bytes] | None = None, chunk_size: int | None = None) -> BlobRecord:
        """Start (or rejoin) filling `digest`: a sparse file of `size` bytes and a partial record.

        Idempotent: claiming a partial blob again returns its record (and sets `hashes` if the
        table was not known yet). A different size (or chunk size) is InvalidArgument; a blob
        already complete is AlreadyExists. `chunk_size` defaults to the store's; pass the one the
        hash table was cut with."""
        path = self.path(digest)
        if size < 0:
            raise InvalidArgument(f"claim of {digest}: negative size {size}")
        if chunk_size is not None and chunk_size <= 0:
            raise InvalidArgument(f"claim of {digest}: chunk size must be positive, got {chunk_size}")
        cs = chunk_size or self._blobs.chunk_size
        table = None if hashes is None else _table(hashes, chunk_count(size, cs), digest)
        with self._committer.lock:  # no commit can slip in between the check and the record
            if self._committer.exists(digest):
                raise AlreadyExists(f"content {digest}: already exists")
            rec = self._get_record(digest)
            if rec is None:
                rec = self._create(digest, path, size, cs, media_type, source, table)
                log.info("claimed partial blob", digest=digest, size=size, chunks=rec.chunks)
                return rec
        if rec.size != size:
            raise InvalidArgument(f"claim of {digest} with size {size}: already claimed with size {rec.size}")
        if chunk_size is not None and chunk_size != rec.chunk_size:
            raise InvalidArgument(f"claim of {digest} with chunk size {chunk_size}: "
                                  f"already claimed with {rec.chunk_size}")
        if hashes is not None:
            self.set_hashes(digest, hashes)
        return rec

    def _create(self, digest: str, path: Path, size: int, chunk_size: int, media_type: str,
                source: Mapping[str, str] | None, table: bytes | None) -> BlobRecord:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, size)  # sparse: no blocks until chunks land
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.dir)
        now = time.time_ns()
        rec = BlobRecord(digest, size, chunk_size, now, now, {}, state="partial", media_type=media_type,
                         source=dict(source) if source else None)
        with self._meta.txn(write=True) as txn:
            schema.put_blob(txn, self._meta, rec)
            schema.put_bitmap(txn, self._meta, digest, bytes(_bitmap_len(rec.chunks)))
            if table is not None:
                schema.put_table(txn, self._meta, digest, table)
        return rec

    def set_hashes(self, digest: str, hashes: list[bytes]) -> list[int]:
        """Set the chunk hash table; returns the chunks dropped because they disagree with it.

        A table of the wrong length is InvalidArgument; the same table again is a no-op; a
        different table than the one already set is FailedPrecondition."""
        st = self._state(digest)
        table = _table(hashes, st.rec.chunks, digest)
        with st.lock:
            self._check_live(st)
            if st.table is not None:
                if st.table == table:
                    return []
                raise FailedPrecondition(f"partial content {digest} already has a different chunk hash "
                                         f"table; abandon it to start over")
            dropped = [i for i in range(st.rec.chunks) if st.has(i)
                       and st.seen.get(i) != table[i * HASH_LEN:(i + 1) * HASH_LEN]]
            present = _clear_bits(st.present, dropped)
            with self._meta.txn(write=True) as txn:
                _check_partial(txn, self._meta, digest)
                schema.put_table(txn, self._meta, digest, table)
                schema.put_bitmap(txn, self._meta, digest, present)
                for i in st.seen:
                    schema.delete_seen(txn, self._meta, digest, i)
            st.table, st.seen, st.present = table, {}, present
            st.count -= len(dropped)
        if dropped:
            log.warning("chunk hash table disagrees with stored chunks: dropped them", digest=digest,
                        dropped=dropped[:16], count=len(dropped))
        return dropped

    # -- filling -----------------------------------------------------------------------------

    def put_chunk(self, digest: str, index: int, data: bytes) -> bool:
        """Store chunk `index`; True if the blob now has every chunk (call `complete`)."""
        return self.put_chunks(digest, [(index, data)])

    def put_chunks(
        self, digest: str, chunks: Iterable[tuple[int, bytes]], claims: Mapping[int, bytes] | None = None
    ) -> bool:
        """Store a batch of chunks with one fdatasync and one LMDB transaction.

        All or nothing: a chunk of the wrong length (InvalidArgument) or failing its hash
        (ChunkCorrupt) rejects the whole batch before anything is written. `claims` are hashes
        the caller was told the chunks have (a peer's `X-Chunk-Sha256`), checked in the same pass
        as the table: the SHA-256 of a chunk is computed once here, so a caller holding a sender
        to its claim need not hash the bytes first. Chunks already present are skipped. A blob that
        is complete already (promoted, or committed by an ingest) answers True; an abandoned or
        unknown one is NotFound."""
        items = list(chunks)
        try:
            st = self._state(digest)
        except NotFound:
            if self._committer.exists(digest):
                return True
            raise
        hashed: list[tuple[int, bytes, bytes]] = []
        for index, data in items:
            _, length = st.rec.chunk_range(index)
            if len(data) != length:
                raise InvalidArgument(f"chunk {index} of {digest} has {len(data)} bytes, want {length}")
            sha = hashlib.sha256(data).digest()  # outside the lock
            if claims is not None and index in claims and claims[index] != sha:
                why = f"chunk {index} of {digest} does not match the hash its sender announced"
                raise ChunkCorrupt(why, index)
            hashed.append((index, data, sha))
        with st.lock:
            if st.retired is not None:
                return self._after_retired(st)
            todo: dict[int, tuple[bytes, bytes]] = {}
            for index, data, sha in hashed:
                want = st.expected_hash(index) if st.table is not None or st.has(index) else None
                if want is None and index in todo:
                    want = todo[index][1]
                if want is not None and sha != want:
                    what = "its chunk table entry" if st.table is not None else "the copy already stored"
                    raise ChunkCorrupt(f"chunk {index} of {digest} does not match {what}", index)
                if not st.has(index):
                    todo[index] = (data, sha)
            superseded = self._write(st, todo) if todo else False
            complete = superseded or st.count == st.rec.chunks
        if todo:
            self._notify(st)
        return complete

    def _write(self, st: _Partial, todo: dict[int, tuple[bytes, bytes]]) -> bool:
        """pwrite, fdatasync, then the bits (caller holds st.lock). If the record stopped being
        partial under us (an ingest committed the same blob), the state retires instead and the
        answer is True (the blob is complete)."""
        digest = st.rec.digest
        for index, (data, _) in todo.items():
            _pwrite_all(st.fd, data, index * st.rec.chunk_size)
        os.fdatasync(st.fd)  # the data (and the sparse file's new blocks) before the bits
        present = _set_bits(st.present, todo)
        seen = {} if st.table is not None else {i: sha for i, (_, sha) in todo.items()}
        try:
            _commit_bits(self._meta, digest, present, seen)
        except NotFound:
            if not self._committer.exists(digest):
                self._retire(st, "abandoned")
                raise
            self._retire(st, "complete")
            return True
        st.present = present
        st.count += len(todo)
        st.seen.update(seen)
        return False

    async def aput_chunks(
        self, digest: str, chunks: Iterable[tuple[int, bytes]], claims: Mapping[int, bytes] | None = None
    ) -> bool:
        """`put_chunks` in a worker thread (for callers on the event loop)."""
        return await asyncio.to_thread(self.put_chunks, digest, list(chunks), claims)

    # -- looking -----------------------------------------------------------------------------

    def have(self, digest: str) -> bytes:
        """The presence bitmap (bit i, LSB first in byte i // 8); all ones for a complete blob."""
        st = self._acquire(digest)
        if st is None:
            rec = self._blobs.record(digest)
            return _full_bitmap(rec.chunks)
        try:
            return st.present
        finally:
            self._release(st)

    def missing(self, digest: str) -> list[int]:
        """The indices of the chunks not present yet ([] for a complete blob)."""
        st = self._acquire(digest)
        if st is None:
            self._blobs.record(digest)
            return []
        try:
            return st.missing_in(0, st.rec.chunks - 1)
        finally:
            self._release(st)

    def known_hashes(self, digest: str) -> tuple[bool, list[bytes | None]]:
        """(table_known, hashes): the chunk hash of every present chunk (from the table when it is
        known, else as written), None for absent ones. What a peer announces while filling."""
        st = self._acquire(digest)
        if st is None:
            return True, list(self._blobs.chunk_hashes(digest))
        try:
            hashes = [st.expected_hash(i) if st.has(i) else None for i in range(st.rec.chunks)]
            return st.table is not None, hashes
        finally:
            self._release(st)

    def read_partial(self, digest: str, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) clipped to the blob's end, if every chunk they touch is
        present (else ChunksMissing); offset past the end is OutOfRange. Works on a complete
        blob too (and on one promoted while the call runs)."""
        st = self._acquire_range("read of", digest, offset, size)
        if st is None:
            return self._blobs.read(digest, offset, size)
        try:
            first, last, end = _span(st.rec, offset, size)
            if last < first:
                return b""
            missing = st.missing_in(first, last)
            if missing:
                raise ChunksMissing(f"partial content {digest}: chunks {_fmt(missing)} of "
                                    f"[{offset}, {end}) not present yet", missing)
            return _pread_all(st.fd, end - offset, offset)
        finally:
            self._release(st)

    @contextlib.contextmanager
    def open_chunk(self, digest: str, index: int) -> Iterator[ChunkView]:
        """A present chunk as a ChunkView (see `ChunkStore.open_chunk`); the fd stays valid until
        the block exits even if the blob is promoted or abandoned meanwhile."""
        st = self._acquire(digest)
        if st is None:
            self._blobs.record(digest)  # NotFound if neither partial nor complete
            with self._blobs.open_chunk(digest, index) as view:  # promoted meanwhile
                yield view
            return
        try:
            offset, length = st.rec.chunk_range(index)
            if not st.has(index):
                raise ChunksMissing(f"partial content {digest}: chunk {index} not present yet", [index])
            sha = st.expected_hash(index)
            assert sha is not None  # a present chunk has a table entry or a seen hash
            yield ChunkView(digest, index, offset, length, sha, st.fd)
        finally:
            self._release(st)

    async def wait_for(self, digest: str, offset: int, size: int, timeout: float | None) -> None:
        """Return once every chunk of [offset, offset+size) (clipped to the end) is present.

        Woken by `put_chunks` from any thread. Timeout: ChunksMissing (an Unavailable); the blob
        abandoned meanwhile: NotFound; promoted meanwhile: returns."""
        st = self._acquire_range("wait on", digest, offset, size)
        if st is None:
            return
        try:
            first, last, _ = _span(st.rec, offset, size)
            loop = asyncio.get_running_loop()
            waiter = _Waiter(loop, loop.create_future(), first, last)
            with self._mutex:  # check and register atomically with respect to _notify and _retire
                retired = st.retired
                if retired is None and st.missing_in(first, last):
                    st.waiters.append(waiter)
            if retired == "abandoned":
                raise NotFound(f"partial content {digest}: abandoned")
            if waiter not in st.waiters:
                return  # present already, or promoted
            try:
                await asyncio.wait_for(waiter.future, timeout)
            except TimeoutError:
                missing = st.missing_in(first, last)
                raise ChunksMissing(f"partial content {digest}: timed out after {timeout}s waiting for "
                                    f"chunks {_fmt(missing)}", missing) from None
            finally:
                with self._mutex:
                    if waiter in st.waiters:
                        st.waiters.remove(waiter)
        finally:
            self._release(st)

    # -- finishing ---------------------------------------------------------------------------

    def complete(self, digest: str, labels: Mapping[str, str] | None = None) -> BlobRecord:
        """Verify the whole blob (streaming from disk) and promote it to a complete blob.

        Blocking (hashes the whole file): from the event loop use `acomplete`. FailedPrecondition
        if chunks are missing; DigestMismatch if the bytes do not hash to `digest` (the partial
        blob is discarded: refetch); AlreadyExists if the blob got committed by other means
        (the partial blob is discarded). Returns the complete record: the same end state as an
        ingest commit, plus the claim's media type and source."""
        try:
            st = self._state(digest)
        except NotFound:
            if self._committer.exists(digest):
                raise AlreadyExists(f"content {digest}: already exists") from None
            raise
        with st.lock:
            self._check_live(st)
            rec = st.rec
            if st.count != rec.chunks:
                raise FailedPrecondition(f"partial content {digest}: {rec.chunks - st.count} of "
                                         f"{rec.chunks} chunks missing")
            os.fsync(st.fd)  # chunks were fdatasynced; this covers the rest of the inode too
            hashed = hash_fd(st.fd, rec.chunk_size)
            if hashed.size != rec.size or hashed.digest() != digest:
                self._discard(st)
                raise DigestMismatch(f"partial content {digest}: assembled blob hashes to "
                                     f"{hashed.digest()} ({hashed.size} bytes); discarded, refetch it")
            now = time.time_ns()
            done = replace(rec, state="complete", updated_ns=now, labels={**rec.labels, **(labels or {})})
            try:
                self._committer.publish(st.path, done, hashed.table(), sync_dirs=[self.dir])
            except AlreadyExists:  # committed by other means (an ingest) meanwhile
                self._discard(st)
                raise
            self._retire(st, "complete")
        log.info("completed partial blob", digest=digest, size=rec.size)
        return done

    async def acomplete(self, digest: str, labels: Mapping[str, str] | None = None) -> BlobRecord:
        """`complete` in a worker thread."""
        return await asyncio.to_thread(self.complete, digest, labels)

    def abandon(self, digest: str) -> None:
        """Drop a partial blob (record and bitmap, then the file); waiters get NotFound."""
        st = self._state(digest)
        with st.lock:
            self._check_live(st)
            self._discard(st)
        log.info("abandoned partial blob", digest=digest)

    def superseded(self, digest: str) -> None:
        """Called after `digest` was committed by an ingest: forget any partial copy of it (the
        commit's transaction already dropped its bitmap and seen keys)."""
        with self._mutex:
            st = self._open.get(digest)
        path = self.path(digest)
        if st is not None:
            with st.lock:
                if st.retired is None:
                    self._retire(st, "complete")
        if path.exists():
            path.unlink(missing_ok=True)
            fsync_dir(self.dir)

    def _discard(self, st: _Partial) -> None:
        """Record, table and bits first, then the file (caller holds st.lock)."""
        digest = st.rec.digest
        with self._meta.txn(write=True) as txn:
            if schema.get_blob(txn, self._meta, digest, "partial") is not None:
                schema.delete_blob(txn, self._meta, digest)
            schema.drop_partial_keys(txn, self._meta, digest)
        st.path.unlink(missing_ok=True)
        fsync_dir(self.dir)
        self._retire(st, "abandoned")

    # -- recovery ----------------------------------------------------------------------------

    def recover(self) -> None:
        """After a restart: keep partial blobs with their progress, re-verify every present chunk
        (clearing bits that fail), drop records without a file and files without a record.
        Runs after `ChunkStore` adopted interrupted promotions; not concurrent-safe. Costs one
        read of every present chunk of every partial blob."""
        with self._mutex:
            states = list(self._open.values())
        for st in states:
            with st.lock:
                self._retire(st, "abandoned")
        live = set()
        for rec in self.records():
            path = self.path(rec.digest)
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                size = -1
            if size != rec.size:
                log.warning("dropping partial blob whose file is missing or resized", digest=rec.digest)
                with self._meta.txn(write=True) as txn:
                    schema.delete_blob(txn, self._meta, rec.digest)
                    schema.drop_partial_keys(txn, self._meta, rec.digest)
                continue
            self._reverify(rec, path)
            live.add(path.name)
        removed = False
        for path in self.dir.iterdir():
            if path.name not in live:
                log.warning("removing partial file without record", path=str(path))
                remove_path(path)
                removed = True
        if removed:
            fsync_dir(self.dir)

    def _reverify(self, rec: BlobRecord, path: Path) -> None:
        if not os.stat(path).st_mode & stat.S_IWUSR:
            os.chmod(path, 0o644)  # a promotion cut short between chmod and rename
        present, table, seen = self._load_keys(rec)
        st = _Partial(rec, path, -1, present, table, seen)
        bad = []
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for i in range(rec.chunks):
                if not st.has(i):
                    continue
                offset, length = rec.chunk_range(i)
                want = st.expected_hash(i)
                if want is None or hashlib.sha256(_pread_all(fd, length, offset)).digest() != want:
                    bad.append(i)
        finally:
            os.close(fd)
        stale = [i for i in seen if not st.has(i) or i in bad]
        if bad or stale:
            log.warning("clearing chunks that fail their hash", digest=rec.digest, chunks=bad[:16],
                        count=len(bad))
            with self._meta.txn(write=True) as txn:
                schema.put_bitmap(txn, self._meta, rec.digest, _clear_bits(present, bad))
                for i in stale:
                    schema.delete_seen(txn, self._meta, rec.digest, i)

    # -- state -------------------------------------------------------------------------------

    def _load_keys(self, rec: BlobRecord) -> tuple[bytes, bytes | None, dict[int, bytes]]:
        digest = rec.digest
        with self._meta.txn() as txn:
            present = schema.get_bitmap(txn, self._meta, digest)
            table = schema.get_table(txn, self._meta, digest)
            seen = schema.get_seen(txn, self._meta, digest)
        present = bytes(present or b"").ljust(_bitmap_len(rec.chunks), b"\0")[:_bitmap_len(rec.chunks)]
        return present, (bytes(table) if table is not None else None), seen

    def _state(self, digest: str) -> _Partial:
        st = self._acquire(digest)
        if st is None:
            raise NotFound(f"partial content {digest}: not found")
        self._release(st)  # the table's own reference keeps it open while it is live
        return st

    def _acquire_range(self, what: str, digest: str, offset: int, size: int) -> _Partial | None:
        """`_acquire` for a range operation: negative offset or size is InvalidArgument; for a
        blob that is complete (None returned) an offset past its end is OutOfRange, and an
        unknown blob NotFound. `what` starts the messages ("read of", "wait on")."""
        if offset < 0 or size < 0:
            raise InvalidArgument(f"{what} {digest}: negative offset or size ({offset}, {size})")
        st = self._acquire(digest)
        if st is None:
            rec = self._blobs.record(digest)
            if offset > rec.size:
                raise OutOfRange(f"{what} {digest} at {offset} past object length {rec.size} bytes")
        return st

    def _acquire(self, digest: str) -> _Partial | None:
        """The live state with a reference held (release it), or None if not a partial blob."""
        with self._mutex:
            st = self._open.get(digest)
            if st is None:
                st = self._load(digest)
                if st is None:
                    return None
                self._open[digest] = st
            st.refs += 1
            return st

    def _load(self, digest: str) -> _Partial | None:
        """Read a partial blob's state from LMDB and open its file (caller holds _mutex)."""
        rec = self._get_record(digest)
        if rec is None:
            return None
        path = self.path(digest)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"partial content {digest}: file missing (run recover)") from None
        present, table, seen = self._load_keys(rec)
        return _Partial(rec, path, fd, present, table, seen)

    def _release(self, st: _Partial) -> None:
        with self._mutex:
            st.refs -= 1
            if st.refs == 0 and st.fd >= 0:
                os.close(st.fd)
                st.fd = -1

    def _retire(self, st: _Partial, outcome: str) -> None:
        """End a state (caller holds st.lock): wake every waiter, drop the table's reference."""
        with self._mutex:
            if st.retired is not None:
                return
            st.retired = outcome
            if self._open.get(st.rec.digest) is st:
                del self._open[st.rec.digest]
            waiters, st.waiters = st.waiters, []
        exc = NotFound(f"partial content {st.rec.digest}: abandoned") if outcome == "abandoned" else None
        for waiter in waiters:
            _wake(waiter, exc)
        self._release(st)

    def _check_live(self, st: _Partial) -> None:
        if st.retired == "complete":
            raise AlreadyExists(f"content {st.rec.digest}: already complete")
        if st.retired is not None:
            raise NotFound(f"partial content {st.rec.digest}: not found")

    def _after_retired(self, st: _Partial) -> bool:
        if st.retired == "complete":
            return True
        raise NotFound(f"partial content {st.rec.digest}: not found")

    def _notify(self, st: _Partial) -> None:
        with self._mutex:
            ready = [w for w in st.waiters if not st.missing_in(w.first, w.last)]
            for waiter in ready:
                st.waiters.remove(waiter)
        for waiter in ready:
            _wake(waiter, None)

    def close(self) -> None:
        """Close the files of open partial blobs (their state stays on disk)."""
        with self._mutex:
            states = list(self._open.values())
        for st in states:
            with st.lock:
                self._retire(st, "abandoned")


def _commit_bits(meta: Meta, digest: str, present: bytes, seen: Mapping[int, bytes]) -> None:
    """The LMDB half of a chunk write (module-level so crash tests can interrupt it)."""
    with meta.txn(write=True) as txn:
        _check_partial(txn, meta, digest)
        schema.put_bitmap(txn, meta, digest, present)
        for index, sha in seen.items():
            schema.put_seen(txn, meta, digest, index, sha)


def _check_partial(txn: lmdb.Transaction, meta: Meta, digest: str) -> None:
    if schema.get_blob(txn, meta, digest, "partial") is None:
        raise NotFound(f"partial content {digest}: not found (completed or abandoned meanwhile)")


def _wake(waiter: _Waiter, exc: BaseException | None) -> None:
    def resolve() -> None:
        if not waiter.future.done():
            if exc is None:
                waiter.future.set_result(None)
            else:
                waiter.future.set_exception(exc)

    with contextlib.suppress(RuntimeError):  # the waiter's loop has closed: nobody to wake
        waiter.loop.call_soon_threadsafe(resolve)


def _table(hashes: list[bytes], chunks: int, digest: str) -> bytes:
    if len(hashes) != chunks:
        raise InvalidArgument(f"chunk hash table of {digest} has {len(hashes)} entries, want {chunks}")
    if any(len(h) != HASH_LEN for h in hashes):
        raise InvalidArgument(f"chunk hash table of {digest}: every entry must be a {HASH_LEN}-byte SHA-256")
    return b"".join(hashes)


def _span(rec: BlobRecord, offset: int, size: int) -> tuple[int, int, int]:
    """(first chunk, last chunk, end) of [offset, offset+size) clipped; last < first if empty."""
    if offset > rec.size:
        raise OutOfRange(f"range of {rec.digest} at {offset} past object length {rec.size} bytes")
    end = min(rec.size, offset + size)
    if end <= offset:
        return 0, -1, offset
    return offset // rec.chunk_size, (end - 1) // rec.chunk_size, end


def _bitmap_len(chunks: int) -> int:
    return (chunks + 7) // 8


def _full_bitmap(chunks: int) -> bytes:
    return ((1 << chunks) - 1).to_bytes(_bitmap_len(chunks), "little")


def _set_bits(bitmap: bytes, indices: Iterable[int]) -> bytes:
    out = bytearray(bitmap)
    for i in indices:
        out[i >> 3] |= 1 << (i & 7)
    return bytes(out)


def _clear_bits(bitmap: bytes, indices: Iterable[int]) -> bytes:
    out = bytearray(bitmap)
    for i in indices:
        out[i >> 3] &= ~(1 << (i & 7)) & 0xFF
    return bytes(out)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    written = 0
    while written < len(view):
        written += os.pwrite(fd, view[written:], offset + written)


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    while len(data) < length:  # only if the kernel splits a huge read
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            raise OSError(errno.EIO, f"partial blob shorter than recorded at {offset + len(data)}")
        data += more
    return data


def _fmt(indices: list[int]) -> str:
    return ", ".join(map(str, indices[:8])) + (f" (+{len(indices) - 8} more)" if len(indices) > 8 else "")


__all__ = ["ChunkCorrupt", "ChunksMissing", "DigestMismatch", "Partials"]
