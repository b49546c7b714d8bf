"""The content store's view of the network side: `snapshotter.content.BlobSource` over the engine,
and `snapshotter.content.CacheHooks` over the cache manager.

The seam adapters of the content store (the other is `peersync.layers`, for the snapshotter): the
snapshotter side owns the interfaces, the network side the engine and the cache manager, and only
this layer knows both.

`stat` answers for blobs here, being filled or catalogued by the mirror, and starts their
background download at once, so by the time containerd reads a layer its chunks are already
arriving. `read` blocks only until the chunks it needs are verified and on disk.
"""

from __future__ import annotations

from peer.cache import CacheManager
from peer.engine import Engine


class LazyBlobs:
    """A `BlobSource` (see snapshotter/content.py) backed by the download engine.

    The content store cannot import the engine (the two sides never import each other), so the
    daemon assembly hands it this: the engine's own calls under the names the store asks for."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def stat(self, digest: str) -> int | None:
        """The engine's size for a blob here (containerd's or not: a blob the cache keeps is the
        cheapest one to deliver), being filled or catalogued, and its download started.

        A size is the skip signal: containerd will not fetch the blob itself, so the daemon must
        complete it even if nothing reads it soon. Starting the download here, at containerd's
        first Info, also gets its chunks arriving before the first Read. A download that cannot
        fit the cache budget raises ResourceExhausted (containerd then tries to fetch the blob
        itself, through the mirror, which refuses it the same way, saying why). (Queueing them
        instead, two at a time in Info order, as `peersync.prefetch` does for the layers the daemon unpacks,
        was tried: the nodes of a site then start each blob at different moments, and the origin
        striping, which deals stripes among the nodes filling a blob at once, sent 1.5x the image
        over the uplink in one of two 4-node runs of tests/integration/test_cluster.py.)"""
        size = self.engine.known_size(digest)
        if size is not None:
            # claimed blobs are always completed in the background (with a transfer id of their
            # own, which `Engine.ensure` binds for the download's lines)
            self.engine.ensure(digest)
        return size

    async def read(self, digest: str, offset: int, size: int) -> bytes:
        """The engine's read: it waits, ahead of the background order, for the chunks the range
        needs and returns them verified, which is what the content store must hand containerd."""
        return await self.engine.read(digest, offset, size)


class ContentCache:
    """`snapshotter.content.CacheHooks` over the cache manager: what containerd does to blobs, for
    their last use, their popularity and the budget, and room for what containerd writes."""

    def __init__(self, cache: CacheManager) -> None:
        self.cache = cache

    def used(self, digest: str, request: bool) -> None:
        """A use of `digest` by containerd (an Info or a commit is a request)."""
        self.cache.used(digest, request)

    def changed(self) -> None:
        """A commit or a Delete: the cache manager checks the budget soon."""
        self.cache.changed()

    def admit_write(self, ref: str, size: int) -> None:
        """containerd writes a blob itself: room for it, or ResourceExhausted naming the budget."""
        self.cache.admit_write(ref, size)

    def wrote(self, ref: str) -> None:
        """The ingest exists: it counts itself from now on."""
        self.cache.wrote(ref)
