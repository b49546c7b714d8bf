"""`snapshotter.remote.LayerSource` over the node's content store and download engine.

This is where the two halves meet for the remote-snapshot handshake: the snapshotter asks for the
layer a chain ID is made of; we read the image's manifest and config (from the content store,
which serves them locally or from peers), check that the chain ID really is that layer on top of
its parents, and stream the blob through the download engine, so the layer is unpacked while its
chunks arrive from peers or the origin. A blob fetched for this is *held* (the store's ownership,
`kernel.store.ownership`) until the last snapshot made from it is removed; then it stays as a
cache-only blob (peers may still want it) until the cache manager needs the room.

Reads go to the engine (local blobs from disk, others as their chunks arrive), never through the
content store: that store answers containerd, and answering hands a blob to containerd.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import structlog

from kernel.errors import PeerSyncError
from kernel.store.ownership import Ownership
from peer.engine import Engine
from snapshotter import remote
from snapshotter.apply import MEDIA_TYPES
from snapshotter.content import ContentStore
from snapshotter.remote import Layer

log = structlog.get_logger(__name__)

MAX_JSON = 4 << 20  # manifests and configs are small; refuse to buffer anything bigger
PREFETCH_CONCURRENT = 2  # layer downloads at once: the uplink stays busy, the next layer is early


class DaemonLayers:
    """Layers for the snapshotter, from this node's store and the download engine.

    The snapshotter cannot import the network side, so the daemon assembly hands it this. The
    manifest and config it checks may be local or lazy blobs: the engine serves both."""

    def __init__(self, content: ContentStore, engine: Engine, owners: Ownership) -> None:
        self.content = content
        self.engine = engine
        self.owners = owners
        self._queue: list[str] = []  # layers to download, in image order
        self._active: set[str] = set()  # layers downloading because we asked

    async def describe(self, target: str, labels: Mapping[str, str]) -> Layer | None:
        """The verified layer `target` is made of, or None (logged) for containerd to unpack.

        A blob that is not here yet is held from this moment: containerd will never fetch it, so
        without the hold its GC would delete it under the snapshot made from it. A blob with no
        known source is refused up front: the unpack could not read it."""
        digest = labels[remote.LAYER_DIGEST_LABEL]
        manifest_digest = labels.get(remote.MANIFEST_LABEL, "")
        try:
            layer = await self._verified_layer(target, digest, manifest_digest)
        except (PeerSyncError, ValueError, KeyError, TypeError) as exc:
            log.info("layer not provided; containerd unpacks it", layer=digest, reason=str(exc))
            return None
        if not self.content.chunks.exists(digest):
            if self.engine.known_size(digest) is None:
                log.info("layer not provided: no source known for it", layer=digest)
                return None
            self.owners.hold(digest)
        return layer

    def prefetch(self, digests: Sequence[str]) -> None:
        """Queue the layers in order; `_pump` keeps PREFETCH_CONCURRENT of them downloading, and
        starts the next one when one completes, not when its turn to be unpacked comes, so a slow
        unpack never leaves the uplink idle. (A layer being unpacked is always downloading: its
        reads start it.)"""
        for digest in digests:
            if digest not in self._queue and digest not in self._active:
                self._queue.append(digest)
        self._pump()

    def _pump(self) -> None:
        while self._queue and len(self._active) < PREFETCH_CONCURRENT:
            digest = self._queue.pop(0)
            try:
                download = self.engine.ensure(digest)
            except PeerSyncError:
                continue  # not catalogued: containerd will fetch it
            if download is None:
                continue  # here already
            self._active.add(digest)
            download.task.add_done_callback(functools.partial(self._finished, digest))

    def _finished(self, digest: str, _task: asyncio.Task[None]) -> None:
        self._active.discard(digest)
        self._pump()

    async def read(self, digest: str, offset: int, size: int) -> bytes:
        """Bytes of the layer from the engine: from disk when complete, else waiting for the
        chunks the range needs (BlobReader asks for at most one chunk at a time)."""
        return await self.engine.read(digest, offset, size)

    async def release(self, digest: str) -> None:
        """The blob is no longer held: the cache manager may evict it when it needs the room
        (unless containerd took it meanwhile, or it is pinned)."""
        if self.owners.release(digest):
            log.info("released layer blob; kept as cache", layer=digest)

    async def _verified_layer(self, target: str, digest: str, manifest_digest: str) -> Layer:
        """The manifest's entry for `digest`, with the diff ID from the config, if the chain ID
        of that layer on its parents is `target`; ValueError otherwise."""
        if not manifest_digest:
            raise ValueError("no manifest digest label")
        manifest = await self._json(manifest_digest)
        layers = manifest["layers"]
        index = next((i for i, d in enumerate(layers) if d["digest"] == digest), None)
        if index is None:
            raise ValueError(f"manifest {manifest_digest} does not name layer {digest}")
        config = await self._json(manifest["config"]["digest"])
        diff_ids = config["rootfs"]["diff_ids"]
        if len(diff_ids) != len(layers):
            raise ValueError("config has a different number of diff IDs than the manifest has layers")
        if remote.chain_ids(diff_ids)[index] != target:
            raise ValueError(f"chain ID of layer {index} is not {target}")
        media_type = layers[index]["mediaType"]
        if media_type not in MEDIA_TYPES:
            raise ValueError(f"media type {media_type} not supported")
        return Layer(digest, media_type, int(layers[index]["size"]), diff_ids[index])

    async def _json(self, digest: str) -> Any:
        size = self.engine.known_size(digest)
        if size is None:
            raise ValueError(f"{digest}: not here and not catalogued")
        if size > MAX_JSON:
            raise ValueError(f"{digest} is {size} bytes, too big for a manifest or config")
        return json.loads(await self.engine.read(digest, 0, size))
