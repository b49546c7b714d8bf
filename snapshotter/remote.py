"""Layers the daemon unpacks itself: containerd's remote-snapshot handshake, snapshotter side.

Kubelet's pulls (containerd's CRI plugin, with `disable_snapshot_annotations = false`) call
Prepare for each layer with labels naming the snapshot to produce and the layer it is made of:

    containerd.io/snapshot.ref                 = <chain ID>   the committed snapshot wanted
    containerd.io/snapshot/cri.layer-digest    = sha256:...   the layer blob
    containerd.io/snapshot/cri.manifest-digest = sha256:...   the image manifest naming it
    containerd.io/snapshot/cri.image-layers    = sha256:a,sha256:b,...   this layer and the next ones

If the snapshotter commits that snapshot itself and answers AlreadyExists, containerd neither
fetches the layer nor applies it (containerd-api.md, "Remote-snapshot handshake"). For us that
removes the slowest part of a pull through a proxy plugin: containerd reading the blob back with
one Read RPC per 32 KiB. Instead the daemon streams the blob into the snapshot while it arrives
from peers (`snapshotter.apply`), checking the uncompressed stream against the image config's
diff ID, so a snapshot committed under a chain ID always has exactly that content.

The snapshotter sees the network only through `LayerSource`, implemented in `peersync.layers`.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12 on

REF_LABEL = "containerd.io/snapshot.ref"
LAYER_DIGEST_LABEL = "containerd.io/snapshot/cri.layer-digest"
MANIFEST_LABEL = "containerd.io/snapshot/cri.manifest-digest"
IMAGE_REF_LABEL = "containerd.io/snapshot/cri.image-ref"
LAYERS_LABEL = "containerd.io/snapshot/cri.image-layers"
UNPACKED_LABEL = "peersync.io/unpacked-layer"  # on snapshots we unpacked: the layer's digest


@dataclass(frozen=True)
class Layer:
    """A layer blob and what unpacking it must produce (checked against the image config)."""

    digest: str
    media_type: str
    size: int
    diff_id: str


class LayerSource(Protocol):
    """Where the snapshotter gets layer blobs from (the daemon's store and download engine).

    Why a seam: the snapshotter is on the containerd side, which never imports the network side
    (ARCHITECTURE.md). It says here what the handshake needs, and `peersync.layers` adapts the
    content store and download engine to it; tests plug in a fake.
    """

    async def describe(self, target: str, labels: Mapping[str, str]) -> Layer | None:
        """The layer snapshot `target` is made of, verified against the image's manifest and
        config (the chain ID must match); None if it cannot be provided here.

        The check is what makes answering AlreadyExists safe: containerd then trusts the
        committed snapshot to be `target` and never looks at the layer. None is always safe:
        containerd fetches and applies the layer as it would without us."""
        ...

    def prefetch(self, digests: Sequence[str]) -> None:
        """Download these blobs in the background, in this order (best effort): the next layers
        keep arriving while earlier ones are unpacked.

        containerd prepares an image's layers one after another, each only once the one below
        is committed; without this, each download would start only when its turn came."""
        ...

    async def read(self, digest: str, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of a described blob, waiting until they have arrived.

        Waiting, not failing, is what lets a layer be unpacked while it downloads (`BlobReader`
        reads it chunk by chunk from the unpacking thread)."""
        ...

    async def release(self, digest: str) -> None:
        """The last snapshot unpacked from `digest` is gone.

        containerd never fetched such a blob, so its GC will not delete it for us: the source
        decides whether the blob is still needed (containerd may have taken it since)."""
        ...


def wants_layer(labels: Mapping[str, str] | None) -> bool:
    """Whether a Prepare asks for a specific layer's snapshot (the handshake's labels are there)."""
    return labels is not None and REF_LABEL in labels and LAYER_DIGEST_LABEL in labels


def upcoming(labels: Mapping[str, str]) -> list[str]:
    """The layer being prepared and the ones after it, per the CRI labels (which CRI truncates
    to fit a label, so the list may end early)."""
    digests = [d for d in labels.get(LAYERS_LABEL, "").split(",") if d.startswith("sha256:")]
    first = labels[LAYER_DIGEST_LABEL]
    if first not in digests:
        digests.insert(0, first)
    return digests[digests.index(first) :]


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """containerd's identity.ChainIDs: chain[0] = diff[0], chain[i] = sha256(chain[i-1] + " " + diff[i])."""
    chain: list[str] = []
    for diff_id in diff_ids:
        if not chain:
            chain.append(diff_id)
        else:
            chain.append("sha256:" + hashlib.sha256(f"{chain[-1]} {diff_id}".encode()).hexdigest())
    return chain


class BlobReader(io.RawIOBase):
    """A blocking file object over `LayerSource.read`, for the unpacking worker thread.

    Reads are cut at `piece` boundaries (the store's chunk size), so each waits for exactly one
    chunk: unpacking follows the download chunk by chunk."""

    def __init__(
        self, source: LayerSource, layer: Layer, loop: asyncio.AbstractEventLoop, piece: int = 1 << 20
    ) -> None:
        self._source = source
        self._layer = layer
        self._loop = loop
        self._piece = piece
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Buffer) -> int:
        view = memoryview(buffer)  # a bytearray or memoryview from io's read()
        size = self._layer.size
        if self._pos >= size or not len(view):
            return 0
        end = min(size, self._pos + len(view), (self._pos // self._piece + 1) * self._piece)
        future = asyncio.run_coroutine_threadsafe(
            self._source.read(self._layer.digest, self._pos, end - self._pos), self._loop
        )
        data = future.result()
        if len(data) != end - self._pos:
            raise OSError(f"layer {self._layer.digest}: short read at {self._pos}")
        view[: len(data)] = data
        self._pos = end
        return len(data)
