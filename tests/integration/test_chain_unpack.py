"""Layers named by the chain ID alone, through a real containerd: the Prepares of containerd's Go
client `Pull(WithPullUnpack)` (nerdctl's path for a snapshotter it does not know; containerd
1.7/2.x's unpacker), driven over containerd's snapshots API by `testbed.chainunpack`.

The daemon has seen the image's manifest through its registry mirror (as the client's resolver
reaches it through hosts.toml) and reads the config itself; each Prepare carries only
`containerd.io/snapshot.ref`. The daemon must unpack every layer, and the result must be the
rootfs containerd's own unpack gives; containerd must never have fetched a layer.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from snapshotter.remote import chain_ids
from testbed.chainunpack import APPLY, PROVIDED, unpack_by_chain_ids
from testbed.containerd import ContainerdFactory
from testbed.images import BuiltImage, compare_manifests, snapshot_tree
from testbed.loopback import SNAPSHOTTER, LoopbackNode, start_node
from testbed.procs import free_port
from testbed.registry import Registry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

NodeFactory = Callable[..., LoopbackNode]
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
)


@pytest.fixture
def make_node(tmp_path: Path, registry: Registry) -> Iterator[NodeFactory]:
    with ExitStack() as stack:

        def make(peers: list[str] | None = None) -> LoopbackNode:
            port = free_port()
            return stack.enter_context(
                start_node(tmp_path / f"node-{port}", port, peers or [], registry.address)
            )

        yield make


def resolve_through_mirror(node: LoopbackNode, ref: str) -> None:
    """The client's resolve: the image manifest from the node's mirror (hosts.toml's first host)."""
    registry, _, rest = ref.partition("/")
    repo, _, tag = rest.rpartition(":")
    url = f"http://{node.daemon.mirror}/v2/{repo}/manifests/{tag}?ns={registry}"
    request = urllib.request.Request(url, headers={"Accept": MANIFEST_TYPES})
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert resp.status == 200


def pull_by_chain_ids(node: LoopbackNode, image: BuiltImage, ref: str) -> list[str]:
    ctrd = node.containerd
    resolve_through_mirror(node, ref)
    lease = ctrd.ctr("leases", "create").split()[0]  # as the client pulls: under a lease
    return unpack_by_chain_ids(
        ctrd.address, ctrd.namespace, SNAPSHOTTER, [layer.diff_id for layer in image.layers], lease
    )


def test_chain_id_prepares_are_unpacked_by_the_daemon(
    make_node: NodeFactory,
    containerd_factory: ContainerdFactory,
    test_image: BuiltImage,
    test_image_ref: str,
) -> None:
    node = make_node()
    assert pull_by_chain_ids(node, test_image, test_image_ref) == [PROVIDED] * len(test_image.layers)
    layers = {layer.descriptor.digest for layer in test_image.layers}
    assert not layers & node.containerd.content_digests()  # containerd fetched no layer itself
    assert layers <= node.daemon.blob_files()  # the daemon holds them (for peers, and the snapshots)
    top = chain_ids([layer.diff_id for layer in test_image.layers])[-1]
    with node.containerd.mount_snapshot(top, snapshotter=SNAPSHOTTER) as rootfs:
        ours = snapshot_tree(rootfs)
    assert test_image.expected is not None
    assert compare_manifests(test_image.expected, ours) == []
    # containerd's own unpack of the same image (builtin content store and overlayfs), compared whole
    reference = containerd_factory()
    reference.pull(test_image_ref)
    with reference.mount_image(test_image_ref) as rootfs:
        theirs = snapshot_tree(rootfs)
    assert compare_manifests(theirs, ours) == []
    assert node.daemon.corrupt_blobs() == []
    assert_pull_lines_carry_transfer_ids(node, layers)


def assert_pull_lines_carry_transfer_ids(node: LoopbackNode, layers: set[str]) -> None:
    """Every line the daemon logged about the pull's blobs and layers (downloads, unpacks ahead,
    Prepares) carries a transfer id (`kernel.logging.in_transfer`); the log is JSON, one record
    per line (its stderr is a file)."""
    text = node.daemon.process.log_path.read_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    about = [r for r in records if {"digest", "blob", "layer", "chain"} & r.keys()]
    assert {r.get("layer") or r.get("digest") for r in about} >= layers
    assert [r["event"] for r in about if not r.get("transfer")] == []


def test_a_second_node_unpacks_chain_ids_from_the_first_without_the_origin(
    make_node: NodeFactory, test_image: BuiltImage, test_image_ref: str
) -> None:
    first = make_node()
    second = make_node([first.peer_url])
    assert pull_by_chain_ids(first, test_image, test_image_ref) == [PROVIDED] * len(test_image.layers)
    assert pull_by_chain_ids(second, test_image, test_image_ref) == [PROVIDED] * len(test_image.layers)
    stats = second.stats()
    assert stats["origin_bytes"] == 0, stats
    assert stats["peer_bytes"] >= sum(layer.descriptor.size for layer in test_image.layers)


def test_a_chain_id_the_daemon_never_saw_is_left_to_containerd(
    make_node: NodeFactory, test_image: BuiltImage
) -> None:
    """No manifest through the mirror, nothing in the store: the plain path, at once."""
    node = make_node()
    ctrd = node.containerd
    diff_ids = [layer.diff_id for layer in test_image.layers]
    assert unpack_by_chain_ids(ctrd.address, ctrd.namespace, SNAPSHOTTER, diff_ids) == [APPLY]


def test_a_debian_image_unpacked_by_chain_ids_at_once_is_containerds_rootfs(
    make_node: NodeFactory,
    containerd_factory: ContainerdFactory,
    debian_image: tuple[BuiltImage, str],
) -> None:
    """Its layers unpack at once in the daemon (unpacked ahead while the first is taken); the tree
    must be the one containerd's own unpack of the same image makes, file for file."""
    image, ref = debian_image
    node = make_node()
    assert pull_by_chain_ids(node, image, ref) == [PROVIDED] * len(image.layers)
    log = node.daemon.process.log_path.read_text()
    assert log.count("unpacking a layer ahead") == len(image.layers) - 1  # all started at the first Prepare
    top = chain_ids([layer.diff_id for layer in image.layers])[-1]
    with node.containerd.mount_snapshot(top, snapshotter=SNAPSHOTTER) as rootfs:
        ours = snapshot_tree(rootfs)
    reference = containerd_factory()
    reference.pull(ref)
    with reference.mount_image(ref) as rootfs:
        theirs = snapshot_tree(rootfs)
    assert len(ours) > 5000
    assert compare_manifests(theirs, ours) == []
