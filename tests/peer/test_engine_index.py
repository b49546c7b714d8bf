"""Real engines with the tracker index: each node a real store, engine and peer exchange (in-process
aiohttp servers over loopback), the origin a real registry; the index sections are driven directly,
in process, as the control plane's sync loop will drive them (member `outgoing` -> tracker
`handle` -> member `incoming`), since the transport is another branch's.

A burst of engines and staggered starts fetch every chunk from the origin exactly once; a member
whose lease holder dies gets the run re-granted; with no tracker the direct path still completes."""

from __future__ import annotations

import asyncio
import contextlib
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
from peer.control.index_sections import IndexMember, IndexTracker
from peer.engine import Engine, EngineConfig
from peer.exchange import PeerClient, routes
from peer.origin import HostSettings, OriginClient
from peer.peers import StaticPeers
from peer.policy.index import IndexConfig
from testbed.images import TEST_IMAGE_REPO, BuiltImage
from testbed.registry import Registry

pytestmark = pytest.mark.integration
CHUNK = 64 << 10


class Node:
    """A store, its engine and index section, its peer exchange served on loopback."""

    def __init__(
        self, root: Path, session: aiohttp.ClientSession, origins: list[str], peers: list[str]
    ) -> None:
        self.meta = Meta(root)
        self.store = ChunkStore(root, self.meta, CHUNK)
        self.store.recover()
        self.catalog = Catalog(self.meta)
        self.session = session
        self.origin = OriginClient(session, hosts={a: HostSettings(plain_http=True) for a in origins})
        self.peers = peers
        self.server: TestServer | None = None
        self.engine: Engine | None = None
        self.member: IndexMember | None = None

    async def start(
        self,
        link: Link | None = None,
        stale_after: float = 3.0,
        config: EngineConfig | None = None,
        untracked: list[str] | None = None,
    ) -> str:
        app = web.Application()
        self.server = TestServer(app)
        holder: list[Engine] = []
        app.add_routes(routes(self.store, lambda d: holder[0].fetching(d) if holder else []))
        await self.server.start_server()
        url = str(self.server.make_url("")).rstrip("/")
        config = config or EngineConfig(gather_delay=0.0, gather_max=0.5)
        self.engine = Engine(
            self.store,
            self.catalog,
            self.origin,
            StaticPeers(self.peers, url),
            PeerClient(self.session),
            url,
            config,
        )
        holder.append(self.engine)
        outside = list(untracked or [])
        self.member = IndexMember(self.engine, link, stale_after=stale_after, untracked=lambda: outside)
        return url

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.close()
        if self.server is not None:
            await self.server.close()
        self.store.close()
        self.meta.close()


