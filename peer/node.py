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

Everything peer-facing goes through the transport `peer.tls.load` gives (docs/tls.md): with the
site certificates the peer port requires a client certificate from the site CA and every peer
client presents this node's; with `[tls] insecure = true` it is plain HTTP, warned about; with
neither, the peer port is never opened and no peer is asked, while the local side (containerd's
plugins, the mirror and its pulls from the origin) keeps working: containerd depends on this
daemon, so a missing certificate must not take it down. The registry mirror stays plain HTTP on
loopback, and the origin client keeps the system's CAs.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import time
from collections.abc import Callable, Collection
from dataclasses import replace
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from kernel import limits
from kernel.config import Config, hostport
from kernel.errors import FailedPrecondition, PeerSyncError
from kernel.logging import bind_transfer
from kernel.store.chains import ChainIndex
from kernel.store.chunkstore import ChunkStore
from kernel.store.meta import Meta
from peer import httpbounds
from peer.access import ClientAccess
from peer.cache import CacheManager
from peer.catalog import Catalog
from peer.connections import ConnectionCount
from peer.control.client import PREFIX as CONTROL_PREFIX
from peer.control.index_sections import IndexMember, IndexTracker
from peer.control.plane import ControlPlane
from peer.control.popularity import PopularityMember, PopularityTracker
from peer.control.sections import MemberSection, TrackerSection
from peer.engine import Engine, EngineConfig
from peer.exchange import PeerClient, routes
from peer.mirror import Mirror
from peer.origin import CredentialStore, HostSettings, OriginClient
from peer.peers import PeerSource, StaticPeers, peer_url
from peer.policy.choice import Rule
from peer.policy.popularity import Window
from peer.replication import Replicator
from peer.tls import DISABLED, MTLS, PeerTransport, load

log = structlog.get_logger(__name__)

CONTROL_STATUS = CONTROL_PREFIX + "/status"


