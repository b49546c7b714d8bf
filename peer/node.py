"""Assembly of the network side: origin client, peer exchange, download engine, registry mirror,
control plane, cache manager, popularity and replication.

`PeerNode(config, store, meta)` is what `peersync.service` starts next to the gRPC server; the
content store reaches its engine and cache manager only through the daemon's adapters
(`peersync.blobs`), never directly: `peer/` and `snapshotter/` do not import each other.

When the peer exchange listens, the node runs a control plane (`peer.control.plane`: discovery,
membership, tracker election, the sync message) on the same port, and the engine's peers come
from it (the static `[peer] peers` list included); without a listen address there is nobody to
meet, and the engine keeps the static list alone. The node's concerns that ride on the sync
message (`member_sections`, `tracker_sections`: popularity, `peer.control.popularity`) are
registered on it; without a control plane the node knows nothing of the site (every site count
and replica count is unknown, and nothing is replicated).

The tracker index rides on the control plane as its `index` section, registered on every node:
any node may become tracker, and the tracker's own node drives its member side in process like
any member's, so it too announces its holdings and fetches origin chunks only under leases. The
member side (`IndexMember`) is the engine's `Coordination` (candidate sets instead of `/have`
polling while a tracker answers), and its early-sync requests wake the control plane's loop. The
index's tracker side counts the replicas the popularity section answers with (by default they
would be unknown: no eviction score would know how many other members hold a blob, and no hot
blob would be replicated).
"""

from __future__ import annotations

import os
import socket
import time

import aiohttp
import structlog
from aiohttp import web

from kernel.config import Config, hostport
from kernel.errors import FailedPrecondition, PeerSyncError
from kernel.store.chains import ChainIndex
from kernel.store.chunkstore import ChunkStore
from kernel.store.meta import Meta
from peer.cache import CacheManager
from peer.catalog import Catalog
from peer.control.index_sections import IndexMember, IndexTracker
from peer.control.plane import ControlPlane
from peer.control.popularity import PopularityMember, PopularityTracker
from peer.control.sections import MemberSection, TrackerSection
from peer.engine import Engine, EngineConfig
from peer.exchange import PeerClient, routes
from peer.mirror import Mirror
from peer.origin import CredentialStore, HostSettings, OriginClient
from peer.peers import PeerSource, StaticPeers
from peer.policy.choice import Rule
from peer.policy.popularity import Window
from peer.replication import Replicator

log = structlog.get_logger(__name__)


