"""The store's ownership model (`kernel.store.ownership`): flags and their transitions, what
survives a restart (flags at once, last uses once flushed or on close), eviction of cache-only
blobs only, and the usage the cache budget counts."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel.errors import FailedPrecondition, NotFound
from kernel.store.chunkstore import ChunkStore, Usage
from kernel.store.meta import Meta

CHUNK = 64 * 1024
T0 = 1_700_000_000_000_000_000


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


_open: list[ChunkStore] = []


def open_store(root: Path) -> ChunkStore:
    store = ChunkStore(root, Meta(root), CHUNK)
    store.recover()
    _open.append(store)
    return store


def shutdown(store: ChunkStore, crash: bool = False) -> None:
    if store in _open:
        _open.remove(store)
        if not crash:
            store.close()
        store.meta.close()


def restart(store: ChunkStore, crash: bool = False) -> ChunkStore:
    """Reopen the root as a fresh daemon; `crash`: without the clean close (no flush)."""
    shutdown(store, crash)
    return open_store(store.root)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ChunkStore]:
    yield open_store(tmp_path)
    while _open:
        shutdown(_open[-1])


def put(store: ChunkStore, data: bytes) -> str:
    """A complete blob committed straight into the store (no owner: cache-only)."""
    writer = store.ingests.open(f"ref-{sha(data)}", len(data))
    writer.write_at(0, data)
    return writer.commit(len(data), sha(data))


def promote(store: ChunkStore, data: bytes) -> str:
    """A blob downloaded chunk by chunk and promoted, as the engine does."""
    digest = sha(data)
    store.partials.claim(digest, len(data))
    store.partials.put_chunks(digest, [(i // CHUNK, data[i:i + CHUNK]) for i in range(0, len(data), CHUNK)])
    store.partials.complete(digest)
    return digest


def test_a_new_blob_belongs_to_nobody_and_is_evictable(store: ChunkStore) -> None:
    ingested, promoted = put(store, b"ingested"), promote(store, b"p" * (2 * CHUNK + 5))
    for digest in (ingested, promoted):
        assert not store.owners.protected(digest) and store.owners.reasons(digest) == []
        assert store.evict(digest) > 0
        assert not store.exists(digest) and store.owners.record(digest) is None
    assert not any((store.root / "content" / "blobs" / "sha256").iterdir())


@pytest.mark.parametrize("flag", ["containerd", "held", "pinned"])
def test_a_flag_protects_and_survives_a_crash(store: ChunkStore, flag: str) -> None:
    digest = put(store, b"kept")
    set_flag = {"containerd": store.owners.adopt, "held": store.owners.hold, "pinned": store.owners.pin}[flag]
    assert set_flag(digest) and not set_flag(digest)  # True only when it changed
    with pytest.raises(FailedPrecondition, match=flag):
        store.evict(digest)
    store = restart(store, crash=True)  # a flag is written at once: no flush needed
    assert store.owners.reasons(digest) == [flag]
    with pytest.raises(FailedPrecondition):
        store.evict(digest)
    owners = store.owners
    unset = {"containerd": owners.disown, "held": owners.release, "pinned": owners.unpin}[flag]
    assert unset(digest) and not unset(digest)
    assert store.evict(digest) == 4


def test_flags_are_independent(store: ChunkStore) -> None:
    """A held blob containerd adopts stays held: neither owner alone lets it go."""
    digest = put(store, b"layer")
    store.owners.hold(digest)
    store.owners.adopt(digest)
    store.owners.disown(digest)  # containerd's GC Deleted it
    assert store.owners.reasons(digest) == ["held"]
    store.owners.adopt(digest)
    store.owners.release(digest)  # the last snapshot went
    assert store.owners.reasons(digest) == ["containerd"] and store.owners.containerds(digest)


def test_a_flag_may_come_before_the_blob(store: ChunkStore) -> None:
    data = b"lazy" * 1000
    digest = sha(data)
    store.owners.adopt(digest)  # containerd took it at Info, before the download
    assert promote(store, data) == digest
    with pytest.raises(FailedPrecondition, match="containerd"):
        store.evict(digest)


def test_an_adopt_undone_leaves_nothing_behind(store: ChunkStore) -> None:
    digest = sha(b"never here")
    assert store.owners.adopt(digest) and store.owners.disown(digest)
    assert store.owners.record(digest) is None
    with store.meta.txn() as txn:
        assert txn.get(digest.encode(), db=store.meta.db("ownership")) is None


def test_last_uses_are_kept_in_memory_until_flushed(store: ChunkStore) -> None:
    a, b = put(store, b"a"), put(store, b"b")
    store.owners.touch(a, T0)
    store.owners.touch(a, T0 - 5)  # an older use never goes back in time
    store.owners.touch(b, T0 + 1)
    assert store.owners.last_use_ns(a) == T0
    store = restart(store, crash=True)
    assert store.owners.last_use_ns(a) == 0  # not flushed: lost with the crash
    store.owners.touch(a, T0)
    assert store.owners.flush() == 1 and store.owners.flush() == 0
    store.owners.touch(b, T0 + 2)
    store = restart(store)  # a clean stop flushes
    assert (store.owners.last_use_ns(a), store.owners.last_use_ns(b)) == (T0, T0 + 2)


def test_pins_survive_a_restart_and_list_sorted(store: ChunkStore) -> None:
    blobs = sorted(put(store, bytes([i])) for i in range(3))
    for digest in reversed(blobs):
        store.owners.pin(digest)
    store = restart(store)
    assert store.owners.pinned() == blobs


def test_a_blob_in_use_is_not_evicted(store: ChunkStore) -> None:
    digest = put(store, b"streamed")
    with store.owners.busy(digest):
        with store.owners.busy(digest):
            pass
        assert store.owners.in_use(digest) and store.owners.reasons(digest) == ["in use"]
        with pytest.raises(FailedPrecondition, match="in use"):
            store.evict(digest)
    assert not store.owners.in_use(digest)
    store.evict(digest)


def test_partial_and_missing_blobs_are_not_evicted(store: ChunkStore) -> None:
    digest = sha(b"x" * CHUNK * 2)
    store.partials.claim(digest, CHUNK * 2)
    with pytest.raises(NotFound):
        store.evict(digest)  # in flight: not a complete blob
    with pytest.raises(NotFound):
        store.evict(sha(b"nowhere"))
    assert store.partials.record(digest).size == CHUNK * 2


def test_an_evicted_blob_keeps_a_flag_set_meanwhile(store: ChunkStore) -> None:
    """`forget` never drops a flagged record: a flag is about the digest, not our copy."""
    digest = put(store, b"gone")
    store.owners.touch(digest, T0)
    store.evict(digest)
    assert store.owners.record(digest) is None
    store.owners.adopt(digest)
    assert not store.owners.forget(digest) and store.owners.containerds(digest)


def test_usage_counts_complete_partial_at_full_size_and_ingests(store: ChunkStore) -> None:
    assert store.usage() == Usage()
    put(store, b"c" * 1000)
    store.partials.claim(sha(b"p" * 5 * CHUNK), 5 * CHUNK)
    writer = store.ingests.open("in-progress", total=9000)
    writer.write_at(0, b"i" * 100)
    writer.close()
    usage = store.usage()
    assert usage == Usage(1000, 1, 5 * CHUNK, 1, 9000, 1)
    assert usage.total == 1000 + 5 * CHUNK + 9000
