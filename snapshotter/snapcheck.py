"""The snapshots' consistency check: does every snapshot in LMDB have its directory, and does
every parent link point at a committed snapshot?

`snapshotter.snapshots` builds a snapshot's directory under a temporary name and renames it into
place inside the transaction that writes its record, and deletes a removed snapshot's directory
only after the record is gone. So a crash may leave a directory no record names (garbage, which
containerd's Cleanup deletes and no client can see), never a record without its directory. This
module checks exactly that, read-only (LMDB opened `readonly=True`, safe beside a running
daemon), for tests, benchmarks and operators after a crash and a restart:

- every record's directory `<root>/snapshots/<id>/fs` exists, and an active snapshot has its
  overlay `work` directory;
- every parent named by a record exists and is committed;
- every child link (`snapshot_children`) joins two ids that have records;
- no two records share an id.

`check_snapshots(root)` returns the problems found, one line each ([] when consistent);
`garbage_dirs(root)` lists the unreferenced directories, which are allowed; `snapshot_ids(root)`
says which directory is whose."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lmdb

from kernel.store.meta import DATABASES, loads
from snapshotter.storage import Kind


def _read(root: Path) -> tuple[dict[str, dict[str, Any]], list[tuple[str, str]]]:
    env = lmdb.open(str(root / "meta"), readonly=True, lock=True, max_dbs=len(DATABASES) + 4, subdir=True)
    try:
        with env.begin() as txn:
            snaps_db = env.open_db(b"snapshots", txn=txn, create=False)
            children_db = env.open_db(b"snapshot_children", txn=txn, create=False)
            records = {bytes(k).decode(): loads(bytes(v)) for k, v in txn.cursor(db=snaps_db)}
            links = [
                tuple(bytes(k).decode().split("\0", 1))
                for k in txn.cursor(db=children_db).iternext(values=False)
            ]
    finally:
        env.close()
    return records, [(link[0], link[1]) for link in links]


def check_snapshots(root: Path) -> list[str]:
    """The problems of the snapshots under `root` (the daemon's `--root`); [] if consistent."""
    root = Path(root)
    if not (root / "meta" / "data.mdb").exists():
        return []
    records, links = _read(root)
    problems: list[str] = []
    ids: dict[str, str] = {}
    for key, rec in records.items():
        snap_id, kind = str(rec["id"]), Kind(rec["kind"])
        if snap_id in ids:
            problems.append(f"snapshots {ids[snap_id]!r} and {key!r} share id {snap_id}")
        ids[snap_id] = key
        directory = root / "snapshots" / snap_id
        if not (directory / "fs").is_dir():
            problems.append(
                f"snapshot {key!r} ({kind.name.lower()}, id {snap_id}): no directory {directory}/fs"
            )
        elif kind is Kind.ACTIVE and not (directory / "work").is_dir():
            problems.append(f"active snapshot {key!r} (id {snap_id}): no work directory")
        parent = rec.get("parent", "")
        if parent and records.get(parent, {}).get("kind") != Kind.COMMITTED:
            problems.append(f"snapshot {key!r}: parent {parent!r} is missing or not committed")
    for parent_id, child_id in links:
        if parent_id not in ids or child_id not in ids:
            problems.append(f"child link {parent_id} -> {child_id} names a snapshot that does not exist")
    return problems


def snapshot_ids(root: Path) -> dict[str, str]:
    """Every snapshot's key (or committed name) mapped to its id: where its directory is."""
    if not (Path(root) / "meta" / "data.mdb").exists():
        return {}
    return {key: str(rec["id"]) for key, rec in _read(Path(root))[0].items()}


def garbage_dirs(root: Path) -> list[str]:
    """Snapshot directories no record names (crash leftovers Cleanup deletes; allowed)."""
    snaps = Path(root) / "snapshots"
    if not snaps.is_dir() or not (Path(root) / "meta" / "data.mdb").exists():
        return []
    used = {str(rec["id"]) for rec in _read(Path(root))[0].values()}
    return sorted(e.name for e in os.scandir(snaps) if e.name not in used)


__all__ = ["check_snapshots", "garbage_dirs", "snapshot_ids"]
