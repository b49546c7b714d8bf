"""Pulls the way kubelet makes them: containerd's CRI plugin, with the daemon unpacking layers.

With `disable_snapshot_annotations = false`, CRI's Prepare names each layer; the daemon streams the
blob (from peers or the origin, through its engine) into the snapshot, commits it under the chain
ID and answers AlreadyExists (snapshotter/remote.py). containerd then never fetches the layers.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest

from snapshotter.containerd_client import LEASE_PREFIX
from testbed.cri import CRI_NAMESPACE
from testbed.images import BuiltImage, build_sized_image, push_image
from testbed.loopback import LoopbackNode, start_node
from testbed.procs import free_port
from testbed.registry import Registry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

UNPACKED = "peersync.io/unpacked-layer"
NodeFactory = Callable[..., LoopbackNode]


@pytest.fixture
def make_node(tmp_path: Path, registry: Registry) -> Iterator[NodeFactory]:
    """`make_node(peer_urls, extra="")`: a loopback node whose containerd serves CRI."""
    with ExitStack() as stack:

        def make(peers: list[str] | None = None, extra: str = "", port: int | None = None) -> LoopbackNode:
            port = port or free_port()
            workdir = tmp_path / f"node-{port}"
            return stack.enter_context(
                start_node(workdir, port, peers or [], registry.address, cri=True, extra=extra)
            )

        yield make


def snapshot_labels(node: LoopbackNode) -> dict[str, dict[str, str]]:
    """Committed peersync snapshots in the k8s.io namespace -> their labels."""
    ctrd = node.containerd
    lines = ctrd.ctr("snapshots", "--snapshotter", "peersync", "ls").splitlines()[1:]
    out = {}
    for line in lines:
        name = line.split()[0]
        info = json.loads(ctrd.ctr("snapshots", "--snapshotter", "peersync", "info", name))
        out[name] = info.get("Labels") or {}
    return out


def layer_digests(image: BuiltImage) -> set[str]:
    return {layer.descriptor.digest for layer in image.layers}


def test_cri_pull_unpacks_layers_in_the_daemon(
    make_node: NodeFactory, test_image: BuiltImage, test_image_ref: str
) -> None:
    node = make_node()
    assert node.containerd.namespace == CRI_NAMESPACE
    image_id = node.cri_pull(test_image_ref)
    assert image_id == test_image.config_digest
    labels = snapshot_labels(node)
    assert {v.get(UNPACKED) for v in labels.values()} == layer_digests(test_image), labels
    # containerd never fetched a layer: its content store knows the manifest and config only
    assert not layer_digests(test_image) & node.containerd.content_digests()
    assert layer_digests(test_image) <= node.daemon.blob_files()  # held by the daemon for peers
    assert node.run(test_image_ref) == test_image.expected_output
    assert node.rootfs_differences(test_image_ref, test_image) == []
    assert node.daemon.corrupt_blobs() == []


def test_held_layers_survive_gc_and_go_with_the_image(
    make_node: NodeFactory, test_image: BuiltImage, test_image_ref: str
) -> None:
    node = make_node()
    node.cri_pull(test_image_ref)
    node.containerd.gc()  # containerd deletes every blob of ours it does not reference...
    assert layer_digests(test_image) <= node.daemon.blob_files()  # ...but held layers are hidden
    node.cri_remove(test_image_ref)
    assert node.containerd.images() == []
    assert node.daemon.snapshot_dirs() == set()
    assert node.daemon.only_cache_left()  # released into the cache, for peers and later pulls


def test_second_node_unpacks_from_the_first_without_the_origin(
    make_node: NodeFactory, test_image: BuiltImage, test_image_ref: str
) -> None:
    pa, pb = free_port(), free_port()
    a = make_node([f"127.0.0.1:{pb}"], port=pa)
    b = make_node([f"127.0.0.1:{pa}"], port=pb)
    a.cri_pull(test_image_ref)
    b.cri_pull(test_image_ref)
    stats = b.stats()
    assert stats["origin_bytes"] == 0, stats
    assert stats["peer_bytes"] >= sum(layer.descriptor.size for layer in test_image.layers)
    assert b.rootfs_differences(test_image_ref, test_image) == []
    assert b.run(test_image_ref) == test_image.expected_output


def test_unpack_layers_off_leaves_it_to_containerd(
    make_node: NodeFactory, test_image: BuiltImage, test_image_ref: str
) -> None:
    node = make_node(extra="[snapshotter]\nunpack_layers = false\n")
    node.cri_pull(test_image_ref)
    assert not any(UNPACKED in v for v in snapshot_labels(node).values())
    assert node.run(test_image_ref) == test_image.expected_output
    assert node.rootfs_differences(test_image_ref, test_image) == []


def test_ctr_pull_of_the_same_image_adopts_held_layers(
    make_node: NodeFactory, test_image: BuiltImage, test_image_ref: str
) -> None:
    """After a CRI pull, `ctr pull` in another namespace takes the held blobs into containerd's
    metadata; removing the CRI image must then not delete them from under the other image."""
    node = make_node()
    node.cri_pull(test_image_ref)
    ctrd = node.containerd
    ctrd.ctr(
        "images",
        "pull",
        "--snapshotter",
        "peersync",
        "--hosts-dir",
        str(node.hosts_dir),
        test_image_ref,
        namespace="default",
    )
    # the daemon's lease on chains it prepared for ctr goes once ctr labelled the image
    deadline = time.monotonic() + 15
    while LEASE_PREFIX in ctrd.ctr("leases", "ls", namespace="default") and time.monotonic() < deadline:
        time.sleep(0.1)
    node.cri_remove(test_image_ref)
    assert layer_digests(test_image) <= node.daemon.blob_files()
    out = ctrd.ctr("run", "--rm", "--snapshotter", "peersync", test_image_ref, "t-adopt", namespace="default")
    assert out == test_image.expected_output
    ctrd.ctr("images", "rm", "--sync", test_image_ref, namespace="default")
    assert layer_digests(test_image) <= node.daemon.blob_files() and node.daemon.only_cache_left()


@pytest.fixture(scope="module")
def big_image(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> tuple[BuiltImage, str]:
    """~64 MB in 4 layers: a CRI pull is still unpacking when the daemon is killed."""
    image = build_sized_image(tmp_path_factory.mktemp("cri-big"), 64 << 20, layers=4, tag="cri-crash")
    return image, push_image(image, registry, "peersync/cri-crash")


def test_sigkill_during_daemon_unpack_then_pull_again(
    make_node: NodeFactory, big_image: tuple[BuiltImage, str]
) -> None:
    image, ref = big_image
    node = make_node()
    log = node.daemon.process.log_path
    failed: list[BaseException] = []

    def pull() -> None:
        try:
            node.cri_pull(ref)
        except grpc.RpcError as exc:
            failed.append(exc)

    puller = threading.Thread(target=pull)
    puller.start()
    deadline = time.monotonic() + 60
    while "unpacked layer" not in log.read_text():  # the first (busybox) layer is in; more follow
        assert time.monotonic() < deadline, "the daemon never unpacked a layer"
        time.sleep(0.01)
    node.daemon.kill()
    puller.join(timeout=120)
    assert failed, "the pull cannot succeed with its snapshotter killed"
    assert node.daemon.corrupt_blobs() == []
    node.daemon.start()
    for attempt in range(10):  # containerd reconnects to a restarted plugin with backoff
        try:
            node.cri_pull(ref)
            break
        except grpc.RpcError:
            if attempt == 9:
                raise
            time.sleep(1.0)
    assert node.daemon.corrupt_blobs() == []
    assert node.rootfs_differences(ref, image) == []
    node.cri_remove(ref)
    assert node.daemon.only_cache_left()
    assert node.daemon.snapshot_dirs() == set()
