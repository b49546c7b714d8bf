"""The preparer's decisions, against a recording stand-in for containerd's API (the real API is
driven in tests/integration/test_client_unpack.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from kernel.errors import Unavailable
from kernel.store.chains import INDEX_TYPES
from snapshotter.containerd_client import ContainerdClient, ImageRecord
from snapshotter.preparer import ChainPreparer, ImageOf
from snapshotter.remote import Planned

MANIFEST, CONFIG, INDEX = "sha256:" + "m" * 64, "sha256:" + "c" * 64, "sha256:" + "i" * 64
LAYERS = ["sha256:" + c * 64 for c in "123"]
CHAINS = [
    Planned("sha256:" + c * 64, "" if i == 0 else "sha256:" + "xyz"[i - 1] * 64) for i, c in enumerate("xyz")
]


class Images:
    def __init__(self, index: bool = False) -> None:
        self.index = index

    def image_with(self, layer: str) -> ImageOf | None:
        return ImageOf(MANIFEST, CONFIG) if layer in LAYERS else None

    async def chains_of(self, manifest: str) -> Sequence[Planned]:
        return CHAINS if manifest == MANIFEST else []

    async def lists_manifest(self, index: str, manifest: str) -> bool:
        return self.index and index == INDEX and manifest == MANIFEST


class Containerd(ContainerdClient):
    """Records the calls; `provide` says which chains our snapshotter would provide."""

    def __init__(
        self, records: list[ImageRecord], provide: set[str] | None = None, hang: bool = False
    ) -> None:
        super().__init__(Path("/nonexistent.sock"), "peersync")
        self.records = records
        self.provide = {p.chain for p in CHAINS} if provide is None else provide
        self.hang = hang
        self.calls: list[tuple[str, ...]] = []
        self.committed: set[str] = set()
        self.labels: dict[str, str] = {}  # the config's, as the client's unpack leaves them

    async def images(self, target: str = "", media_types: tuple[str, ...] = ()) -> list[ImageRecord]:
        self.calls.append(("images", target, ",".join(media_types)))
        return [r for r in self.records if (target and r.target == target) or r.media_type in media_types]

    async def create_lease(self, namespace: str, ttl: float) -> str:
        self.calls.append(("lease", namespace))
        return "lease-1"

    async def exists(self, namespace: str, name: str) -> bool:
        return name in self.committed

    async def content_labels(self, namespace: str, digest: str) -> dict[str, str]:
        return dict(self.labels) if digest == CONFIG else {}

    async def delete_lease(self, namespace: str, lease: str) -> None:
        self.calls.append(("delete lease", namespace, lease))

    async def prepare_chain(self, namespace: str, lease: str, chain: str, parent: str) -> bool:
        if self.hang:
            await asyncio.sleep(3600)
        self.calls.append(("prepare", namespace, lease, chain, parent))
        if chain not in self.provide:
            return False
        self.committed.add(chain)
        return True


OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def image(
    namespace: str, target: str = MANIFEST, media_type: str = OCI_MANIFEST, updated: int = 1
) -> ImageRecord:  # noqa: E501
    return ImageRecord(namespace, target, media_type, updated)


def prepares(client: Containerd) -> list[tuple[str, ...]]:
    return [c for c in client.calls if c[0] == "prepare"]


async def test_a_layer_info_holds_the_config_read_until_every_chain_is_prepared_in_order() -> None:
    client = Containerd([image("default")])
    preparer = ChainPreparer(client, Images())
    preparer.noticed(CONFIG)  # the config's own Info: not a layer
    assert not preparer.gated(CONFIG)
    preparer.noticed(LAYERS[1])
    assert preparer.gated(CONFIG) and not preparer.gated(LAYERS[1])
    await preparer.settled(CONFIG)
    assert prepares(client) == [("prepare", "default", "lease-1", p.chain, p.parent) for p in CHAINS]
    assert preparer.prepared == 3
    assert not preparer.gated(CONFIG)  # the next Reads go straight through
    await preparer.close()


async def test_the_namespace_is_the_one_whose_image_changed_last() -> None:
    client = Containerd([image("k8s.io", updated=5), image("default", updated=9), image("old", updated=1)])
    preparer = ChainPreparer(client, Images())
    preparer.noticed(LAYERS[0])
    await preparer.settled(CONFIG)
    assert {c[1] for c in prepares(client)} == {"default"}


async def test_an_image_whose_target_is_an_index_listing_the_manifest_is_found() -> None:
    client = Containerd([image("default", target=INDEX, media_type=INDEX_TYPES[0])])
    preparer = ChainPreparer(client, Images(index=True))
    preparer.noticed(LAYERS[0])
    await preparer.settled(CONFIG)
    assert len(prepares(client)) == 3


async def test_no_containerd_image_of_the_manifest_prepares_nothing_and_lets_the_read_go() -> None:
    client = Containerd([image("default", target=INDEX, media_type=INDEX_TYPES[0])])
    preparer = ChainPreparer(client, Images(index=False))  # the index does not list it
    preparer.noticed(LAYERS[0])
    await preparer.settled(CONFIG)
    assert prepares(client) == [] and ("lease", "default") not in client.calls
    assert not preparer.gated(CONFIG)


async def test_a_chain_the_snapshotter_cannot_provide_stops_the_preparation_there() -> None:
    client = Containerd([image("default")], provide={CHAINS[0].chain})
    preparer = ChainPreparer(client, Images())
    preparer.noticed(LAYERS[0])
    await preparer.settled(CONFIG)
    assert [c[3] for c in prepares(client)] == [CHAINS[0].chain, CHAINS[1].chain]  # not the third
    assert preparer.prepared == 1


async def test_chains_containerd_has_already_are_not_prepared_again() -> None:
    client = Containerd([image("default")])
    client.committed = {CHAINS[0].chain, CHAINS[1].chain}
    preparer = ChainPreparer(client, Images())
    preparer.noticed(LAYERS[2])
    await preparer.settled(CONFIG)
    assert [c[3] for c in prepares(client)] == [CHAINS[2].chain]


async def test_containerd_unreachable_lets_the_client_apply_the_layers_itself() -> None:
    class Down(Containerd):
        async def images(self, target: str = "", media_types: tuple[str, ...] = ()) -> list[ImageRecord]:
            raise Unavailable("containerd at /nonexistent.sock: connection refused")

    preparer = ChainPreparer(Down([]), Images())
    preparer.noticed(LAYERS[0])
    await preparer.settled(CONFIG)  # returns, logs a warning
    assert not preparer.gated(CONFIG)


async def test_a_preparation_that_hangs_holds_the_read_for_wait_seconds_at_most() -> None:
    client = Containerd([image("default")], hang=True)
    preparer = ChainPreparer(client, Images(), wait=0.2)
    preparer.noticed(LAYERS[0])
    await asyncio.wait_for(preparer.settled(CONFIG), 5)
    await asyncio.wait_for(preparer.settled(CONFIG), 5)  # a second reader joins, bounded the same
    await preparer.close()  # cancels it
    assert not preparer.gated(CONFIG)


async def test_concurrent_reads_of_the_config_share_one_preparation() -> None:
    client = Containerd([image("default")])
    preparer = ChainPreparer(client, Images())
    preparer.noticed(LAYERS[0])
    preparer.noticed(LAYERS[1])  # the image's other layers: the same pending image
    await asyncio.gather(*(preparer.settled(CONFIG) for _ in range(5)))
    assert len(prepares(client)) == 3 and client.calls.count(("lease", "default")) == 1


@pytest.mark.parametrize("digest", [CONFIG, MANIFEST, "sha256:" + "0" * 64])
async def test_blobs_that_are_no_layer_of_a_known_image_gate_nothing(digest: str) -> None:
    preparer = ChainPreparer(Containerd([]), Images())
    preparer.noticed(digest)
    assert not preparer.gated(CONFIG) and not preparer.gated(digest)


async def test_our_lease_goes_once_the_client_labels_the_config_with_its_top_chain() -> None:
    """Until then it keeps the new chains from containerd's GC; after, the image's label does,
    and they go with the image (a lease left an hour would keep them after `ctr images rm`)."""
    client = Containerd([image("default")])
    preparer = ChainPreparer(client, Images())
    preparer.noticed(LAYERS[0])
    await preparer.settled(CONFIG)
    await asyncio.sleep(0.5)
    assert ("delete lease", "default", "lease-1") not in client.calls  # the client has not labelled it
    client.labels = {"containerd.io/gc.ref.snapshot.peersync": CHAINS[-1].chain}
    for _ in range(50):
        if ("delete lease", "default", "lease-1") in client.calls:
            break
        await asyncio.sleep(0.1)
    assert ("delete lease", "default", "lease-1") in client.calls
    await preparer.close()


async def test_a_lease_nothing_was_prepared_under_is_deleted_at_once() -> None:
    client = Containerd([image("default")], provide=set())
    preparer = ChainPreparer(client, Images())
    preparer.noticed(LAYERS[0])
    await preparer.settled(CONFIG)
    for _ in range(20):
        if ("delete lease", "default", "lease-1") in client.calls:
            break
        await asyncio.sleep(0.05)
    assert ("delete lease", "default", "lease-1") in client.calls
    await preparer.close()
