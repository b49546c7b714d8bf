"""Proactive replication of site-hot blobs: the small background task around
`peer.policy.replication`, whose docstring has the trigger and the bounds.

Every `tick` seconds it asks the policy whether this node is idle and which hot blob, if any, to
copy; it starts that download peers-only (`Engine.ensure(peers_only=True)`: never the origin)
through the usual admission, and waits for it to end before it considers another. A blob whose
replication failed, or that the cache manager refused or evicted lately, is shunned for
`SHUN_FOR` seconds. The replica is an ordinary cache-only blob.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import structlog

from kernel.errors import NotFound, PeerSyncError
from peer.cache import CacheManager, SiteView
from peer.catalog import Source
from peer.engine import Engine
from peer.policy import replication
from peer.policy.replication import Limits

log = structlog.get_logger(__name__)

TICK = 10.0  # seconds between two looks
SHUN_FOR = 600.0  # seconds a failed or refused replication is not tried again


class _Here:
    """`in` answers whether the blob is complete or partial in the store (a Container)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def __contains__(self, digest: object) -> bool:
        if not isinstance(digest, str):
            return False
        if self._engine.store.exists(digest):
            return True
        try:
            self._engine.store.partials.record(digest)
        except NotFound:
            return False
        return True


class Replicator:
    """One node's replication loop. Lifecycle: `start()`, then `await stop()`."""

    def __init__(
        self,
        engine: Engine,
        cache: CacheManager,
        site: SiteView,
        limits: Limits | None = None,
        tick: float = TICK,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.cache = cache
        self.site = site
        self.limits = limits if limits is not None else Limits()
        self.tick = tick
        self.clock = clock  # the engine's clock: monotonic, as `Engine.idle_since`
        self.started = 0  # replications started since start-up
        self._last_started = float("-inf")
        self._shunned: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="replication")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            try:
                await self.step()
            except PeerSyncError as exc:  # one failed round must not end the loop
                log.warning("replication round failed", error=str(exc))

    def shunned(self) -> set[str]:
        """Digests not to replicate now: failed or refused lately, or evicted lately."""
        now = self.clock()
        self._shunned = {d: t for d, t in self._shunned.items() if now - t < SHUN_FOR}
        return set(self._shunned) | self.cache.recently_evicted()

    async def step(self) -> str | None:
        """One look: start (and wait for) the replication the policy picks; the digest, or None."""
        now = self.clock()
        if not replication.idle(self.engine.idle_since(), self._last_started, now, self.limits):
            return None
        hot = replication.pick(self.site.hot(), _Here(self.engine), self.shunned(), self.cache.room(),
                               self.limits)
        if hot is None:
            return None
        source = self.engine.catalog.lookup(hot.digest) or Source(hot.digest, hot.size, "", "", "")
        self._last_started = now
        try:
            download = self.engine.ensure(hot.digest, peers_only=True, source=source)
        except PeerSyncError as exc:
            self._shunned[hot.digest] = now
            log.info("replication not started", digest=hot.digest, error=str(exc))
            return None
        if download is None:
            return None
        self.started += 1
        log.info("replicating a site-hot blob from peers", digest=hot.digest, size=hot.size,
                 requests=hot.requests, replicas=hot.replicas)
        await asyncio.shield(download.task)
        if download.error is not None:
            self._shunned[hot.digest] = self.clock()
        return hot.digest


__all__ = ["Replicator"]
