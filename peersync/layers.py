"""`snapshotter.remote.LayerSource` over the node's content store, download engine and chain index.

This is where the two halves meet for the remote-snapshot handshake: the snapshotter asks for the
layer a chain ID is made of on a parent chain; we answer from the chain index
(`kernel.store.chains`), which the registry mirror feeds with every image manifest it serves and
we complete with the image configs (read through the content store, which serves them locally or
from peers) and with the manifests containerd wrote into the content store itself. The index
proves that the chain ID is that layer's diff ID on that parent chain; the unpacker proves that the
blob has that diff ID. The blob streams through the download engine, so the layer is unpacked
while its chunks arrive from peers or the origin. A blob fetched for this is *held* (the store's
ownership, `kernel.store.ownership`) until the last snapshot made from it is removed; then it stays
as a cache-only blob (peers may still want it) until the cache manager needs the room.

Reads go to the engine (local blobs from disk, others as their chunks arrive), never through the
content store: that store answers containerd, and answering hands a blob to containerd.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence

import structlog

from kernel.errors import PeerSyncError
from kernel.store.chains import MAX_DOCUMENT, ChainIndex, ChainLayer, parse_index
from kernel.store.ownership import Ownership
from peer.engine import Engine
from peersync.prefetch import Prefetcher
from snapshotter import remote
from snapshotter.apply import MEDIA_TYPES
from snapshotter.content import ContentStore
from snapshotter.preparer import ImageOf
from snapshotter.remote import Layer, Planned

log = structlog.get_logger(__name__)

class DaemonLayers:
    """Layers for the snapshotter, from this node's store, the download engine and the chain index.

    The snapshotter cannot import the network side, so the daemon assembly hands it this. The
    manifests and configs it reads may be local or lazy blobs: the engine serves both."""

    def __init__(
        self,
        content: ContentStore,
        engine: Engine,
        owners: Ownership,
        chains: ChainIndex,
        prefetcher: Prefetcher | None = None,
    ) -> None:
        self.content = content
        self.engine = engine
        self.owners = owners
        self.chains = chains
        self.prefetcher = prefetcher or Prefetcher(engine)
        self._examined: set[str] = set()  # small blobs of the store already read for manifests
        self._learning = asyncio.Lock()

    async def describe(self, target: str, parent: str, labels: Mapping[str, str]) -> Layer | None:
        """The layer `target` is made of on chain `parent`, or None (logged) for containerd to
        unpack.

        With CRI's labels the manifest they name is indexed first (and its layer preferred);
        otherwise the chain ID alone is looked up, and on a miss the index learns what it can
        (configs of manifests the mirror served, manifests in the content store) and looks again.
        A blob that is not here yet is held from this moment: containerd will never fetch it, so
        without the hold its GC would delete it under the snapshot made from it. A blob with no
        known source is refused up front: the unpack could not read it."""
        hint = labels.get(remote.LAYER_DIGEST_LABEL, "")
        manifest = labels.get(remote.MANIFEST_LABEL, "")
        if manifest:
            await self._index(manifest)
        candidates = self.chains.lookup(target)
        if not candidates:
            await self._learn()
            candidates = self.chains.lookup(target)
        if not candidates:
            log.info("layer not provided: chain ID not in any image seen", target=target, layer=hint or None)
            return None
        on_parent = [c for c in candidates if c.parent == parent]
        if not on_parent:
            log.warning(
                "layer not provided: the chain ID belongs on another parent",
                target=target,
                parent=parent,
                expected=sorted({c.parent for c in candidates}),
            )
            return None
        usable = [c for c in on_parent if c.media_type in MEDIA_TYPES]
        usable.sort(key=lambda c: (c.digest != hint, not self.content.chunks.exists(c.digest)))
        for entry in usable:
            if self.content.chunks.exists(entry.digest):
                return _layer(entry)
            if self.engine.known_size(entry.digest) == entry.size:
                self.owners.hold(entry.digest)
                return _layer(entry)
        log.info(
            "layer not provided: no source known for its blob, or its media type is not supported",
            target=target,
            layers=[(c.digest, c.media_type) for c in on_parent],
        )
        return None

    async def plan(self, target: str, labels: Mapping[str, str]) -> list[Planned]:
        """The layers above `target` in its image: the one CRI's manifest label names, else the
        image containing `target` whose manifest the mirror served last (a base layer is in many
        images; the one being pulled was served a moment ago)."""
        manifest = labels.get(remote.MANIFEST_LABEL, "")
        layers = self.chains.image(manifest) if manifest else []
        if not any(layer.chain == target for layer in layers):
            manifests = {c.manifest for c in self.chains.lookup(target)}
            if not manifests:
                return []
            layers = self.chains.image(max(manifests, key=self.chains.seen_ns))
        above = [layer for layer in layers if layer.chain == target]
        if not above:
            return []
        return [Planned(layer.chain, layer.parent) for layer in layers[above[0].index + 1 :]]

    def image_with(self, layer: str) -> ImageOf | None:
        """The image, of those whose manifest lists blob `layer`, that was seen last (the one a
        client is fetching: the mirror served its manifest a moment ago)."""
        images = self.chains.images_with(layer)
        if not images:
            return None
        manifest, config, _ = max(images, key=lambda image: image[2])
        return ImageOf(manifest, config)

    async def chains_of(self, manifest: str) -> list[Planned]:
        """The image's (chain ID, parent) pairs, bottom first, resolving its config first if it
        has not been read yet; [] if it cannot be."""
        layers = self.chains.image(manifest)
        if not layers:
            await self._learn()
            layers = self.chains.image(manifest)
        return [Planned(layer.chain, layer.parent) for layer in layers]

    async def lists_manifest(self, index: str, manifest: str) -> bool:
        """Whether image index `index` lists `manifest` (read through the engine; False if it
        cannot be read or is not an index)."""
        try:
            listed = parse_index(await self._document(index))
        except (PeerSyncError, ValueError):
            return False
        return listed is not None and manifest in listed

    def prefetch(self, digests: Sequence[str]) -> None:
        """Queue the layers in order on the node's prefetcher (`peersync.prefetch`): a few of them
        download at once, each next one as soon as one completes, not when its turn to be
        unpacked comes, so a slow unpack never leaves the uplink idle. (A layer being unpacked
        is always downloading: its reads start it.)"""
        self.prefetcher.add(digests)

    async def read(self, digest: str, offset: int, size: int) -> bytes:
        """Bytes of the layer from the engine: from disk when complete, else waiting for the
        chunks the range needs (BlobReader asks for at most one chunk at a time)."""
        return await self.engine.read(digest, offset, size)

    async def release(self, digest: str) -> None:
        """The blob is no longer held: the cache manager may evict it when it needs the room
        (unless containerd took it meanwhile, or it is pinned)."""
        if self.owners.release(digest):
            log.info("released layer blob; kept as cache", layer=digest)

    # --- what the index learns

    async def _index(self, manifest: str) -> None:
        """Index the manifest CRI names (and its config), unless it is indexed already."""
        if self.chains.image(manifest):
            return
        try:
            body = await self._document(manifest)
            config = self.chains.note_manifest(manifest, body)
            if config is not None:
                self.chains.resolve(manifest, await self._document(config))
        except (PeerSyncError, ValueError) as exc:
            log.info("manifest not indexed", manifest=manifest, reason=str(exc))

    async def _learn(self) -> None:
        """Resolve the configs of manifests seen but not resolved yet (most recent first), and
        index the manifests containerd wrote into the content store that were never read here.
        Serialised: concurrent misses (an image's layers) share one pass."""
        async with self._learning:
            await self._scan_store()
            for pending in sorted(self.chains.pending(), key=lambda p: -self.chains.seen_ns(p.manifest)):
                try:
                    body = await self._document(pending.config)
                except (PeerSyncError, ValueError) as exc:
                    log.debug("config not readable yet", config=pending.config, reason=str(exc))
                    continue
                if not self.chains.resolve(pending.manifest, body):
                    log.info("manifest and config disagree; not indexed", manifest=pending.manifest)
                    self.chains.forget(pending.manifest)

    async def _scan_store(self) -> None:
        """Note every small complete blob of the store not examined before that is an image
        manifest (containerd writes manifests it fetched itself through the content API)."""
        records = await asyncio.to_thread(
            lambda: [r.digest for r in self.content.chunks.iter_blobs() if r.size <= MAX_DOCUMENT]
        )
        for digest in records:
            if digest in self._examined:
                continue
            self._examined.add(digest)
            with contextlib.suppress(PeerSyncError, OSError):
                body = await asyncio.to_thread(self.content.chunks.read, digest, 0, MAX_DOCUMENT)
                self.chains.note_manifest(digest, body)

    async def _document(self, digest: str) -> bytes:
        """A manifest or config through the engine (local, or lazily from peers); not through the
        content store, whose answers hand blobs to containerd."""
        size = self.engine.known_size(digest)
        if size is None:
            raise ValueError(f"{digest}: not here and not catalogued")
        if size > MAX_DOCUMENT:
            raise ValueError(f"{digest} is {size} bytes, too big for a manifest or config")
        return await self.engine.read(digest, 0, size)


def _layer(entry: ChainLayer) -> Layer:
    return Layer(entry.digest, entry.media_type, entry.size, entry.diff_id)
