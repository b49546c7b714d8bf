"""The content store's persistent format: where its files live, what LMDB holds about them, and the
crash-safety invariants that tie the two. Every path and key layout of blobs, chunk tables,
partial-blob progress and ingests is spelled here and nowhere else, so that a change of format is
a change of this module (and of `meta.SCHEMA_VERSION`), never an accident elsewhere.

The record functions are plain functions that run inside a transaction the caller opened (as
`snapshotter.storage` does for snapshots): the caller decides what commits together, and nothing
here touches the filesystem. `commit` is the one place that commits complete-blob records; the
partial side (`partial`) writes its own progress keys through these same functions.

A blob is addressed by its digest (`sha256:<hex>`) and logically cut into fixed-size chunks:
chunk `i` covers bytes `[i * chunk_size, min((i + 1) * chunk_size, size))`. Every chunk has its
own SHA-256, so a chunk received from a peer can be verified before the whole blob is. The chunk
size is stored per blob, so a store can change its default without rewriting blobs, and a partial
blob keeps the chunking of the table it was announced with.

Layout on disk (`<root>/content/`, `Layout`):

    blobs/sha256/<hex>        a complete, verified blob; read-only (0444), never modified
    partial/sha256/<hex>      a blob being filled chunk by chunk: a sparse file of the final
                              size, written with pwrite at chunk offsets (`kernel.store.partial`)
    ingest/<sha256(ref)>/data an ingest (containerd's Writer), see `kernel.store.ingest`

Records in LMDB (`kernel.store.meta`, schema version 2), keys are UTF-8 strings:

    blobs   "<digest>"          JSON {digest, size, chunk_size, state, created_ns, updated_ns,
                                labels[, media_type, source]}; state is "complete" (file in
                                blobs/) or "partial" (file in partial/); media_type and source are
                                left out when unset
    chunks  "<digest>"          the chunk hash table: chunk_count(size) SHA-256 digests of 32
                                bytes (`fsutil.HASH_LEN`) each, concatenated in chunk order (of
                                a partial blob: the announced table, absent until it is known)
    chunks  "<digest>/present"  (partial blobs only) presence bitmap, bit i (LSB first in byte
                                i // 8) set once chunk i is written, fdatasynced and checked
    chunks  "<digest>/seen/<i>" (partial blobs without a table only) SHA-256 of chunk i as
                                written, 32 bytes, i as 8 lowercase hex digits; cross-checked
                                against the table when it arrives
    ingests "<sha256(ref)>"     JSON {ref, total, expected, started_ns, updated_ns}
    ownership "<digest>"        (version 2) JSON {[containerd, held, pinned,] last_use_ns}: why the
                                blob is kept (each flag written only when true) and when it was
                                last used; what `kernel.store.ownership` keeps and the cache
                                manager evicts by. A complete blob with no flag set is cache-only.
                                A record may exist for a digest that is not (yet) here: a flag set
                                before the blob arrived (containerd took a lazy blob, a layer held
                                for an unpack) protects it from the moment it completes.

JSON is compact with sorted keys (`meta.dumps`); timestamps are Unix nanoseconds.

Upgrades (`upgrade`, run by `ChunkStore` when it opens an older store, in one transaction that
also writes the new version). 1 -> 2: every blob record (complete or partial) of version 1 gets
an ownership record with `containerd` set, except held blobs (db `holds` of version 1), which get
`held` instead; `holds` is emptied. Version 1 showed every unheld blob to containerd, so none may
be taken for cache-only until containerd says so (Delete); `last_use_ns` starts at the record's
`updated_ns`.

Crash safety. Blob files appear only by `rename` of an fsynced, verified, read-only file, and the
directory is fsynced before the LMDB record is written (`commit.Committer.publish`); deletion
unlinks (and fsyncs) before the record goes (`blobs.Blobs.delete`). So every crash leaves one of:
file and record (consistent), file without record (verified content whose record was lost:
recovery re-hashes it and adopts it, or deletes it if it does not match its name), or record
without file (recovery drops it). A blob file whose record still says "partial" (crash inside a
promotion) is adopted like one without a record, keeping the partial record's labels, media type
and source. Partial files and their records are reconciled the same way (`partial` documents the
order of its own writes), and so are ingest directories and theirs (`ingest`). Chunk-table,
bitmap and seen keys whose blob record is gone are dropped last. `ChunkStore.recover` runs all of
this, in that order, before the store serves requests.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from kernel.errors import InvalidArgument, NotFound
from kernel.store.meta import Meta, dumps, loads

_DIGEST_RE = re.compile(r"^(sha256|sha384|sha512):([a-f0-9]+)$")
_HEX_LEN = {"sha256": 64, "sha384": 96, "sha512": 128}


# -- digests and chunks ------------------------------------------------------------------------


def parse_digest(digest: str) -> tuple[str, str]:
    """Split a digest into (algorithm, hex); InvalidArgument if it is not a valid OCI digest.

    Every entry point that takes a digest checks it here first, so that a malformed name is the
    caller's InvalidArgument and can never become a path or a key."""
    match = _DIGEST_RE.match(digest)
    if match is None or len(match.group(2)) != _HEX_LEN[match.group(1)]:
        raise InvalidArgument(f"invalid digest {digest!r}: want <algorithm>:<lowercase hex>")
    return match.group(1), match.group(2)


