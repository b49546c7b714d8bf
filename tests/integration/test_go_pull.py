"""Pulls the way nerdctl makes them with a snapshotter it does not know, through a full node.

testbed/go/pull calls `client.Pull(ref, WithPullUnpack, WithPullSnapshotter("peersync"),
WithResolver(hosts-dir resolver))` without `snapshotters.AppendInfoHandlerWrapper`, so no
Prepare carries CRI's layer labels: each names only the chain ID it wants
(`containerd.io/snapshot.ref`). The node is a daemon in full mode (peer exchange, registry mirror)
and a containerd whose snapshotter and content store are our proxy plugins, pulling through the
mirror by hosts.toml. The daemon recognises every layer from its chain ID (the chain index, fed by
the manifest its mirror served and the config it read), unpacks it itself and answers
AlreadyExists, so containerd applies no layer and fetches none: the client downloads only the
manifest and config. The layer blobs stay the daemon's (held for its snapshots), never entering
containerd's content metadata.

The rootfs is checked on the snapshots themselves, against the layers' declarations and against
containerd's own unpack of the same image (builtin content store and overlayfs, in another
containerd). Not with `ctr images mount --snapshotter peersync`: ctr 1.6 ignores that flag and
unpacks into overlayfs from containerd's content, which has no layer here (`Containerd.mount_image`
says why); `test_the_image_mounts_from_our_snapshots_not_from_overlayfs` keeps that so.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from snapshotter.remote import UNPACKED_LABEL
from testbed import gotools
from testbed.containerd import ContainerdFactory
from testbed.images import BuiltImage, Manifest, compare_manifests, snapshot_tree
from testbed.loopback import SNAPSHOTTER, LoopbackNode, start_node
from testbed.procs import free_port
from testbed.registry import Registry

GO_MISSING = gotools.missing_requirements()  # no Go or no containerd sources: skip, saying which
pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(600),
    pytest.mark.skipif(GO_MISSING is not None, reason=GO_MISSING or ""),
]

NodeFactory = Callable[[], LoopbackNode]


@pytest.fixture
def make_node(tmp_path: Path, registry: Registry) -> Iterator[NodeFactory]:
    gotools.build("pull")  # before any node starts: a cold build takes a while
    with ExitStack() as stack:

        def make() -> LoopbackNode:
            port = free_port()
            return stack.enter_context(start_node(tmp_path / f"node-{port}", port, [], registry.address))

        yield make


def unpacked_by_daemon(node: LoopbackNode) -> set[str]:
    """Layer digests of the committed snapshots the daemon unpacked itself (its label says so)."""
    unpacked = set()
    for name in node.containerd.snapshot_keys(SNAPSHOTTER):
        info = json.loads(node.containerd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "info", name))
        if UNPACKED_LABEL in (info.get("Labels") or {}):
            unpacked.add(info["Labels"][UNPACKED_LABEL])
    return unpacked


def go_pull(node: LoopbackNode, ref: str) -> gotools.PullResult:
    ctrd = node.containerd
    return gotools.go_pull(ctrd.address, ctrd.namespace, SNAPSHOTTER, node.hosts_dir, ref)


def assert_the_daemon_unpacked_every_layer(
    node: LoopbackNode, image: BuiltImage, ref: str, result: gotools.PullResult
) -> None:
    """The daemon unpacked each layer and containerd applied and fetched none, yet containerd
    considers the image unpacked into peersync (its rootfs chain is in containerd's metadata)."""
    layers = {layer.descriptor.digest for layer in image.layers}
    assert (result.image, result.target, result.layers) == (ref, image.manifest.digest, len(image.layers))
    assert (result.applied, result.fetched) == ((), ()), result
    assert (result.applied_layers, result.fetched_layers) == (0, 0)
    assert unpacked_by_daemon(node) == layers
    assert node.containerd.is_unpacked(ref, SNAPSHOTTER)
    assert not layers & node.containerd.content_digests()  # containerd was never handed a layer
    assert layers <= node.daemon.blob_files()  # the daemon holds them (its snapshots, its peers)
    assert node.containerd.builtin_blob_files() == set()
    assert node.daemon.corrupt_blobs() == []


def containerds_own_rootfs(factory: ContainerdFactory, ref: str) -> Manifest:
    """The image as containerd's own stores unpack it: `ctr images pull` into overlayfs."""
    reference = factory()
    reference.pull(ref)
    with reference.mount_image(ref) as rootfs:
        return snapshot_tree(rootfs)


def test_go_client_pulls_like_nerdctl_through_a_full_node(
    make_node: NodeFactory,
    containerd_factory: ContainerdFactory,
    test_image: BuiltImage,
    test_image_ref: str,
) -> None:
    node = make_node()
    result = go_pull(node, test_image_ref)
    assert_the_daemon_unpacked_every_layer(node, test_image, test_image_ref, result)
    # The daemon got every layer from the origin (through its mirror or its engine).
    assert node.stats()["origin_bytes"] >= test_image.compressed_size
    assert node.rootfs_differences(test_image_ref, test_image) == []
    with node.containerd.mount_image(test_image_ref, snapshotter=SNAPSHOTTER) as rootfs:
        ours = snapshot_tree(rootfs)
    assert compare_manifests(containerds_own_rootfs(containerd_factory, test_image_ref), ours) == []
    assert node.run(test_image_ref) == test_image.expected_output


def test_the_image_mounts_from_our_snapshots_not_from_overlayfs(
    make_node: NodeFactory, test_image: BuiltImage, test_image_ref: str
) -> None:
    """Regression: the rootfs check used `ctr images mount --snapshotter peersync`, which in ctr
    1.6 unpacks into the builtin overlayfs whatever the flag says (and so failed once no layer
    blob was containerd's: "content digest ...: not found"). The mount must be our snapshot's,
    leave overlayfs empty, and see what the daemon unpacked."""
    node = make_node()
    go_pull(node, test_image_ref)
    ctrd = node.containerd
    with ctrd.mount_image(test_image_ref, snapshotter=SNAPSHOTTER) as rootfs:
        assert (rootfs / "etc" / "greeting").exists()
        assert ctrd.builtin_overlay_snapshot_dirs() == set()
        assert ctrd.snapshot_keys("overlayfs") == set()
    assert ctrd.builtin_overlay_snapshot_dirs() == set()
    assert not ctrd.is_unpacked(test_image_ref, "overlayfs")


def test_go_client_pulls_the_debian_image_into_containerds_rootfs(
    make_node: NodeFactory,
    containerd_factory: ContainerdFactory,
    debian_image: tuple[BuiltImage, str],
) -> None:
    """~10k files in 3 layers, all unpacked by the daemon (the upper ones ahead of their
    Prepares): file for file the tree containerd's own unpack makes."""
    image, ref = debian_image
    node = make_node()
    result = go_pull(node, ref)
    assert_the_daemon_unpacked_every_layer(node, image, ref, result)
    with node.containerd.mount_image(ref, snapshotter=SNAPSHOTTER) as rootfs:
        ours = snapshot_tree(rootfs)
    assert len(ours) > 5000
    assert compare_manifests(containerds_own_rootfs(containerd_factory, ref), ours) == []
