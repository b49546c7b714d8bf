"""The download engine against real registries and real peer exchanges (in-process aiohttp servers
over real chunk stores): lazy reads, failure without leftovers, hedging away from a slow peer."""

from __future__ import annotations

import asyncio
import hashlib
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
from peer.peers import StaticPeers
from testbed.images import TEST_IMAGE_REPO, BuiltImage
from testbed.registry import Registry

pytestmark = pytest.mark.integration
CHUNK = 64 << 10  # small chunks: a layer of the test image spans many of them


class Node:
    """A store, its engine, and (optionally) its peer exchange served in-process."""

    def __init__(
        self,
        root: Path,
        session: aiohttp.ClientSession,
        registry: Registry,
        peers: list[str],
        config: EngineConfig | None = None,
    ) -> None:
        self.meta = Meta(root)
        self.store = ChunkStore(root, self.meta, CHUNK)
        self.store.recover()
        self.catalog = Catalog(self.meta)
        origin = OriginClient(session, hosts={registry.address: HostSettings(plain_http=True)})
        self.engine = Engine(
            self.store,
            self.catalog,
            origin,
            StaticPeers(peers),
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
            node.engine.stat(peers[1]).bps = 1e9  # make the slow peer look best, so it gets requests
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
