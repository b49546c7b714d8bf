"""Degradation (docs/degradation.md): what a node does while its daemon is down, and that a
restart recovers with no manual step.

- full mode (containerd's content store and snapshotter are the daemon's): running containers
  keep running and their files stay readable; starting a new one fails at once (the plugin's
  socket refused, or Unavailable); a pull waits (containerd retries the content store) and completes
  once the daemon is back, and the same containerd pulls and runs again with no manual step;
- mirror-only (containerd's own store, the daemon only the first host of hosts.toml): pulls fall
  back to the origin (hosts.toml's `server`) while the daemon is down.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peersync import hosts
from testbed.containerd import CTR_BINARY, ContainerdFactory
from testbed.images import BuiltImage, build_sized_image, push_image
from testbed.loopback import SNAPSHOTTER, LoopbackNode, start_node
from testbed.peersyncd import loopback_config, start_peersync
from testbed.procs import CommandError, free_port
from testbed.registry import Registry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> list[tuple[BuiltImage, str]]:
    """Three small runnable images (busybox and a payload layer), one per pull of the test."""
    out = []
    for n in range(3):
        image = build_sized_image(
            tmp_path_factory.mktemp(f"degrade-{n}"), 1 << 20, layers=1, tag=f"d{n}", seed=n
        )
        out.append((image, push_image(image, registry, f"peersync/degrade{n}")))
    return out


@pytest.fixture
def node(tmp_path: Path, registry: Registry) -> Iterator[LoopbackNode]:
    with start_node(tmp_path / "node", free_port(), [], registry.address) as n:
        yield n


def task_status(node: LoopbackNode, container: str) -> str:
    for line in node.containerd.ctr("tasks", "ls").splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == container:
            return fields[-1]
    return "absent"


def test_full_mode_containers_keep_running_new_ones_fail_clearly_pulls_wait_and_a_restart_recovers(
    node: LoopbackNode, images: list[tuple[BuiltImage, str]]
) -> None:
    (first, ref1), (second, ref2), (third, ref3) = images
    node.pull(ref1)
    node.containerd.ctr("run", "-d", "--snapshotter", SNAPSHOTTER, ref1, "alive", "sleep", "600")
    payload = next(p for p in first.expected or {} if p.startswith("/payload/") and p.endswith(".bin"))
    assert task_status(node, "alive") == "RUNNING"
    node.daemon.kill()

    assert task_status(node, "alive") == "RUNNING"
    read = node.containerd.ctr("tasks", "exec", "--exec-id", "r1", "alive", "wc", "-c", payload)
    assert int(read.split()[0]) > 0  # its files are still there: the overlay mount needs no daemon
    with pytest.raises(CommandError) as refused:  # a new container needs the snapshotter
        node.run(ref1, ["true"])
    message = str(refused.value)
    # containerd names the plugin's socket when the dial is refused; a connection it still had
    # open when the daemon died ends as gRPC Unavailable instead
    assert "connection refused" in message or "code = Unavailable" in message, message

    # A pull waits: containerd's content.OpenWriter retries UNAVAILABLE (a busy ref, to it) with
    # backoff, so the pull neither fails nor completes until the daemon is back.
    ctrd = node.containerd
    args = [
        CTR_BINARY,
        "--address",
        str(ctrd.address),
        "--namespace",
        ctrd.namespace,
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        SNAPSHOTTER,
        "--hosts-dir",
        str(node.hosts_dir),
        ref2,
    ]
    pull = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(10)
        assert pull.poll() is None, f"the pull ended while the daemon was down: {pull.stderr.read()!r}"  # type: ignore[union-attr]
        node.daemon.start()  # no manual step: the same containerd reconnects to the plugin
        assert pull.wait(timeout=180) == 0, pull.stderr.read()  # type: ignore[union-attr]
    finally:
        if pull.poll() is None:
            pull.kill()
            pull.wait()
    assert node.run(ref2, ["true"]) == ""
    node.pull(ref3)
    assert node.run(ref3, ["true"]) == ""
    assert task_status(node, "alive") == "RUNNING"
    assert node.daemon.corrupt_blobs() == []
    assert (second.blob_digests | third.blob_digests) <= node.daemon.blob_files()


def test_mirror_only_pulls_fall_back_to_the_origin_while_the_daemon_is_down(
    tmp_path: Path,
    registry: Registry,
    containerd_factory: ContainerdFactory,
    images: list[tuple[BuiltImage, str]],
) -> None:
    (_first, ref1), (second, ref2), _ = images
    ctrd = containerd_factory()  # containerd's builtin content store and overlayfs
    hosts_dir = tmp_path / "hosts.d"
    with start_peersync(tmp_path / "d", config=loopback_config(plain_http=[registry.address])) as daemon:
        hosts.install(registry.address, f"http://{daemon.mirror}", hosts_dir)
        toml = hosts_dir / registry.address / "hosts.toml"  # the test registry speaks plain HTTP
        toml.write_text(toml.read_text().replace(f"https://{registry.address}", f"http://{registry.address}"))
        args = ["--hosts-dir", str(hosts_dir)]
        ctrd.pull(ref1, extra_args=args)
        served = daemon.stats()["origin_bytes"]
        assert served > 0  # the first pull went through the mirror
        daemon.kill()
        ctrd.pull(ref2, extra_args=args)  # hosts.toml's server: straight to the origin
        assert ctrd.run(ref2, ["true"]) == ""
        assert second.blob_digests <= ctrd.content_digests()
        daemon.start()
        assert daemon.corrupt_blobs() == []
