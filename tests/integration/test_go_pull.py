"""Pulls the way nerdctl makes them with a snapshotter it does not know, through a full node.

testbed/go/pull calls `client.Pull(ref, WithPullUnpack, WithPullSnapshotter("peersync"),
WithResolver(hosts-dir resolver))` without `snapshotters.AppendInfoHandlerWrapper`, so no
Prepare carries CRI's layer labels. The node is a daemon in full mode (peer exchange, registry
mirror) and a containerd whose snapshotter and content store are our proxy plugins, pulling
through the mirror by hosts.toml. Today the daemon unpacks a layer itself only when CRI's labels
name it, so containerd applies every layer itself (reading blobs the daemon fetches from the origin
as containerd reads them: its Info offers them, so the client downloads none). The test checks
that the layers containerd applied and those the daemon unpacked add up to the image, which stays
true when the daemon learns to recognise layers by chain ID alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from snapshotter.remote import UNPACKED_LABEL
from testbed import gotools
from testbed.images import BuiltImage
from testbed.loopback import SNAPSHOTTER, LoopbackNode, start_node
from testbed.procs import free_port
from testbed.registry import Registry

GO_MISSING = gotools.missing_requirements()  # no Go or no containerd sources: skip, saying which
pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(600),
    pytest.mark.skipif(GO_MISSING is not None, reason=GO_MISSING or ""),
]


def unpacked_by_daemon(node: LoopbackNode) -> set[str]:
    """Layer digests of the committed snapshots the daemon unpacked itself (its label says so)."""
    unpacked = set()
    for name in node.containerd.snapshot_keys(SNAPSHOTTER):
        info = json.loads(node.containerd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "info", name))
        if UNPACKED_LABEL in (info.get("Labels") or {}):
            unpacked.add(info["Labels"][UNPACKED_LABEL])
    return unpacked


def test_go_client_pulls_like_nerdctl_through_a_full_node(
    tmp_path: Path, registry: Registry, test_image: BuiltImage, test_image_ref: str
) -> None:
    pull_binary = gotools.build("pull")  # before the node starts: a cold build takes a while
    assert pull_binary.exists()
    with start_node(tmp_path / "node", free_port(), [], registry.address) as node:
        ctrd = node.containerd
        result = gotools.go_pull(ctrd.address, ctrd.namespace, SNAPSHOTTER, node.hosts_dir, test_image_ref)
        assert result.image == test_image_ref
        assert result.target == test_image.manifest.digest
        layers = {layer.descriptor.digest for layer in test_image.layers}
        assert result.layers == len(layers)
        applied, fetched, unpacked = set(result.applied), set(result.fetched), unpacked_by_daemon(node)
        # Every layer was applied by containerd or unpacked by the daemon, never both; containerd
        # fetches only layers it applies (and none the daemon's content store offers).
        assert applied | unpacked == layers and not applied & unpacked, (applied, unpacked)
        assert fetched <= applied
        assert (result.applied_layers, result.fetched_layers) == (len(applied), len(fetched))
        # The daemon got every layer from the origin (through its mirror or its BlobSource) and
        # holds it; containerd's builtin store stays empty.
        assert node.stats()["origin_bytes"] >= test_image.compressed_size
        assert layers <= node.daemon.blob_files()
        assert ctrd.builtin_blob_files() == set()
        assert node.daemon.corrupt_blobs() == []
        assert node.rootfs_differences(test_image_ref, test_image) == []
        assert node.run(test_image_ref) == test_image.expected_output
