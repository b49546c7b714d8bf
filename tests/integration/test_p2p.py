"""Peer-to-peer pulls on loopback: nodes fetch chunks from each other, the origin only when needed.

Each node is a `peersync daemon` + its own containerd, pulling through the node's registry mirror
(`ctr --hosts-dir`), in full mode (content + snapshotter proxy: lazy reads).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from peersync import hosts
from tests.harness.containerd import Containerd, start_containerd
from tests.harness.images import BuiltImage, compare_manifests, snapshot_tree
from tests.harness.peersyncd import PeerSyncDaemon, loopback_config, start_peersync
from tests.harness.procs import free_port
from tests.harness.registry import Registry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@dataclass
class Node:
    daemon: PeerSyncDaemon
    containerd: Containerd
    hosts_dir: Path
    peer_url: str

    def pull(self, ref: str) -> None:
        self.containerd.pull(
            ref, snapshotter="peersync", plain_http=True, extra_args=["--hosts-dir", str(self.hosts_dir)]
        )

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self.peer_url}/peersync/v1/stats", timeout=10) as resp:
            return json.loads(resp.read())


@pytest.fixture
def nodes(tmp_path: Path, registry: Registry) -> Iterator[list[Node]]:
    ports = [free_port() for _ in range(2)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    with ExitStack() as stack:
        result = []
        for i, port in enumerate(ports):
            peers = [u.removeprefix("http://") for j, u in enumerate(urls) if j != i]
            config = loopback_config(plain_http=[registry.address], peers=peers)
            config = config.replace('listen = "127.0.0.1:', f'listen = "127.0.0.1:{port}"\n#', 1)
            daemon = stack.enter_context(start_peersync(tmp_path / f"n{i}", config=config))
            ctrd = stack.enter_context(
                start_containerd(tmp_path / f"c{i}", extra_config=daemon.containerd_config())
            )
            hosts_dir = tmp_path / f"hosts{i}"
            hosts.install(registry.address, f"http://{daemon.mirror}", hosts_dir)
            toml = hosts_dir / registry.address / "hosts.toml"
            toml.write_text(
                toml.read_text().replace(f"https://{registry.address}", f"http://{registry.address}")
            )
            result.append(Node(daemon, ctrd, hosts_dir, urls[i]))
        yield result


def test_second_node_pulls_from_the_first(
    nodes: list[Node], test_image: BuiltImage, test_image_ref: str
) -> None:
    a, b = nodes
    a.pull(test_image_ref)
    assert a.containerd.run(test_image_ref, snapshotter="peersync") == test_image.expected_output
    layers = sum(layer.descriptor.size for layer in test_image.layers)
    first = a.stats()
    assert first["origin_bytes"] >= layers  # alone: everything came from the origin
    b.pull(test_image_ref)
    assert b.containerd.run(test_image_ref, snapshotter="peersync") == test_image.expected_output
    second = b.stats()
    assert second["origin_bytes"] == 0, second
    assert second["peer_bytes"] >= layers
    assert b.daemon.corrupt_blobs() == [] and a.daemon.corrupt_blobs() == []
    assert test_image.expected is not None
    with b.containerd.mount_image(test_image_ref, snapshotter="peersync") as rootfs:
        assert compare_manifests(test_image.expected, snapshot_tree(rootfs)) == []
