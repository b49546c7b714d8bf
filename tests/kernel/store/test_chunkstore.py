"""ChunkStore and its ingests: chunk tables, reads, the fd cache, and crash recovery.

Crashes are simulated by making one step of a commit (or delete) raise, then reopening the store
from disk as a restarted daemon would (new Meta, new ChunkStore, `recover()`)."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    Unavailable,
)
from kernel.store import blobs as blobsmod
from kernel.store import commit as commitmod
from kernel.store import ingest
from kernel.store.chunkstore import ChunkStore
from kernel.store.meta import Meta
from kernel.store.schema import ingest_key

CHUNK = 64 * 1024


class Crash(Exception):
    """Stands in for the process dying at a given step."""


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chunk_table(data: bytes, chunk_size: int = CHUNK) -> list[bytes]:
    return [hashlib.sha256(data[i:i + chunk_size]).digest() for i in range(0, len(data), chunk_size)]


def open_store(root: Path, chunk_size: int = CHUNK, **kw: int) -> ChunkStore:
    store = ChunkStore(root, Meta(root), chunk_size, **kw)
    store.recover()
    return store


def shutdown(store: ChunkStore) -> None:
    store.close()
    store.meta.close()


def restart(store: ChunkStore) -> ChunkStore:
    """Reopen the same root as a fresh daemon: no locks, no caches, recovery first."""
    shutdown(store)
    return open_store(store.root, store.chunk_size)


def write_all(store: ChunkStore, ref: str, data: bytes, piece: int = 100_000,
              total: int | None = None) -> ingest.IngestWriter:
    writer = store.ingests.open(ref, len(data) if total is None else total)
    for i in range(0, len(data), piece):
        writer.write_at(i, data[i:i + piece])
    return writer


def commit(store: ChunkStore, ref: str, data: bytes, **labels: str) -> str:
    return write_all(store, ref, data).commit(len(data), sha(data), labels)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ChunkStore]:
    s = open_store(tmp_path)
    yield s
    shutdown(s)


@pytest.fixture(scope="module")
def blob() -> bytes:
    """Several chunks plus a ragged tail, so pieces of 100 000 bytes straddle chunk boundaries."""
    return os.urandom(3 * 1024 * 1024 + 12_345)


def test_commit_records_chunk_table(store: ChunkStore, blob: bytes) -> None:
    digest = commit(store, "r", blob, team="edge")
    rec = store.record(digest)
    assert (rec.size, rec.chunk_size, rec.chunks, rec.labels) == (len(blob), CHUNK, 49, {"team": "edge"})
    assert store.chunk_hashes(digest) == chunk_table(blob)
    assert store.chunk_hash(digest, 48) == hashlib.sha256(blob[48 * CHUNK:]).digest()
    path = store.blob_path(digest)
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert path.read_bytes() == blob
    assert list(store.ingest_dir.iterdir()) == []
    with pytest.raises(NotFound):
        store.ingests.status("r")


def test_read_ranges(store: ChunkStore, blob: bytes) -> None:
    digest = commit(store, "r", blob)
    for offset, size in [(0, 4), (512, 508), (CHUNK - 3, 7), (len(blob) - 10, 100), (len(blob), 5)]:
        assert store.read(digest, offset, size) == blob[offset:offset + size]


def test_open_chunk_serves_verified_chunk(store: ChunkStore, blob: bytes) -> None:
    digest = commit(store, "r", blob)
    with store.open_chunk(digest, 48) as view:
        data = os.pread(view.fd, view.length, view.offset)
    assert (view.offset, view.length) == (48 * CHUNK, len(blob) - 48 * CHUNK)
    assert hashlib.sha256(data).digest() == view.sha256
    with pytest.raises(InvalidArgument):
        with store.open_chunk(digest, 49):
            pass


def test_empty_blob_has_no_chunks(store: ChunkStore) -> None:
    digest = commit(store, "empty", b"")
    assert store.record(digest).size == 0
    assert store.chunk_hashes(digest) == []
    assert store.read(digest, 0, 10) == b""


def test_chunk_boundary_exact_multiple(store: ChunkStore) -> None:
    data = os.urandom(4 * CHUNK)
    digest = write_all(store, "r", data, piece=CHUNK).commit(len(data), sha(data))
    assert store.chunk_hashes(digest) == chunk_table(data)


def test_missing_and_malformed_digests(store: ChunkStore) -> None:
    with pytest.raises(NotFound):
        store.record(sha(b"nope"))
    with pytest.raises(NotFound):
        store.read(sha(b"nope"), 0, 1)
    with pytest.raises(NotFound):
        store.delete(sha(b"nope"))
    for bad in ["", "sha256:abc", "sha256:" + "A" * 64, "md5:" + "0" * 32, "sha256" + "0" * 64]:
        with pytest.raises(InvalidArgument):
            store.record(bad)


def test_write_rules(store: ChunkStore) -> None:
    writer = store.ingests.open("r", 0)
    assert writer.write_at(0, b"hello") == 5
    with pytest.raises(OutOfRange):
        writer.write_at(3, b"x")
    assert writer.write_at(0, b"fresh start") == 11  # offset 0 over data truncates
    assert writer.write_at(11, b"!") == 12
    assert writer.commit(12, sha(b"fresh start!")) == sha(b"fresh start!")


def test_busy_ref_is_unavailable_until_closed(store: ChunkStore) -> None:
    writer = store.ingests.open("r", 0)
    with pytest.raises(Unavailable, match="ref r locked for"):
        store.ingests.open("r", 0)
    with pytest.raises(Unavailable):
        store.ingests.abort("r")
    writer.close()
    store.ingests.open("r", 0).close()


def test_commit_mismatch_keeps_ingest(store: ChunkStore) -> None:
    writer = write_all(store, "r", b"abc")
    with pytest.raises(FailedPrecondition, match="size"):
        writer.commit(4, "")
    with pytest.raises(FailedPrecondition):  # a commit always ends the writer
        writer.write_at(3, b"d")
    writer = store.ingests.open("r", 0)
    assert writer.offset == 3
    with pytest.raises(FailedPrecondition, match="digest"):
        writer.commit(3, sha(b"abd"))
    assert store.ingests.status("r").offset == 3
    assert list(store.iter_blobs()) == []


def test_already_exists_removes_ingest(store: ChunkStore) -> None:
    commit(store, "a", b"same")
    with pytest.raises(AlreadyExists):
        write_all(store, "b", b"same").commit(4, sha(b"same"))
    with pytest.raises(NotFound):
        store.ingests.status("b")
    with pytest.raises(AlreadyExists):  # detected from the digest alone, without `expected`
        write_all(store, "c", b"same").commit()
    assert not (store.ingest_dir / ingest_key("c")).exists()


def test_status_list_and_abort(store: ChunkStore) -> None:
    writer = write_all(store, "r", b"x" * 1000)
    st = store.ingests.status("r")
    assert (st.ref, st.offset, st.total) == ("r", 1000, 1000)
    assert st.started_ns <= st.updated_ns
    writer.close()
    assert [s.ref for s in store.ingests.list()] == ["r"]
    store.ingests.abort("r")
    with pytest.raises(NotFound):
        store.ingests.abort("r")
    assert store.ingests.list() == []


def test_resume_after_restart_rehashes(store: ChunkStore, blob: bytes) -> None:
    cut = 5 * CHUNK + 777  # mid-chunk, so the partial chunk hash must be rebuilt from disk
    write_all(store, "r", blob[:cut], total=len(blob))  # never closed: the daemon dies holding the ref
    store = restart(store)
    writer = store.ingests.open("r", len(blob))
    assert writer.offset == cut
    writer.write_at(cut, blob[cut:])
    digest = writer.commit(len(blob), sha(blob))
    assert store.chunk_hashes(digest) == chunk_table(blob)
    shutdown(store)


def test_resume_with_other_total_restarts(store: ChunkStore) -> None:
    write_all(store, "r", b"abc").close()
    writer = store.ingests.open("r", 10)
    assert writer.offset == 0
    writer.close()


def test_fd_cache_eviction_and_delete_under_reader(tmp_path: Path) -> None:
    store = open_store(tmp_path, fd_cache_size=2)
    blobs = [os.urandom(1000 + i) for i in range(5)]
    digests = [commit(store, f"r{i}", b) for i, b in enumerate(blobs)]
    for _ in range(3):
        for digest, data in zip(digests, blobs, strict=True):
            assert store.read(digest, 10, 100) == data[10:110]
    handle = store.open_blob(digests[0])
    fd = handle.fd
    store.delete(digests[0])
    assert handle.pread(0, 50) == blobs[0][:50]  # the borrowed fd outlives the delete
    handle.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(NotFound):
        store.read(digests[0], 0, 1)
    shutdown(store)


def test_update_labels_and_iteration(store: ChunkStore, monkeypatch: pytest.MonkeyPatch) -> None:
    digests = sorted(commit(store, f"r{i}", f"blob {i}".encode()) for i in range(7))
    monkeypatch.setattr(blobsmod, "LIST_BATCH", 3)
    assert [r.digest for r in store.iter_blobs()] == digests
    rec = store.update_labels(digests[0], {"a": "1", "b": "2"}, replace_all=True)
    assert rec.labels == {"a": "1", "b": "2"}
    rec = store.update_labels(digests[0], {"a": "", "c": "3"}, replace_all=False)
    assert rec.labels == {"b": "2", "c": "3"}
    assert store.record(digests[0]).labels == {"b": "2", "c": "3"}


# -- crash recovery ------------------------------------------------------------------------


def test_crash_after_rename_before_record_adopts_blob(store: ChunkStore, blob: bytes,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args: object) -> None:
        raise Crash()

    monkeypatch.setattr(commitmod, "commit_record", crash)
    with pytest.raises(Crash):
        commit(store, "r", blob, lost="label")
    monkeypatch.undo()
    digest = sha(blob)
    assert store.blob_path(digest).exists()
    store = restart(store)
    assert store.record(digest).size == len(blob)
    assert store.chunk_hashes(digest) == chunk_table(blob)
    assert store.read(digest, 0, 100) == blob[:100]
    with pytest.raises(NotFound):
        store.ingests.status("r")
    assert list(store.ingest_dir.iterdir()) == []
    shutdown(store)


def test_crash_before_rename_leaves_resumable_ingest(store: ChunkStore, blob: bytes,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args: object) -> None:
        raise Crash()

    monkeypatch.setattr(commitmod.os, "rename", crash)
    with pytest.raises(Crash):
        commit(store, "r", blob)
    monkeypatch.undo()
    store = restart(store)
    assert list(store.iter_blobs()) == [] and list(store.blob_dir.iterdir()) == []
    assert store.ingests.status("r").offset == len(blob)
    digest = store.ingests.open("r").commit(len(blob), sha(blob))
    assert store.chunk_hashes(digest) == chunk_table(blob)
    shutdown(store)


def test_crash_before_ingest_cleanup(store: ChunkStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args: object) -> None:
        raise Crash()

    writer = write_all(store, "r", b"data")
    monkeypatch.setattr(ingest, "remove_path", crash)
    with pytest.raises(Crash):
        writer.commit(4, sha(b"data"))
    monkeypatch.undo()
    assert (store.ingest_dir / ingest_key("r")).exists()
    store = restart(store)
    assert list(store.ingest_dir.iterdir()) == []
    assert store.read(sha(b"data"), 0, 4) == b"data"
    shutdown(store)


def test_crash_in_delete_between_unlink_and_record(store: ChunkStore,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    digest = commit(store, "r", b"doomed")

    def crash(*args: object) -> bool:
        raise Crash()

    monkeypatch.setattr(commitmod, "drop_record", crash)
    with pytest.raises(Crash):
        store.delete(digest)
    monkeypatch.undo()
    store = restart(store)
    with pytest.raises(NotFound):
        store.record(digest)
    with store.meta.txn() as txn:
        assert txn.get(digest.encode(), db=store.meta.db("chunks")) is None
    shutdown(store)


def test_recover_deletes_corrupt_and_stray_files(store: ChunkStore) -> None:
    good = commit(store, "r", b"good")
    liar = store.blob_dir / hashlib.sha256(b"claimed").hexdigest()
    liar.write_bytes(b"not what the name says")
    (store.blob_dir / "tmp.partial").write_bytes(b"junk")
    orphan = store.blob_dir / hashlib.sha256(b"orphan").hexdigest()
    orphan.write_bytes(b"orphan")
    store = restart(store)
    assert sorted(p.name for p in store.blob_dir.iterdir()) == sorted([good[7:], orphan.name])
    assert store.record("sha256:" + orphan.name).size == 6
    assert stat.S_IMODE(orphan.stat().st_mode) == 0o444
    shutdown(store)


def test_recover_drops_record_without_file(store: ChunkStore) -> None:
    digest = commit(store, "r", b"vanishing")
    store.blob_path(digest).unlink()
    store = restart(store)
    with pytest.raises(NotFound):
        store.record(digest)
    with pytest.raises(NotFound):
        store.chunk_hashes(digest)
    shutdown(store)


def test_recover_reconciles_ingests(store: ChunkStore) -> None:
    write_all(store, "kept", b"abc").close()
    write_all(store, "no-data", b"abc").close()
    (store.ingest_dir / ingest_key("no-data") / "data").unlink()
    stray = store.ingest_dir / "stray"
    stray.mkdir()
    store = restart(store)
    assert [s.ref for s in store.ingests.list()] == ["kept"]
    assert sorted(p.name for p in store.ingest_dir.iterdir()) == [ingest_key("kept")]
    shutdown(store)
