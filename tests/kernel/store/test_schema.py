"""The persistent format (`kernel.store.schema`) is a promise to stores already on disk: a root
written by an earlier peersync (version 1) opens, is upgraded to version 2 and works, and what this
code writes for blobs, chunks and ingests is still what version 1 wrote, byte for byte; version 2
only adds the `ownership` records, whose format is pinned here too.

The store here is built by hand with `lmdb` and plain files, byte for byte as version 1 lays it
out (keys, compact sorted JSON, bitmaps, seen hashes, file modes), without any of the store's own
code, so a change of layout in the code fails these tests instead of silently agreeing with
itself."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest

from kernel.errors import AlreadyExists, FailedPrecondition
from kernel.store.chunkstore import ChunkStore
from kernel.store.meta import Meta
from kernel.store.schema import BlobRecord

CHUNK = 64 * 1024
MEDIA = "application/vnd.oci.image.layer.v1.tar+gzip"
SOURCE = {"registry": "docker.io", "repository": "library/alpine"}
T0 = 1_700_000_000_000_000_000


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def pieces(data: bytes) -> list[bytes]:
    return [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]


def table(data: bytes) -> bytes:
    return b"".join(hashlib.sha256(p).digest() for p in pieces(data))


def v1_json(value: Any) -> bytes:
    """Version 1's record encoding: compact JSON, sorted keys."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def v1_blob(digest: str, size: int, state: str, labels: dict[str, str], **optional: Any) -> bytes:
    fields = {"digest": digest, "size": size, "chunk_size": CHUNK, "state": state, "created_ns": T0,
              "updated_ns": T0, "labels": labels, **optional}
    return v1_json(fields)


class V1Root:
    """A store root written the way version 1 writes one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.content = root / "content"
        for sub in ("blobs/sha256", "partial/sha256", "ingest"):
            (self.content / sub).mkdir(parents=True)
        (root / "meta").mkdir()
        self.env = lmdb.open(str(root / "meta"), map_size=1 << 30, max_dbs=16, subdir=True)
        self.dbs = {name: self.env.open_db(name.encode())
                    for name in ("schema", "blobs", "chunks", "ingests", "holds")}
        self.held: list[str] = []
        self.put("schema", b"version", b"1")

    def put(self, db: str, key: bytes, value: bytes) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(key, value, db=self.dbs[db])

    def complete(self, data: bytes, labels: dict[str, str], **optional: Any) -> str:
        digest = sha(data)
        path = self.content / "blobs" / "sha256" / digest[7:]
        path.write_bytes(data)
        path.chmod(0o444)
        self.put("blobs", digest.encode(), v1_blob(digest, len(data), "complete", labels, **optional))
        self.put("chunks", digest.encode(), table(data))
        return digest

    def partial(self, data: bytes, present: list[int], with_table: bool, **optional: Any) -> str:
        digest = sha(data)
        with open(self.content / "partial" / "sha256" / digest[7:], "wb") as f:
            f.truncate(len(data))
            for i in present:
                f.seek(i * CHUNK)
                f.write(pieces(data)[i])
        self.put("blobs", digest.encode(), v1_blob(digest, len(data), "partial", {}, **optional))
        bitmap = bytearray((len(pieces(data)) + 7) // 8)
        for i in present:
            bitmap[i // 8] |= 1 << (i % 8)
        self.put("chunks", f"{digest}/present".encode(), bytes(bitmap))
        if with_table:
            self.put("chunks", digest.encode(), table(data))
        else:
            for i in present:
                sha256 = hashlib.sha256(pieces(data)[i]).digest()
                self.put("chunks", f"{digest}/seen/{i:08x}".encode(), sha256)
        return digest

    def hold(self, digest: str) -> None:
        """Version 1's holds: db `holds`, key = digest, value b"1"."""
        self.put("holds", digest.encode(), b"1")

    def ingest(self, ref: str, written: bytes, total: int, expected: str) -> None:
        key = hashlib.sha256(ref.encode()).hexdigest()
        (self.content / "ingest" / key).mkdir()
        (self.content / "ingest" / key / "data").write_bytes(written)
        rec = {"ref": ref, "total": total, "expected": expected, "started_ns": T0, "updated_ns": T0}
        self.put("ingests", key.encode(), v1_json(rec))

    def close(self) -> None:
        self.env.close()


def raw(store: ChunkStore, db: str) -> dict[bytes, bytes]:
    with store.meta.txn() as txn, txn.cursor(db=store.meta.db(db)) as cur:
        return {bytes(k): bytes(v) for k, v in cur}


def data_of(size: int, seed: str) -> bytes:
    out = bytearray()
    while len(out) < size:
        out += hashlib.sha256(f"{seed}{len(out)}".encode()).digest()
    return bytes(out[:size])


