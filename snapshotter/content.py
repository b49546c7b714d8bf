"""The content store containerd sees: containerd's content API over the node's chunk store.

This docstring is the spec; `snapshotter.grpc_content` is a thin adapter over it, and the
conformance suite (tests/snapshotter/test_content.py) runs against both.

Vocabulary. A *blob* is immutable content named by its digest (`sha256:<64 hex>`); its *info*
is (digest, size, created, updated, labels). An *ingest* is a blob being written under a
client-chosen *ref*; its *status* is (ref, offset = bytes stored so far, total, expected,
started, updated). Committing an ingest turns it into a blob and removes it.

Blobs
- Held blobs (`kernel.store.holds`: layers the snapshotter unpacked itself, which containerd never
  fetched) are left out of `walk`, so containerd's GC cannot delete them under their snapshots;
  `info`, or a writer expecting one, hands the blob to containerd (the hold is dropped).
- `info(digest)` -> Info. A malformed digest is InvalidArgument; a blob that is neither here nor
  offered by the BlobSource is NotFound.
- `update(info, fieldpaths)` changes labels only. Paths: `labels` (replace all labels with
  info.labels) or `labels.<key>` (set that key from info.labels; absent or empty deletes it).
  An empty list replaces all labels. Any other path is InvalidArgument. Returns the new Info.
- `walk(filters)` yields the Info of every local blob matching containerd filters over the
  fields `digest`, `size` (decimal string) and `labels.<key>`. Bad filter syntax: InvalidArgument.
- `delete(digest)` removes a local blob; NotFound if it is not here.
- `read(digest, offset, size)` yields (offset, bytes) pieces of at most `piece` bytes covering
  [offset, offset+size): offset < 0 reads from 0; offset past the end (> size of blob) is
  OutOfRange; offset equal to the size yields nothing; size <= 0 reads to the end; a range past
  the end is clipped. Reads of up to INLINE_READ bytes are a single pread on the event loop
  (containerd issues thousands of 32 KiB reads and some of 4 or 512 bytes); larger pieces are
  read in a worker thread.

Ingests
- `writer(ref, total, expected)` opens or resumes the ingest `ref` (resuming re-hashes the data
  already stored, in a thread) and holds it until `close()`/`commit()`. Another writer on the same
  ref: Unavailable("ref X locked for Ns"). If `expected` is already present: AlreadyExists.
- `Writer.write_at(offset, data)`: offset equal to the current offset appends; offset 0 over
  existing data truncates and restarts; any other offset: OutOfRange. Returns the new offset.
- `Writer.expect(digest)`: if that blob is already present, the ingest is removed and
  AlreadyExists raised (containerd's service does this for any message carrying `expected`).
- `Writer.commit(size, expected, labels)`: size (if > 0) must equal the bytes written and the
  digest must equal `expected` (if given), else FailedPrecondition and the ingest stays, ready to
  resume; a blob already present is AlreadyExists and the ingest is removed. Success returns the
  digest, the blob is visible at once with `labels`. Commit always ends the writer.
- `status(ref)`, `abort(ref)`: NotFound for an unknown ref. Abort of a ref held by a writer is
  Unavailable (containerd's GC retries later). `list_statuses(filters)` over the fields `ref`,
  `expected`, `offset`, `total`.

Bounds (`kernel.limits`, containerd's own where it has one)
- Labels, on `commit` and on the result of `update`: each key and value together at most 4096
  bytes (containerd's `labels.Validate`), all labels of one blob at most 64 KiB encoded; otherwise
  InvalidArgument and nothing changes.
- Refs (`writer`, `status`, `abort`): non-empty and at most `REF_MAX_BYTES` (what containerd can
  send); otherwise InvalidArgument.
- Records stored by an older version beyond these bounds never break a listing: `info` and `walk`
  report such a blob without the labels over the bounds (logged), and `list_statuses` leaves out an
  ingest whose ref is over-long (it cannot be named by any request).

BlobSource (the seam for the peer network; `peersync.blobs.LazyBlobs` implements it over the
download engine). A ContentStore may be given a `source`: Info and Read consult it for blobs
that are not present locally, so a blob can be served lazily, chunk by chunk, from peers
(containerd then never opens a writer for it, see ../shared/containerd-api.md, "the skip signal
on pull"). Without a source such blobs are NotFound. Delete, Update and Walk see local blobs
only.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import structlog

from kernel import limits
from kernel.errors import AlreadyExists, InvalidArgument, NotFound, OutOfRange
from kernel.store.chunkstore import ChunkStore
from kernel.store.holds import Holds
from kernel.store.ingest import IngestStatus, IngestWriter
from kernel.store.schema import BlobRecord, parse_digest
from snapshotter.filters import compile_filters

READ_PIECE = 1 << 20  # largest data payload of one Read message (containerd's limit is 16 MiB)
INLINE_READ = 64 << 10  # preads up to this size run on the event loop: a thread hop costs more
INLINE_WRITE = 64 << 10  # same for hashing + writing small Write messages

Status = IngestStatus

log = structlog.get_logger(__name__)


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
        """AlreadyExists (and the ingest removed) if `digest` is already present."""
        parse_digest(digest)
        if self._store.chunks.exists(digest):
            self._store.adopt(digest)
            await asyncio.to_thread(self._store.chunks.ingests.discard, self.ref)
            self.close()  # after the discard: the ref stays ours until its ingest is gone
            raise AlreadyExists(f"blob with expected digest {digest} exists")

    async def commit(self, size: int = 0, expected: str = "", labels: Mapping[str, str] | None = None) -> str:
        if expected:
            parse_digest(expected)
        limits.check_labels(labels or {}, f"commit of ingest {limits.short(self.ref, 100)}")
        return await asyncio.to_thread(self._ingest.commit, size, expected, labels)

    def close(self) -> None:
        """Release the ref; the ingest stays and can be resumed. Idempotent."""
        self._ingest.close()


class ContentStore:
    """containerd's content store over a ChunkStore (the module docstring is the spec)."""

    def __init__(
        self, chunks: ChunkStore, source: BlobSource | None = None, holds: Holds | None = None
    ) -> None:
        self.chunks = chunks
        self.source = source
        self.holds = holds

    def adopt(self, digest: str) -> None:
        """containerd is taking `digest` into its metadata: a hold on it ends."""
        if self.holds is not None:
            self.holds.adopt(digest)

    # -- blobs -------------------------------------------------------------------------------

    async def info(self, digest: str) -> Info:
        self.adopt(digest)
        try:
            return _info(self.chunks.record(digest))
        except NotFound:
            size = await self._remote_size(digest)
            return Info(digest, size)

    async def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        parse_digest(info.digest)
        labels, replace_all = _label_update(info, fieldpaths)
        # Checked on the result, as containerd's metadata store does (a merge can grow a blob's
        # labels past the bound one key at a time); labels an older version stored beyond the
        # bounds are not held against an update that leaves them alone.
        current = {} if replace_all else limits.kept_labels(self.chunks.record(info.digest).labels)[0]
        limits.check_labels(_merged(current, labels), f"content {info.digest}")
        return _info(self.chunks.update_labels(info.digest, labels, replace_all))

    async def walk(self, filters: Sequence[str] = ()) -> AsyncIterator[Info]:
        match = compile_filters(filters)
        after = ""
        while batch := self.chunks.iter_records(after):
            for rec in batch:
                if self.holds is not None and rec.digest in self.holds:
                    continue
                if match(_fields(rec)):
                    yield _info(rec)
            after = batch[-1].digest
            await asyncio.sleep(0)  # a long walk must not starve other RPCs

    async def delete(self, digest: str) -> None:
        parse_digest(digest)
        await asyncio.to_thread(self.chunks.delete, digest)

    def read_once(
        self, digest: str, offset: int, size: int, piece: int = READ_PIECE
    ) -> tuple[int, bytes] | None:
        """The whole answer to a small Read in one pread, when that is all it takes: the blob is
        complete and its fd cached, 0 <= offset < size, 0 < size <= piece. Anything else is None
        and goes through `read`, which owns every rule and error."""
        if offset < 0 or not 0 < size <= piece:
            return None
        try:
            got = self.chunks.read_cached(digest, offset, size)
        except OSError:
            return None
        if got is None or offset >= got[0]:
            return None
        return offset, got[1]

    async def read(
        self, digest: str, offset: int = 0, size: int = 0, piece: int = READ_PIECE
    ) -> AsyncGenerator[tuple[int, bytes], None]:
        try:
            handle = self.chunks.open_blob(digest)
        except NotFound:
            async for item in self._read_remote(digest, offset, size, piece):
                yield item
            return
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
        blob_size = await self._remote_size(digest)
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
        limits.check_ref(ref)
        if expected:
            parse_digest(expected)
            if self.chunks.exists(expected):
                self.adopt(expected)
                raise AlreadyExists(f"content {expected}: already exists")
        ingest = await asyncio.to_thread(self.chunks.ingests.open, ref, total, expected)
        return Writer(self, ingest)

    async def status(self, ref: str) -> Status:
        limits.check_ref(ref)
        return self.chunks.ingests.status(ref)

    async def list_statuses(self, filters: Sequence[str] = ()) -> list[Status]:
        match = compile_filters(filters)
        statuses = []
        for st in self.chunks.ingests.list():
            if not limits.ref_within_bounds(st.ref):
                log.warning("over-long ingest ref left out of listings", ref=limits.short(st.ref, 100))
            elif match(_status_fields(st)):
                statuses.append(st)
        return statuses

    async def abort(self, ref: str) -> None:
        limits.check_ref(ref)
        await asyncio.to_thread(self.chunks.ingests.abort, ref)


def _info(rec: BlobRecord) -> Info:
    labels, dropped = limits.kept_labels(rec.labels)
    if dropped:
        log.warning("blob labels over the bounds left out (stored by an older version)",
                    digest=rec.digest, dropped=dropped)
    return Info(rec.digest, rec.size, rec.created_ns, rec.updated_ns, labels)


def _merged(current: Mapping[str, str], labels: Mapping[str, str]) -> dict[str, str]:
    """`current` with the update `labels` applied as the store applies them (empty deletes)."""
    merged = dict(current)
    for key, value in labels.items():
        if value:
            merged[key] = value
        else:
            merged.pop(key, None)
    return merged


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


__all__ = ["BlobSource", "ContentStore", "INLINE_READ", "Info", "READ_PIECE", "Status", "Writer"]
