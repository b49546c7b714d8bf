"""The store's consistency check: do LMDB and the files agree, and is every complete blob intact?

Recovery (`ChunkStore.recover`) repairs what a crash can leave (`kernel.store.schema`, "Crash
safety"); this module only looks, so that a test, a benchmark or an operator can ask, after a
crash and a restart, whether recovery left the store as the invariants say it must be. It reads
LMDB read-only (`lmdb.open(readonly=True)`), which is safe beside a running daemon, and writes
nothing, so it can be pointed at a live store that is idle or at a stopped one.

What a consistent store is, after recovery:

- every complete record has its file in `blobs/`, read-only, of the recorded size, whose SHA-256
  is its name and whose chunks hash to the recorded chunk table;
- every file in `blobs/` has a complete record (a file without one is what recovery adopts);
- every partial record has its file in `partial/` of the recorded size; its presence bitmap has
  one bit per chunk and each chunk it marks hashes to the table (or to its seen hash); every file
  in `partial/` has a partial record;
- every ingest record has its directory and data file, and every ingest directory its record;
- no chunk-table, bitmap or seen key outlives its blob record.

`check_store(root)` returns the problems found, one readable line each; an empty list is a
consistent store. `verify=False` skips re-hashing complete blobs (the expensive part)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import lmdb

from kernel.store import schema
from kernel.store.fsutil import HASH_LEN, HashState
from kernel.store.meta import DATABASES
from kernel.store.schema import BlobRecord, Layout

_STORE_DBS = ("blobs", "chunks", "ingests")


def check_store(root: Path, verify: bool = True) -> list[str]:
    """The problems of the store at `root` (see the module docstring); [] if it is consistent.

    `root` is the daemon's `--root`. A store with no metadata yet (never opened) is consistent."""
    root = Path(root)
    if not (root / "meta" / "data.mdb").exists():
        return []
    layout = Layout(root)
    env = lmdb.open(str(root / "meta"), readonly=True, lock=True, max_dbs=len(DATABASES) + 4, subdir=True)
    try:
        with env.begin() as txn:
            dbs = {name: env.open_db(name.encode(), txn=txn, create=False) for name in _STORE_DBS}
            records = [
                BlobRecord.decode(bytes(raw)) for raw in txn.cursor(db=dbs["blobs"]).iternext(keys=False)
            ]
            chunk_keys = {bytes(k): bytes(v) for k, v in txn.cursor(db=dbs["chunks"])}
            ingests = {bytes(k).decode(): bytes(v) for k, v in txn.cursor(db=dbs["ingests"])}
    finally:
        env.close()
    problems: list[str] = []
    by_digest = {rec.digest: rec for rec in records}
    for rec in records:
        if rec.state == "complete":
            problems += _check_complete(layout, rec, chunk_keys.get(rec.digest.encode()), verify)
        else:
            problems += _check_partial(layout, rec, chunk_keys)
    problems += _stray_files(layout.blobs, by_digest, "complete")
    problems += _stray_files(layout.partial, by_digest, "partial")
    problems += _check_ingests(layout, ingests)
    for key in chunk_keys:
        if key.split(b"/")[0].decode() not in by_digest:
            problems.append(f"chunk key {key.decode(errors='replace')!r} outlives its blob record")
    return problems


def _check_complete(layout: Layout, rec: BlobRecord, table: bytes | None, verify: bool) -> list[str]:
    path = layout.blobs / rec.digest.split(":", 1)[1]
    try:
        st = path.stat()
    except FileNotFoundError:
        return [f"{rec.digest}: complete record without its file"]
    problems = []
    if st.st_size != rec.size:
        problems.append(f"{rec.digest}: file has {st.st_size} bytes, record says {rec.size}")
    if st.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        problems.append(f"{rec.digest}: complete blob file is writable ({oct(st.st_mode & 0o777)})")
    if table is None or len(table) != rec.chunks * HASH_LEN:
        problems.append(f"{rec.digest}: chunk table missing or of the wrong length")
    if verify and not problems:
        state = _hash_file(path, rec.chunk_size)
        if state.digest() != rec.digest:
            problems.append(f"{rec.digest}: content hashes to {state.digest()}")
        elif state.table() != table:
            problems.append(f"{rec.digest}: chunk table does not match the content")
    return problems


def _check_partial(layout: Layout, rec: BlobRecord, chunk_keys: dict[bytes, bytes]) -> list[str]:
    path = layout.partial / rec.digest.split(":", 1)[1]
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return [f"{rec.digest}: partial record without its file"]
    if size != rec.size:
        return [f"{rec.digest}: partial file has {size} bytes, record says {rec.size}"]
    bitmap = chunk_keys.get(schema.present_key(rec.digest), b"")
    if len(bitmap) != (rec.chunks + 7) // 8:
        return [f"{rec.digest}: presence bitmap of {len(bitmap)} bytes for {rec.chunks} chunks"]
    table = chunk_keys.get(rec.digest.encode())
    problems = []
    with open(path, "rb") as f:
        for index in range(rec.chunks):
            if not bitmap[index // 8] >> (index % 8) & 1:
                continue
            offset, length = rec.chunk_range(index)
            f.seek(offset)
            actual = hashlib.sha256(f.read(length)).digest()
            expected = (
                table[index * HASH_LEN : (index + 1) * HASH_LEN]
                if table is not None
                else chunk_keys.get(schema.seen_key(rec.digest, index))
            )
            if expected != actual:
                problems.append(f"{rec.digest}: chunk {index} is marked present but does not match")
    return problems


def _stray_files(directory: Path, by_digest: dict[str, BlobRecord], state: str) -> list[str]:
    if not directory.is_dir():
        return []
    problems = []
    for entry in os.scandir(directory):
        rec = by_digest.get("sha256:" + entry.name)
        if rec is None or rec.state != state:
            problems.append(f"{state} file {entry.name} has no {state} record")
    return problems


def _check_ingests(layout: Layout, ingests: dict[str, bytes]) -> list[str]:
    problems = [
        f"ingest {key}: record without its data file"
        for key in ingests
        if not (layout.ingest / key / "data").is_file()
    ]
    if layout.ingest.is_dir():
        problems += [
            f"ingest directory {entry.name} has no record"
            for entry in os.scandir(layout.ingest)
            if entry.name not in ingests
        ]
    return problems


def _hash_file(path: Path, chunk_size: int) -> HashState:
    state = HashState(chunk_size)
    with open(path, "rb") as f:
        while data := f.read(1 << 20):
            state.update(data)
    return state


__all__ = ["check_store"]
