"""The cache manager (peer/cache.py) over a real store: the watermarks, eviction in score order
and never of a protected blob, admission and its refusal, pins, the last copy of a hot blob,
restarts, gc and cache_status. The clock is passed in; nothing waits."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel.config import CacheConfig
from kernel.errors import FailedPrecondition, NotFound, ResourceExhausted
from kernel.store.chunkstore import ChunkStore
from kernel.store.meta import Meta
from peer.cache import CacheManager, NoSite, SiteView
from peer.policy.replication import HotBlob

CHUNK = 64 * 1024
KIB = 1024
T0 = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class Site:
    """What a tracker said (the member section's answers, as the cache manager reads them)."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.copies: dict[str, int] = {}

    def site_requests(self, digest: str) -> int | None:
        return self.requests.get(digest)

    def replicas(self, digest: str) -> int | None:
        return self.copies.get(digest)

    def hot(self) -> list[HotBlob]:
        return []


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob(name: str, size: int) -> bytes:
    return (name.encode() * size)[:size]


class Node:
    def __init__(self, root: Path, budget: str, site: SiteView | None = None) -> None:
        self.root = root
        self.budget = budget
        self.site = site
        self.clock = Clock()
        self.open()

    def open(self) -> None:
        self.meta = Meta(self.root)
        self.store = ChunkStore(self.root, self.meta, CHUNK)
        self.store.recover()
        config = CacheConfig(budget=self.budget, high_watermark=0.9, low_watermark=0.5)
        self.cache = CacheManager(self.store, config, site=self.site, clock=self.clock,
                                  filesystem_bytes=lambda: 1 << 30)

    def close(self) -> None:
        self.store.close()
        self.meta.close()

    def restart(self) -> None:
        self.cache.owners.flush()  # what `CacheManager.stop` does
        self.close()
        self.open()

    def put(self, name: str, size: int, at: float | None = None) -> str:
        """A cache-only blob (what the mirror or a download leaves), used at `at`."""
        data = blob(name, size)
        writer = self.store.ingests.open(f"ref-{name}", size)
        writer.write_at(0, data)
        digest = writer.commit(size, sha(data))
        self.clock.now = T0 if at is None else at
        self.cache.used(digest)
        return digest

    def here(self) -> set[str]:
        return {r.digest for r in self.store.iter_blobs()}


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path, "100KiB")
    yield n
    n.close()


def test_nothing_happens_below_the_high_watermark(node: Node) -> None:
    a = node.put("a", 40 * KIB)
    b = node.put("b", 40 * KIB)  # 80 of 100 KiB: below 90
    assert node.cache.check() == [] and node.here() == {a, b}


def test_above_the_high_watermark_it_evicts_to_the_low_one_oldest_use_first(node: Node) -> None:
    old = node.put("old", 30 * KIB, at=T0)
    mid = node.put("mid", 30 * KIB, at=T0 + 100)
    new = node.put("new", 35 * KIB, at=T0 + 200)  # 95 KiB > 90
    node.clock.now = T0 + 300
    assert node.cache.check() == [old, mid]  # 95 -> 65 -> 35 <= 50
    assert node.here() == {new}
    status = node.cache.cache_status()
    assert status["evictions"]["count"] == 2 and status["evictions"]["bytes"] == 60 * KIB
    assert [e["digest"] for e in status["evictions"]["last"]] == [old, mid]


def test_popularity_and_replicas_change_the_order(tmp_path: Path) -> None:
    site = Site()
    node = Node(tmp_path, "100KiB", site)
    try:
        popular = node.put("popular", 30 * KIB, at=T0)
        plain = node.put("plain", 30 * KIB, at=T0 + 600)
        replicated = node.put("replicated", 35 * KIB, at=T0 + 1200)
        for i in range(3):  # requested three times (through the site's members), last used at T0
            node.cache.window.request(popular, T0 + 100 + 11 * i)
        node.clock.now = T0 + 1400
        assert node.store.owners.last_use_ns(popular) == int(T0 * 1e9)
        site.copies[replicated] = 3  # three other members hold it
        assert node.cache.check() == [replicated, plain]
        assert node.here() == {popular}
    finally:
        node.close()


