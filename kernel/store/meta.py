"""One home for LMDB: the environment, its named databases, and the transaction helper.

Every module that keeps metadata writes plain functions that take an open transaction
(`txn`) and the `Meta` whose databases they use, so that one caller decides what commits
together:

    with meta.txn(write=True) as txn:
        storage.create_snapshot(txn, meta, Kind.ACTIVE, key, ...)

A transaction commits when the block exits normally and aborts on any exception. LMDB is
crash-safe by design (copy-on-write B+tree, fsync on commit), so metadata is always either the
old or the new state; the filesystem work around it is ordered so that it can be cleaned up from
either state.

Schema: database `schema` holds key `version`. `SCHEMA_VERSION` names the layout of every other
database, whoever owns it, so it lives here, below all of them: `snapshots` and
`snapshot_children` are described in `snapshotter.storage`; `blobs`, `chunks` and `ingests` in
`kernel.store.schema`, and `ownership` (which blobs containerd, our snapshots or a pin keep, and
when each blob was last used) there too; `chains` in `kernel.store.chains` (the layers each chain ID
is made of, from the manifests and configs seen; a store without it starts it empty); `sources` in
`peer.catalog`; `counters` at `next_id`; `holds` is version 1's list of held blobs, emptied by the
upgrade to version 2. A store written by a newer layout is refused rather than misread; an older
one is opened as it is (`version` says which) and upgraded by the code that owns the changed
layout, in one transaction that also writes the new version (`kernel.store.schema.upgrade`), so a
crash leaves the old or the new layout.

Versions: 1, blobs, chunks, ingests, holds, snapshots, sources (and chains, added within version
1: older code never opens it). 2, the `ownership` database: a complete blob without an ownership
flag is cache-only (evictable) instead of containerd's.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb

from kernel.errors import FailedPrecondition

SCHEMA_VERSION = 2
DATABASES = (
    "schema", "snapshots", "snapshot_children", "blobs", "chunks", "ingests", "counters", "sources",
    "holds", "ownership", "chains",
)
DEFAULT_MAP_SIZE = 1 << 34  # 16 GiB of address space; LMDB only uses what it writes


class Meta:
    """The LMDB environment at `<root>/meta`."""

    def __init__(self, root: Path, map_size: int = DEFAULT_MAP_SIZE) -> None:
        path = Path(root) / "meta"
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.env = lmdb.open(str(path), map_size=map_size, max_dbs=len(DATABASES) + 4, subdir=True)
        self._dbs = {name: self.env.open_db(name.encode()) for name in DATABASES}
        self.version = SCHEMA_VERSION  # the layout on disk; lower until its upgrade has run
        self._check_schema()

    def db(self, name: str) -> Any:
        """The handle of the named database (see `DATABASES`)."""
        return self._dbs[name]

    @contextlib.contextmanager
    def txn(self, write: bool = False) -> Iterator[lmdb.Transaction]:
        """A transaction that commits on normal exit and aborts on an exception."""
        txn = self.env.begin(write=write)
        try:
            yield txn
        except BaseException:
            txn.abort()
            raise
        else:
            txn.commit()

    def next_id(self, txn: lmdb.Transaction, counter: str) -> int:
        """Allocate the next integer of a named counter inside `txn` (1, 2, 3, ...)."""
        db = self._dbs["counters"]
        raw = txn.get(counter.encode(), db=db)
        value = int(raw) + 1 if raw else 1
        txn.put(counter.encode(), str(value).encode(), db=db)
        return value

    def set_version(self, txn: lmdb.Transaction, version: int) -> None:
        """Write that the layout on disk is `version`, inside the upgrade's transaction (the
        caller sets `self.version` once that transaction has committed)."""
        txn.put(b"version", str(version).encode(), db=self._dbs["schema"])

    def close(self) -> None:
        """Close the environment: after every store, snapshotter and catalog built on it is done."""
        self.env.close()

    def _check_schema(self) -> None:
        db = self._dbs["schema"]
        with self.txn(write=True) as txn:
            raw = txn.get(b"version", db=db)
            if raw is None:
                txn.put(b"version", str(SCHEMA_VERSION).encode(), db=db)
            elif int(raw) < SCHEMA_VERSION:
                self.version = int(raw)
            elif int(raw) > SCHEMA_VERSION:
                raise FailedPrecondition(
                    f"store at {self.path} has schema version {int(raw)}, newer than this peersync "
                    f"understands ({SCHEMA_VERSION}); upgrade peersync or use another --root"
                )


def dumps(value: Any) -> bytes:
    """Encode a record for LMDB (compact JSON: small, readable with `mdb_dump`)."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def loads(raw: bytes) -> Any:
    """Decode a record written by `dumps`."""
    return json.loads(raw)
