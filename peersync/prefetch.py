"""Blob downloads started ahead of their readers: in the order they were asked for, a few at a time.

Why: the origin striping between the nodes of a site (`peer.engine`) holds up when each node fills
a couple of blobs at once and frays when it fills many (bench/RESULTS.md: three layers at once cost
1.15-1.26x the image on the uplink, two kept it at 1.02x); and a layer's unpack can only start on
its first bytes, so the bottom layers should arrive first, not all layers at the same slow pace.
The layers the snapshotter unpacks (`peersync.layers`) go through it. (The blobs containerd was
told it need not fetch, `peersync.blobs`, do not: see `LazyBlobs.stat` for what that cost.)

A blob being read is always downloading: a read starts its download at once, queued or not. A
claimed blob is therefore always completed: at the latest when its turn in the queue comes.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterable

from kernel.errors import PeerSyncError
from peer.engine import Engine

DEFAULT_CONCURRENT = 2


class Prefetcher:
    """A FIFO of digests to download; `concurrent` of them are downloading at any time."""

    def __init__(self, engine: Engine, concurrent: int = DEFAULT_CONCURRENT) -> None:
        self.engine = engine
        self.concurrent = concurrent
        self._queue: list[str] = []
        self._active: set[str] = set()

    def add(self, digests: Iterable[str]) -> None:
        """Queue these blobs (in this order, after those already queued) unless queued already."""
        for digest in digests:
            if digest not in self._queue and digest not in self._active:
                self._queue.append(digest)
        self._pump()

    def _pump(self) -> None:
        while self._queue and len(self._active) < self.concurrent:
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
        """A download ended (complete or failed): the next one starts, not when its reader comes."""
        self._active.discard(digest)
        self._pump()