def is_sha256(digest: str) -> bool:
    """True for a valid sha256 digest: the only algorithm whose blobs are stored, so the test
    recovery uses to tell a blob file from a stray one."""
    try:
        return parse_digest(digest)[0] == "sha256"
    except InvalidArgument:
        return False


def chunk_count(size: int, chunk_size: int) -> int:
    """How many chunks a blob of `size` bytes has (the last one may be short; 0 for an empty
    blob): the length of its chunk table and of its presence bitmap in bits."""
    return (size + chunk_size - 1) // chunk_size


@dataclass(frozen=True)
class BlobRecord:
    """A blob's metadata as kept in db `blobs`, complete or partial (`state`).

    Frozen: a record is a value read from or written to LMDB in one transaction; a change is a new
    record (`dataclasses.replace`) written back by whoever holds the transaction."""

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
        """The number of chunks (`chunk_count`)."""
        return chunk_count(self.size, self.chunk_size)

    def chunk_range(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk `index`; InvalidArgument outside the blob, because an index
        usually comes from a peer or a request and must not turn into a read past the end."""
        if not 0 <= index < self.chunks:
            raise InvalidArgument(f"chunk {index} out of range for {self.digest} ({self.chunks} chunks)")
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)

    def encode(self) -> bytes:
        """The record's LMDB value. Unset optional fields are left out, so that records of blobs
        without them stay byte-for-byte what older code wrote and reads."""
        fields = dict(self.__dict__)
        for optional in ("media_type", "source"):
            if not fields[optional]:
                del fields[optional]
        return dumps(fields)

    @classmethod
    def decode(cls, raw: bytes) -> BlobRecord:
        """The record from its LMDB value (missing optional fields take their defaults)."""
        return cls(**loads(raw))


# -- paths -------------------------------------------------------------------------------------


class Layout:
    """Where the content store's files live under `<root>/content` (the module docstring).

    Paths are derived from digests here only, after `parse_digest`, so a malformed digest can
    never name a file outside these directories."""

    def __init__(self, root: Path) -> None:
        content = Path(root) / "content"
        self.blobs = content / "blobs" / "sha256"
        self.partial = content / "partial" / "sha256"
        self.ingest = content / "ingest"

    def create(self) -> None:
        """Create the directories (idempotent), so that every later rename has a target."""
        for path in (self.blobs, self.ingest, self.partial):
            path.mkdir(parents=True, exist_ok=True)

    def blob_path(self, digest: str) -> Path:
        """A complete blob's file. InvalidArgument for a malformed digest; NotFound for another
        algorithm: such a blob is simply never here (what containerd expects to hear)."""
        algorithm, hexdigest = parse_digest(digest)
        if algorithm != "sha256":
            raise NotFound(f"content {digest}: only sha256 blobs are stored")
        return self.blobs / hexdigest

    def partial_path(self, digest: str) -> Path:
        """A partial blob's file. Any other algorithm is InvalidArgument: claiming one is a
        caller's mistake, not a lookup that may miss."""
        algorithm, hexdigest = parse_digest(digest)
        if algorithm != "sha256":
            raise InvalidArgument(f"content {digest}: only sha256 blobs are stored")
        return self.partial / hexdigest


# -- keys --------------------------------------------------------------------------------------


def present_key(digest: str) -> bytes:
    """Key (db chunks) of a partial blob's presence bitmap."""
    return f"{digest}/present".encode()


def seen_key(digest: str, index: int) -> bytes:
    """Key (db chunks) of the hash of chunk `index` as written, while no table is known."""
    return f"{digest}/seen/{index:08x}".encode()


def _seen_prefix(digest: str) -> bytes:
    return f"{digest}/seen/".encode()


def ingest_key(ref: str) -> str:
    """The name of an ingest (its LMDB key and its directory). Refs are arbitrary strings, and can
    exceed LMDB's key limit or hold `/`: name them by hash."""
    return hashlib.sha256(ref.encode()).hexdigest()


# -- db blobs ----------------------------------------------------------------------------------


def get_blob(txn: lmdb.Transaction, meta: Meta, digest: str, state: str | None = None) -> BlobRecord | None:
    """The blob's record, or None if there is none (or, with `state`, if it is in another state:
    callers of either side must not mistake the other side's record for theirs)."""
    raw = txn.get(digest.encode(), db=meta.db("blobs"))
    if raw is None:
        return None
    rec = BlobRecord.decode(bytes(raw))
    return rec if state is None or rec.state == state else None


def put_blob(txn: lmdb.Transaction, meta: Meta, rec: BlobRecord) -> None:
    """Write (or overwrite) the blob's record."""
    txn.put(rec.digest.encode(), rec.encode(), db=meta.db("blobs"))


def delete_blob(txn: lmdb.Transaction, meta: Meta, digest: str) -> None:
    """Delete the blob's record and its chunk table: the two never outlive each other."""
    txn.delete(digest.encode(), db=meta.db("blobs"))
    txn.delete(digest.encode(), db=meta.db("chunks"))


def iter_blobs(txn: lmdb.Transaction, meta: Meta, after: str = "") -> Iterator[BlobRecord]:
    """Records (both states) with digest > `after`, in digest order; valid while `txn` is open,
    so that a caller can stop early and page with `after` across transactions."""
    with txn.cursor(db=meta.db("blobs")) as cur:
        found = cur.set_range(after.encode())
        while found:
            key, raw = cur.item()
            if bytes(key).decode() != after:
                yield BlobRecord.decode(bytes(raw))
            found = cur.next()


# -- db chunks ---------------------------------------------------------------------------------


def get_table(txn: lmdb.Transaction, meta: Meta, digest: str) -> bytes | None:
    """The blob's chunk hash table (HASH_LEN bytes per chunk), or None if not known."""
    raw = txn.get(digest.encode(), db=meta.db("chunks"))
    return None if raw is None else bytes(raw)


def put_table(txn: lmdb.Transaction, meta: Meta, digest: str, table: bytes) -> None:
    """Write the blob's chunk hash table."""
    txn.put(digest.encode(), table, db=meta.db("chunks"))


def get_bitmap(txn: lmdb.Transaction, meta: Meta, digest: str) -> bytes | None:
    """A partial blob's presence bitmap, or None if it has none."""
    raw = txn.get(present_key(digest), db=meta.db("chunks"))
    return None if raw is None else bytes(raw)


def put_bitmap(txn: lmdb.Transaction, meta: Meta, digest: str, bitmap: bytes) -> None:
    """Write a partial blob's presence bitmap."""
    txn.put(present_key(digest), bitmap, db=meta.db("chunks"))


def get_seen(txn: lmdb.Transaction, meta: Meta, digest: str) -> dict[int, bytes]:
    """A partial blob's seen hashes, by chunk index (one prefix scan)."""
    prefix = _seen_prefix(digest)
    seen: dict[int, bytes] = {}
    with txn.cursor(db=meta.db("chunks")) as cur:
        found = cur.set_range(prefix)
        while found and (key := bytes(cur.key())).startswith(prefix):
            seen[int(key[len(prefix):], 16)] = bytes(cur.value())
            found = cur.next()
    return seen


def put_seen(txn: lmdb.Transaction, meta: Meta, digest: str, index: int, sha: bytes) -> None:
    """Record the hash of chunk `index` as written (while the blob has no table)."""
    txn.put(seen_key(digest, index), sha, db=meta.db("chunks"))


def delete_seen(txn: lmdb.Transaction, meta: Meta, digest: str, index: int) -> None:
    """Forget the seen hash of chunk `index` (superseded by a table, or its bit cleared)."""
    txn.delete(seen_key(digest, index), db=meta.db("chunks"))


def drop_partial_keys(txn: lmdb.Transaction, meta: Meta, digest: str) -> None:
    """Delete a blob's bitmap and seen-hash keys: what is left of partial progress once the blob
    is complete or dropped (its table, if any, is the caller's to keep or delete)."""
    chunks_db = meta.db("chunks")
    txn.delete(present_key(digest), db=chunks_db)
    prefix = _seen_prefix(digest)
    with txn.cursor(db=chunks_db) as cur:
        found = cur.set_range(prefix)
        while found and bytes(cur.key()).startswith(prefix):
            found = cur.delete()


def drop_orphan_chunk_keys(txn: lmdb.Transaction, meta: Meta) -> None:
    """Delete every chunk-table, bitmap and seen key whose blob has no record (left by a crash
    between dropping a record and its keys, or by an older bug): they would otherwise be read as
    the progress or table of a later claim of the same digest."""
    blobs_db, chunks_db = meta.db("blobs"), meta.db("chunks")
    with txn.cursor(db=chunks_db) as cur:
        orphans = [bytes(key) for key in cur.iternext(values=False)
                   if txn.get(bytes(key).split(b"/")[0], db=blobs_db) is None]
    for key in orphans:
        txn.delete(key, db=chunks_db)


# -- db ownership ------------------------------------------------------------------------------


@dataclass(frozen=True)
class OwnerRecord:
    """Why a blob is kept and when it was last used (db `ownership`, schema version 2).

    `containerd`: in containerd's content metadata (it committed, adopted or was handed the blob
    and has not Deleted it). `held`: a snapshot the daemon unpacked needs it. `pinned`: an operator
    pinned it. `last_use_ns`: the last read, Info, mirror request or download of it."""

    digest: str
    containerd: bool = False
    held: bool = False
    pinned: bool = False
    last_use_ns: int = 0

    @property
    def flagged(self) -> bool:
        """True if any flag keeps the blob (it is not cache-only)."""
        return self.containerd or self.held or self.pinned

    def encode(self) -> bytes:
        """The LMDB value: the flags that are set, and the last use."""
        fields: dict[str, Any] = {"last_use_ns": self.last_use_ns}
        for flag in ("containerd", "held", "pinned"):
            if getattr(self, flag):
                fields[flag] = True
        return dumps(fields)

    @classmethod
    def decode(cls, digest: str, raw: bytes) -> OwnerRecord:
        """The record from its key and LMDB value."""
        v = loads(raw)
        return cls(digest, bool(v.get("containerd")), bool(v.get("held")), bool(v.get("pinned")),
                   int(v.get("last_use_ns", 0)))


def put_owner(txn: lmdb.Transaction, meta: Meta, rec: OwnerRecord) -> None:
    """Write (or overwrite) the blob's ownership record."""
    txn.put(rec.digest.encode(), rec.encode(), db=meta.db("ownership"))


def delete_owner(txn: lmdb.Transaction, meta: Meta, digest: str) -> None:
    """Forget the blob's ownership record (the blob was evicted, or never came)."""
    txn.delete(digest.encode(), db=meta.db("ownership"))


def iter_owners(txn: lmdb.Transaction, meta: Meta) -> Iterator[OwnerRecord]:
    """Every ownership record, in digest order; valid while `txn` is open."""
    with txn.cursor(db=meta.db("ownership")) as cur:
        for key, raw in cur:
            yield OwnerRecord.decode(bytes(key).decode(), bytes(raw))


# -- upgrades ----------------------------------------------------------------------------------


def upgrade(meta: Meta) -> None:
    """Bring a store of an older schema version up to `meta.SCHEMA_VERSION` (the module docstring
    says what each step does). One transaction per step, the new version written in it."""
    if meta.version < 2:
        with meta.txn(write=True) as txn:
            _upgrade_1_to_2(txn, meta)
            meta.set_version(txn, 2)
        meta.version = 2


def _upgrade_1_to_2(txn: lmdb.Transaction, meta: Meta) -> None:
    holds_db = meta.db("holds")
    with txn.cursor(db=holds_db) as cur:
        held = {bytes(k).decode() for k in cur.iternext(values=False)}
    owners = {d: OwnerRecord(d, held=True) for d in held}
    for rec in iter_blobs(txn, meta):
        if rec.digest not in owners:
            owners[rec.digest] = OwnerRecord(rec.digest, containerd=True, last_use_ns=rec.updated_ns)
        else:
            owners[rec.digest] = OwnerRecord(rec.digest, held=True, last_use_ns=rec.updated_ns)
    for owner in owners.values():
        put_owner(txn, meta, owner)
    txn.drop(holds_db, delete=False)


# -- db ingests --------------------------------------------------------------------------------


def get_ingest(txn: lmdb.Transaction, meta: Meta, key: str) -> dict[str, Any] | None:
    """The ingest record named `key` (`ingest_key`), or None."""
    raw = txn.get(key.encode(), db=meta.db("ingests"))
    return None if raw is None else loads(bytes(raw))


def put_ingest(txn: lmdb.Transaction, meta: Meta, key: str, rec: dict[str, Any]) -> None:
    """Write the ingest record named `key`."""
    txn.put(key.encode(), dumps(rec), db=meta.db("ingests"))


def delete_ingest(txn: lmdb.Transaction, meta: Meta, key: str) -> bool:
    """Delete the ingest record named `key`; True if there was one."""
    return bool(txn.delete(key.encode(), db=meta.db("ingests")))


def iter_ingests(txn: lmdb.Transaction, meta: Meta) -> list[dict[str, Any]]:
    """Every ingest record, in key order."""
    with txn.cursor(db=meta.db("ingests")) as cur:
        return [loads(bytes(raw)) for raw in cur.iternext(keys=False)]


__all__ = [
    "BlobRecord",
    "Layout",
    "OwnerRecord",
    "delete_owner",
    "iter_owners",
    "put_owner",
    "upgrade",
    "chunk_count",
    "delete_blob",
    "delete_ingest",
    "delete_seen",
    "drop_orphan_chunk_keys",
    "drop_partial_keys",
    "get_bitmap",
    "get_blob",
    "get_ingest",
    "get_seen",
    "get_table",
    "ingest_key",
    "is_sha256",
    "iter_blobs",
    "iter_ingests",
    "parse_digest",
    "present_key",
    "put_bitmap",
    "put_blob",
    "put_ingest",
    "put_seen",
    "put_table",
    "seen_key",
]
