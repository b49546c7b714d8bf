"""Partial blobs: claim, chunks in any order, late hash tables, waits, promotion, crash recovery.

Crashes are simulated as in test_chunkstore: one step raises, then the root is reopened as a
restarted daemon would (new Meta, new ChunkStore, `recover()`)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, OutOfRange
from kernel.store import blobs as blobsmod
from kernel.store import commit as commitmod
from kernel.store import partial, schema
from kernel.store.chunkstore import ChunkStore
from kernel.store.meta import Meta
from kernel.store.partial import ChunkCorrupt, ChunksMissing, DigestMismatch
from snapshotter.content import ContentStore

CHUNK = 64 * 1024
SOURCE = {"registry": "docker.io", "repository": "library/alpine"}
MEDIA = "application/vnd.oci.image.layer.v1.tar+gzip"


class Crash(Exception):
    """Stands in for the process dying at a given step."""


def crash(*args: object, **kw: object) -> None:
    raise Crash()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def pieces(data: bytes) -> list[bytes]:
    return [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]


def table(data: bytes) -> list[bytes]:
    return [hashlib.sha256(p).digest() for p in pieces(data)]


def open_store(root: Path) -> ChunkStore:
    store = ChunkStore(root, Meta(root), CHUNK)
    store.recover()
    return store


def shutdown(store: ChunkStore) -> None:
    store.close()
    store.meta.close()


def restart(store: ChunkStore) -> ChunkStore:
    shutdown(store)
    return open_store(store.root)


def chunk_keys(store: ChunkStore, digest: str) -> list[bytes]:
    with store.meta.txn() as txn, txn.cursor(db=store.meta.db("chunks")) as cur:
        return [k for k in cur.iternext(values=False) if k.startswith(digest.encode())]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ChunkStore]:
    s = open_store(tmp_path)
    yield s
    shutdown(s)


@pytest.fixture(scope="module")
def blob() -> bytes:
    """Five full chunks and a short last one."""
    return os.urandom(5 * CHUNK + 1234)


def fill(store: ChunkStore, data: bytes, order: list[int] | None = None, digest: str = "") -> bool:
    digest = digest or sha(data)
    chunks = pieces(data)
    done = False
    for i in order if order is not None else range(len(chunks)):
        done = store.partials.put_chunk(digest, i, chunks[i])
    return done


# -- claiming ------------------------------------------------------------------------------


def test_claim_creates_hidden_sparse_partial(store: ChunkStore, blob: bytes) -> None:
    digest = sha(blob)
    rec = store.partials.claim(digest, len(blob), MEDIA, SOURCE)
    assert (rec.state, rec.size, rec.chunks, rec.media_type, rec.source) == ("partial", len(blob), 6, MEDIA,
                                                                            SOURCE)
    path = store.partials.path(digest)
    assert path.parent == store.root / "content" / "partial" / "sha256"
    assert path.stat().st_size == len(blob)
    assert path.stat().st_blocks == 0  # sparse until chunks land
    assert list(store.blob_dir.iterdir()) == []
    assert store.partials.missing(digest) == list(range(6))
    assert store.partials.have(digest) == b"\0"
    # invisible to the complete-blob API, so containerd never sees half a blob
    assert not store.exists(digest)
    assert list(store.iter_blobs()) == []
    with pytest.raises(NotFound):
        store.record(digest)
    with pytest.raises(NotFound):
        store.read(digest, 0, 1)
    with pytest.raises(NotFound):
        store.update_labels(digest, {"a": "b"}, replace_all=True)
    with pytest.raises(NotFound):
        store.delete(digest)  # and it leaves the partial blob alone
    assert store.partials.record(digest) == rec


def test_claim_is_idempotent_and_checks_size(store: ChunkStore, blob: bytes) -> None:
    digest = sha(blob)
    rec = store.partials.claim(digest, len(blob))
    store.partials.put_chunk(digest, 2, pieces(blob)[2])
    assert store.partials.claim(digest, len(blob)) == rec
    assert store.partials.missing(digest) == [0, 1, 3, 4, 5]  # progress kept
    with pytest.raises(InvalidArgument, match="already claimed with size"):
        store.partials.claim(digest, len(blob) + 1)
    with pytest.raises(InvalidArgument, match="chunk size"):
        store.partials.claim(digest, len(blob), chunk_size=CHUNK * 2)
    with pytest.raises(InvalidArgument, match="entries"):
        store.partials.claim(sha(b"other"), 10, hashes=[b"\0" * 32] * 2)
    with pytest.raises(InvalidArgument):
        store.partials.claim("sha256:short", 10)
    with pytest.raises(InvalidArgument):
        store.partials.claim(sha(b"neg"), -1)


def test_claim_of_committed_blob_already_exists(store: ChunkStore) -> None:
    data = b"committed"
    writer = store.ingests.open("r", len(data))
    writer.write_at(0, data)
    digest = writer.commit(len(data), sha(data))
    with pytest.raises(AlreadyExists):
        store.partials.claim(digest, len(data))


def test_partials_interleaved_with_complete_blobs_in_listing(store: ChunkStore,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    complete = []
    for i in range(6):
        data = f"blob {i}".encode()
        if i % 2:
            store.partials.claim(sha(data), len(data))
        else:
            w = store.ingests.open(f"r{i}", len(data))
            w.write_at(0, data)
            complete.append(w.commit(len(data), sha(data)))
    monkeypatch.setattr(blobsmod, "LIST_BATCH", 1)
    assert [r.digest for r in store.iter_blobs()] == sorted(complete)
    assert sorted(r.digest for r in store.partials.records()) == sorted(
        sha(f"blob {i}".encode()) for i in (1, 3, 5))


# -- filling and completing ----------------------------------------------------------------


def test_out_of_order_puts_complete_and_read_like_any_blob(store: ChunkStore, blob: bytes) -> None:
    digest = sha(blob)
    store.partials.claim(digest, len(blob), MEDIA, SOURCE, hashes=table(blob))
    assert not fill(store, blob, [5, 0, 3])
    assert store.partials.missing(digest) == [1, 2, 4]
    assert store.partials.have(digest) == bytes([0b101001])
    assert fill(store, blob, [4, 1, 2])
    rec = store.partials.complete(digest, {"containerd.io/gc.root": "x"})
    assert (rec.state, rec.size, rec.labels) == ("complete", len(blob), {"containerd.io/gc.root": "x"})
    assert store.record(digest) == rec
    assert (rec.media_type, rec.source) == (MEDIA, SOURCE)
    assert store.exists(digest)
    assert store.chunk_hashes(digest) == table(blob)
    path = store.blob_path(digest)
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert path.read_bytes() == blob
    assert store.read(digest, CHUNK - 5, 10) == blob[CHUNK - 5:CHUNK + 5]
    assert list(store.partials.dir.iterdir()) == []
    assert chunk_keys(store, digest) == [digest.encode()]  # bitmap and seen keys gone
    with pytest.raises(NotFound):
        store.partials.record(digest)
    assert store.partials.missing(digest) == [] and store.partials.have(digest) == bytes([0b111111])
    assert store.partials.read_partial(digest, 0, 100) == blob[:100]
    assert store.partials.put_chunk(digest, 0, pieces(blob)[0])  # a late duplicate is harmless
    with store.open_chunk(digest, 5) as view:
        assert os.pread(view.fd, view.length, view.offset) == pieces(blob)[5]


async def test_completed_blob_served_by_content_store(store: ChunkStore, blob: bytes) -> None:
    """A lazy blob containerd took is served once complete (one nobody took is cache-only:
    tests/snapshotter/test_content_ownership.py)."""
    digest = sha(blob)
    store.partials.claim(digest, len(blob), hashes=table(blob))
    content = ContentStore(store)
    with pytest.raises(NotFound):  # not while partial (without a BlobSource)
        await content.info(digest)
    assert [i async for i in content.walk()] == []
    store.owners.adopt(digest)  # containerd took it at Info (through a BlobSource, in the daemon)
    fill(store, blob)
    await store.partials.acomplete(digest)
    assert (await content.info(digest)).size == len(blob)
    assert b"".join([d async for _, d in content.read(digest)]) == blob
    assert [i.digest async for i in content.walk()] == [digest]


def test_chunk_length_and_index_checked(store: ChunkStore, blob: bytes) -> None:
    digest = sha(blob)
    store.partials.claim(digest, len(blob))
    with pytest.raises(InvalidArgument, match="want 1234"):
        store.partials.put_chunk(digest, 5, pieces(blob)[0])  # the last chunk is short
    with pytest.raises(InvalidArgument, match=f"want {CHUNK}"):
        store.partials.put_chunk(digest, 0, pieces(blob)[0][:-1])
    with pytest.raises(InvalidArgument, match="out of range"):
        store.partials.put_chunk(digest, 6, b"x")
    assert store.partials.missing(digest) == list(range(6))
    with pytest.raises(NotFound):
        store.partials.put_chunk(sha(b"unclaimed"), 0, b"x")


def test_corrupt_chunk_rejected_against_table(store: ChunkStore, blob: bytes) -> None:
    digest = sha(blob)
    store.partials.claim(digest, len(blob), hashes=table(blob))
    bad = bytearray(pieces(blob)[1])
    bad[100] ^= 1
    with pytest.raises(ChunkCorrupt) as exc:
        store.partials.put_chunk(digest, 1, bytes(bad))
    assert exc.value.index == 1 and isinstance(exc.value, InvalidArgument)
    # a batch is all or nothing: the good chunk in it is not stored either
    with pytest.raises(ChunkCorrupt):
        store.partials.put_chunks(digest, [(0, pieces(blob)[0]), (1, bytes(bad))])
    assert store.partials.missing(digest) == list(range(6))
    assert store.partials.path(digest).stat().st_blocks == 0  # nothing written
    assert not store.partials.put_chunks(digest, [(0, pieces(blob)[0]), (1, pieces(blob)[1])])
    assert store.partials.missing(digest) == [2, 3, 4, 5]


def test_a_chunk_is_held_to_the_hash_its_sender_claimed(store: ChunkStore, blob: bytes) -> None:
    """`claims` (the sender's X-Chunk-Sha256) are checked in the store's own hashing pass: a chunk
    that does not match its claim is refused with its batch, one that does is stored."""
    digest = sha(blob)
    store.partials.claim(digest, len(blob))  # no table: the claim is all the chunk is held to
    good = pieces(blob)
    lie = hashlib.sha256(b"something else").digest()
    with pytest.raises(ChunkCorrupt) as exc:
        store.partials.put_chunks(digest, [(0, good[0]), (1, good[1])], claims={1: lie})
    assert exc.value.index == 1 and "sender" in str(exc.value)
    assert store.partials.missing(digest) == list(range(6))
    assert store.partials.path(digest).stat().st_blocks == 0  # nothing written
    honest = {0: hashlib.sha256(good[0]).digest(), 1: hashlib.sha256(good[1]).digest()}
    assert not store.partials.put_chunks(digest, [(0, good[0]), (1, good[1])], claims=honest)
    assert store.partials.missing(digest) == [2, 3, 4, 5]


def test_without_table_a_conflicting_copy_is_refused(store: ChunkStore, blob: bytes) -> None:
    digest = sha(blob)
    store.partials.claim(digest, len(blob))
    store.partials.put_chunk(digest, 0, pieces(blob)[0])
    store.partials.put_chunk(digest, 0, pieces(blob)[0])  # the same copy again: no-op
    with pytest.raises(ChunkCorrupt, match="copy already stored"):
        store.partials.put_chunk(digest, 0, os.urandom(CHUNK))
    with pytest.raises(ChunkCorrupt):  # two different copies within one batch
        store.partials.put_chunks(digest, [(1, os.urandom(CHUNK)), (1, os.urandom(CHUNK))])
    assert store.partials.read_partial(digest, 0, CHUNK) == pieces(blob)[0]


def test_late_table_keeps_agreeing_chunks(store: ChunkStore, blob: bytes) -> None:
    digest = sha(blob)
    store.partials.claim(digest, len(blob))
    fill(store, blob, [0, 2, 5])
    assert len(chunk_keys(store, digest)) == 1 + 3  # bitmap + three seen hashes
    assert store.partials.set_hashes(digest, table(blob)) == []
    assert store.partials.missing(digest) == [1, 3, 4]
    assert store.partials.set_hashes(digest, table(blob)) == []  # the same table again: no-op
    assert sorted(chunk_keys(store, digest)) == [digest.encode(), schema.present_key(digest)]
    # from now on chunks are checked against it
    with pytest.raises(ChunkCorrupt):
        store.partials.put_chunk(digest, 1, os.urandom(CHUNK))
    assert fill(store, blob, [1, 3, 4])
    assert store.partials.complete(digest).size == len(blob)


def test_late_table_drops_disagreeing_chunks(store: ChunkStore, blob: bytes) -> None:
    digest = sha(blob)
    store.partials.claim(digest, len(blob))
    chunks = pieces(blob)
    store.partials.put_chunk(digest, 0, chunks[0])
    store.partials.put_chunk(digest, 1, os.urandom(CHUNK))  # a bad source, undetectable so far
    store.partials.put_chunk(digest, 5, chunks[5])
    assert store.partials.set_hashes(digest, table(blob)) == [1]
    assert store.partials.missing(digest) == [1, 2, 3, 4]
    with pytest.raises(ChunksMissing):
        store.partials.read_partial(digest, CHUNK, 10)
    with pytest.raises(FailedPrecondition, match="different chunk hash table"):
        store.partials.set_hashes(digest, [b"\1" * 32] * 6)
    with pytest.raises(InvalidArgument, match="entries"):
        store.partials.set_hashes(digest, table(blob)[:5])
    assert fill(store, blob, [1, 2, 3, 4])
    assert store.partials.complete(digest).size == len(blob)
    assert store.read(digest, 0, len(blob)) == blob


def test_digest_mismatch_discards_everything(store: ChunkStore, blob: bytes) -> None:
    digest = sha(blob)
    store.partials.claim(digest, len(blob))
    wrong = os.urandom(len(blob))  # a consistent but wrong blob: no table to catch it early
    assert fill(store, wrong, digest=digest)
    with pytest.raises(DigestMismatch, match="refetch") as exc:
        store.partials.complete(digest)
    assert isinstance(exc.value, FailedPrecondition)
    assert list(store.partials.dir.iterdir()) == [] and list(store.blob_dir.iterdir()) == []
    assert chunk_keys(store, digest) == []
    with pytest.raises(NotFound):
        store.partials.record(digest)
    with pytest.raises(NotFound):
        store.partials.put_chunk(digest, 0, pieces(blob)[0])
    store.partials.claim(digest, len(blob))  # start over
    assert fill(store, blob)
    store.partials.complete(digest)


def test_wrong_table_fails_at_complete(store: ChunkStore, blob: bytes) -> None:
    """A provisional table is only trusted once the whole digest verifies."""
    digest = sha(blob)
    wrong = os.urandom(len(blob))
    store.partials.claim(digest, len(blob), hashes=table(wrong))
    assert fill(store, wrong, digest=digest)  # every chunk agrees with the (lying) table
    with pytest.raises(DigestMismatch):
        store.partials.complete(digest)
    assert chunk_keys(store, digest) == []  # the table went with it


def test_complete_needs_every_chunk_and_abandon(store: ChunkStore, blob: bytes) -> None:
    digest = sha(blob)
    store.partials.claim(digest, len(blob))
    fill(store, blob, [0, 1])
    with pytest.raises(FailedPrecondition, match="4 of 6 chunks missing"):
        store.partials.complete(digest)
    store.partials.abandon(digest)
    assert list(store.partials.dir.iterdir()) == [] and chunk_keys(store, digest) == []
    with pytest.raises(NotFound):
        store.partials.abandon(digest)
    with pytest.raises(NotFound):
        store.partials.read_partial(digest, 0, 1)


def test_empty_blob(store: ChunkStore) -> None:
    digest = sha(b"")
    store.partials.claim(digest, 0, hashes=[])
    assert store.partials.missing(digest) == [] and store.partials.have(digest) == b""
    assert store.partials.read_partial(digest, 0, 10) == b""
    assert store.partials.complete(digest).size == 0
    assert store.read(digest, 0, 10) == b""


def test_ingest_commit_supersedes_partial(store: ChunkStore, blob: bytes) -> None:
    digest = sha(blob)
    store.partials.claim(digest, len(blob))
    fill(store, blob, [0, 1])
    writer = store.ingests.open("r", len(blob))
    writer.write_at(0, blob)
    writer.commit(len(blob), digest)
    assert list(store.partials.dir.iterdir()) == []
    assert chunk_keys(store, digest) == [digest.encode()]
    assert store.partials.put_chunk(digest, 2, pieces(blob)[2])  # complete already
    assert store.partials.read_partial(digest, 0, 10) == blob[:10]
    with pytest.raises(AlreadyExists):
        store.partials.complete(digest)


# -- reading while filling -----------------------------------------------------------------


def test_read_partial_serves_only_present_ranges(store: ChunkStore, blob: bytes) -> None:
    digest = sha(blob)
    store.partials.claim(digest, len(blob), hashes=table(blob))
    fill(store, blob, [1, 2, 5])
    assert store.partials.read_partial(digest, CHUNK + 7, 2 * CHUNK - 7) == blob[CHUNK + 7:3 * CHUNK]
    assert store.partials.read_partial(digest, 5 * CHUNK, 10_000) == blob[5 * CHUNK:]  # clipped
    assert store.partials.read_partial(digest, len(blob), 10) == b""
    with pytest.raises(ChunksMissing, match="chunks 0") as exc:
        store.partials.read_partial(digest, CHUNK - 1, 2)
    assert exc.value.missing == [0]
    with pytest.raises(ChunksMissing) as exc:
        store.partials.read_partial(digest, 0, len(blob))
    assert exc.value.missing == [0, 3, 4]
    with pytest.raises(OutOfRange):
        store.partials.read_partial(digest, len(blob) + 1, 1)
    with store.open_chunk(digest, 2) as view:  # a present chunk serves like a complete one
        assert os.pread(view.fd, view.length, view.offset) == pieces(blob)[2]
        assert view.sha256 == table(blob)[2]
    with pytest.raises(ChunksMissing):
        with store.open_chunk(digest, 3):
            pass


async def test_wait_for_wakes_on_the_right_chunk(store: ChunkStore, blob: bytes) -> None:
    digest = sha(blob)
    store.partials.claim(digest, len(blob))
    chunks = pieces(blob)
    waiter = asyncio.create_task(store.partials.wait_for(digest, 2 * CHUNK + 10, CHUNK, timeout=5))
    await asyncio.sleep(0.01)
    store.partials.put_chunk(digest, 0, chunks[0])  # unrelated
    store.partials.put_chunk(digest, 2, chunks[2])  # half of what it needs
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await asyncio.to_thread(store.partials.put_chunk, digest, 3, chunks[3])  # from a worker thread
    await asyncio.wait_for(waiter, 1)
    assert store.partials.read_partial(digest, 2 * CHUNK + 10, CHUNK) == blob[2 * CHUNK + 10:3 * CHUNK + 10]
    await store.partials.wait_for(digest, 0, 10, timeout=0)  # already present: returns at once


async def test_wait_for_times_out(store: ChunkStore, blob: bytes) -> None:
    digest = sha(blob)
    store.partials.claim(digest, len(blob))
    store.partials.put_chunk(digest, 1, pieces(blob)[1])
    with pytest.raises(ChunksMissing, match="timed out") as exc:
        await store.partials.wait_for(digest, 0, 2 * CHUNK, timeout=0.05)
    assert exc.value.missing == [0]
    st = store.partials._open[digest]
    assert st.waiters == []  # no leaked waiter
    with pytest.raises(OutOfRange):
        await store.partials.wait_for(digest, len(blob) + 1, 1, timeout=0.05)
    with pytest.raises(NotFound):
        await store.partials.wait_for(sha(b"unclaimed"), 0, 1, timeout=0.05)


async def test_wait_for_ends_on_complete_and_abandon(store: ChunkStore, blob: bytes) -> None:
    digest = sha(blob)
    store.partials.claim(digest, len(blob))
    other = sha(b"other blob")
    store.partials.claim(other, 10)
    waiting = asyncio.create_task(store.partials.wait_for(digest, 0, 0, timeout=5))  # size 0: nothing
    await waiting
    abandoned = asyncio.create_task(store.partials.wait_for(other, 0, 10, timeout=5))
    await asyncio.sleep(0.01)
    store.partials.abandon(other)
    with pytest.raises(NotFound):
        await asyncio.wait_for(abandoned, 1)
    waiter = asyncio.create_task(store.partials.wait_for(digest, 0, len(blob), timeout=5))
    await asyncio.sleep(0.01)
    assert await store.partials.aput_chunks(digest, list(enumerate(pieces(blob))))
    await asyncio.wait_for(waiter, 1)
    await store.partials.acomplete(digest)
    await store.partials.wait_for(digest, 0, len(blob), timeout=0)  # complete: returns at once


async def test_concurrent_reads_while_chunks_arrive(store: ChunkStore) -> None:
    data = os.urandom(40 * CHUNK + 999)
    digest = sha(data)
    store.partials.claim(digest, len(data))
    chunks = pieces(data)
    order = list(range(len(chunks)))
    random.Random(7).shuffle(order)

    def writer() -> None:
        for batch in range(0, len(order), 3):  # batches of three, in random order
            store.partials.put_chunks(digest, [(i, chunks[i]) for i in order[batch:batch + 3]])

    async def reader(piece: int, seed: int) -> bytes:
        rng = random.Random(seed)
        offsets = list(range(0, len(data), piece))
        rng.shuffle(offsets)
        out = {}
        for offset in offsets:
            await store.partials.wait_for(digest, offset, piece, timeout=10)
            out[offset] = await asyncio.to_thread(store.partials.read_partial, digest, offset, piece)
        return b"".join(out[o] for o in sorted(out))

    thread = threading.Thread(target=writer)
    readers = [asyncio.create_task(reader(p, s)) for p, s in [(4096, 1), (100_000, 2), (CHUNK, 3)]]
    thread.start()
    results = await asyncio.gather(*readers)
    await asyncio.to_thread(thread.join)
    assert all(r == data for r in results)
    store.partials.complete(digest)
    assert store.read(digest, 0, len(data)) == data


# -- durability and recovery ---------------------------------------------------------------


def test_data_is_synced_before_the_bitmap(store: ChunkStore, blob: bytes,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    digest = sha(blob)
    store.partials.claim(digest, len(blob))
    events: list[str] = []
    real_sync, real_commit = os.fdatasync, partial._commit_bits
    monkeypatch.setattr(partial.os, "fdatasync", lambda fd: (events.append("fdatasync"), real_sync(fd))[1])
    monkeypatch.setattr(partial, "_commit_bits",
                        lambda *a: (events.append("bitmap"), real_commit(*a))[1])
    store.partials.put_chunks(digest, [(0, pieces(blob)[0]), (3, pieces(blob)[3])])
    assert events == ["fdatasync", "bitmap"]  # one of each per batch, data first


def test_crash_between_pwrite_and_bitmap_leaves_chunk_missing(store: ChunkStore, blob: bytes,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    digest = sha(blob)
    store.partials.claim(digest, len(blob))
    fill(store, blob, [0])
    monkeypatch.setattr(partial, "_commit_bits", crash)
    with pytest.raises(Crash):
        store.partials.put_chunk(digest, 1, pieces(blob)[1])
    monkeypatch.undo()
    store = restart(store)
    assert store.partials.missing(digest) == [1, 2, 3, 4, 5]  # missing, not corrupt
    with pytest.raises(ChunksMissing):
        store.partials.read_partial(digest, CHUNK, 1)
    assert fill(store, blob, [1, 2, 3, 4, 5])
    store.partials.complete(digest)
    assert store.read(digest, 0, len(blob)) == blob
    shutdown(store)


def test_restart_keeps_progress_and_seen_hashes(store: ChunkStore, blob: bytes) -> None:
    digest = sha(blob)
    store.partials.claim(digest, len(blob), MEDIA, SOURCE)
    store.partials.put_chunk(digest, 0, pieces(blob)[0])
    store.partials.put_chunk(digest, 4, os.urandom(CHUNK))  # wrong, not detectable yet
    store = restart(store)
    assert store.partials.missing(digest) == [1, 2, 3, 5]
    assert store.partials.record(digest).source == SOURCE
    assert store.partials.set_hashes(digest, table(blob)) == [4]  # cross-checked after the restart
    assert fill(store, blob, [1, 2, 3, 4, 5])
    store = restart(store)
    assert store.partials.missing(digest) == []
    assert store.partials.complete(digest).media_type == MEDIA
    shutdown(store)


def test_recover_clears_bits_over_bad_data(store: ChunkStore, blob: bytes) -> None:
    """A disk that lost or mangled a synced chunk costs a refetch, not a corrupt blob."""
    with_table, without = sha(blob), sha(blob[::-1])
    store.partials.claim(with_table, len(blob), hashes=table(blob))
    store.partials.claim(without, len(blob))
    fill(store, blob, [0, 1, 2])
    fill(store, blob[::-1], [0, 1, 2], digest=without)
    for digest in (with_table, without):
        with open(store.partials.path(digest), "r+b") as f:
            f.seek(CHUNK + 10)
            f.write(b"bit rot")
    store = restart(store)
    assert store.partials.missing(with_table) == [1, 3, 4, 5]
    assert store.partials.missing(without) == [1, 3, 4, 5]
    assert schema.seen_key(without, 1) not in chunk_keys(store, without)
    shutdown(store)


def test_recover_drops_orphans(store: ChunkStore, blob: bytes) -> None:
    kept, fileless = sha(blob), sha(b"fileless")
    store.partials.claim(kept, len(blob))
    store.partials.claim(fileless, 8)
    store.partials.put_chunk(fileless, 0, b"fileless")
    store.partials.path(fileless).unlink()
    stray = store.partials.dir / hashlib.sha256(b"stray").hexdigest()
    stray.write_bytes(b"no record")
    (store.partials.dir / "junk.tmp").write_bytes(b"junk")
    store = restart(store)
    assert [r.digest for r in store.partials.records()] == [kept]
    assert [p.name for p in store.partials.dir.iterdir()] == [kept[7:]]
    assert chunk_keys(store, fileless) == []
    shutdown(store)


def test_crash_after_promotion_rename_adopts_blob(store: ChunkStore, blob: bytes,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    digest = sha(blob)
    store.partials.claim(digest, len(blob), MEDIA, SOURCE)
    fill(store, blob)
    monkeypatch.setattr(commitmod, "commit_record", crash)
    with pytest.raises(Crash):
        store.partials.complete(digest, {"k": "v"})
    monkeypatch.undo()
    assert store.blob_path(digest).exists() and store.partials.record(digest).state == "partial"
    store = restart(store)
    rec = store.record(digest)
    assert (rec.state, rec.media_type, rec.source) == ("complete", MEDIA, SOURCE)
    assert store.chunk_hashes(digest) == table(blob)
    assert store.partials.records() == [] and chunk_keys(store, digest) == [digest.encode()]
    assert store.read(digest, 0, len(blob)) == blob
    shutdown(store)


def test_crash_before_promotion_rename_resumes(store: ChunkStore, blob: bytes,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    digest = sha(blob)
    store.partials.claim(digest, len(blob))
    fill(store, blob)
    monkeypatch.setattr(partial.os, "rename", crash)
    with pytest.raises(Crash):
        store.partials.complete(digest)
    monkeypatch.undo()
    store = restart(store)  # the partial file was left read-only: recovery makes it writable again
    assert store.partials.missing(digest) == []
    store.partials.complete(digest)
    assert store.read(digest, 0, len(blob)) == blob
    shutdown(store)


def test_crash_in_claim_before_record_leaves_nothing(store: ChunkStore, blob: bytes,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    digest = sha(blob)
    monkeypatch.setattr(partial, "fsync_dir", crash)
    with pytest.raises(Crash):
        store.partials.claim(digest, len(blob))
    monkeypatch.undo()
    store = restart(store)
    assert list(store.partials.dir.iterdir()) == [] and store.partials.records() == []
    shutdown(store)
