"""The download engine against real registries and real peer exchanges (in-process aiohttp servers
over real chunk stores): lazy reads, failure without leftovers, hedging away from a slow peer."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from kernel.store.chunkstore import ChunkStore
from kernel.store.meta import Meta
from peer.catalog import Catalog, Source
from peer.engine import DownloadFailed, Engine, EngineConfig
from peer.exchange import PeerClient, routes
from peer.origin import HostSettings, OriginClient
from peer.policy.holdings import BlobView
from testbed.images import TEST_IMAGE_REPO, BuiltImage
from testbed.registry import Registry

pytestmark = pytest.mark.integration
CHUNK = 64 << 10  # small chunks: a layer of the test image spans many of them


class Membership:
    """The engine's peer source as the control plane is one: the site's members, which change
    (`urls` may be edited: a node that leaves the site is removed)."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = list(urls)

    def peers(self) -> list[str]:
        return list(self.urls)


class Node:
    """A store, its engine, and (optionally) its peer exchange served in-process."""

    def __init__(
        self,
        root: Path,
        session: aiohttp.ClientSession,
        registry: Registry,
        peers: list[str],
        config: EngineConfig | None = None,
        origin_hosts: list[str] | None = None,
        origin_read_timeout: float = 30.0,
    ) -> None:
        """`peers` is the engine's peer source, read at every poll (a test may change it, as
        membership does); `origin_hosts` are the plain-HTTP origins (default: `registry`)."""
        self.meta = Meta(root)
        self.store = ChunkStore(root, self.meta, CHUNK)
        self.store.recover()
        self.catalog = Catalog(self.meta)
        hosts = {h: HostSettings(plain_http=True) for h in origin_hosts or [registry.address]}
        origin = OriginClient(session, hosts=hosts, read_timeout=origin_read_timeout)
        self.membership = Membership(peers)
        self.engine = Engine(
            self.store,
            self.catalog,
            origin,
            self.membership,
            PeerClient(session),
            "http://self",
            config or EngineConfig(gather_delay=0.0),
        )

    async def close(self) -> None:
        await self.engine.close()
        self.store.close()
        self.meta.close()


def biggest_layer(image: BuiltImage) -> tuple[str, int, bytes]:
    layer = max(image.layers, key=lambda la: la.descriptor.size).descriptor
    data = (image.layout / "blobs" / "sha256" / layer.digest[7:]).read_bytes()
    return layer.digest, layer.size, data


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def test_lazy_read_from_the_origin_then_complete(
    tmp_path: Path,
    session: aiohttp.ClientSession,
    registry: Registry,
    test_image: BuiltImage,
    test_image_ref: str,
) -> None:
    digest, size, data = biggest_layer(test_image)
    node = Node(tmp_path, session, registry, [])
    try:
        node.catalog.record([Source(digest, size, "", registry.address, TEST_IMAGE_REPO)])
        middle = size // 2
        assert await node.engine.read(digest, middle, 1000) == data[middle : middle + 1000]
        await node.engine.wait_complete(digest)
        assert node.store.exists(digest)
        assert node.store.read(digest, 0, size) == data
        assert node.engine.counters["origin_bytes"] == size
    finally:
        await node.close()


async def test_unfetchable_blob_fails_clearly_and_leaves_nothing(
    tmp_path: Path, session: aiohttp.ClientSession, registry: Registry, test_image_ref: str
) -> None:
    missing = "sha256:" + hashlib.sha256(b"never pushed").hexdigest()
    node = Node(tmp_path, session, registry, [], EngineConfig(gather_delay=0.0, max_attempts=2))
    try:
        node.catalog.record([Source(missing, 5 * CHUNK, "", registry.address, TEST_IMAGE_REPO)])
        with pytest.raises(DownloadFailed, match=missing):
            await asyncio.wait_for(node.engine.read(missing, 0, 100), timeout=60)
        assert not node.store.exists(missing)
        assert node.store.partials.records() == []
        assert not any((tmp_path / "content" / "partial" / "sha256").iterdir())
    finally:
        await node.close()


