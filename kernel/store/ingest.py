"""Ingests: containerd's content Writer, one per `ref`, appended to and then committed as a blob.

Each ingest is a data file `<root>/content/ingest/<sha256(ref)>/data` plus a record in db
`ingests` under the same key: {ref, total, expected, started_ns, updated_ns} (`kernel.store.schema`
spells both). The offset of an ingest is the size of its data file, and its last update the
file's mtime, so a Write never touches LMDB: records change only when an ingest starts, restarts,
or is committed/aborted. Every write stamps the file's mtime with the clock reading the writer
reports (`_touch`): the kernel's own stamp comes from its coarse clock, up to a tick behind, and a
resumed ingest or a Status would report an update time earlier than the writer did (containerd's
suite, Resume).

Writes append at the current offset and feed a `HashState` (the whole-blob SHA-256 and the
per-chunk SHA-256s), so committing never re-reads the data. A write at offset 0 over existing
data truncates and restarts; any other offset that is not the current one is OutOfRange.
Opening an existing ingest (after the stream broke, or after a daemon restart) re-hashes the
file from disk, streaming, and resumes at its end.

A ref is held by at most one writer at a time: another open answers Unavailable with how long it
has been held (containerd's client retries). Locks live in memory: a restart frees them all.

Commit: fsync, check the size and digest, check that the blob is not already present (if it is,
the ingest is removed and AlreadyExists raised, as containerd does), then hand the file to the
store's `install` (`commit.Committer.publish`: read-only, rename, fsync dir, one LMDB transaction
that writes the blob and drops the ingest record), then remove the ingest directory. A commit
always ends the writer.

Ingests know the store they commit into only as an `IngestTarget` (its `exists` and `install`),
defined here on the consumer's side: the store owns its ingests, and this module never imports
the store.
"""

from __future__ import annotations

import builtins
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

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
from kernel.store.fsutil import HashState, hash_fd, remove_path
from kernel.store.meta import Meta
from kernel.store.schema import BlobRecord, ingest_key

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class IngestStatus:
    """What containerd's `content.Status` reports about an ingest."""

    ref: str
    offset: int
    total: int
    expected: str
    started_ns: int
    updated_ns: int


class IngestTarget(Protocol):
    """What a committed ingest goes into: the store that owns the ingests (`ChunkStore`)."""

    def exists(self, digest: str) -> bool:
        """True if the blob is complete already (the commit then answers AlreadyExists)."""
        ...

    def install(self, source: Path, digest: str, size: int, hashes: bytes, labels: Mapping[str, str],
                ingest_key: str | None = None) -> BlobRecord:
        """Make the verified, fsynced `source` the complete blob and drop the ingest record
        `ingest_key` in the same transaction; AlreadyExists if it is complete already."""
        ...