class PeerNode:
    """The HTTP side of one node. Lifecycle: `await start()`, then `await stop()`."""

    def __init__(self, config: Config, store: ChunkStore, meta: Meta) -> None:
        self.config = config
        self.store = store
        self.catalog = Catalog(meta)
        self.chains = ChainIndex(meta)  # the mirror notes the image manifests it serves
        self._runners: list[web.AppRunner] = []
        self.session: aiohttp.ClientSession | None = None
        self.engine: Engine | None = None
        self.control: ControlPlane | None = None
        self.index: IndexMember | None = None
        self.self_url = advertised_url(config)
        self.window = Window()
        self.popularity = PopularityMember(self.window, self._manifest_size, self._asking)
        self.index_tracker = IndexTracker()  # the tracker side of the index section
        self.popularity_tracker = PopularityTracker(replicas=self.index_tracker)
        self.cache = CacheManager(store, config.cache, site=self.popularity, window=self.window)
        self.replicator: Replicator | None = None

    def member_sections(self) -> list[MemberSection]:
        """This node's parts of the sync message, member side."""
        return [self.popularity]

    def tracker_sections(self) -> list[TrackerSection]:
        """This node's parts of the sync message, tracker side (used while it is the tracker)."""
        return [self.popularity_tracker]

    def _manifest_size(self, digest: str) -> int | None:
        """A blob's size from a manifest (the catalog) or its verified record: what members tell
        the tracker with their requests."""
        src = self.catalog.lookup(digest)
        if src is not None:
            return src.size
        try:
            return self.store.record(digest).size
        except PeerSyncError:
            return None

    def _asking(self) -> list[str]:
        return self.cache.asking()

    async def start(self) -> None:
        cfg = self.config
        connector = aiohttp.TCPConnector(limit=256, limit_per_host=32)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        hosts = {h: HostSettings(plain_http=True) for h in cfg.origin.plain_http}
        origin = OriginClient(self.session, CredentialStore.from_mapping(cfg.origin.auth), hosts=hosts)
        peers: PeerSource = StaticPeers(cfg.peer.peers, self.self_url)
        engine_config = EngineConfig(choice=Rule(cfg.peer.choice), subnets=tuple(cfg.peer.subnets))
        if cfg.peer.listen:
            self.control = ControlPlane(cfg, self.self_url)
            # one bound on direct polling: the engine's groups, and the status that reports them
            engine_config.fanout = self.control.tunables.fanout
            sides = zip(self.member_sections(), self.tracker_sections(), strict=True)
            for member_side, tracker_side in sides:
                self.control.register(member_side, tracker_side)
            peers = self.control
        self.engine = Engine(
            self.store, self.catalog, origin, peers, PeerClient(self.session), self.self_url, engine_config,
            cache=self.cache,
        )  # fmt: skip
        if self.control is not None:
            self.engine.on_busy = self.control.set_busy
            # the engine's coordination; static peers outside the membership are still polled
            self.index = IndexMember(self.engine, _Wake(self.control), untracked=self.control.untracked)
            self.control.register(self.index, self.index_tracker)
        if cfg.peer.listen:
            app = web.Application()
            app.add_routes(routes(self.store, self.engine.fetching))
            if self.control is not None:
                app.add_routes(self.control.routes())
            app.router.add_get("/peersync/v1/stats", self._stats)
            app.router.add_get("/peersync/v1/peers", self._peers)
            app.router.add_get("/peersync/v1/transfers", self._transfers)
            await self._serve(app, cfg.peer.listen, "peer exchange", "[peer] listen")
        if cfg.mirror.listen:
            app = web.Application()
            mirror = Mirror(
                self.store,
                self.catalog,
                origin,
                self.engine,
                cfg.mirror.default_registry,
                cfg.mirror.tag_ttl,
                chains=self.chains,
            )
            app.add_routes(mirror.routes())
            await self._serve(app, cfg.mirror.listen, "registry mirror", "[mirror] listen")
        if self.control is not None:
            await self.control.start()
        self.engine.resume()
        self.cache.start()
        self.replicator = Replicator(self.engine, self.cache, self.popularity)
        self.replicator.start()
        log.info("peer side up", url=self.self_url, peers=peers.peers())

    async def _stats(self, request: web.Request) -> web.Response:
        """Transfer counters (bytes from peers and from the origin, corrupt chunks, hedges), and
        the cache (`CacheManager.cache_status`, read-only)."""
        assert self.engine is not None
        active = [d for d, dl in self.engine.downloads.items() if not dl.task.done()]
        now = time.monotonic()
        dropped = sorted(p for p, st in self.engine.stats.items() if not st.usable(now))
        replicated = self.replicator.started if self.replicator is not None else 0
        body = {
            **self.engine.counters,
            "active_downloads": active,
            "dropped_peers": dropped,
            "replications": replicated,
            "cache": self.cache.cache_status(),
        }
        if self.control is not None:
            body["control"] = self.control.counters.snapshot()
        return web.json_response(body)

    async def _peers(self, request: web.Request) -> web.Response:
        """Per-peer figures (`Engine.peers()`; keys documented by `peer.policy.peerstats.PeerFigures`)."""
        assert self.engine is not None
        return web.json_response(self.engine.peers())

    async def _transfers(self, request: web.Request) -> web.Response:
        """The last few thousand chunk requests to peers (`Engine.transfers()`), oldest first."""
        assert self.engine is not None
        return web.json_response({"transfers": self.engine.transfers()})

    async def stop(self) -> None:
        if self.control is not None:
            await self.control.stop()
        if self.replicator is not None:
            await self.replicator.stop()
            self.replicator = None
        await self.cache.stop()
        if self.engine is not None:
            await self.engine.close()
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def _serve(self, app: web.Application, listen: str, what: str, key: str) -> None:
        """Listen on `listen` or fail naming the address, the reason and the config key (`key`):
        a second daemon on a host with the default config finds the ports taken."""
        host, port = hostport(listen)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        except OSError as exc:
            await runner.cleanup()
            reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
            hint = f"another daemon on this host? {key} in the config"
            raise FailedPrecondition(f"{what}: cannot listen on {listen}: {reason} ({hint})") from exc
        self._runners.append(runner)
        log.info("listening", what=what, address=listen)


class _Wake:
    """The index section's `ControlLink` over the control plane: an early sync is a `wake()` of
    its loop (coalesced there; never closer than its minimum gap). On the tracker's own node the
    wake runs the in-process sync of its sections, so a lease it asks itself for comes as soon."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane

    def sync_soon(self) -> None:
        self.plane.wake()


def advertised_url(config: Config) -> str:
    """How other nodes reach this one: `peer.advertise`, else the listen address (a wildcard host
    replaced by this host's primary address)."""
    if config.peer.advertise:
        url = config.peer.advertise
        return (url if "://" in url else f"http://{url}").rstrip("/")
    if not config.peer.listen:
        return ""
    host, port = hostport(config.peer.listen)
    if host in ("0.0.0.0", "::", ""):
        host = _primary_address()
    return f"http://{host}:{port}"


def _primary_address() -> str:
    """The address of the interface holding the default route (no packet is sent)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 9))
        address: str = probe.getsockname()[0]
        return address
    except OSError:
        return "127.0.0.1"
    finally:
        probe.close()
