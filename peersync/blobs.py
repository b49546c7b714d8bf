"""The content store's view of the network: `snapshotter.content.BlobSource` over the engine.

One of the two seam adapters of the daemon assembly (the other is `peersync.layers`): the
snapshotter side owns the interface, the network side the engine, and only this layer knows both.

`stat` answers for blobs being filled or catalogued by the mirror, and queues their background
download (`peersync.prefetch`, in the order containerd asked, a few at a time), so by the time
containerd reads a layer its chunks are already arriving. `read` blocks only until the chunks it
needs are verified and on disk (and starts the download of its blob at once if it is still queued).
"""

from __future__ import annotations

from peer.engine import Engine
from peersync.prefetch import Prefetcher


class LazyBlobs:
    """A `BlobSource` (see snapshotter/content.py) backed by the download engine.

    The content store cannot import the engine (the two sides never import each other), so the
    daemon assembly hands it this: the engine's own calls under the names the store asks for."""

    def __init__(self, engine: Engine, prefetcher: Prefetcher | None = None) -> None:
        self.engine = engine
        self.prefetcher = prefetcher or Prefetcher(engine)

    async def stat(self, digest: str) -> int | None:
        """The engine's size for a blob being filled or catalogued, and its download queued.

        A size is the skip signal: containerd will not fetch the blob itself, so the daemon must
        complete it even if nothing reads it soon: it is queued at once, and its turn comes when
        the blobs asked for before it are in. Queueing here, at containerd's first Info (a `ctr
        pull` asks for every layer, bottom first, before it unpacks any), gets the bottom layers'
        chunks arriving first, while not filling every layer of the image at once (the origin
        striping between nodes frays with too many blobs at once, `peersync.prefetch`)."""
        size = self.engine.known_size(digest)
        if size is not None:
            self.prefetcher.add([digest])  # claimed blobs are always completed in the background
        return size

    async def read(self, digest: str, offset: int, size: int) -> bytes:
        """The engine's read: it waits, ahead of the background order, for the chunks the range
        needs and returns them verified, which is what the content store must hand containerd."""
        return await self.engine.read(digest, offset, size)