class PeerNode:
    """The HTTP side of one node. Lifecycle: `await start()`, then `await stop()`."""

    def __init__(
        self,
        config: Config,
        store: ChunkStore,
        meta: Meta,
        installed_registries: Callable[[], Collection[str]] = tuple,
    ) -> None:
        """`installed_registries` says which registries' hosts.toml send their pulls to the
        mirror (the assembly reads containerd's hosts dir); the mirror serves those too."""
        self.config = config
        self.installed_registries = installed_registries
        self.store = store
        self.catalog = Catalog(meta)
        self.chains = ChainIndex(meta)  # the mirror notes the image manifests it serves
        self._runners: list[web.AppRunner] = []
        self.session: aiohttp.ClientSession | None = None
        self.connections = ConnectionCount()  # opened by `session` (stats: handshakes under TLS)
        self.engine: Engine | None = None
        self.control: ControlPlane | None = None
        self.index: IndexMember | None = None
        if config.peer.listen or config.peer.peers:
            self.transport = load(config.tls)
        else:  # no peer side configured at all: nothing to say about certificates
            self.transport = PeerTransport(DISABLED, reason="[peer] listen and [peer] peers are empty")
        self.self_url = advertised_url(config, self.transport.scheme)
        self._check_addresses()
        self.window = Window()
        self.popularity = PopularityMember(self.window, self._manifest_size, self._asking)
        self.index_tracker = IndexTracker()  # the tracker side of the index section
        self.popularity_tracker = PopularityTracker(replicas=self.index_tracker)
        self.cache = CacheManager(store, config.cache, site=self.popularity, window=self.window)
        self.replicator: Replicator | None = None
        self.mirror: Mirror | None = None
        self.origin: OriginClient | None = None
        # bytes of blob bodies this node sent: to other peers (the exchange) and to this node's
        # containerd (the mirror); what came in is the engine's counters
        self.served = {"peer": 0, "local": 0}
        self.mirror_inflight = 0

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
        connector = aiohttp.TCPConnector(
            limit=256, limit_per_host=32, keepalive_timeout=limits.CLIENT_KEEPALIVE
        )
        self.session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, trace_configs=[self.connections.trace()]
        )
        hosts = {h: HostSettings(plain_http=True) for h in cfg.origin.plain_http}
        origin = OriginClient(self.session, CredentialStore.from_mapping(cfg.origin.auth), hosts=hosts)
        self.origin = origin
        transport = self.transport
        static = cfg.peer.peers if transport.enabled else []
        peers: PeerSource = StaticPeers(static, self.self_url, transport.scheme)
        engine_config = EngineConfig(choice=Rule(cfg.peer.choice), subnets=tuple(cfg.peer.subnets))
        if cfg.peer.listen:
            self.control = ControlPlane(cfg, self.self_url, transport=transport)
            # one bound on direct polling: the engine's groups, and the status that reports them
            engine_config.fanout = self.control.tunables.fanout
            sides = zip(self.member_sections(), self.tracker_sections(), strict=True)
            for member_side, tracker_side in sides:
                self.control.register(member_side, tracker_side)
            peers = self.control
        client = PeerClient(self.session, ssl=transport.client)
        self.engine = Engine(
            self.store, self.catalog, origin, peers, client, self.self_url, engine_config, cache=self.cache
        )
        if self.control is not None:
            self.engine.on_busy = self.control.set_busy
            # the engine's coordination; static peers outside the membership are still polled
            self.index = IndexMember(self.engine, _Wake(self.control), untracked=self.control.untracked)
            self.control.register(self.index, self.index_tracker)
        if cfg.peer.listen and transport.enabled:
            app = httpbounds.application(httpbounds.EXCHANGE, [self._count_served("peer", "/data")])
            app.add_routes(routes(self.store, self.engine.fetching))
            if self.control is not None:
                app.add_routes(self.control.routes())
            app.router.add_get("/peersync/v1/stats", self._stats)
            app.router.add_get("/peersync/v1/peers", self._peers)
            app.router.add_get("/peersync/v1/transfers", self._transfers)
            await self._serve(app, cfg.peer.listen, "peer exchange", "[peer] listen", transport.server)
        if cfg.mirror.listen:
            app = httpbounds.application(
                httpbounds.MIRROR, [self._transfer, self._count_served("local", "/blobs/")]
            )
            self.mirror = mirror = Mirror(
                self.store,
                self.catalog,
                origin,
                self.engine,
                cfg.mirror.default_registry,
                cfg.mirror.tag_ttl,
                chains=self.chains,
                registries=[*cfg.mirror.registries, *cfg.origin.plain_http, *cfg.origin.auth],
                installed=self.installed_registries,
                access=ClientAccess(origin, cfg.mirror.access_ttl),
            )
            app.add_routes(mirror.routes())
            if self.control is not None:  # local callers see the status even with the peer port closed
                app.router.add_get(CONTROL_STATUS, self._control_status)
            await self._serve(app, cfg.mirror.listen, "registry mirror", "[mirror] listen")
        if self.control is not None:
            await self.control.start()
        self.engine.resume()
        self.cache.start()
        self.replicator = Replicator(self.engine, self.cache, self.popularity)
        self.replicator.start()
        log.info("peer side up", url=self.self_url, peers=peers.peers(), transport=transport.mode)

    def _check_addresses(self) -> None:
        """Say loudly what will make peers fail: a certificate that does not name the address
        this node advertises, or configured URLs of the other scheme."""
        t, cfg = self.transport, self.config
        host = self.self_url.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
        if t.mode == MTLS and host and not t.check_address(host):
            warning = (
                f"this node advertises {self.self_url} but its certificate names only "
                f"{', '.join(t.certificate.get('addresses', [])) or 'no address'}: peers will refuse it "
                "(issue it with --ip for this address, or set [peer] advertise)"
            )
            log.error("site certificate does not match this node's address", warning=warning)
            self.transport = replace(t, warnings=(*t.warnings, warning))
        for address in [*cfg.peer.peers, *cfg.peer.bootstrap, cfg.peer.advertise]:
            if "://" in address and not address.startswith(f"{t.scheme}://") and t.enabled:
                log.warning("peer address of the other scheme", address=address, scheme=t.scheme)

    async def _control_status(self, request: web.Request) -> web.Response:
        """The control plane's status for local callers (on the loopback mirror listener)."""
        assert self.control is not None
        return web.json_response(self.control.status())

    @web.middleware
    async def _transfer(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Every log line of one mirror request (a manifest or a blob of a pull), and of the
        downloads it starts, carries one transfer id (`kernel.logging.bind_transfer`); the
        requests being served are counted (`mirror_inflight`)."""
        self.mirror_inflight += 1
        try:
            with bind_transfer(path=request.path):
                resp: web.StreamResponse = await handler(request)
                return resp
        finally:
            self.mirror_inflight -= 1

    def _count_served(self, to: str, marker: str) -> Any:
        """A middleware adding the body bytes of the blob responses sent to paths containing
        `marker` to `served[to]`: their Content-Length once sent (a response whose stream was cut
        raised instead, and counts nothing; aiohttp's own body count includes a sent file's
        headers)."""

        @web.middleware
        async def count(request: web.Request, handler: Any) -> web.StreamResponse:
            resp: web.StreamResponse = await handler(request)
            if marker in request.path and request.method == "GET" and resp.status in (200, 206):
                self.served[to] += _body_bytes(request, resp)
            return resp

        return count

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
            "connections_opened": self.connections.opened,
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

    async def _serve(
        self, app: web.Application, listen: str, what: str, key: str, tls: ssl.SSLContext | None = None
    ) -> None:
        """Listen on `listen` (with TLS context `tls`, if any) or fail naming the address, the
        reason and the config key (`key`): a second daemon on a host with the default config finds
        the ports taken. The app's bounds (`peer.httpbounds`) also bound its connections."""
        host, port = hostport(listen)
        runner = httpbounds.runner(app)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, reuse_address=True, ssl_context=tls).start()
        except OSError as exc:
            await runner.cleanup()
            reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
            hint = f"another daemon on this host? {key} in the config"
            raise FailedPrecondition(f"{what}: cannot listen on {listen}: {reason} ({hint})") from exc
        self._runners.append(runner)
        log.info("listening", what=what, address=listen)