async def test_slow_peer_is_hedged(
    tmp_path: Path,
    session: aiohttp.ClientSession,
    registry: Registry,
    test_image: BuiltImage,
    test_image_ref: str,
) -> None:
    """Two peers hold the blob; one answers chunk requests after 3 s: its requests are hedged to the
    other, the blob completes quickly, nothing comes from the origin."""
    digest, size, data = biggest_layer(test_image)
    servers = []
    try:
        for name, delay in (("fast", 0.0), ("slow", 3.0)):
            holder = Node(tmp_path / name, session, registry, [])
            holder.catalog.record([Source(digest, size, "", registry.address, TEST_IMAGE_REPO)])
            await holder.engine.wait_complete(digest)
            app = web.Application(middlewares=[_delay(delay)])
            app.add_routes(routes(holder.store))
            server = TestServer(app)
            await server.start_server()
            servers.append((holder, server))
        peers = [str(server.make_url("")).rstrip("/") for _, server in servers]
        config = EngineConfig(gather_delay=0.0, hedge_after=0.3, peer_window=4)
        node = Node(tmp_path / "fetcher", session, registry, peers, config)
        try:
            node.catalog.record([Source(digest, size, "", registry.address, TEST_IMAGE_REPO)])
            slow = node.engine.stat(peers[1])  # make the slow peer look best, so it gets requests
            for _ in range(8):
                slow.observe(CHUNK, 0.0005, latency=0.0001, now=time.monotonic())
            await asyncio.wait_for(node.engine.wait_complete(digest), timeout=30)
            assert node.store.read(digest, 0, size) == data
            assert node.engine.counters["origin_bytes"] == 0
            assert node.engine.counters["hedges"] >= 1
        finally:
            await node.close()
    finally:
        for holder, server in servers:
            await server.close()
            await holder.close()


def _delay(seconds: float):  # type: ignore[no-untyped-def]
    @web.middleware
    async def middleware(request: web.Request, handler):  # type: ignore[no-untyped-def]
        if seconds and request.path.endswith("/data"):
            await asyncio.sleep(seconds)
        return await handler(request)

    return middleware


@contextlib.asynccontextmanager
async def fetching_peer(
    root: Path, session: aiohttp.ClientSession, registry: Registry, origin: str, digest: str, size: int
) -> AsyncIterator[tuple[Node, TestServer]]:
    """A node whose origin (`origin`) never answers, filling `digest` alone: it announces an origin
    fetch of the blob's first chunks on its peer exchange and never delivers them."""
    node = Node(root, session, registry, [], origin_hosts=[origin], origin_read_timeout=600.0)
    node.catalog.record([Source(digest, size, "", origin, TEST_IMAGE_REPO)])
    app = web.Application()
    app.add_routes(routes(node.store, node.engine.fetching))
    server = TestServer(app)
    await server.start_server()
    try:
        node.engine.ensure(digest)
        while not node.engine.fetching(digest):
            await asyncio.sleep(0.02)
        yield node, server
    finally:
        await server.close()
        await node.close()


async def _sees_fetching(node: Node, peer: str, digest: str) -> None:
    while not node.engine.views.get(digest, {}).get(peer, BlobView(digest, 0, 1, False, b"")).fetching:
        await asyncio.sleep(0.02)


async def test_a_peer_that_leaves_the_site_mid_origin_fetch_does_not_keep_its_chunks(
    tmp_path: Path,
    session: aiohttp.ClientSession,
    registry: Registry,
    hanging_origin: str,
    pushed_layer: tuple[str, int, bytes],
) -> None:
    """B announces an origin fetch of the blob and A leaves those chunks to it; then B dies and
    leaves the membership (as a SIGKILLed tracker leaves every member's view). A forgets the fetch
    B announced, so B stalls after one grace (not the five a node announcing a fetch gets) and A,
    its heir, fetches the blob. Before: nobody polled B any more, its last view stayed, and its
    announced fetch kept those chunks out of A's origin plan for good; A's download failed with
    "no progress for 120 s". Graces are 10 s here: five would outlast the test's 40 s."""
    digest, size, data = pushed_layer
    async with fetching_peer(tmp_path / "b", session, registry, hanging_origin, digest, size) as (b, server):
        b_url = str(server.make_url("")).rstrip("/")
        a = Node(tmp_path / "a", session, registry, [b_url], EngineConfig(gather_delay=0.0, owner_grace=10.0))
        try:
            a.catalog.record([Source(digest, size, "", registry.address, TEST_IMAGE_REPO)])
            a.engine.ensure(digest)
            await asyncio.wait_for(_sees_fetching(a, b_url, digest), timeout=30)
            await server.close()  # B dies ...
            await b.engine.close()
            a.membership.urls.remove(b_url)  # ... and leaves the site
            await asyncio.wait_for(a.engine.wait_complete(digest), timeout=40)
            assert a.store.read(digest, 0, size) == data
            assert a.engine.counters["origin_bytes"] == size
        finally:
            await a.close()


