"""Layers the daemon unpacks itself: containerd's remote-snapshot handshake, snapshotter side.

Every pull path that unpacks through containerd's snapshotter API names, on each layer's Prepare,
the committed snapshot it wants (the metadata layer forwards only `containerd.io/snapshot/*` and
this label):

    containerd.io/snapshot.ref                 = <chain ID>   the committed snapshot wanted

That is all that containerd's own client sends for `Pull(WithPullUnpack)` (nerdctl with a
snapshotter it does not know, Go programs) and the 1.7/2.x unpacker. CRI (kubelet's pulls, with
`disable_snapshot_annotations = false`) adds labels naming the layer:

    containerd.io/snapshot/cri.layer-digest    = sha256:...   the layer blob
    containerd.io/snapshot/cri.manifest-digest = sha256:...   the image manifest naming it
    containerd.io/snapshot/cri.image-layers    = sha256:a,sha256:b,...   this layer and the next ones

If the snapshotter commits that snapshot itself and answers AlreadyExists, containerd neither
fetches the layer nor applies it (containerd-api.md, "Remote-snapshot handshake"). For us that
removes the slowest part of a pull through a proxy plugin: containerd reading the blob back with
one Read RPC per 32 KiB. Instead the daemon streams the blob into the snapshot while it arrives
from peers (`snapshotter.apply`), checking the uncompressed stream against the image config's
diff ID, so a snapshot committed under a chain ID always has exactly that content.

Which layer a chain ID is made of, and the chain it must sit on, is the `LayerSource`'s to say
(the daemon's comes from the manifests and configs it has seen, `kernel.store.chains`); the
snapshotter checks that the Prepare's parent snapshot is that chain. Once a layer is known, the
source also names the image's next layers (`plan`), and `snapshotter.unpacker` unpacks those
ahead of containerd's Prepares, several at once.

The snapshotter sees the network only through `LayerSource`, implemented in `peersync.layers`.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from kernel.store.chains import chain_ids

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12 on

REF_LABEL = "containerd.io/snapshot.ref"
LAYER_DIGEST_LABEL = "containerd.io/snapshot/cri.layer-digest"
MANIFEST_LABEL = "containerd.io/snapshot/cri.manifest-digest"
IMAGE_REF_LABEL = "containerd.io/snapshot/cri.image-ref"
LAYERS_LABEL = "containerd.io/snapshot/cri.image-layers"
UNPACKED_LABEL = "peersync.io/unpacked-layer"  # on snapshots we unpacked: the layer's digest

__all__ = [
    "BlobReader", "Layer", "LayerSource", "Planned", "chain_ids", "chain_of", "wants_layer",
    "REF_LABEL", "LAYER_DIGEST_LABEL", "MANIFEST_LABEL", "IMAGE_REF_LABEL", "LAYERS_LABEL", "UNPACKED_LABEL",
]  # fmt: skip


@dataclass(frozen=True)
class Layer:
    """A layer blob and what unpacking it must produce (checked against the image config)."""

    digest: str
    media_type: str
    size: int
    diff_id: str


@dataclass(frozen=True)
class Planned:
    """A layer of the same image further up: the chain ID it makes, on which parent chain."""

    chain: str
    parent: str


class LayerSource(Protocol):
    """Where the snapshotter gets layer blobs from (the daemon's store and download engine).

    Why a seam: the snapshotter is on the containerd side, which never imports the network side
    (ARCHITECTURE.md). It says here what the handshake needs, and `peersync.layers` adapts the
    content store and download engine to it; tests plug in a fake.
    """

    async def describe(self, target: str, parent: str, labels: Mapping[str, str]) -> Layer | None:
        """The layer snapshot `target` is made of when it sits on a snapshot of chain `parent`
        ("" for none), from what is known of the image's manifest and config; None if it cannot
        be provided here (unknown chain ID, another parent, no source for the blob).

        `labels` are the Prepare's (CRI's name the layer and manifest; others may carry only
        the chain ID). Knowing that target is layer L on chain `parent` is what makes answering
        AlreadyExists safe once L's diff ID is checked: containerd then trusts the committed
        snapshot to be `target` and never looks at the layer. None is always safe: containerd
        fetches and applies the layer as it would without us."""
        ...

    async def plan(self, target: str, labels: Mapping[str, str]) -> list[Planned]:
        """The layers of the image above `target`, bottom first, as far as they are known.

        containerd prepares an image's layers one after another, each only once the one below is
        committed; knowing the rest lets the snapshotter fetch and unpack them ahead."""
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
    """Whether a Prepare asks for a committed snapshot by its chain ID (the handshake's label)."""
    return labels is not None and _is_digest(labels.get(REF_LABEL, ""))


def _is_digest(value: str) -> bool:
    return value.startswith("sha256:") and len(value) == 71


def chain_of(name: str, labels: Mapping[str, str]) -> str | None:
    """The chain ID a committed snapshot holds: its `snapshot.ref` label (set by every unpacker
    that names chains, and by us), else its name's last part when containerd named it by the
    chain ID (`<ns>/<seq>/<chain ID>`, `ctr`'s unpack); None if neither says."""
    ref = labels.get(REF_LABEL, "")
    if _is_digest(ref):
        return ref
    last = name.rsplit("/", 1)[-1]
    return last if _is_digest(last) else None


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
