"""What containerd sees of the store's ownership model through the content store
(snapshotter/content.py, "Whose blobs"): only its own blobs locally; every other blob we keep
offered through the BlobSource and handed over when the answer goes out; Delete keeps the bytes as
a cache-only blob; a commit of a blob we keep takes it over; the uses reported to the cache
manager. Blobs nobody claims are placed in the store the way the network side places them (an
ingest straight into the ChunkStore, or a partial blob promoted)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel.errors import AlreadyExists, FailedPrecondition, NotFound, ResourceExhausted
from kernel.store.chunkstore import ChunkStore
from kernel.store.meta import Meta
from snapshotter.content import BlobSource, CacheHooks, ContentStore, Info

CHUNK = 64 * 1024


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class LocalSource:
    """A BlobSource that delivers the blobs the store keeps (what the daemon's does for them)."""

    def __init__(self, chunks: ChunkStore) -> None:
        self.chunks = chunks

    async def stat(self, digest: str) -> int | None:
        try:
            return self.chunks.record(digest).size
        except NotFound:
            return None

    async def read(self, digest: str, offset: int, size: int) -> bytes:
        return self.chunks.read(digest, offset, size)


class RecordedHooks:
    """A cache manager that records what it hears and admits writes up to `room` bytes."""

    def __init__(self, room: int = 1 << 40) -> None:
        self.uses: list[tuple[str, bool]] = []
        self.changes = 0
        self.room = room
        self.writing: dict[str, int] = {}
        self.admitted: list[str] = []

    def used(self, digest: str, request: bool) -> None:
        self.uses.append((digest, request))

    def changed(self) -> None:
        self.changes += 1

    def admit_write(self, ref: str, size: int) -> None:
        if size > self.room:
            raise ResourceExhausted(f"a write of {ref!r} does not fit the cache budget")
        self.writing[ref] = size
        self.admitted.append(ref)

    def wrote(self, ref: str) -> None:
        self.writing.pop(ref, None)


@pytest.fixture
def chunks(tmp_path: Path) -> Iterator[ChunkStore]:
    meta = Meta(tmp_path)
    store = ChunkStore(tmp_path, meta, CHUNK)
    store.recover()
    yield store
    store.close()
    meta.close()


def keep(chunks: ChunkStore, data: bytes) -> str:
    """A blob the network side stored (the mirror, a download): nobody's."""
    writer = chunks.ingests.open(f"mirror-{sha(data)}", len(data))
    writer.write_at(0, data)
    return writer.commit(len(data), sha(data))


async def commit(content: ContentStore, data: bytes, **labels: str) -> str:
    """containerd writes a blob."""
    writer = await content.writer(f"default/1/{sha(data)}", len(data))
    await writer.write_at(0, data)
    return await writer.commit(len(data), sha(data), labels)


async def read_all(content: ContentStore, digest: str) -> bytes:
    return b"".join([d async for _, d in content.read(digest)])


def test_the_test_doubles_fit_the_seams(chunks: ChunkStore) -> None:
    assert isinstance(LocalSource(chunks), BlobSource) and isinstance(RecordedHooks(), CacheHooks)


async def test_a_blob_nobody_claimed_is_invisible_to_containerd(chunks: ChunkStore) -> None:
    content = ContentStore(chunks)
    digest = keep(chunks, b"cache only")
    assert [i async for i in content.walk()] == []
    with pytest.raises(NotFound):
        await content.info(digest)
    with pytest.raises(NotFound):
        await read_all(content, digest)
    assert content.read_once(digest, 0, 4) is None  # the fast path never serves it either
    with pytest.raises(NotFound):
        await content.delete(digest)
    with pytest.raises(NotFound):
        await content.update(Info(digest, labels={"a": "b"}), ["labels"])
    assert chunks.exists(digest) and chunks.owners.record(digest) is None


async def test_the_source_offers_a_kept_blob_and_the_answer_hands_it_over(chunks: ChunkStore) -> None:
    content = ContentStore(chunks, source=LocalSource(chunks))
    digest = keep(chunks, b"cached layer")
    info = await content.info(digest)  # containerd's shared-policy check during a pull
    assert info.size == 12 and info.created_ns > 0  # our own record, not a bare size
    assert chunks.owners.containerds(digest)
    assert [i.digest async for i in content.walk()] == [digest]
    assert await read_all(content, digest) == b"cached layer"
    assert content.read_once(digest, 0, 6) == (0, b"cached")  # its fd is cached now: fast path
    with pytest.raises(FailedPrecondition, match="containerd"):
        chunks.evict(digest)


async def test_a_read_through_the_source_hands_it_over_too(chunks: ChunkStore) -> None:
    content = ContentStore(chunks, source=LocalSource(chunks))
    digest = keep(chunks, b"read before any info")
    assert await read_all(content, digest) == b"read before any info"
    assert chunks.owners.containerds(digest)


async def test_a_refused_answer_leaves_no_trace(chunks: ChunkStore) -> None:
    content = ContentStore(chunks, source=LocalSource(chunks))
    missing = sha(b"nowhere")
    with pytest.raises(NotFound):
        await content.info(missing)
    with pytest.raises(NotFound):
        await read_all(content, missing)
    assert chunks.owners.record(missing) is None


async def test_delete_keeps_the_bytes_as_cache_and_a_new_commit_takes_them_back(chunks: ChunkStore) -> None:
    content = ContentStore(chunks)
    data = os.urandom(3 * CHUNK + 7)
    digest = await commit(content, data, **{"containerd.io/gc.root": "x"})
    assert chunks.owners.containerds(digest)
    inode = chunks.blob_path(digest).stat().st_ino
    await content.delete(digest)
    # gone for containerd, kept for the cache
    with pytest.raises(NotFound):
        await content.info(digest)
    with pytest.raises(NotFound):
        await content.delete(digest)
    assert [i async for i in content.walk()] == [] and chunks.exists(digest)
    assert not chunks.owners.protected(digest)
    # containerd writes it again: the commit succeeds, nothing is written twice, labels are new
    assert await commit(content, data, fresh="1") == digest
    assert chunks.blob_path(digest).stat().st_ino == inode
    assert (await content.info(digest)).labels == {"fresh": "1"}
    assert chunks.ingests.list() == []
    # and a second commit of a blob that is containerd's already is AlreadyExists, as ever
    with pytest.raises(AlreadyExists):
        await commit(content, data)


async def test_a_commit_that_does_not_match_the_kept_blob_takes_nothing(chunks: ChunkStore) -> None:
    content = ContentStore(chunks)
    digest = keep(chunks, b"kept")
    writer = await content.writer("default/2/x", 4)
    await writer.write_at(0, b"kept")
    with pytest.raises(FailedPrecondition):
        await writer.commit(3, digest)  # wrong size
    assert not chunks.owners.containerds(digest)
    writer = await content.writer("default/2/x", 4)  # resumes the ingest
    assert await writer.commit(4, digest) == digest
    assert chunks.owners.containerds(digest)


async def test_a_commit_is_containerds_before_anything_could_evict_it(chunks: ChunkStore) -> None:
    content = ContentStore(chunks)
    digest = await commit(content, b"fresh layer")
    with pytest.raises(FailedPrecondition, match="containerd"):
        chunks.evict(digest)


async def test_a_writer_expecting_a_held_blob_hands_it_over_and_it_stays_held(chunks: ChunkStore) -> None:
    """A `ctr pull` of an image the CRI pull unpacked: containerd takes the held layer."""
    content = ContentStore(chunks, source=LocalSource(chunks))
    digest = keep(chunks, b"layer")
    chunks.owners.hold(digest)
    assert [i async for i in content.walk()] == []  # containerd's GC cannot delete it
    with pytest.raises(AlreadyExists):
        await content.writer("pull-ref", 5, expected=digest)
    assert chunks.owners.reasons(digest) == ["containerd", "held"]
    assert [i.digest async for i in content.walk()] == [digest]
    await content.delete(digest)  # the other image goes: still held for the snapshot
    assert chunks.owners.reasons(digest) == ["held"]


async def test_without_a_source_a_writer_expecting_a_kept_blob_writes_and_takes_it_over(
    chunks: ChunkStore,
) -> None:
    content = ContentStore(chunks)
    digest = keep(chunks, b"layer")
    writer = await content.writer("pull-ref", 5, expected=digest)  # Info would not find it
    await writer.write_at(0, b"layer")
    assert await writer.commit(5, digest) == digest
    assert chunks.owners.containerds(digest)


async def test_uses_reach_the_cache_manager(chunks: ChunkStore) -> None:
    uses = RecordedHooks()
    content = ContentStore(chunks, cache=uses)
    digest = await commit(content, b"used")
    assert uses.uses == [(digest, True)] and uses.changes == 1
    await content.info(digest)
    await read_all(content, digest)
    assert content.read_once(digest, 0, 2) == (0, b"us")
    assert uses.uses[1:] == [(digest, True), (digest, False), (digest, False)]
    await content.delete(digest)
    assert uses.changes == 2


async def test_containerds_own_writes_are_admitted_and_a_write_that_cannot_fit_is_refused(
    chunks: ChunkStore,
) -> None:
    """In full mode containerd fetches a blob itself when the daemon refused to download it, and
    writes it here: the budget holds for that too."""
    hooks = RecordedHooks(room=100)
    content = ContentStore(chunks, cache=hooks)
    with pytest.raises(ResourceExhausted, match="does not fit"):
        await content.writer("default/9/big", 101)
    assert chunks.ingests.list() == [] and hooks.writing == {}
    writer = await content.writer("default/9/small", 10)
    assert hooks.admitted == ["default/9/small"] and hooks.writing == {}  # the ingest counts itself
    await writer.write_at(0, b"0123")
    writer.close()
    writer = await content.writer("default/9/small", 10)  # a resume: counted already
    assert hooks.admitted == ["default/9/small"]
    await writer.write_at(4, b"456789")
    assert await writer.commit(10, sha(b"0123456789")) == sha(b"0123456789")
    await content.writer("default/9/unsized", 0)  # no size announced: nothing to admit
    assert hooks.admitted == ["default/9/small"]