def _body_bytes(request: web.Request, resp: web.StreamResponse) -> int:
    """The body bytes of a blob response: its Content-Length once sent; for a file response the
    handler returned unsent (the exchange's), the length of the one Range it was asked for."""
    if resp.prepared:
        return resp.content_length or 0
    m = re.fullmatch(r"bytes=(\d+)-(\d+)", request.headers.get("Range", ""))
    return int(m.group(2)) - int(m.group(1)) + 1 if m else 0


class _Wake:
    """The index section's `ControlLink` over the control plane: an early sync is a `wake()` of
    its loop (coalesced there; never closer than its minimum gap). On the tracker's own node the
    wake runs the in-process sync of its sections, so a lease it asks itself for comes as soon."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane

    def sync_soon(self) -> None:
        self.plane.wake()

    def patience(self) -> float:
        return self.plane.sync_patience()


def advertised_url(config: Config, scheme: str = "https") -> str:
    """How other nodes reach this one: `peer.advertise`, else the listen address (a wildcard host
    replaced by this host's primary address); `scheme` is the transport's (`peer.tls`)."""
    if config.peer.advertise:
        return peer_url(config.peer.advertise, scheme)
    if not config.peer.listen:
        return ""
    host, port = hostport(config.peer.listen)
    if host in ("0.0.0.0", "::", ""):
        host = _primary_address()
    return f"{scheme}://{host}:{port}"


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