async def test_a_live_peer_that_announced_an_origin_fetch_and_stalled_loses_its_chunks(
    tmp_path: Path,
    session: aiohttp.ClientSession,
    registry: Registry,
    hanging_origin: str,
    pushed_layer: tuple[str, int, bytes],
) -> None:
    """B stays a member and keeps answering, but its origin fetch never delivers: once B has
    stalled (5 graces while it announces a fetch), A, its heir, fetches B's stripes, the chunks
    B announced included. Before: the heir inherited the stripes but not those chunks."""
    digest, size, data = pushed_layer
    async with fetching_peer(tmp_path / "b", session, registry, hanging_origin, digest, size) as (_b, server):
        b_url = str(server.make_url("")).rstrip("/")
        config = EngineConfig(gather_delay=0.0, owner_grace=0.4)
        a = Node(tmp_path / "a", session, registry, [b_url], config)
        try:
            a.catalog.record([Source(digest, size, "", registry.address, TEST_IMAGE_REPO)])
            await asyncio.wait_for(a.engine.wait_complete(digest), timeout=60)
            assert a.store.read(digest, 0, size) == data
            assert a.engine.counters["origin_bytes"] == size
            assert a.engine.counters["origin_heir_chunks"] > 0
        finally:
            await a.close()


def _fail_data() -> web.middleware:  # type: ignore[valid-type]
    @web.middleware
    async def middleware(request: web.Request, handler):  # type: ignore[no-untyped-def]
        if request.path.endswith("/data"):
            raise web.HTTPInternalServerError(text="broken disk")
        return await handler(request)

    return middleware


async def _holders(
    tmp_path: Path,
    session: aiohttp.ClientSession,
    registry: Registry,
    digest: str,
    size: int,
    middlewares: list[list[object]],
) -> tuple[list[tuple[Node, TestServer]], list[str]]:
    """Nodes that hold the blob (fetched from the registry), each serving it behind its middlewares."""
    servers = []
    for n, mws in enumerate(middlewares):
        holder = Node(tmp_path / f"holder{n}", session, registry, [])
        holder.catalog.record([Source(digest, size, "", registry.address, TEST_IMAGE_REPO)])
        await holder.engine.wait_complete(digest)
        app = web.Application(middlewares=mws)  # type: ignore[arg-type]
        app.add_routes(routes(holder.store))
        server = TestServer(app)
        await server.start_server()
        servers.append((holder, server))
    return servers, [str(server.make_url("")).rstrip("/") for _, server in servers]


async def _close(servers: list[tuple[Node, TestServer]]) -> None:
    for holder, server in servers:
        await server.close()
        await holder.close()