def test_protected_blobs_are_never_evicted(node: Node) -> None:
    kept = {}
    for flag in ("containerd", "held", "pinned"):
        digest = node.put(flag, 20 * KIB, at=T0)
        getattr(node.store.owners, {"containerd": "adopt", "held": "hold", "pinned": "pin"}[flag])(digest)
        kept[flag] = digest
    busy = node.put("busy", 20 * KIB, at=T0)
    cache_only = node.put("cache-only", 15 * KIB, at=T0 + 999)
    node.clock.now = T0 + 1000
    with node.store.owners.busy(busy):
        assert node.cache.check() == [cache_only]  # 95 KiB; only one blob may go at all
    assert node.here() == {*kept.values(), busy}
    for digest in kept.values():
        with pytest.raises(FailedPrecondition):
            node.cache.evict(digest)


def test_a_download_is_admitted_after_room_is_made(node: Node) -> None:
    old = node.put("old", 50 * KIB, at=T0)
    new = node.put("new", 20 * KIB, at=T0 + 10)
    incoming = sha(b"incoming")
    node.cache.admit(incoming, 25 * KIB)  # 95 > 90: room is made first, down to 50
    assert node.here() == {new}
    assert node.cache.cache_status()["usage"]["reserved"] == 25 * KIB
    # the reservation counts until the download claims the blob, then the partial record does
    node.store.partials.claim(incoming, 25 * KIB)
    assert node.cache.cache_status()["usage"] == {
        "complete": 20 * KIB, "partial": 25 * KIB, "ingest": 0, "reserved": 0, "total": 45 * KIB}
    node.cache.finished(incoming)
    assert old not in node.here()


def test_a_download_that_cannot_fit_is_refused_naming_the_budget(node: Node) -> None:
    mine = node.put("containerds", 60 * KIB)
    node.store.owners.adopt(mine)
    other = node.put("cache-only", 20 * KIB)
    with pytest.raises(ResourceExhausted, match=r"budget of 100\.0 KiB \(cache\.budget = '100KiB'\)"):
        node.cache.admit(sha(b"big"), 45 * KIB)  # 60 protected + 45 > 100 even without the 20
    assert node.here() == {mine, other}  # nothing was evicted for a download that was refused
    assert node.cache.cache_status()["evictions"]["refused_downloads"] == 1
    with pytest.raises(ResourceExhausted):
        node.cache.admit(sha(b"huge"), 1 << 40)  # the one hostile size: refused, no file made
    node.cache.admit(sha(b"fits"), 20 * KIB)  # 100 - 60: evicting the cache-only blob is enough
    assert node.here() == {mine}


def test_the_last_copy_of_a_hot_blob_goes_only_to_stay_within_the_budget(tmp_path: Path) -> None:
    site = Site()
    node = Node(tmp_path, "100KiB", site)
    try:
        hot = node.put("hot", 30 * KIB, at=T0)  # the oldest, but the site wants it
        cold = node.put("cold", 25 * KIB, at=T0 + 10)
        fresh = node.put("fresh", 40 * KIB, at=T0 + 20)
        site.requests[hot] = 5
        node.clock.now = T0 + 30
        assert node.cache.check() == [cold, fresh]  # 95 -> 30: under the low watermark, hot kept
        more = node.put("more", 60 * KIB, at=T0 + 40)
        node.clock.now = T0 + 50
        node.cache.admit(sha(b"incoming"), 20 * KIB)  # 110: the cache-only "more" goes, not hot
        assert node.here() == {hot}
        more = node.put("more", 60 * KIB, at=T0 + 60)
        node.store.owners.adopt(more)  # containerd's: nothing else may go now
        node.clock.now = T0 + 70
        node.cache.admit(sha(b"incoming-2"), 20 * KIB)  # 30 + 60 + 20 (+20 reserved) > 100
        assert node.here() == {more}
    finally:
        node.close()


def test_pins_and_last_uses_survive_a_restart(node: Node) -> None:
    pinned = node.put("pinned", 40 * KIB, at=T0)
    used = node.put("used", 30 * KIB, at=T0 + 500)
    other = node.put("other", 10 * KIB, at=T0 + 100)
    assert node.cache.pin(pinned) and not node.cache.pin(pinned)
    with pytest.raises(NotFound):
        node.cache.pin(sha(b"not here"))
    node.restart()
    assert node.cache.pins() == [pinned]
    assert node.store.owners.last_use_ns(used) == int((T0 + 500) * 1e9)
    big = node.put("big", 20 * KIB, at=T0 + 600)  # 100 KiB
    node.clock.now = T0 + 700
    # the order is by the last uses from before the restart ("other" before "used"; without them
    # both would be never used, and the bigger one would go first)
    assert node.cache.check() == [other, used, big]
    assert node.here() == {pinned}
    assert node.cache.unpin(pinned) and not node.cache.unpin(pinned)
    assert node.cache.evict(pinned) == 40 * KIB


