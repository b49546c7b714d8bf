"""Peer-to-peer pulls on loopback: nodes fetch chunks from each other, the origin only when needed.

Each node is a `peersync daemon` + its own containerd, pulling through the node's registry mirror
(`ctr --hosts-dir`), in full mode (content + snapshotter proxy: lazy reads).
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from testbed.images import BuiltImage, build_sized_image, push_image
from testbed.loopback import LoopbackNode, start_node
from testbed.peersyncd import REPO
from testbed.pki import loopback_site
from testbed.procs import ManagedProcess, free_port, running, tcp_port_accepts
from testbed.registry import Registry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


Node = LoopbackNode
NodeFactory = Callable[[int, list[str]], Node]


@pytest.fixture
def make_node(tmp_path: Path, registry: Registry) -> Iterator[NodeFactory]:
    """`make_node(port, peer_urls)`: a daemon whose peer exchange listens on 127.0.0.1:port."""
    with ExitStack() as stack:

        def make(port: int, peers: list[str]) -> Node:
            return stack.enter_context(start_node(tmp_path / f"node-{port}", port, peers, registry.address))

        yield make


def check(node: Node, ref: str, image: BuiltImage) -> None:
    assert node.daemon.corrupt_blobs() == []
    assert node.rootfs_differences(ref, image) == []


@pytest.fixture(scope="module")
def small_image(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> tuple[BuiltImage, str]:
    """~12 MB in 2 layers: a dozen chunks, so a peer is asked for many of them."""
    image = build_sized_image(tmp_path_factory.mktemp("p2p-image"), 12 << 20, layers=2, tag="p2p")
    return image, push_image(image, registry, "peersync/p2p")


def test_second_node_pulls_from_the_first(
    make_node: NodeFactory, test_image: BuiltImage, test_image_ref: str
) -> None:
    pa, pb = free_port(), free_port()
    a = make_node(pa, [f"127.0.0.1:{pb}"])
    b = make_node(pb, [f"127.0.0.1:{pa}"])
    a.pull(test_image_ref)
    assert a.containerd.run(test_image_ref, snapshotter="peersync") == test_image.expected_output
    layers = sum(layer.descriptor.size for layer in test_image.layers)
    assert a.stats()["origin_bytes"] >= layers  # alone: everything came from the origin
    b.pull(test_image_ref)
    assert b.containerd.run(test_image_ref, snapshotter="peersync") == test_image.expected_output
    second = b.stats()
    assert second["origin_bytes"] == 0, second
    assert second["peer_bytes"] >= layers
    check(a, test_image_ref, test_image)
    check(b, test_image_ref, test_image)


@pytest.mark.parametrize("mode", ["flip", "liar"])
def test_corrupt_peer_is_detected_and_dropped(
    make_node: NodeFactory, tmp_path: Path, small_image: tuple[BuiltImage, str], mode: str
) -> None:
    """A peer serving corrupted chunks (with the honest hash, or with a hash of its own garbage)
    is caught chunk by chunk against the verified table, dropped, and the image is still right.
    It is a site member gone bad: it holds a certificate of the site, so TLS lets it in and
    only chunk verification stands between it and B's image."""
    image, ref = small_image
    pa, pe, pb = free_port(), free_port(), free_port()
    a = make_node(pa, [])
    a.pull(ref)  # A holds the complete, verified blobs
    evil_url = f"https://127.0.0.1:{pe}"
    cert = loopback_site().issue("evil", tmp_path / "evil-tls")
    tls = ["--ca", str(cert.ca), "--cert", str(cert.cert), "--key", str(cert.key)]
    evil = ManagedProcess(
        [
            sys.executable,
            "-m",
            "testbed.evilpeer",
            "--listen",
            f"127.0.0.1:{pe}",
            "--upstream",
            a.peer_url,
            "--mode",
            mode,
            *tls,
        ],
        tmp_path / "evil.log",
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    with running(evil, lambda: tcp_port_accepts("127.0.0.1", pe)):
        b = make_node(pb, [a.peer_url, evil_url])
        b.pull(ref)
        context = cert.client_context()
        with urllib.request.urlopen(f"{evil_url}/evil/served", timeout=10, context=context) as resp:
            served = json.loads(resp.read())["chunks"]
    stats = b.stats()
    assert served >= 1, "the corrupt peer was never asked: the test proves nothing"
    assert stats["corrupt_chunks"] >= 1
    assert evil_url in stats["dropped_peers"]
    assert a.peer_url not in stats["dropped_peers"]
    assert stats["origin_bytes"] == 0  # everything still came from the honest peer
    assert b.run(ref, ["sh", "-c", "ls /payload | wc -l"]).strip() == "2"
    check(b, ref, image)
