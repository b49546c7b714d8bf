"""The content store's view of the network: `snapshotter.content.BlobSource` over the engine.

One of the two seam adapters of the daemon assembly (the other is `peersync.layers`): the
snapshotter side owns the interface, the network side the engine, and only this layer knows both.

`stat` answers for blobs being filled or catalogued by the mirror, and starts their background
download at once, so by the time containerd reads a layer its chunks are already arriving.
`read` blocks only until the chunks it needs are verified and on disk.
"""

from __future__ import annotations

from peer.engine import Engine


class LazyBlobs:
    """A `BlobSource` (see snapshotter/content.py) backed by the download engine.

    The content store cannot import the engine (the two sides never import each other), so the
    daemon assembly hands it this: the engine's own calls under the names the store asks for."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def stat(self, digest: str) -> int | None:
        """The engine's size for a blob being filled or catalogued, and its download started.

        A size is the skip signal: containerd will not fetch the blob itself, so the daemon must
        complete it even if nothing reads it soon. Starting the download here, at containerd's
        first Info, also gets its chunks arriving before the first Read. (Queueing them instead,
        two at a time in Info order, as `peersync.prefetch` does for the layers the daemon unpacks,
        was tried: the nodes of a site then start each blob at different moments, and the origin
        striping, which deals stripes among the nodes filling a blob at once, sent 1.5x the image
        over the uplink in one of two 4-node runs of tests/integration/test_cluster.py.)"""
        size = self.engine.known_size(digest)
        if size is not None:
            self.engine.ensure(digest)  # claimed blobs are always completed in the background
        return size

    async def read(self, digest: str, offset: int, size: int) -> bytes:
        """The engine's read: it waits, ahead of the background order, for the chunks the range
        needs and returns them verified, which is what the content store must hand containerd."""
        return await self.engine.read(digest, offset, size)
