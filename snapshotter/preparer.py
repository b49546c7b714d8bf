"""An image's chains committed in containerd ahead of a client that would apply its layers itself.

The client: containerd 1.6's `ctr images pull` (and any program pulling with `client.Fetch` and
then `image.Unpack`). Its Prepares carry no label naming the snapshot it wants, so the
remote-snapshot handshake (`snapshotter.remote`) never starts: it fetches, then for each layer asks
containerd's metadata for a snapshot named by the chain ID and, finding none, applies the layer
itself, reading the blob back through our content store one 32 KiB Read RPC at a time, layer after
layer, after the whole transfer (bench/RESULTS.md, issue 13: 1.1-2.3x mirror-only's time).

What we do instead, in three steps, each tied to a message containerd sends us anyway:

1. **Notice.** Fetching, the client opens a writer for every blob, and containerd's metadata asks
   our content store for the blob's Info first (it answers from peers lazily, so nothing is
   written, and the engine starts downloading). Info of a *layer* blob is the signal: the CRI and
   Go-client paths never fetch a layer whose chain we provide, so only a client that will apply
   it itself asks. We note the image whose manifest (most recently served by the mirror) lists
   that layer; nothing else happens yet.
2. **Hold the client's unpack.** The client's unpack starts by reading the image config (for the
   diff IDs) through our content store. A Read of a noticed image's config waits while step 3
   runs (at most `wait` seconds): then every `Stat(chain ID)` of the client finds its layer
   committed, and it applies nothing.
3. **Prepare.** The calls containerd makes to a proxy plugin carry no namespace, so we ask
   containerd which namespace has an image of that manifest (its target, or an index listing
   it; the client created it when its fetch ended, a moment ago), and then call containerd's
   snapshots API there ourselves, bottom layer first, exactly as containerd's Go unpacker does
   (`snapshotter.containerd_client`), under a lease of ours that is deleted again once the
   client's unpack has labelled the image config with the top chain (we look at the config's
   labels through containerd's content API: its metadata keeps labels to itself). containerd
   forwards each Prepare to our snapshotter with the chain ID label, and the handshake runs as
   for CRI: the first one plans the image's other layers and unpacks them ahead, several at
   once, while their chunks arrive; each Prepare commits its chain and answers AlreadyExists,
   and containerd records the chain.

Nothing here can commit a wrong layer: every chain is still provided by the handshake, which
checks the chain against the image's manifest and config and the unpacked stream against the diff
ID. When a chain cannot be provided (unknown, another parent, no source) or containerd is not
reachable, the preparation stops, the Read goes on, and the client applies the rest itself as it
always did. If a client Stats a chain that we commit a moment later, its own commit of that chain
gets AlreadyExists, which `rootfs.ApplyLayerWithOpts` takes as done.

A client that pulls with another snapshotter (`ctr images pull` without `--snapshotter peersync`
while this content store is containerd's) gets our snapshots for nothing; they go with the lease
(`lease_ttl`). Set `[snapshotter] containerd_address = ""` on nodes used that way.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
import structlog

from kernel.errors import PeerSyncError
from kernel.logging import in_transfer
from kernel.store.chains import INDEX_TYPES
from snapshotter.containerd_client import SNAPSHOT_REF_LABEL, ContainerdClient
from snapshotter.remote import Planned

log = structlog.get_logger(__name__)

LEASE_TTL = 3600.0  # seconds our lease keeps prepared chains from containerd's GC, at most
LABEL_POLL = 0.2  # seconds between looks at the config's labels, until the client's unpack set them


@dataclass(frozen=True)
class ImageOf:
    """The image a layer blob was last seen in: its manifest and config digests."""

    manifest: str
    config: str


class Images(Protocol):
    """What the preparer needs to know of images (the daemon's chain index), consumer side.

    Why a seam: which images exist is learnt on the network side (the mirror notes every manifest
    it serves); `peersync.layers.DaemonLayers` answers from the chain index."""

    def image_with(self, layer: str) -> ImageOf | None:
        """The image whose manifest, of those listing blob `layer`, was seen last; None if the
        blob is no known image's layer. Cheap: called on every Info containerd sends."""
        ...

    async def chains_of(self, manifest: str) -> Sequence[Planned]:
        """The image's layers as (chain ID, parent chain ID), bottom first; empty if its config
        cannot be read."""
        ...

    async def lists_manifest(self, index: str, manifest: str) -> bool:
        """Whether image index `index` (a blob here or at peers) lists `manifest`."""
        ...


@dataclass(eq=False)
class _Run:
    image: ImageOf
    task: asyncio.Task[None] | None = None


class ChainPreparer:
    """Images noticed and not prepared yet, by config digest (what the client's unpack reads)."""

    def __init__(
        self, client: ContainerdClient, images: Images, wait: float = 600.0, lease_ttl: float = LEASE_TTL
    ) -> None:
        self.client = client
        self.images = images
        self.wait = wait
        self.lease_ttl = lease_ttl
        self._runs: dict[str, _Run] = {}
        self._releasing: set[asyncio.Task[None]] = set()
        self.prepared = 0  # chains committed through containerd (the metrics' and tests' count)

    def noticed(self, digest: str) -> None:
        """containerd asked for the Info of blob `digest` (a client is fetching it)."""
        image = self.images.image_with(digest)
        if image is None or image.config in self._runs:
            return
        self._runs[image.config] = _Run(image)  # before anything is awaited: the client reads it next

    def gated(self, digest: str) -> bool:
        """Whether a Read of `digest` must wait (`settled`): it is the config of an image noticed
        and not prepared yet. A dict lookup: it is asked on every Read."""
        return digest in self._runs

    async def settled(self, digest: str) -> None:
        """Prepare the image with config `digest` (once; concurrent readers join), and return when
        that is over, or after `wait` seconds."""
        run = self._runs.get(digest)
        if run is None:
            return
        if run.task is None:
            with in_transfer(image=run.image.manifest):
                run.task = asyncio.create_task(self._run(run), name=f"prepare {run.image.manifest[:19]}")
        await asyncio.wait([asyncio.shield(run.task)], timeout=self.wait)

    async def close(self) -> None:
        tasks = [r.task for r in self._runs.values() if r.task is not None and not r.task.done()]
        tasks += list(self._releasing)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        self._runs.clear()
        await asyncio.to_thread(self.client.close)

    # --- one preparation

    async def _run(self, run: _Run) -> None:
        started = time.monotonic()
        manifest = run.image.manifest
        try:
            namespace = await self._namespace_of(manifest)
            if namespace is None:
                log.info("no containerd image of this manifest yet; nothing prepared", manifest=manifest)
                return
            log.info("holding a client's unpack until the image's chains are committed", namespace=namespace)
            committed = await self._prepare(namespace, run.image)
            log.info(
                "committed an image's chains for a client that unpacks itself",
                namespace=namespace,
                chains=committed,
                seconds=round(time.monotonic() - started, 2),
            )
        except (PeerSyncError, grpc.RpcError, OSError) as exc:
            detail = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
            log.warning("preparing an image's chains failed; the client applies them itself", error=detail)
        finally:
            if self._runs.get(run.image.config) is run:
                del self._runs[run.image.config]

    async def _namespace_of(self, manifest: str) -> str | None:
        """The namespace of the most recently changed containerd image of `manifest` (its target,
        or an index listing it): the one whose client reads the config now."""
        records = await self.client.images(target=manifest)
        if not records:
            records = [
                r for r in await self.client.images(media_types=INDEX_TYPES)
                if await self.images.lists_manifest(r.target, manifest)
            ]  # fmt: skip
        if not records:
            return None
        return max(records, key=lambda r: r.updated_ns).namespace

    async def _prepare(self, namespace: str, image: ImageOf) -> int:
        """Prepare the image's chains bottom first; returns how many were committed here. Stops
        at the first chain containerd's metadata has no committed snapshot for afterwards."""
        chains = await self.images.chains_of(image.manifest)
        if not chains:
            return 0
        lease = await self.client.create_lease(namespace, self.lease_ttl)
        committed = 0
        try:
            for step in chains:
                if await self.client.exists(namespace, step.chain):
                    continue
                if not await self.client.prepare_chain(namespace, lease, step.chain, step.parent):
                    log.info(
                        "a chain was not provided; the client applies it and those above", chain=step.chain
                    )
                    break
                committed += 1
                self.prepared += 1
        finally:
            task = asyncio.create_task(self._release(namespace, image.config, lease, committed > 0))
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)
        return committed

    async def _release(self, namespace: str, config: str, lease: str, wait_for_client: bool) -> None:
        """Delete our lease once the client's unpack has labelled the image config with its top
        chain (then that label keeps the chains from GC, and they go with the image), or at once
        when nothing was prepared under it; if the label never comes within `wait`, the lease
        expires by itself (`lease_ttl`)."""
        label = SNAPSHOT_REF_LABEL.format(name=self.client.name)
        deadline = time.monotonic() + self.wait
        try:
            while wait_for_client:
                if label in await self.client.content_labels(namespace, config):
                    break
                if time.monotonic() >= deadline:
                    log.info("the client never labelled the image; our lease expires by itself", lease=lease)
                    return
                await asyncio.sleep(LABEL_POLL)
            await self.client.delete_lease(namespace, lease)
        except (PeerSyncError, grpc.RpcError, OSError) as exc:
            detail = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
            log.info("our lease could not be deleted; it expires by itself", lease=lease, error=detail)


__all__ = ["ChainPreparer", "ImageOf", "Images", "LEASE_TTL"]
