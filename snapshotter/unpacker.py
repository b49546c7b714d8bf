"""An image's layers unpacked ahead of containerd's Prepares, several at once.

Why: containerd prepares an image's layers one after another, each only once the one below it is
committed, so a daemon that unpacked a layer only when its Prepare came would unpack one layer at
a time on one core. Once the `LayerSource` knows the image's other layers (`LayerSource.plan`),
their blobs can be fetched at once and each unpacked as soon as its bytes stream in, on the
second core, before containerd asks for it.

A layer can be unpacked before its parents are complete because the applier reads them only to
copy up a missing parent directory (`apply.Lowers`): then, and only then, the job waits until a
committed snapshot of its parent chain exists, and reads that. So the result is exactly what
unpacking on the committed parents gives.

A job unpacks into a staging directory (`<root>/unpacking/<token>/fs`, beside `snapshots/` on the
same filesystem), which is nobody's snapshot: containerd's GC never sees it and `cleanup` never
touches it. It becomes a snapshot only when containerd's Prepare for its chain ID arrives on a
parent of the right chain (`Snapshotter._provide` renames it into place). A staged layer nobody
claims within `ttl` seconds is deleted, and the source told (`on_discard`); leftovers of a crash
are deleted when the unpacker starts.

Bounds: at most `concurrency` speculative jobs run at once (each holds a few 1 MiB buffers:
`snapshotter.apply`). Each runs in a thread of its own, never in the event loop's default
executor: a job blocks its thread while it waits for the blob's next chunk, and the chunk can only
arrive through that executor (the store's writes and reads run there), so jobs there would starve
the very downloads they wait for (seen on the testbed with 8 jobs and the default 6 threads). The
layer containerd is waiting for is never queued behind them: `take` starts it at once. That is
also why a job waiting for its parents cannot deadlock the queue: the parent it waits for is
either committed, or the one containerd waits for (running), or one containerd applies itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import shutil
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from kernel.errors import Unavailable
from kernel.logging import in_transfer
from snapshotter.apply import Lowers, apply_layer
from snapshotter.remote import BlobReader, Layer, LayerSource

log = structlog.get_logger(__name__)

STAGING_PREFIX = "unpack-"
DEFAULT_TTL = 600.0  # seconds a staged, unclaimed layer is kept


@dataclass(eq=False)
class _Job:
    chain: str
    parent: str
    layer: Layer
    dir: Path | None = None
    task: asyncio.Task[None] | None = None
    done_at: float | None = None
    urgent: bool = False
    discarded: bool = False


class Unpacker:
    """Layer jobs keyed by chain ID: queued, running, or staged and waiting to be taken.

    `lowers(chain)` returns the upper directories (nearest first) of a committed snapshot of
    `chain`, or None while there is none; `committed()` must be called after every commit so that
    jobs waiting for their parents look again. `on_discard(digest)` is awaited when a staged layer
    is dropped unclaimed (the source may then release the blob)."""

    def __init__(
        self,
        staging: Path,
        source: LayerSource,
        lowers: Callable[[str], Sequence[Path] | None],
        on_discard: Callable[[str], Awaitable[None]],
        concurrency: int = 2,
        ttl: float = DEFAULT_TTL,
    ) -> None:
        self.staging = staging
        self.source = source
        self._lowers = lowers
        self._on_discard = on_discard
        self.concurrency = concurrency
        self.ttl = ttl
        self._jobs: dict[str, _Job] = {}
        self._queue: list[_Job] = []
        self._running = 0
        self._commits = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        shutil.rmtree(staging, ignore_errors=True)  # a previous run's jobs: nobody's snapshots
        staging.mkdir(mode=0o700, parents=True, exist_ok=True)

    @property
    def running(self) -> int:
        """Layer unpacks running now (the metrics' unpacks in flight)."""
        return self._running

    def known(self, chain: str) -> bool:
        """Whether a job for `chain` is queued, running or staged."""
        return chain in self._jobs

    def schedule(self, jobs: Sequence[tuple[str, str, Layer]]) -> None:
        """Queue (chain, parent chain, layer) jobs, bottom layer first, unless known already."""
        for chain, parent, layer in jobs:
            if chain not in self._jobs:
                job = _Job(chain, parent, layer)
                self._jobs[chain] = job
                self._queue.append(job)
        self._pump()

    async def take(self, chain: str, parent: str, layer: Layer) -> Path:
        """The staged directory of `chain` unpacked on `parent` (its `fs` holds the layer, its
        `work` is empty): joins the job if there is one, else unpacks now. The directory is the
        caller's from then on. Raises what the unpack raised (the job is forgotten, so the next
        `take` tries afresh)."""
        job = self._jobs.get(chain)
        if job is None or job.parent != parent:
            job = _Job(chain, parent, layer)
            self._jobs[chain] = job
        job.urgent = True
        if job.task is None:
            with contextlib.suppress(ValueError):
                self._queue.remove(job)
            self._start(job)
        assert job.task is not None
        try:
            await asyncio.shield(job.task)  # a cancelled Prepare leaves the job staged for a retry
        except asyncio.CancelledError:
            if not job.task.done():
                job.urgent = False  # nobody waits any more: it expires unless taken
            raise
        except BaseException:
            if self._jobs.get(chain) is job:
                del self._jobs[chain]
            raise
        if job.discarded or job.dir is None:
            raise Unavailable(f"unpacked layer for {chain} was discarded")
        del self._jobs[chain]
        staged, job.dir = job.dir, None
        return staged

    def committed(self) -> None:
        """A snapshot was committed: jobs waiting for their parents look again."""
        self._commits.set()
        self._commits = asyncio.Event()

    async def close(self) -> None:
        """Stop every job and delete what is staged."""
        self._queue.clear()
        tasks = [j.task for j in self._jobs.values() if j.task is not None and not j.task.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        self._jobs.clear()
        await asyncio.to_thread(shutil.rmtree, self.staging, True)

    # --- running jobs

    def _pump(self) -> None:
        while self._queue and self._running < self.concurrency:
            self._start(self._queue.pop(0))

    def _start(self, job: _Job) -> None:
        self._running += 1
        with in_transfer(layer=job.layer.digest):  # the Prepare's transfer when it is urgent
            if not job.urgent:
                log.info("unpacking a layer ahead", chain=job.chain, layer=job.layer.digest)
            job.task = asyncio.create_task(self._unpack(job), name=f"unpack {job.chain[:19]}")
        job.task.add_done_callback(functools.partial(self._finished, job))

    def _finished(self, job: _Job, _task: asyncio.Task[None]) -> None:
        self._running -= 1
        self._pump()
        assert job.task is not None
        if job.task.cancelled() or job.task.exception() is not None:
            if not job.urgent:  # nobody waits: say why once, and let a Prepare try afresh
                error = "cancelled" if job.task.cancelled() else repr(job.task.exception())
                log.info("unpacking ahead failed", chain=job.chain, layer=job.layer.digest, error=error)
                self._drop(job)
            return
        job.done_at = time.monotonic()
        if not job.urgent:
            asyncio.get_running_loop().call_later(self.ttl, self._expire, job)

    def _expire(self, job: _Job) -> None:
        if self._jobs.get(job.chain) is not job or job.urgent:
            return
        log.info("dropping a layer unpacked ahead that containerd never asked for", chain=job.chain)
        self._drop(job)

    def _drop(self, job: _Job) -> None:
        """Forget a job nobody waits for; its directory goes, and the source hears of its blob."""
        if self._jobs.get(job.chain) is job:
            del self._jobs[job.chain]
        job.discarded = True
        task = asyncio.create_task(self._discard(job))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _discard(self, job: _Job) -> None:
        if job.dir is not None:
            await asyncio.to_thread(shutil.rmtree, job.dir, True)
            job.dir = None
        if not any(j.layer.digest == job.layer.digest for j in self._jobs.values()):
            await self._on_discard(job.layer.digest)  # no other job reads that blob

    async def _unpack(self, job: _Job) -> None:
        """Unpack the job's layer into a fresh staging directory (removed again on failure)."""
        directory = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.staging))
        (directory / "fs").mkdir(mode=0o755)
        (directory / "work").mkdir(mode=0o711)
        loop = asyncio.get_running_loop()
        reader = BlobReader(self.source, job.layer, loop)
        parents: Sequence[Path] | Lowers = ()
        if job.parent:
            parents = Lowers(lambda: asyncio.run_coroutine_threadsafe(self._wait_lowers(job), loop).result())
        try:
            await _in_own_thread(
                functools.partial(
                    apply_layer, reader, job.layer.media_type, directory / "fs", parents, job.layer.diff_id
                )
            )
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, directory, True)
            raise
        job.dir = directory
        log.debug("layer unpacked", chain=job.chain, layer=job.layer.digest, ahead=not job.urgent)

    async def _wait_lowers(self, job: _Job) -> Sequence[Path]:
        """The parent chain's directories once a committed snapshot of it exists (`ttl` at most)."""
        deadline = time.monotonic() + self.ttl
        while True:
            event = self._commits
            lowers = self._lowers(job.parent)
            if lowers is not None:
                return lowers
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unavailable(f"parent {job.parent} of {job.chain} was never committed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)


async def _in_own_thread(fn: Callable[[], object]) -> None:
    """Run `fn` in a new thread and wait for it (see "Bounds" above for why not the executor).

    Cancelling the wait does not stop the thread: it ends when its reads fail or the layer is
    done, and its result is dropped."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if done.done():
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def run() -> None:
        error: BaseException | None = None
        try:
            fn()
        except BaseException as exc:  # handed to the waiting task
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=run, name="layer-unpack", daemon=True).start()
    await done