class Link:
    """The early-sync request of one member: wakes the driver."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver

    def sync_soon(self) -> None:
        self.driver.wake.set()

    def patience(self) -> float:
        """The in-process rounds never time out: `stale_after` alone bounds one in flight."""
        return 0.0


class Driver:
    """The control plane's sync rounds, in process: every `interval` (sooner when a member asks),
    each member's section payload goes to the tracker section and its reply comes back."""

    def __init__(self, tracker: IndexTracker, interval: float = 0.1) -> None:
        self.tracker = tracker
        self.interval = interval
        self.members: dict[str, IndexMember] = {}
        self.fresh: set[str] = set()
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def add(self, name: str, member: IndexMember) -> None:
        self.members[name] = member
        self.fresh.add(name)

    def remove(self, name: str) -> None:
        """Stop syncing `name` (it died; the tracker has not noticed: no `forget`)."""
        self.members.pop(name, None)

    def round(self) -> None:
        for name, member in list(self.members.items()):
            payload = member.outgoing(full=name in self.fresh)
            self.fresh.discard(name)
            member.incoming(self.tracker.handle(name, payload, time.monotonic()))

    async def run(self) -> None:
        while True:
            self.round()
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.interval)

    def __enter__(self) -> Driver:
        self.task = asyncio.get_running_loop().create_task(self.run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()


def biggest_layer(image: BuiltImage) -> tuple[str, int, bytes]:
    layer = max(image.layers, key=lambda la: la.descriptor.size).descriptor
    data = (image.layout / "blobs" / "sha256" / layer.digest[7:]).read_bytes()
    return layer.digest, layer.size, data


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def nodes(tmp_path: Path, session: aiohttp.ClientSession, n: int, origins: list[str]) -> list[Node]:
    return [Node(tmp_path / f"n{i}", session, origins, []) for i in range(n)]


async def start_tracked(
    node: Node,
    driver: Driver,
    source: Source,
    config: EngineConfig | None = None,
    untracked: list[str] | None = None,
) -> Engine:
    """Start `node` as the driver's member "m0", wanting `source`'s blob; its engine."""
    await node.start(Link(driver), config=config, untracked=untracked)
    assert node.member is not None and node.engine is not None
    driver.add("m0", node.member)
    node.catalog.record([source])
    return node.engine


def assert_once_from_the_origin(made: list[Node], size: int, nchunks: int) -> None:
    engines = [node.engine for node in made if node.engine is not None]
    print(f"\n{nchunks} chunks:", [{k: v for k, v in e.counters.items() if v} for e in engines])
    assert sum(e.counters["origin_bytes"] for e in engines) == size
    assert sum(e.counters["origin_lease_chunks"] for e in engines) == nchunks
    assert sum(e.counters["origin_rescue_chunks"] for e in engines) == 0


async def test_a_burst_with_an_index_fetches_each_chunk_once_from_the_origin(
    tmp_path: Path,
    session: aiohttp.ClientSession,
    registry: Registry,
    test_image: BuiltImage,
    test_image_ref: str,
) -> None:
    digest, size, data = biggest_layer(test_image)
    nchunks = -(-size // CHUNK)
    tracker = IndexTracker(IndexConfig())
    driver = Driver(tracker)
    made = await nodes(tmp_path, session, 4, [registry.address])
    try:
        for i, node in enumerate(made):
            await node.start(Link(driver))
            assert node.member is not None
            driver.add(f"m{i}", node.member)
            node.catalog.record([Source(digest, size, "", registry.address, TEST_IMAGE_REPO)])
        with driver:
            await asyncio.sleep(0.3)  # the first syncs: every member is tracking before the burst
            engines = [node.engine for node in made if node.engine is not None]
            assert all(e.coordination.tracking() for e in engines)
            await asyncio.wait_for(asyncio.gather(*(e.wait_complete(digest) for e in engines)), 60)
        for node in made:
            assert node.store.read(digest, 0, size) == data
        assert_once_from_the_origin(made, size, nchunks)
        for e in engines:  # every control request was a sync: nobody's /have was polled
            assert e.counters["control_requests"] > 0
            assert not e._asking
        # each member got the rest from peers; a hedge's twin may land before it is cancelled
        hedged = sum(e.counters["hedges"] for e in engines)
        assert 3 * size <= sum(e.counters["peer_bytes"] for e in engines) <= 3 * size + hedged * CHUNK
    finally:
        for node in made:
            await node.close()


async def test_staggered_starts_with_an_index_fetch_each_chunk_once_from_the_origin(
    tmp_path: Path,
    session: aiohttp.ClientSession,
    registry: Registry,
    test_image: BuiltImage,
    test_image_ref: str,
) -> None:
    digest, size, data = biggest_layer(test_image)
    nchunks = -(-size // CHUNK)
    driver = Driver(IndexTracker(IndexConfig()))
    made = await nodes(tmp_path, session, 4, [registry.address])
    try:
        for i, node in enumerate(made):
            await node.start(Link(driver))
            assert node.member is not None
            driver.add(f"m{i}", node.member)
            node.catalog.record([Source(digest, size, "", registry.address, TEST_IMAGE_REPO)])
        with driver:
            await asyncio.sleep(0.3)
            waits = []
            for node in made:
                assert node.engine is not None
                waits.append(asyncio.ensure_future(node.engine.wait_complete(digest)))
                await asyncio.sleep(0.15)
            await asyncio.wait_for(asyncio.gather(*waits), 60)
        for node in made:
            assert node.store.read(digest, 0, size) == data
        assert_once_from_the_origin(made, size, nchunks)
    finally:
        for node in made:
            await node.close()


async def test_a_dead_lease_holders_run_is_regranted(
    tmp_path: Path,
    session: aiohttp.ClientSession,
    registry: Registry,
    hanging_origin: str,
    test_image: BuiltImage,
    test_image_ref: str,
) -> None:
    """Member A is alone, so it is leased the whole blob (runs as long as the blob: its first
    lease too: no gathering window); its uplink hangs, then it dies without
    the tracker noticing (no `forget`). B, which joined meanwhile, is granted A's run once A has
    shown no progress for `lease_grace`, and completes from the origin: not by the engine's own
    rescue, which waits longer."""
    digest, size, data = biggest_layer(test_image)
    nchunks = -(-size // CHUNK)
    driver = Driver(IndexTracker(IndexConfig(lease_grace=3.0, lease_chunks=32, gather=0.0)))
    a, b = await nodes(tmp_path, session, 2, [registry.address, hanging_origin])
    try:
        for name, node, origin in (("a", a, hanging_origin), ("b", b, registry.address)):
            await node.start(Link(driver))
            assert node.member is not None
            driver.add(name, node.member)
            node.catalog.record([Source(digest, size, "", origin, TEST_IMAGE_REPO)])
        assert a.engine is not None and b.engine is not None
        with driver:
            await asyncio.sleep(0.3)
            a.engine.ensure(digest)
            while not a.engine.counters["leases"]:
                await asyncio.sleep(0.05)
            leases = driver.tracker.index.leases(digest, time.monotonic())
            assert [(le.member, le.first, le.last) for le in leases] == [("a", 0, min(31, nchunks - 1))]
            waiting = asyncio.ensure_future(b.engine.wait_complete(digest))
            await asyncio.sleep(0.3)
            assert b.engine.counters["leases"] == 0  # everything is leased to A
            driver.remove("a")
            await a.close()
            a.engine = None
            await asyncio.wait_for(waiting, 30)
        assert b.store.read(digest, 0, size) == data
        assert b.engine.counters["origin_bytes"] == size
        assert b.engine.counters["origin_lease_chunks"] == nchunks
        assert b.engine.counters["origin_rescue_chunks"] == 0
    finally:
        await b.close()
        with contextlib.suppress(Exception):
            await a.close()


async def test_with_no_tracker_the_direct_path_completes(
    tmp_path: Path,
    session: aiohttp.ClientSession,
    registry: Registry,
    test_image: BuiltImage,
    test_image_ref: str,
) -> None:
    """Index sections attached but never synced: the engines poll their (bounded) peers and
    stripe the origin work themselves, as before."""
    digest, size, data = biggest_layer(test_image)
    made = [Node(tmp_path / f"n{i}", session, [registry.address], []) for i in range(3)]
    try:
        urls = [await node.start() for node in made]
        for node, url in zip(made, urls, strict=True):
            assert node.engine is not None
            node.engine.peer_source = StaticPeers(urls, url)
            node.catalog.record([Source(digest, size, "", registry.address, TEST_IMAGE_REPO)])
        engines = [node.engine for node in made if node.engine is not None]
        assert not any(e.coordination.tracking() for e in engines)
        await asyncio.wait_for(asyncio.gather(*(e.wait_complete(digest) for e in engines)), 60)
        for node in made:
            assert node.store.read(digest, 0, size) == data
        assert sum(e.counters["leases"] for e in engines) == 0
        assert all(e.counters["control_requests"] > 0 for e in engines)  # /have polls
    finally:
        for node in made:
            await node.close()


async def test_pulls_go_on_when_the_tracker_dies_and_a_new_one_rebuilds_the_index(
    tmp_path: Path,
    session: aiohttp.ClientSession,
    registry: Registry,
    test_image: BuiltImage,
    test_image_ref: str,
) -> None:
    """The tracker stops answering once the first lease is out: the members fall back to polling
    each other and striping, and finish. A new tracker then starts empty and learns everything
    from the members' full announcements: each one's holdings, exactly as its store has them."""
    layers = sorted(test_image.layers, key=lambda la: la.descriptor.size)[-2:]
    blobs = [(la.descriptor.digest, la.descriptor.size) for la in layers]
    made = [Node(tmp_path / f"n{i}", session, [registry.address], []) for i in range(3)]
    first = Driver(IndexTracker(IndexConfig()))
    try:
        urls = [await node.start(Link(first), stale_after=0.5) for node in made]
        for i, (node, url) in enumerate(zip(made, urls, strict=True)):
            assert node.engine is not None and node.member is not None
            node.engine.peer_source = StaticPeers(urls, url)
            node.catalog.record([Source(d, n, "", registry.address, TEST_IMAGE_REPO) for d, n in blobs])
            first.add(f"m{i}", node.member)
        engines = [node.engine for node in made if node.engine is not None]
        with first:
            await asyncio.sleep(0.3)
            waits = [asyncio.ensure_future(e.wait_complete(d)) for e in engines for d, _ in blobs]
            while not any(e.counters["leases"] for e in engines):
                await asyncio.sleep(0.01)
        await asyncio.wait_for(asyncio.gather(*waits), 60)
        assert not any(e.coordination.tracking() for e in engines)
        second = Driver(IndexTracker(IndexConfig()))
        for i, node in enumerate(made):
            assert node.member is not None
            second.add(f"m{i}", node.member)
        second.round()
        for node in made:
            for d, _ in blobs:
                assert node.store.exists(d)
        for i in range(3):
            for d, n in blobs:
                assert second.tracker.index.holdings(d, f"m{i}") == (1 << -(-n // CHUNK)) - 1
                assert second.tracker.index.replicas(d) == 3
    finally:
        for node in made:
            await node.close()


async def test_a_download_stuck_without_a_lease_fetches_from_the_origin_anyway(
    tmp_path: Path,
    session: aiohttp.ClientSession,
    registry: Registry,
    test_image: BuiltImage,
    test_image_ref: str,
) -> None:
    """The index says X holds the blob whole, so nobody gets a lease; but X's exchange is gone and
    the tracker has not noticed. B drops X after its failed requests, makes no progress for
    `lease_stuck`, and fetches the chunks nobody usable holds from the origin itself."""
    digest, size, data = biggest_layer(test_image)
    nchunks = -(-size // CHUNK)
    driver = Driver(IndexTracker(IndexConfig()))
    x, b = await nodes(tmp_path, session, 2, [registry.address])
    try:
        for name, node in (("x", x), ("b", b)):
            config = EngineConfig(gather_delay=0.0, lease_stuck=1.0)
            await node.start(Link(driver), config=config)
            assert node.member is not None
            driver.add(name, node.member)
            node.catalog.record([Source(digest, size, "", registry.address, TEST_IMAGE_REPO)])
        assert x.engine is not None and b.engine is not None
        with driver:
            await asyncio.sleep(0.3)
            await asyncio.wait_for(x.engine.wait_complete(digest), 30)
            await asyncio.sleep(0.3)  # the tracker hears that X holds it whole
            assert driver.tracker.index.replicas(digest) == 1
            driver.remove("x")
            await x.close()
            x.engine = None
            await asyncio.wait_for(b.engine.wait_complete(digest), 60)
        assert b.store.read(digest, 0, size) == data
        assert b.engine.counters["leases"] == 0
        assert b.engine.counters["origin_rescue_chunks"] == nchunks
        assert b.engine.counters["origin_bytes"] == size
    finally:
        await b.close()
        with contextlib.suppress(Exception):
            await x.close()


async def test_a_peers_only_download_asks_for_no_lease(
    tmp_path: Path, session: aiohttp.ClientSession, registry: Registry, pushed_layer: tuple[str, int, bytes]
) -> None:
    """A replication (peers only) while a tracker answers: nobody holds the blob, and the download
    never asks the tracker for a lease (one granted would have it fetch from the origin, or, if
    it kept its word, hold those chunks back from every other member); it gives up, leaving
    nothing. Before: it asked, was granted the whole blob, and fetched it from the origin."""
    digest, size, _data = pushed_layer
    tracker = IndexTracker(IndexConfig())
    driver = Driver(tracker)
    (node,) = await nodes(tmp_path, session, 1, [registry.address])
    try:
        config = EngineConfig(gather_delay=0.0, peers_only_stall=1.0)
        engine = await start_tracked(
            node, driver, Source(digest, size, "", registry.address, TEST_IMAGE_REPO), config
        )
        with driver:
            await asyncio.sleep(0.3)
            assert engine.coordination.tracking()
            dl = engine.ensure(digest, peers_only=True)
            assert dl is not None
            await asyncio.wait_for(asyncio.shield(dl.task), 30)
        assert dl.error is not None and not node.store.exists(digest)
        assert node.engine.counters["leases"] == 0
        assert node.engine.counters["origin_bytes"] == 0
        assert tracker.index.leases(digest, time.monotonic()) == []
    finally:
        await node.close()


async def test_a_static_peer_outside_the_membership_is_polled_and_used_beside_the_tracker(
    tmp_path: Path, session: aiohttp.ClientSession, registry: Registry, pushed_layer: tuple[str, int, bytes]
) -> None:
    """A tracked member whose static `[peer] peers` entry H is no member (`untracked`): the
    tracker's candidate sets know nothing of H, yet H is polled and the whole blob comes from it,
    under no lease. Before: under a tracker only candidate sets were views, H was never asked, and
    the member leased the blob and fetched it from the origin (test_p2p's corrupt-peer tests)."""
    digest, size, data = pushed_layer
    holder = Node(tmp_path / "h", session, [registry.address], [])
    h_url = await holder.start()
    assert holder.engine is not None
    holder.catalog.record([Source(digest, size, "", registry.address, TEST_IMAGE_REPO)])
    await asyncio.wait_for(holder.engine.wait_complete(digest), 60)
    tracker = IndexTracker(IndexConfig())
    driver = Driver(tracker)
    node = Node(tmp_path / "a", session, [registry.address], [h_url])
    try:
        source = Source(digest, size, "", registry.address, TEST_IMAGE_REPO)
        engine = await start_tracked(node, driver, source, untracked=[h_url])
        with driver:
            await asyncio.sleep(0.3)
            assert engine.coordination.tracking()
            assert engine.polled_peers() == [h_url]
            await asyncio.wait_for(engine.wait_complete(digest), 60)
            assert engine.coordination.tracking()
        assert node.store.read(digest, 0, size) == data
        assert engine.counters["origin_bytes"] == 0
        assert engine.counters["peer_bytes"] == size
        assert engine.counters["leases"] == 0
    finally:
        await node.close()
        await holder.close()