def test_uses_feed_popularity_and_last_use(node: Node) -> None:
    digest = node.put("x", KIB, at=T0)
    node.clock.now = T0 + 0.5
    node.cache.used(digest)  # within TOUCH_EVERY: not even an in-memory write
    assert node.store.owners.last_use_ns(digest) == int(T0 * 1e9)
    node.clock.now = T0 + 2
    node.cache.used(digest, request=True)
    assert node.store.owners.last_use_ns(digest) == int((T0 + 2) * 1e9)
    assert node.cache.window.count(digest, node.clock.now) == 1


def test_gc_forgets_flags_of_blobs_that_never_came(node: Node) -> None:
    lazy, stale, held = sha(b"lazy"), sha(b"stale"), sha(b"held")
    node.store.owners.adopt(lazy)
    node.cache.used(lazy, request=True)
    node.store.owners.adopt(stale)
    node.store.owners.hold(held)
    node.clock.now = T0 + 601
    node.cache.used(lazy, request=True)
    result = node.cache.gc()
    assert result["forgotten"] == 1
    assert node.store.owners.record(stale) is None
    assert node.store.owners.containerds(lazy) and node.store.owners.reasons(held) == ["held"]


def test_cache_status_says_where_the_cache_stands(node: Node) -> None:
    a = node.put("a", 10 * KIB, at=T0)
    b = node.put("b", 20 * KIB, at=T0 + 1)
    node.store.owners.adopt(a)
    node.store.owners.pin(a)
    node.store.partials.claim(sha(b"partial"), 5 * KIB)
    node.clock.now = T0 + 2
    status = node.cache.cache_status()
    assert status["budget"] == 100 * KIB and status["budget_config"] == "100KiB"
    assert (status["high_bytes"], status["low_bytes"]) == (90 * KIB, 50 * KIB)
    assert status["usage"]["total"] == 35 * KIB
    assert status["blobs"] == {"containerd": 1, "held": 0, "pinned": 1, "in_use": 0, "cache_only": 1,
                               "partial": 1, "complete": 2, "ingests": 0}
    assert status["cache_only_bytes"] == 20 * KIB and status["pins"] == [a]
    assert [n["digest"] for n in status["next"]] == [b]
    assert status["next"][0]["score"] == pytest.approx(2 ** (-1 / 3600))


def test_no_budget_means_nothing_is_evicted_or_refused(tmp_path: Path) -> None:
    node = Node(tmp_path, "")
    try:
        a = node.put("a", 200 * KIB)
        node.cache.admit(sha(b"any"), 1 << 40)
        assert node.cache.check() == [] and node.here() == {a}
        assert node.cache.cache_status()["budget"] is None and node.cache.room() is None
    finally:
        node.close()


def test_a_share_of_the_filesystem_follows_its_size(tmp_path: Path) -> None:
    meta = Meta(tmp_path)
    store = ChunkStore(tmp_path, meta, CHUNK)
    size = [1000 * KIB]
    cache = CacheManager(store, CacheConfig(budget="10%"), NoSite(), filesystem_bytes=lambda: size[0])
    try:
        assert cache.budget() == 100 * KIB
        size[0] = 2000 * KIB
        assert cache.budget() == 200 * KIB
    finally:
        store.close()
        meta.close()


def test_containerds_own_writes_make_room_or_are_refused(node: Node) -> None:
    old = node.put("old", 40 * KIB, at=T0)
    mine = node.put("mine", 40 * KIB, at=T0 + 1)
    node.store.owners.adopt(mine)
    node.cache.admit_write("default/1/layer", 30 * KIB)  # 110: the cache-only blob makes room
    assert node.here() == {mine}
    assert node.cache.cache_status()["usage"]["reserved"] == 30 * KIB  # held until the ingest exists
    node.cache.wrote("default/1/layer")
    assert node.cache.cache_status()["usage"]["reserved"] == 0
    with pytest.raises(ResourceExhausted, match="a write of 'default/2/layer'"):
        node.cache.admit_write("default/2/layer", 61 * KIB)
    assert old not in node.here()
