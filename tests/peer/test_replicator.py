"""Proactive replication (peer/replication.py) with real engines, a real registry and a real peer
exchange served in-process: an idle node copies a site-hot blob from the peer that holds it and
never from the origin; a replication nobody can serve gives up and leaves nothing; a reader that
needs the blob meanwhile lets the download use the origin. The site's answers (hot list, replica
counts) are given as the control plane's popularity section would give them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from kernel.config import CacheConfig
from kernel.store.chunkstore import ChunkStore
from kernel.store.meta import Meta
from peer.cache import CacheManager
from peer.catalog import Catalog, Source
from peer.engine import DownloadFailed, Engine, EngineConfig
from peer.exchange import PeerClient, routes
from peer.origin import HostSettings, OriginClient
from peer.peers import StaticPeers
from peer.policy.replication import HotBlob, Limits
from peer.replication import Replicator
from testbed.images import TEST_IMAGE_REPO, BuiltImage
from testbed.registry import Registry

pytestmark = pytest.mark.integration
CHUNK = 64 << 10
NOW_IDLE = Limits(hot=3, target_replicas=2, idle_for=0.0, interval=0.0)


class Site:
    def __init__(self, hot: list[HotBlob]) -> None:
        self._hot = hot

    def site_requests(self, digest: str) -> int | None:
        return next((h.requests for h in self._hot if h.digest == digest), None)

    def replicas(self, digest: str) -> int | None:
        return next((h.replicas for h in self._hot if h.digest == digest), None)

    def hot(self) -> list[HotBlob]:
        return list(self._hot)


class Node:
    def __init__(self, root: Path, session: aiohttp.ClientSession, registry: Registry, peers: list[str],
                 config: EngineConfig | None = None, site: Site | None = None) -> None:
        self.meta = Meta(root)
        self.store = ChunkStore(root, self.meta, CHUNK)
        self.store.recover()
        self.catalog = Catalog(self.meta)
        self.site = site or Site([])
        self.cache = CacheManager(self.store, CacheConfig(budget="64MiB"), site=self.site)
        origin = OriginClient(session, hosts={registry.address: HostSettings(plain_http=True)})
        self.engine = Engine(self.store, self.catalog, origin, StaticPeers(peers), PeerClient(session),
                             "http://self", config or EngineConfig(gather_delay=0.0), cache=self.cache)

    async def close(self) -> None:
        await self.engine.close()
        self.store.close()
        self.meta.close()


def biggest_layer(image: BuiltImage) -> tuple[str, int, bytes]:
    layer = max(image.layers, key=lambda la: la.descriptor.size).descriptor
    return layer.digest, layer.size, (image.layout / "blobs" / "sha256" / layer.digest[7:]).read_bytes()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def holder(
    tmp_path: Path, session: aiohttp.ClientSession, registry: Registry, test_image: BuiltImage,
    test_image_ref: str,
) -> AsyncIterator[tuple[Node, str]]:
    """A node holding the test image's biggest layer, its peer exchange served in-process."""
    digest, size, _ = biggest_layer(test_image)
    node = Node(tmp_path / "holder", session, registry, [])
    node.catalog.record([Source(digest, size, "", registry.address, TEST_IMAGE_REPO)])
    await node.engine.wait_complete(digest)
    app = web.Application()
    app.add_routes(routes(node.store))
    server = TestServer(app)
    await server.start_server()
    try:
        yield node, str(server.make_url("")).rstrip("/")
    finally:
        await server.close()
        await node.close()


async def test_an_idle_node_copies_a_site_hot_blob_from_its_peer_never_the_origin(
    tmp_path: Path, session: aiohttp.ClientSession, registry: Registry, test_image: BuiltImage,
    holder: tuple[Node, str],
) -> None:
    digest, size, data = biggest_layer(test_image)
    _, url = holder
    site = Site([HotBlob(digest, 5, size, 1)])  # hot site-wide, one member holds it
    node = Node(tmp_path / "idle", session, registry, [url], site=site)
    try:
        replicator = Replicator(node.engine, node.cache, site, NOW_IDLE)
        assert await asyncio.wait_for(replicator.step(), timeout=60) == digest
        assert node.store.read(digest, 0, size) == data
        assert node.engine.counters["origin_bytes"] == 0 and node.engine.counters["peer_bytes"] == size
        assert node.store.owners.reasons(digest) == []  # an ordinary cache-only blob
        assert node.catalog.lookup(digest) is None  # no manifest was needed, nor invented
        assert await replicator.step() is None  # here already: nothing more to do
        assert replicator.started == 1
    finally:
        await node.close()


async def test_a_replication_nobody_can_serve_gives_up_and_leaves_nothing(
    tmp_path: Path, session: aiohttp.ClientSession, registry: Registry, test_image: BuiltImage,
    test_image_ref: str,
) -> None:
    digest, size, _ = biggest_layer(test_image)
    site = Site([HotBlob(digest, 5, size, 1)])  # the tracker says a member holds it; none answers
    config = EngineConfig(gather_delay=0.0, peers_only_stall=0.5)
    node = Node(tmp_path / "idle", session, registry, [], config, site)
    node.catalog.record([Source(digest, size, "", registry.address, TEST_IMAGE_REPO)])  # origin known
    try:
        replicator = Replicator(node.engine, node.cache, site, NOW_IDLE)
        assert await asyncio.wait_for(replicator.step(), timeout=60) == digest
        assert isinstance(node.engine.downloads[digest].error, DownloadFailed)
        assert node.engine.counters["origin_bytes"] == 0  # even though the origin was known
        assert not node.store.exists(digest) and node.store.partials.records() == []
        assert digest in replicator.shunned() and await replicator.step() is None
        assert node.cache.cache_status()["usage"]["reserved"] == 0
    finally:
        await node.close()


async def test_a_reader_lets_a_replication_use_the_origin(
    tmp_path: Path, session: aiohttp.ClientSession, registry: Registry, test_image: BuiltImage,
    test_image_ref: str,
) -> None:
    digest, size, data = biggest_layer(test_image)
    node = Node(tmp_path / "node", session, registry, [], EngineConfig(gather_delay=0.0))
    node.catalog.record([Source(digest, size, "", registry.address, TEST_IMAGE_REPO)])
    try:
        replica = node.engine.ensure(digest, peers_only=True)
        assert replica is not None and replica.peers_only
        assert await asyncio.wait_for(node.engine.read(digest, 0, 100), timeout=60) == data[:100]
        assert not replica.peers_only  # the reader's ensure lifted it
        await asyncio.wait_for(node.engine.wait_complete(digest), timeout=60)
        assert node.engine.counters["origin_bytes"] == size
    finally:
        await node.close()


async def test_a_busy_node_does_not_replicate(
    tmp_path: Path, session: aiohttp.ClientSession, registry: Registry, test_image: BuiltImage,
    test_image_ref: str,
) -> None:
    digest, size, _ = biggest_layer(test_image)
    site = Site([HotBlob(digest, 5, size, 1)])
    node = Node(tmp_path / "busy", session, registry, [], site=site)
    try:
        node.engine.busy_until = 100.0  # a download of its own ended at t=100
        limits = Limits(idle_for=30.0, interval=0.0)
        replicator = Replicator(node.engine, node.cache, site, limits, clock=lambda: 129.0)
        assert await replicator.step() is None and replicator.started == 0
    finally:
        await node.close()
