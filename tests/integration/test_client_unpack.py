"""`ctr images pull` of containerd 1.6, through a real containerd: the daemon commits the image's
chains through containerd before ctr's unpack looks for them (`snapshotter.preparer`).

ctr names no snapshot on its Prepares, so without the preparer it applies every layer itself,
reading the blob back through our content store. Whether ctr applied a layer shows on the layer
blob: `image.Unpack` labels it `containerd.io/uncompressed` only when it applied it
(containerd 1.6 image.go), so a pull where the daemon provided every layer leaves no such label.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from snapshotter.containerd_client import LEASE_PREFIX
from snapshotter.remote import chain_ids
from testbed.containerd import ContainerdFactory
from testbed.images import BuiltImage, compare_manifests, snapshot_tree
from testbed.loopback import SNAPSHOTTER, LoopbackNode, start_node
from testbed.procs import free_port
from testbed.registry import Registry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

NodeFactory = Callable[..., LoopbackNode]
APPLIED_LABEL = "containerd.io/uncompressed"


@pytest.fixture
def make_node(tmp_path: Path, registry: Registry) -> Iterator[NodeFactory]:
    with ExitStack() as stack:

        def make(peers: list[str] | None = None, prepare: bool = True) -> LoopbackNode:
            port = free_port()
            return stack.enter_context(
                start_node(tmp_path / f"node-{port}", port, peers or [], registry.address, prepare=prepare)
            )

        yield make


def applied_by_ctr(node: LoopbackNode, image: BuiltImage) -> list[str]:
    """The layers of `image` that ctr applied itself (their blobs carry its label)."""
    lines = node.containerd.ctr("content", "ls").splitlines()[1:]
    labelled = {line.split()[0] for line in lines if APPLIED_LABEL in line}
    return [layer.descriptor.digest for layer in image.layers if layer.descriptor.digest in labelled]


def rootfs(node: LoopbackNode, image: BuiltImage) -> dict[str, object]:
    top = chain_ids([layer.diff_id for layer in image.layers])[-1]
    with node.containerd.mount_snapshot(top, snapshotter=SNAPSHOTTER) as root:
        return snapshot_tree(root)


def reference_rootfs(containerd_factory: ContainerdFactory, ref: str) -> dict[str, object]:
    """containerd's own unpack of the image (builtin content store and overlayfs)."""
    reference = containerd_factory()
    reference.pull(ref)
    with reference.mount_image(ref) as root:
        return snapshot_tree(root)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Whether `condition` held within `timeout` seconds (the lease goes a poll after the label)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def daemon_log(node: LoopbackNode) -> str:
    return node.daemon.process.log_path.read_text()


def test_ctr_pull_finds_every_layer_committed_by_the_daemon(
    make_node: NodeFactory,
    containerd_factory: ContainerdFactory,
    test_image: BuiltImage,
    test_image_ref: str,
) -> None:
    node = make_node()
    node.pull(test_image_ref)
    assert applied_by_ctr(node, test_image) == []
    assert "committed an image's chains for a client that unpacks itself" in daemon_log(node)
    ours = rootfs(node, test_image)
    assert test_image.expected is not None
    assert compare_manifests(test_image.expected, ours) == []
    assert compare_manifests(reference_rootfs(containerd_factory, test_image_ref), ours) == []
    assert node.run(test_image_ref) == test_image.expected_output
    assert node.daemon.corrupt_blobs() == []
    # our lease went once ctr labelled the image: removing the image takes the chains with it
    assert wait_until(lambda: LEASE_PREFIX not in node.containerd.ctr("leases", "ls"))
    node.containerd.ctr("images", "rm", "--sync", test_image_ref)
    assert wait_until(node.daemon.only_cache_left)


def test_without_containerds_address_ctr_applies_the_layers_itself(
    make_node: NodeFactory, test_image: BuiltImage, test_image_ref: str
) -> None:
    """The control: the same pull on a daemon not told containerd's socket."""
    node = make_node(prepare=False)
    node.pull(test_image_ref)
    assert applied_by_ctr(node, test_image) == [layer.descriptor.digest for layer in test_image.layers]
    assert "for a client that unpacks itself" not in daemon_log(node)


def test_a_second_ctr_pull_of_the_image_prepares_nothing_again(
    make_node: NodeFactory, test_image: BuiltImage, test_image_ref: str
) -> None:
    """The image is unpacked: the chains are there, and ctr's second pull applies nothing."""
    node = make_node()
    node.pull(test_image_ref)
    node.pull(test_image_ref)
    assert applied_by_ctr(node, test_image) == []
    assert daemon_log(node).count("unpacked layer") == len(test_image.layers)


def test_a_second_node_gets_the_layers_from_the_first_and_ctr_applies_none(
    make_node: NodeFactory, test_image: BuiltImage, test_image_ref: str
) -> None:
    first = make_node()
    second = make_node([first.peer_url])
    first.pull(test_image_ref)
    # The first node announces its complete copies to the tracker in its next sync (at once since
    # this stop, `Download.run`); a pull started within that instant may still be leased a chunk
    # of the origin. Give that sync a moment on a loaded machine.
    time.sleep(1.0)
    second.pull(test_image_ref)
    assert applied_by_ctr(second, test_image) == []
    stats = second.stats()
    assert stats["origin_bytes"] == 0, stats


def test_a_debian_image_pulled_by_ctr_is_containerds_rootfs(
    make_node: NodeFactory,
    containerd_factory: ContainerdFactory,
    debian_image: tuple[BuiltImage, str],
) -> None:
    image, ref = debian_image
    node = make_node()
    node.pull(ref)
    assert applied_by_ctr(node, image) == []
    ours = rootfs(node, image)
    assert len(ours) > 5000
    assert compare_manifests(reference_rootfs(containerd_factory, ref), ours) == []