@pytest.fixture
def v1(tmp_path: Path) -> Iterator[V1Root]:
    root = V1Root(tmp_path)
    yield root
    root.close()


def open_store(root: Path) -> ChunkStore:
    store = ChunkStore(root, Meta(root), CHUNK)
    store.recover()
    return store


def test_version_1_store_opens_and_works(v1: V1Root) -> None:
    ingested = data_of(3 * CHUNK + 5, "ingested")
    promoted = data_of(2 * CHUNK, "promoted")
    seen_only = data_of(4 * CHUNK + 9, "seen")
    tabled = data_of(3 * CHUNK, "tabled")
    a = v1.complete(ingested, {"containerd.io/gc.root": "x"})
    b = v1.complete(promoted, {}, media_type=MEDIA, source=SOURCE)
    c = v1.partial(seen_only, [0, 2], with_table=False, media_type=MEDIA, source=SOURCE)
    d = v1.partial(tabled, [1], with_table=True)
    v1.hold(b)  # a layer the daemon unpacked itself
    v1.ingest("ref-resume", ingested[:1000], len(ingested), "")
    v1.close()

    store = open_store(v1.root)
    try:
        # the upgrade to version 2: every blob of version 1 is containerd's, but the held one
        assert store.meta.version == 2 and raw(store, "schema") == {b"version": b"2"}
        assert raw(store, "ownership") == {
            a.encode(): v1_json({"containerd": True, "last_use_ns": T0}),
            b.encode(): v1_json({"held": True, "last_use_ns": T0}),
            c.encode(): v1_json({"containerd": True, "last_use_ns": T0}),
            d.encode(): v1_json({"containerd": True, "last_use_ns": T0}),
        }
        assert raw(store, "holds") == {}
        assert store.owners.containerds(a) and not store.owners.containerds(b)
        assert store.owners.reasons(b) == ["held"]

        # complete blobs: records decoded field for field, bytes, tables, chunk views
        assert store.record(a) == BlobRecord(a, len(ingested), CHUNK, T0, T0, {"containerd.io/gc.root": "x"})
        assert store.record(b) == BlobRecord(b, len(promoted), CHUNK, T0, T0, {}, "complete", MEDIA, SOURCE)
        assert [r.digest for r in store.iter_blobs()] == sorted([a, b])
        assert store.read(a, 0, len(ingested)) == ingested
        assert b"".join(store.chunk_hashes(a)) == table(ingested)
        with store.open_chunk(a, 3) as view:
            assert os.pread(view.fd, view.length, view.offset) == ingested[3 * CHUNK:]
            assert view.sha256 == hashlib.sha256(ingested[3 * CHUNK:]).digest()

        # partial blobs: progress, seen hashes and tables as version 1 wrote them
        assert sorted(r.digest for r in store.partials.records()) == sorted([c, d])
        assert store.partials.record(c).source == SOURCE
        assert store.partials.missing(c) == [1, 3, 4] and store.partials.have(c) == bytes([0b101])
        assert store.partials.read_partial(c, 2 * CHUNK, CHUNK) == pieces(seen_only)[2]
        known, hashes = store.partials.known_hashes(c)
        assert not known and hashes[2] == hashlib.sha256(pieces(seen_only)[2]).digest() and hashes[1] is None
        assert store.partials.missing(d) == [0, 2]
        with store.open_chunk(d, 1) as view:
            assert view.sha256 == table(tabled)[32:64]
        # the seen hashes are cross-checked against a late table: they agree, nothing dropped
        assert store.partials.set_hashes(c, [table(seen_only)[i:i + 32] for i in range(0, 5 * 32, 32)]) == []
        assert store.partials.put_chunks(c, [(i, pieces(seen_only)[i]) for i in (1, 3, 4)])
        assert store.partials.complete(c) == BlobRecord(
            c, len(seen_only), CHUNK, T0, store.record(c).updated_ns, {}, "complete", MEDIA, SOURCE
        )
        assert store.partials.put_chunks(d, [(0, pieces(tabled)[0]), (2, pieces(tabled)[2])])
        store.partials.complete(d)
        assert store.read(d, 0, len(tabled)) == tabled

        # an ingest resumes where version 1 left it and commits
        assert store.ingests.status("ref-resume").offset == 1000
        writer = store.ingests.open("ref-resume", len(ingested))
        assert writer.offset == 1000
        writer.write_at(1000, ingested[1000:])
        with pytest.raises(AlreadyExists):
            writer.commit(len(ingested), a)

        # and what this code wrote for blobs, chunks and ingests is still version 1, byte for byte
        rec = store.update_labels(a, {"team": "edge"}, replace_all=False)
        labels = {"containerd.io/gc.root": "x", "team": "edge"}
        blobs = raw(store, "blobs")
        assert blobs[a.encode()] == v1_json({"digest": a, "size": len(ingested), "chunk_size": CHUNK,
                                             "state": "complete", "created_ns": T0,
                                             "updated_ns": rec.updated_ns, "labels": labels})
        assert json.loads(blobs[c.encode()]) == {
            "digest": c, "size": len(seen_only), "chunk_size": CHUNK, "state": "complete", "created_ns": T0,
            "updated_ns": store.record(c).updated_ns, "labels": {}, "media_type": MEDIA, "source": SOURCE}
        assert raw(store, "chunks") == {a.encode(): table(ingested), b.encode(): table(promoted),
                                        c.encode(): table(seen_only), d.encode(): table(tabled)}
        assert raw(store, "ingests") == {}
        for digest in (a, b, c, d):
            path = v1.content / "blobs" / "sha256" / digest[7:]
            assert stat.S_IMODE(path.stat().st_mode) == 0o444
        assert list((v1.content / "partial" / "sha256").iterdir()) == []
    finally:
        store.close()
        store.meta.close()


