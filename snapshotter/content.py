"""The content store containerd sees: containerd's content API over the node's chunk store.

This docstring is the spec; `snapshotter.grpc_content` is a thin adapter over it, and the
conformance suite (tests/snapshotter/test_content.py) runs against both.

Vocabulary. A *blob* is immutable content named by its digest (`sha256:<64 hex>`); its *info*
is (digest, size, created, updated, labels). An *ingest* is a blob being written under a
client-chosen *ref*; its *status* is (ref, offset = bytes stored so far, total, expected,
started, updated). Committing an ingest turns it into a blob and removes it.

Blobs
- Whose blobs. The store keeps blobs for several owners (`kernel.store.ownership`, whose
  docstring is the spec): only those with the `containerd` flag are containerd's, and only those
  are seen locally by `info`, `update`, `walk`, `delete` and `read`. Every other blob we keep
  (held for our own snapshots, pinned, cache-only: fetched for the mirror or for peers, released,
  Deleted by containerd) is left out of `walk`, so containerd's GC cannot delete it, and is
  NotFound locally; the BlobSource may still offer it (the daemon's does: a local copy is the
  cheapest blob it can deliver). Whenever this store answers containerd for a blob, by Info, Read,
  a commit or a writer expecting it, the blob becomes containerd's (`adopt`): containerd has it in
  its metadata from then on.
- `info(digest)` -> Info. A malformed digest is InvalidArgument; a blob that is neither here nor
  offered by the BlobSource is NotFound.
- `update(info, fieldpaths)` changes labels only. Paths: `labels` (replace all labels with
  info.labels) or `labels.<key>` (set that key from info.labels; absent or empty deletes it).
  An empty list replaces all labels. Any other path is InvalidArgument. Returns the new Info.
- `walk(filters)` yields the Info of every local blob matching containerd filters over the
  fields `digest`, `size` (decimal string) and `labels.<key>`. Bad filter syntax: InvalidArgument.
- `delete(digest)`: the blob is no longer containerd's; NotFound if it was not. The bytes stay as
  a cache-only blob (peers may still want it, a later pull may take it back at no cost) until the
  cache manager needs the room.
- `read(digest, offset, size)` yields (offset, bytes) pieces of at most `piece` bytes covering
  [offset, offset+size): offset < 0 reads from 0; offset past the end (> size of blob) is
  OutOfRange; offset equal to the size yields nothing; size <= 0 reads to the end; a range past
  the end is clipped. Reads of up to INLINE_READ bytes are a single pread on the event loop
  (containerd issues thousands of 32 KiB reads and some of 4 or 512 bytes); larger pieces are
  read in a worker thread.

Ingests
- `writer(ref, total, expected)` opens or resumes the ingest `ref` (resuming re-hashes the data
  already stored, in a thread) and holds it until `close()`/`commit()`. Another writer on the same
  ref: Unavailable("ref X locked for Ns"). If `expected` is here and `info` finds it:
  AlreadyExists.
- `Writer.write_at(offset, data)`: offset equal to the current offset appends; offset 0 over
  existing data truncates and restarts; any other offset: OutOfRange. Returns the new offset.
- `Writer.expect(digest)`: if that blob is here and `info` finds it, the ingest is removed and
  AlreadyExists raised (containerd's service does this, through Info, for any message carrying
  `expected`).
- `Writer.commit(size, expected, labels)`: size (if > 0) must equal the bytes written and the
  digest must equal `expected` (if given), else FailedPrecondition and the ingest stays, ready to
  resume; a blob already containerd's is AlreadyExists and the ingest is removed. A blob we keep
  for another owner is taken over instead of written again: the ingest is removed and the commit
  succeeds with `labels`. Success returns the digest, the blob is visible at once with `labels`.
  Commit always ends the writer.
- `status(ref)`, `abort(ref)`: NotFound for an unknown ref. Abort of a ref held by a writer is
  Unavailable (containerd's GC retries later). `list_statuses(filters)` over the fields `ref`,
  `expected`, `offset`, `total`.

BlobSource (the seam for the peer network; `peersync.blobs.LazyBlobs` implements it over the
download engine). A ContentStore may be given a `source`: Info and Read consult it for blobs
that are not present locally, so a blob can be served lazily, chunk by chunk, from peers
(containerd then never opens a writer for it, see ../shared/containerd-api.md, "the skip signal
on pull"). Without a source such blobs are NotFound. Delete, Update and Walk see containerd's
local blobs only.

CacheHooks (the seam for the cache manager; `peersync.blobs.ContentCache` implements it over
`peer.cache.CacheManager`). A ContentStore may be given `cache`: it hears of every use of a blob
(its last use keeps it in the cache; Info and commits count as requests toward its popularity)
and of every change that may need room (a commit, a Delete that leaves a cache-only blob), and it
admits containerd's own writes: a new ingest of `total` bytes that cannot fit the cache budget,
even after every evictable blob went, is refused with ResourceExhausted (in full mode the store
is containerd's content store: when the daemon refuses to download a blob, containerd fetches it
itself from the next host in hosts.toml and writes it here, and the budget must hold for that too).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from kernel.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, OutOfRange
from kernel.store.chunkstore import ChunkStore
from kernel.store.ingest import IngestStatus, IngestWriter
from kernel.store.schema import BlobRecord, parse_digest
from snapshotter.filters import compile_filters

READ_PIECE = 1 << 20  # largest data payload of one Read message (containerd's limit is 16 MiB)
INLINE_READ = 64 << 10  # preads up to this size run on the event loop: a thread hop costs more
INLINE_WRITE = 64 << 10  # same for hashing + writing small Write messages

Status = IngestStatus


@dataclass(frozen=True)
class Info:
    """containerd's content.Info (timestamps in nanoseconds since the epoch)."""

    digest: str
    size: int = 0
    created_ns: int = 0
    updated_ns: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)


