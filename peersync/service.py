"""Assembly of the daemon: open the store, build both halves, serve until told to stop.

Start-up refuses, with a message that says what to do, when the root is unusable, when another
daemon holds the root, or when the socket is served by a live process. A stale socket file left
by a crash is replaced.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket as socketlib
from pathlib import Path

import grpc
import structlog

from kernel.config import Config
from kernel.errors import FailedPrecondition
from kernel.store.chunkstore import ChunkStore
from kernel.store.meta import Meta
from peer.node import PeerNode
from peersync import hosts
from peersync.activation import inherited_socket
from peersync.admin.server import AdminServer
from peersync.blobs import ContentCache, LazyBlobs
from peersync.layers import DaemonLayers
from peersync.prefetch import Prefetcher
from peersync.rootlock import lock_root
from snapshotter.containerd_client import ContainerdClient
from snapshotter.content import ContentStore
from snapshotter.preparer import ChainPreparer
from snapshotter.server import build_server, restrict_socket
from snapshotter.snapshots import Snapshotter

log = structlog.get_logger(__name__)


class Service:
    """One node's daemon. Lifecycle: `await start()`, then `await stop()` (once)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._lock_fd: int | None = None
        self.meta: Meta | None = None
        self.server: grpc.aio.Server | None = None
        self._bound = False  # only a socket we bound is ours to remove
        self.peer: PeerNode | None = None
        self.snapshotter: Snapshotter | None = None
        self.admin: AdminServer | None = None
        self.preparer: ChainPreparer | None = None

    async def start(self) -> None:
        cfg = self.config
        self._lock_fd = lock_root(cfg.root)
        listener = inherited_socket(cfg.socket)
        if listener is None:
            prepare_socket(cfg.socket)
        self.meta = Meta(cfg.root)
        chunks = ChunkStore(cfg.root, self.meta, cfg.store.chunk_size)
        await asyncio.to_thread(chunks.recover)
        hosts_dir = Path(cfg.mirror.hosts_dir)
        self.peer = PeerNode(cfg, chunks, self.meta, installed_registries=lambda: hosts.managed(hosts_dir))
        await self.peer.start()
        engine = self.peer.engine
        assert engine is not None
        prefetcher = Prefetcher(engine, cfg.snapshotter.prefetch_layers)
        self.content = ContentStore(chunks, source=LazyBlobs(engine), cache=ContentCache(self.peer.cache))
        layers = None
        if cfg.snapshotter.unpack_layers:
            layers = DaemonLayers(self.content, engine, chunks.owners, self.peer.chains, prefetcher)
        ahead = cfg.snapshotter.unpack_ahead
        snapshotter = Snapshotter(cfg.root, self.meta, layers=layers, unpack_ahead=ahead)
        self.snapshotter = snapshotter
        sn = cfg.snapshotter
        if layers is not None and sn.containerd_address:  # for clients that apply layers themselves
            client = ContainerdClient(Path(sn.containerd_address), sn.containerd_snapshotter)
            self.preparer = ChainPreparer(client, layers, wait=sn.client_unpack_wait)
        self.server = build_server(cfg.socket, snapshotter, self.content, cfg.grpc, listener, self.preparer)
        await self.server.start()
        if listener is None:  # an inherited socket belongs to systemd: its mode, its path
            self._bound = True
            restrict_socket(cfg.socket)
        prepare_socket(cfg.admin_socket)  # a live one is another daemon's: refused, as above
        self.admin = AdminServer(cfg, self.peer, snapshotter.unpacks_running)
        await self.admin.start()
        log.info(
            "serving",
            socket=str(cfg.socket),
            root=str(cfg.root),
            chunk_size=cfg.store.chunk_size,
            socket_from="systemd" if listener is not None else "self",
        )

    async def stop(self, grace: float = 5.0) -> None:
        """Finish in-flight RPCs (up to `grace` seconds), then close the store."""
        if self.admin is not None:
            await self.admin.stop()
            self.admin = None
        if self.server is not None:
            await self.server.stop(grace)
            self.server = None
        if self.preparer is not None:
            await self.preparer.close()
            self.preparer = None
        if self.snapshotter is not None:
            await self.snapshotter.close()
            self.snapshotter = None
        if self.peer is not None:
            await self.peer.stop()
            self.peer = None
        if self._bound:
            self.config.socket.unlink(missing_ok=True)
            self._bound = False
        if self.meta is not None:
            self.meta.close()
            self.meta = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        log.info("stopped")


async def run_until_signal(service: Service) -> None:
    """Serve until SIGTERM or SIGINT, then stop cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await service.start()
        await stop.wait()
        log.info("signal received, shutting down")
    finally:
        await service.stop()


def prepare_socket(path: Path) -> None:
    """Make sure `path` can be bound: refuse a live socket, remove a stale one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FailedPrecondition(f"cannot create socket directory {path.parent}: {exc.strerror}") from exc
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_socket():
        raise FailedPrecondition(f"{path} exists and is not a socket; refusing to replace it")
    probe = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise FailedPrecondition(f"cannot probe socket {path}: {exc.strerror}") from exc
        log.info("removing stale socket", socket=str(path))
        path.unlink(missing_ok=True)
    else:
        raise FailedPrecondition(f"socket {path} is in use by another process")
    finally:
        probe.close()