async def test_every_chunk_outcome_feeds_the_model_and_peers_shows_it(
    tmp_path: Path,
    session: aiohttp.ClientSession,
    registry: Registry,
    test_image: BuiltImage,
    test_image_ref: str,
) -> None:
    """Two good peers: each chunk's outcome lands in its peer's window (bytes, time, first byte,
    queue); `peers()` shows the figures; `transfers()` every request; the queues drain to zero."""
    digest, size, data = biggest_layer(test_image)
    servers, peers = await _holders(tmp_path, session, registry, digest, size, [[], []])
    try:
        node = Node(tmp_path / "fetcher", session, registry, peers)
        try:
            node.catalog.record([Source(digest, size, "", registry.address, TEST_IMAGE_REPO)])
            await asyncio.wait_for(node.engine.wait_complete(digest), timeout=60)
            assert node.store.read(digest, 0, size) == data
            nchunks = -(-size // CHUNK)
            figures = node.engine.peers()
            assert set(figures) == set(peers)
            assert sum(f["chunks"] for f in figures.values()) >= nchunks
            for peer, f in figures.items():
                st_ = node.engine.stats[peer]
                assert f["inflight"] == st_.inflight == 0
                assert f["state"] == "ok" and f["samples"] == min(len(st_.history), 32) > 0
                assert f["p95"] is not None and f["p99"] is not None and f["p99"] >= f["p95"] > 0
                assert f["rtt"] > 0 and f["throughput"] > 0 and f["score"] > 0  # rtt: vs a 2 ms prior
                assert f["chunk_failures"] == f["poll_failures"] == 0
                assert f["same_subnet"] is None  # "http://self" has no address of its own
                for t in st_.history.items:
                    assert t.ok and 0 <= t.latency <= t.seconds and t.queue >= 0
            stored = [r for r in node.engine.transfers() if r["chunk_seconds"] is not None]
            assert len(stored) == nchunks and {r["outcome"] for r in stored} == {"ok"}
            assert node.engine.inflight == 0
        finally:
            await node.close()
    finally:
        await _close(servers)


async def test_chunk_failures_are_their_own_streak_and_drop_the_peer(
    tmp_path: Path,
    session: aiohttp.ClientSession,
    registry: Registry,
    test_image: BuiltImage,
    test_image_ref: str,
) -> None:
    """A peer that answers polls but fails every chunk request: its chunk failures are counted (not
    its polls), it is dropped after three in a row, and the blob comes from the good peer."""
    digest, size, data = biggest_layer(test_image)
    servers, peers = await _holders(tmp_path, session, registry, digest, size, [[_fail_data()], []])
    try:
        node = Node(tmp_path / "fetcher", session, registry, peers)
        try:
            node.catalog.record([Source(digest, size, "", registry.address, TEST_IMAGE_REPO)])
            await asyncio.wait_for(node.engine.wait_complete(digest), timeout=60)
            assert node.store.read(digest, 0, size) == data
            bad = node.engine.peers()[peers[0]]
            assert bad["state"] == "dropped" and bad["chunks"] == 0
            assert bad["chunk_failures"] >= 3 and bad["poll_failures"] == 0
            assert bad["failure_share"] > 0.5
            assert node.engine.counters["origin_bytes"] == 0
            failed = [r for r in node.engine.transfers() if r["peer"] == peers[0]]
            # Each request to it failed, or was cancelled when its twin (a hedge, or the drop) ended first.
            outcomes = {r["outcome"] for r in failed}
            assert "failed" in outcomes and outcomes <= {"failed", "cancelled"}
        finally:
            await node.close()
    finally:
        await _close(servers)


async def test_hedges_stay_within_the_window_and_the_cap(
    tmp_path: Path,
    session: aiohttp.ClientSession,
    registry: Registry,
    test_image: BuiltImage,
    test_image_ref: str,
) -> None:
    """A peer that stalls each chunk for a second, looking best at first: its requests are hedged,
    yet the requests in flight never exceed the blob's window nor the engine-wide cap (hedges used to
    bypass both), and the stragglers that lost are recorded as slow evidence."""
    digest, size, data = biggest_layer(test_image)
    servers, peers = await _holders(tmp_path, session, registry, digest, size, [[_delay(1.0)], []])
    try:
        config = EngineConfig(gather_delay=0.0, peer_window=4, max_peer_window=4, max_inflight=3)
        node = Node(tmp_path / "fetcher", session, registry, peers, config)
        most = {"engine": 0, "blob": 0}

        async def watch() -> None:
            while True:
                most["engine"] = max(most["engine"], node.engine.inflight)
                for dl in node.engine.downloads.values():
                    most["blob"] = max(most["blob"], sum(len(f) for f in dl.flights.values()))
                await asyncio.sleep(0)

        watcher = asyncio.create_task(watch())
        try:
            slow = node.engine.stat(peers[0])
            for _ in range(8):
                slow.observe(CHUNK, 0.0005, latency=0.0001, now=time.monotonic())
            node.catalog.record([Source(digest, size, "", registry.address, TEST_IMAGE_REPO)])
            await asyncio.wait_for(node.engine.wait_complete(digest), timeout=60)
            assert node.store.read(digest, 0, size) == data
            assert node.engine.counters["hedges"] >= 1
            assert most["engine"] <= 3 and most["blob"] <= 4
            outcomes = {r["outcome"] for r in node.engine.transfers() if r["peer"] == peers[0]}
            assert "outrun" in outcomes
            assert any(t.censored for t in node.engine.stats[peers[0]].history.items)
        finally:
            watcher.cancel()
            await node.close()
    finally:
        await _close(servers)