def test_what_this_code_writes_for_partial_progress_is_version_1(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    try:
        blob = data_of(3 * CHUNK, "progress")
        digest = sha(blob)
        store.partials.claim(digest, len(blob), MEDIA)
        store.partials.put_chunks(digest, [(0, pieces(blob)[0]), (2, pieces(blob)[2])])
        rec = store.partials.record(digest)
        assert raw(store, "blobs") == {digest.encode(): v1_json({
            "digest": digest, "size": len(blob), "chunk_size": CHUNK, "state": "partial",
            "created_ns": rec.created_ns, "updated_ns": rec.updated_ns, "labels": {}, "media_type": MEDIA})}
        assert raw(store, "chunks") == {
            f"{digest}/present".encode(): bytes([0b101]),
            f"{digest}/seen/00000000".encode(): hashlib.sha256(pieces(blob)[0]).digest(),
            f"{digest}/seen/00000002".encode(): hashlib.sha256(pieces(blob)[2]).digest(),
        }
        writer = store.ingests.open("a ref/with slashes", 7, "sha256:" + "0" * 64)
        key = hashlib.sha256(b"a ref/with slashes").hexdigest()
        assert json.loads(raw(store, "ingests")[key.encode()]) == {
            "ref": "a ref/with slashes", "total": 7, "expected": "sha256:" + "0" * 64,
            "started_ns": writer.status().started_ns, "updated_ns": writer.status().started_ns}
        assert writer.data_path == tmp_path / "content" / "ingest" / key / "data"
        writer.close()
    finally:
        store.close()
        store.meta.close()


def test_what_this_code_writes_for_ownership_is_version_2(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    try:
        digest = sha(b"owned")
        store.owners.adopt(digest)
        store.owners.hold(digest)
        store.owners.pin(digest)
        store.owners.touch(digest, T0 + 5)
        assert store.owners.flush() == 1
        assert raw(store, "ownership") == {
            digest.encode(): v1_json(
                {"containerd": True, "held": True, "pinned": True, "last_use_ns": T0 + 5}
            )
        }
        for undo in (store.owners.disown, store.owners.release, store.owners.unpin):
            undo(digest)
        assert raw(store, "ownership") == {digest.encode(): v1_json({"last_use_ns": T0 + 5})}
        assert raw(store, "schema") == {b"version": b"2"}
    finally:
        store.close()
        store.meta.close()


def test_an_upgrade_cut_short_leaves_version_1(v1: V1Root, monkeypatch: pytest.MonkeyPatch) -> None:
    """The upgrade is one transaction with the new version: a crash inside it leaves version 1
    whole, and the next open upgrades it."""
    a = v1.complete(data_of(CHUNK, "a"), {})
    v1.close()
    from kernel.store import schema

    def crash(txn: Any, meta: Meta) -> None:
        schema.put_owner(txn, meta, schema.OwnerRecord(a, containerd=True))
        raise RuntimeError("power cut")

    monkeypatch.setattr(schema, "_upgrade_1_to_2", crash)
    meta = Meta(v1.root)
    with pytest.raises(RuntimeError):
        ChunkStore(v1.root, meta, CHUNK)
    meta.close()
    monkeypatch.undo()
    store = open_store(v1.root)
    try:
        assert store.meta.version == 2 and store.owners.containerds(a)
    finally:
        store.close()
        store.meta.close()


def test_newer_schema_is_refused(v1: V1Root) -> None:
    v1.put("schema", b"version", b"3")
    v1.close()
    with pytest.raises(FailedPrecondition, match="schema version 3"):
        Meta(v1.root)