class Ingests:
    """The ingests of one store: records, data files and the per-ref locks.

    `root` is the ingest directory; new ingests hash their chunks with `chunk_size`, and commit
    into `target`."""

    def __init__(self, meta: Meta, root: Path, chunk_size: int, target: IngestTarget) -> None:
        self._target = target
        self._meta = meta
        self.root = root
        self._chunk_size = chunk_size
        self._held: dict[str, float] = {}
        self._mutex = threading.Lock()

    # -- opening -----------------------------------------------------------------------------

    def open(self, ref: str, total: int = 0, expected: str = "") -> IngestWriter:
        """Lock `ref` and open (or resume) its ingest. Blocking: resuming re-hashes the file."""
        if not ref:
            raise InvalidArgument("ingest ref must not be empty")
        self._lock(ref)
        try:
            return self._open_locked(ref, total, expected)
        except BaseException:
            self._unlock(ref)
            raise

    def _open_locked(self, ref: str, total: int, expected: str) -> IngestWriter:
        key = ingest_key(ref)
        data = self.root / key / "data"
        rec = self._get(key)
        if rec is not None and data.is_file():
            return self._resume(ref, rec, data, total, expected)
        remove_path(data.parent)
        data.parent.mkdir(parents=True)
        fd = os.open(data, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        now = time.time_ns()
        rec = {"ref": ref, "total": max(total, 0), "expected": expected, "started_ns": now, "updated_ns": now}
        self._put(key, rec)
        return IngestWriter(self, rec, data, fd, HashState(self._chunk_size))

    def _resume(self, ref: str, rec: dict[str, Any], data: Path, total: int, expected: str) -> IngestWriter:
        fd = os.open(data, os.O_RDWR | os.O_CLOEXEC)
        try:
            if total > 0 and rec["total"] > 0 and total != rec["total"]:
                # containerd's local store does the same: a different total means a different blob
                log.info("restarting ingest: total changed", ref=ref, old=rec["total"], new=total)
                os.ftruncate(fd, 0)
                now = time.time_ns()
                rec.update(total=total, expected=expected, started_ns=now, updated_ns=now)
                self._put(ingest_key(ref), rec)
                state = HashState(self._chunk_size)
            else:
                state = hash_fd(fd, self._chunk_size)
                if (total > 0 and not rec["total"]) or (expected and not rec["expected"]):
                    rec.update(total=rec["total"] or total, expected=rec["expected"] or expected)
                    self._put(ingest_key(ref), rec)
        except BaseException:
            os.close(fd)
            raise
        rec["updated_ns"] = max(rec["updated_ns"], os.fstat(fd).st_mtime_ns)
        return IngestWriter(self, rec, data, fd, state)

    def _lock(self, ref: str) -> None:
        with self._mutex:
            since = self._held.get(ref)
            if since is None:
                self._held[ref] = time.monotonic()
                return
        raise Unavailable(f"ref {ref} locked for {time.monotonic() - since:.0f}s")

    def _unlock(self, ref: str) -> None:
        with self._mutex:
            self._held.pop(ref, None)

    def busy(self, ref: str) -> bool:
        """True while a writer holds `ref` (a second writer would get Unavailable)."""
        with self._mutex:
            return ref in self._held

    # -- status, abort, recovery -------------------------------------------------------------

    def status(self, ref: str) -> IngestStatus:
        """The ingest's state, from its record and the data file (works while it is written)."""
        rec = self._get(ingest_key(ref))
        status = None if rec is None else self._status(rec)
        if status is None:
            raise NotFound(f"ingest {ref}: not found")
        return status

    def list(self) -> list[IngestStatus]:
        """Every ingest that has its data file (one mid-commit or awaiting recovery is left out)."""
        recs = self._all_records()
        return [status for rec in recs if (status := self._status(rec)) is not None]

    def _status(self, rec: dict[str, Any]) -> IngestStatus | None:
        try:
            st = os.stat(self.root / ingest_key(rec["ref"]) / "data")
        except FileNotFoundError:
            return None  # mid-commit, or awaiting recovery
        updated = max(rec["updated_ns"], st.st_mtime_ns)
        return IngestStatus(rec["ref"], st.st_size, rec["total"], rec["expected"], rec["started_ns"], updated)

    def abort(self, ref: str) -> None:
        """Remove an ingest. A ref held by a writer is Unavailable, not pulled from under it."""
        self._lock(ref)  # Unavailable, with the age of the lock, if a writer holds it
        try:
            if not self.discard(ref):
                raise NotFound(f"ingest {ref}: not found")
        finally:
            self._unlock(ref)

    def discard(self, ref: str) -> bool:
        """Drop record then directory (a crash in between leaves a directory `recover` drops)."""
        key = ingest_key(ref)
        with self._meta.txn(write=True) as txn:
            had_record = schema.delete_ingest(txn, self._meta, key)
        had_dir = (self.root / key).exists()
        remove_path(self.root / key)
        return had_record or had_dir

    def recover(self) -> None:
        """Drop records without a data file and directories without a record."""
        keys = set()
        for rec in self._all_records():
            key = ingest_key(rec["ref"])
            if (self.root / key / "data").is_file():
                keys.add(key)
            else:
                log.warning("dropping ingest without data", ref=rec["ref"])
                self.discard(rec["ref"])
        for path in self.root.iterdir():
            if path.name not in keys:
                log.warning("removing ingest directory without record", path=str(path))
                remove_path(path)

    def _all_records(self) -> builtins.list[dict[str, Any]]:  # `list` here is the method above
        with self._meta.txn() as txn:
            return schema.iter_ingests(txn, self._meta)

    def _get(self, key: str) -> dict[str, Any] | None:
        with self._meta.txn() as txn:
            return schema.get_ingest(txn, self._meta, key)

    def _put(self, key: str, rec: dict[str, Any]) -> None:
        with self._meta.txn(write=True) as txn:
            schema.put_ingest(txn, self._meta, key, rec)


class IngestWriter:
    """The holder of one ref's lock. Not thread-safe: one stream drives it, one call at a time.

    Lifecycle: open -> (write_at | truncate | status)* -> commit or close. After either, every
    call raises FailedPrecondition."""

    def __init__(self, ingests: Ingests, rec: dict[str, Any], data: Path, fd: int, state: HashState) -> None:
        self._ingests = ingests
        self._rec = rec
        self.ref: str = rec["ref"]
        self.data_path = data
        self._fd: int | None = fd
        self._state = state
        self._closed = False

    @property
    def offset(self) -> int:
        """Bytes written so far: where the next write must start (containerd's Status offset)."""
        return self._state.size

    @property
    def total(self) -> int:
        """The size the client announced (0 if unknown)."""
        return int(self._rec["total"])

    def status(self) -> IngestStatus:
        """The writer's view (still answers after commit/close: the final state)."""
        rec = self._rec
        return IngestStatus(self.ref, self.offset, rec["total"], rec["expected"], rec["started_ns"],
                            rec["updated_ns"])

    def digest(self) -> str:
        """The digest of the bytes written so far."""
        return self._state.digest()

    def write_at(self, offset: int, data: bytes) -> int:
        """Append `data` at `offset` (the current one, or 0 to restart); returns the new offset."""
        self._check_open()
        if offset != self.offset:
            if offset != 0:
                raise OutOfRange(f"write @{offset} must occur at current offset {self.offset}")
            self.truncate()
        if data:
            self._append(data)
        return self.offset

    def truncate(self) -> None:
        """Drop everything written so far (containerd only truncates to 0)."""
        fd = self._check_open()
        os.ftruncate(fd, 0)
        self._state = HashState(self._state.chunk_size)
        self._touch(fd)

    def _append(self, data: bytes) -> None:
        fd = self._check_open()
        start = self.offset
        view = memoryview(data)
        try:
            written = 0
            while written < len(view):
                written += os.pwrite(fd, view[written:], start + written)
        except OSError:
            os.ftruncate(fd, start)  # keep the file and the hash state in step (e.g. ENOSPC)
            raise
        self._state.update(data)
        self._touch(fd)

    def _touch(self, fd: int) -> None:
        """Record the update time, in the file's mtime too (see the module docstring)."""
        now = time.time_ns()
        os.utime(fd, ns=(now, now))
        self._rec["updated_ns"] = now

    def commit(self, size: int = 0, expected: str = "", labels: Mapping[str, str] | None = None) -> str:
        """Verify and install the blob; returns its digest. Always ends the writer."""
        fd = self._check_open()
        store = self._ingests._target
        try:
            if expected and store.exists(expected):
                self._ingests.discard(self.ref)
                raise AlreadyExists(f"content {expected}: already exists")
            os.fsync(fd)
            if size > 0 and size != self.offset:
                raise FailedPrecondition(f"unexpected commit size {self.offset}, expected {size}")
            digest = self.digest()
            if expected and expected != digest:
                raise FailedPrecondition(f"unexpected commit digest {digest}, expected {expected}")
            key = ingest_key(self.ref)
            try:
                store.install(self.data_path, digest, self.offset, self._state.table(), labels or {}, key)
            except AlreadyExists:
                self._ingests.discard(self.ref)
                raise
            remove_path(self.data_path.parent)
            return digest
        finally:
            self.close()

    def close(self) -> None:
        """Release the ref (the ingest stays, resumable). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._ingests._unlock(self.ref)

    def _check_open(self) -> int:
        if self._closed or self._fd is None:
            raise FailedPrecondition(f"writer for ref {self.ref} is closed")
        return self._fd


__all__ = ["IngestStatus", "IngestTarget", "IngestWriter", "Ingests"]
