"""The commit primitives: the one place a blob becomes complete, or stops being complete.

Two paths produce a complete blob, and both end here: an ingest commit (`blobs.Blobs.install`,
a file containerd wrote) and a partial blob's promotion (`partial.Partials.complete`, a file
filled chunk by chunk). Recovery adopts a file left without its record (`Committer.adopt`), and
a delete drops a record (`Committer.drop`). Keeping the ordering in one place is what makes the
crash-safety argument of `kernel.store.schema` hold for every path at once:

    the caller fsyncs the file and verifies its size and digest, then `publish`, under `lock`:
    check the blob is not complete already, make the file read-only, rename it into blobs/,
    fsync blobs/ (and the directory it came from), then one LMDB transaction (`commit_record`)
    writing the record and chunk table and dropping partial progress and the ingest record.

`commit_record` and `drop_record` are module-level functions, looked up at call time, so that
crash tests (and the chunk-size bench) can interrupt or time exactly the LMDB half of a commit.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path

from kernel.errors import AlreadyExists, NotFound
from kernel.store import schema
from kernel.store.fsutil import HASH_LEN, fsync_dir
from kernel.store.meta import Meta
from kernel.store.schema import BlobRecord, Layout


class Committer:
    """Complete-blob records and files of one store, and the lock that makes "already exists"
    exact.

    `lock` is held by whoever checks that a digest is not complete and then acts on that:
    `publish` (so two commits of the same blob cannot both succeed) and a partial claim (so no
    commit slips in between its check and its record). It is held only for local disk and LMDB
    work, and nothing takes a partial blob's own lock while holding it (a promotion takes them
    the other way round), so the two cannot deadlock."""

    def __init__(self, meta: Meta, layout: Layout) -> None:
        self.meta = meta
        self.layout = layout
        self.lock = threading.Lock()

    def exists(self, digest: str) -> bool:
        """True if the blob is complete here: its record, or (mid-commit, between the rename and
        the record) its file. False for a digest of another algorithm; InvalidArgument for a
        malformed one."""
        try:
            path = self.layout.blob_path(digest)
        except NotFound:
            return False
        with self.meta.txn() as txn:
            rec = schema.get_blob(txn, self.meta, digest, "complete")
        return rec is not None or path.exists()

    def publish(self, source: Path, rec: BlobRecord, hashes: bytes, ingest_key: str | None = None,
                sync_dirs: Iterable[Path] = ()) -> None:
        """Move a verified, fsynced file into place as the complete blob `rec` and record it.

        AlreadyExists (nothing moved) if the blob is complete already. `hashes` is the verified
        chunk table; `ingest_key` names the ingest record to drop in the same transaction;
        `sync_dirs` are fsynced after blobs/ (the directory the file left). A crash after the
        rename and before the transaction leaves a verified file without (complete) record,
        which `adopt` takes in at recovery."""
        target = self.layout.blob_path(rec.digest)
        with self.lock:
            if self.exists(rec.digest):
                raise AlreadyExists(f"content {rec.digest}: already exists")
            os.chmod(source, 0o444)  # before the rename: a visible blob is never writable
            os.rename(source, target)
            fsync_dir(self.layout.blobs)
            for path in sync_dirs:
                fsync_dir(path)
            commit_record(self.meta, rec, hashes, ingest_key)

    def adopt(self, path: Path, rec: BlobRecord, hashes: bytes) -> None:
        """Record a blob file already in blobs/ whose content was just re-verified (recovery
        only: no lock, nothing else runs)."""
        os.chmod(path, 0o444)
        commit_record(self.meta, rec, hashes, None)

    def drop(self, digest: str) -> bool:
        """The LMDB half of a delete (`drop_record`), run after the file is durably gone."""
        return drop_record(self.meta, digest)

    def drop_orphan_keys(self) -> None:
        """Drop chunk-table and partial keys left without a blob record (recovery, last)."""
        with self.meta.txn(write=True) as txn:
            schema.drop_orphan_chunk_keys(txn, self.meta)


def commit_record(meta: Meta, rec: BlobRecord, hashes: bytes, ingest_key: str | None) -> None:
    """The LMDB half of a commit, one transaction: the complete record and its chunk table, no
    more partial progress for it, and the ingest record gone. ValueError for a table of the
    wrong length (a bug in the caller, never written)."""
    if len(hashes) != rec.chunks * HASH_LEN:
        raise ValueError(f"chunk table of {len(hashes)} bytes for {rec.chunks} chunks of {rec.digest}")
    with meta.txn(write=True) as txn:
        schema.put_blob(txn, meta, rec)
        schema.put_table(txn, meta, rec.digest, hashes)
        schema.drop_partial_keys(txn, meta, rec.digest)
        if ingest_key is not None:
            schema.delete_ingest(txn, meta, ingest_key)


def drop_record(meta: Meta, digest: str) -> bool:
    """Delete a complete blob's record and table; True if there was a complete record. A partial
    record is left alone: partial blobs are dropped by their own side (`Partials.abandon`)."""
    with meta.txn(write=True) as txn:
        if schema.get_blob(txn, meta, digest, "complete") is None:
            return False
        schema.delete_blob(txn, meta, digest)
    return True


__all__ = ["Committer", "commit_record", "drop_record"]