@runtime_checkable
class BlobSource(Protocol):
    """Blobs this node does not hold but can obtain (from peers or the origin), consumer side.

    Why a seam: the content store is on the containerd side, which never imports the network side
    (ARCHITECTURE.md). It states here the little it needs to serve a blob lazily, and the daemon
    assembly adapts the download engine to it; the conformance suite plugs in a fake instead.

    Contract: `stat` is cheap and answers only for blobs the source can actually deliver;
    `read` returns exactly the requested bytes, verified against the chunk hashes before they are
    returned, or raises a PeerSyncError (NotFound if the blob became unavailable, Unavailable for
    a transient failure). `size` is at most one Read message's payload (READ_PIECE by default).

        class Peers:
            async def stat(self, digest):  return swarm.size_of(digest)     # or None
            async def read(self, digest, offset, size):  return await engine.fetch(digest, offset, size)

        store = ContentStore(chunks, source=Peers())
    """

    async def stat(self, digest: str) -> int | None:
        """The blob's size if this source can supply it, else None.

        Info answers with it, and on that answer containerd opens no writer and downloads
        nothing: every later byte comes through Read. So a size given for a blob that cannot be
        delivered fails the pull where containerd would otherwise have fetched the blob itself.
        A pull asks Info for each blob before fetching it, so this must be cheap."""
        ...

    async def read(self, digest: str, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of the blob, which `stat` said it can supply.

        They must already be verified against the chunk hashes: the content store passes them
        to containerd as they are, so a bad chunk from a peer has to be caught before this
        returns."""
        ...


@runtime_checkable
class CacheHooks(Protocol):
    """What the content store tells the cache manager, consumer side.

    Why a seam: the cache manager lives on the network side (it scores blobs by the site's
    popularity and replica counts), which this side never imports. The content store only reports
    what containerd did; the daemon assembly adapts the cache manager to it.

    Contract: `used` and `changed` are cheap and never raise (`used` is called on every Read,
    thousands of times a second during an unpack); `admit_write` raises only ResourceExhausted."""

    def used(self, digest: str, request: bool) -> None:
        """containerd used `digest`: renews its last use. `request` marks a request of the blob
        (Info, a commit), which counts toward its popularity; a Read is only a use."""
        ...

    def changed(self) -> None:
        """The store grew (a commit) or a blob became cache-only (a Delete): the budget may need
        a look soon."""
        ...

    def admit_write(self, ref: str, size: int) -> None:
        """containerd opens a new ingest `ref` of `size` bytes: make room for it (evictions), or
        raise ResourceExhausted if it cannot fit. The room is held until `wrote(ref)`."""
        ...

    def wrote(self, ref: str) -> None:
        """The ingest `ref` exists now (or never will): its record counts its bytes from here."""
        ...


class Writer:
    """An open ingest, held until `commit` or `close` (see the module docstring)."""

    def __init__(self, store: ContentStore, ingest: IngestWriter) -> None:
        self._store = store
        self._ingest = ingest
        self.ref = ingest.ref

    def status(self) -> Status:
        return self._ingest.status()

    def digest(self) -> str:
        """The digest of the bytes written so far."""
        return self._ingest.digest()

    async def write_at(self, offset: int, data: bytes) -> int:
        if len(data) <= INLINE_WRITE:
            return self._ingest.write_at(offset, data)
        return await asyncio.to_thread(self._ingest.write_at, offset, data)

    async def expect(self, digest: str) -> None:
        """AlreadyExists (and the ingest removed) if Info would find `digest` (containerd's
        service asks Info for any message carrying `expected`)."""
        if await self._store.known(digest):
            await asyncio.to_thread(self._store.chunks.ingests.discard, self.ref)
            self.close()  # after the discard: the ref stays ours until its ingest is gone
            raise AlreadyExists(f"blob with expected digest {digest} exists")

    async def commit(self, size: int = 0, expected: str = "", labels: Mapping[str, str] | None = None) -> str:
        """The ingest becomes containerd's blob (see the module docstring). The digest written is
        adopted before the blob can be seen complete, so the cache manager never takes a blob
        being committed for a cache-only one."""
        if expected:
            parse_digest(expected)
        store, chunks = self._store, self._store.chunks
        digest, written = self._ingest.digest(), self._ingest.status().offset
        newly = chunks.owners.adopt(digest)
        try:
            if newly and chunks.exists(digest):  # we keep it for another owner: take it over
                try:  # a commit always ends the writer; the ingest stays if it fails
                    if size > 0 and size != written:
                        raise FailedPrecondition(f"unexpected commit size {written}, expected {size}")
                    if expected and expected != digest:
                        raise FailedPrecondition(f"unexpected commit digest {digest}, expected {expected}")
                    await asyncio.to_thread(chunks.ingests.discard, self.ref)
                finally:
                    self.close()  # after the discard: the ref stays ours until its ingest is gone
                chunks.update_labels(digest, labels or {}, replace_all=True)
            else:
                digest = await asyncio.to_thread(self._ingest.commit, size, expected, labels)
        except BaseException:
            if newly:
                chunks.owners.disown(digest)
            raise
        store.used(digest, request=True)
        store.changed()
        return digest

    def close(self) -> None:
        """Release the ref; the ingest stays and can be resumed. Idempotent."""
        self._ingest.close()


class ContentStore:
    """containerd's content store over a ChunkStore (the module docstring is the spec)."""

    def __init__(
        self, chunks: ChunkStore, source: BlobSource | None = None, cache: CacheHooks | None = None
    ) -> None:
        self.chunks = chunks
        self.source = source
        self.cache = cache

    def mine(self, digest: str) -> bool:
        """True if `digest` is containerd's (visible to it locally)."""
        return self.chunks.owners.containerds(digest)

    async def known(self, digest: str) -> bool:
        """True if the blob is here and `info` finds it (and so, if we kept it for another owner,
        it is containerd's now): what a writer expecting it checks first, as containerd's own
        content service does. A blob the source could fetch but that is not here is not known
        to a writer: containerd is writing the bytes itself, the cheapest copy there is."""
        if not self.chunks.exists(digest):
            return False
        try:
            await self.info(digest)
        except NotFound:
            return False
        return True

    def used(self, digest: str, request: bool = False) -> None:
        if self.cache is not None:
            self.cache.used(digest, request)

    def changed(self) -> None:
        if self.cache is not None:
            self.cache.changed()

    # -- blobs -------------------------------------------------------------------------------

    async def info(self, digest: str) -> Info:
        parse_digest(digest)
        if self.mine(digest):
            with contextlib.suppress(NotFound):
                rec = self.chunks.record(digest)
                self.used(digest, request=True)
                return _info(rec)
        size = await self._hand_over(digest)
        self.used(digest, request=True)
        with contextlib.suppress(NotFound):
            return _info(self.chunks.record(digest))  # a blob we kept: its own record
        return Info(digest, size)

    async def _hand_over(self, digest: str) -> int:
        """The size of a blob the source offers, now containerd's; NotFound without a source or
        an offer. Adopted before the source is asked (and undone if it says no), so a blob we
        keep cannot be evicted between the answer and the flag."""
        parse_digest(digest)
        newly = self.chunks.owners.adopt(digest)
        try:
            return await self._remote_size(digest)
        except BaseException:
            if newly:
                self.chunks.owners.disown(digest)
            raise

    async def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        parse_digest(info.digest)
        if not self.mine(info.digest):
            raise NotFound(f"content {info.digest}: not found")
        labels, replace_all = _label_update(info, fieldpaths)
        return _info(self.chunks.update_labels(info.digest, labels, replace_all))

    async def walk(self, filters: Sequence[str] = ()) -> AsyncIterator[Info]:
        match = compile_filters(filters)
        after = ""
        while batch := self.chunks.iter_records(after):
            for rec in batch:
                if self.mine(rec.digest) and match(_fields(rec)):
                    yield _info(rec)
            after = batch[-1].digest
            await asyncio.sleep(0)  # a long walk must not starve other RPCs

    async def delete(self, digest: str) -> None:
        parse_digest(digest)
        if not (self.mine(digest) and self.chunks.exists(digest)):
            raise NotFound(f"content {digest}: not found")
        self.chunks.owners.disown(digest)
        self.changed()

    def read_once(
        self, digest: str, offset: int, size: int, piece: int = READ_PIECE
    ) -> tuple[int, bytes] | None:
        """The whole answer to a small Read in one pread, when that is all it takes: the blob is
        complete and its fd cached, 0 <= offset < size, 0 < size <= piece. Anything else is None
        and goes through `read`, which owns every rule and error."""
        if offset < 0 or not 0 < size <= piece or not self.mine(digest):
            return None
        try:
            got = self.chunks.read_cached(digest, offset, size)
        except OSError:
            return None
        if got is None or offset >= got[0]:
            return None
        self.used(digest)
        return offset, got[1]

    async def read(
        self, digest: str, offset: int = 0, size: int = 0, piece: int = READ_PIECE
    ) -> AsyncGenerator[tuple[int, bytes], None]:
        try:
            if not self.mine(digest):
                raise NotFound(f"content {digest}: not found")
            handle = self.chunks.open_blob(digest)
        except NotFound:
            async for item in self._read_remote(digest, offset, size, piece):
                yield item
            return
        self.used(digest)
        with handle:
            start, end = _read_range(digest, handle.size, offset, size)
            while start < end:
                n = min(piece, end - start)
                if n <= INLINE_READ:
                    data = handle.pread(start, n)
                else:
                    data = await asyncio.to_thread(handle.pread, start, n)
                yield start, data
                start += n

    async def _read_remote(
        self, digest: str, offset: int, size: int, piece: int
    ) -> AsyncIterator[tuple[int, bytes]]:
        blob_size = await self._hand_over(digest)
        self.used(digest)
        assert self.source is not None  # _remote_size raised otherwise
        start, end = _read_range(digest, blob_size, offset, size)
        while start < end:
            n = min(piece, end - start)
            yield start, await self.source.read(digest, start, n)
            start += n

    async def _remote_size(self, digest: str) -> int:
        """The size of a blob the source offers; NotFound without a source or an offer."""
        parse_digest(digest)
        size = None if self.source is None else await self.source.stat(digest)
        if size is None:
            raise NotFound(f"content {digest}: not found")
        return size

    # -- ingests -----------------------------------------------------------------------------

    async def writer(self, ref: str, total: int = 0, expected: str = "") -> Writer:
        if expected and await self.known(expected):
            raise AlreadyExists(f"content {expected}: already exists")
        admitted = self.cache is not None and total > 0 and not self._ingesting(ref)
        if admitted:
            assert self.cache is not None
            self.cache.admit_write(ref, total)  # ResourceExhausted if it cannot fit the budget
        try:
            ingest = await asyncio.to_thread(self.chunks.ingests.open, ref, total, expected)
        finally:
            if admitted:
                assert self.cache is not None
                self.cache.wrote(ref)
        return Writer(self, ingest)

    def _ingesting(self, ref: str) -> bool:
        """True if the ingest `ref` exists (a resume: its bytes are counted already)."""
        try:
            self.chunks.ingests.status(ref)
        except NotFound:
            return False
        return True

    async def status(self, ref: str) -> Status:
        return self.chunks.ingests.status(ref)

    async def list_statuses(self, filters: Sequence[str] = ()) -> list[Status]:
        match = compile_filters(filters)
        return [st for st in self.chunks.ingests.list() if match(_status_fields(st))]

    async def abort(self, ref: str) -> None:
        await asyncio.to_thread(self.chunks.ingests.abort, ref)


def _info(rec: BlobRecord) -> Info:
    return Info(rec.digest, rec.size, rec.created_ns, rec.updated_ns, dict(rec.labels))


def _fields(rec: BlobRecord) -> dict[str, Any]:
    """What content filters see (containerd's content adaptor)."""
    return {"digest": rec.digest, "size": str(rec.size), "labels": rec.labels}


def _status_fields(st: Status) -> dict[str, Any]:
    return {"ref": st.ref, "expected": st.expected, "offset": str(st.offset), "total": str(st.total)}


def _label_update(info: Info, fieldpaths: Sequence[str]) -> tuple[dict[str, str], bool]:
    """(labels to apply, replace all?) for an Update mask, as containerd's local store does."""
    if not fieldpaths:
        return dict(info.labels), True
    labels: dict[str, str] = {}
    replace_all = False
    for path in fieldpaths:
        if path == "labels":
            replace_all = True
            labels.update(info.labels)
        elif path.startswith("labels.") and len(path) > len("labels."):
            key = path[len("labels.") :]
            labels[key] = info.labels.get(key, "")
        else:
            raise InvalidArgument(f"cannot update {path!r} field on content info {info.digest!r}")
    return labels, replace_all


def _read_range(digest: str, blob_size: int, offset: int, size: int) -> tuple[int, int]:
    """[start, end) of a Read: negative offsets read from 0, size <= 0 reads to the end."""
    start = max(offset, 0)
    if start > blob_size:
        raise OutOfRange(f"read of {digest} at {start} past object length {blob_size} bytes")
    end = blob_size if size <= 0 else min(blob_size, start + size)
    return start, end


__all__ = [
    "BlobSource", "CacheHooks", "ContentStore", "INLINE_READ", "Info", "READ_PIECE", "Status", "Writer",
]
