"""The peersync plugin under a real containerd 1.6: pull, unpack, run, GC, restarts and crashes.

containerd is configured with the output of `peersync containerd-config`, so its builtin content
store is disabled and every blob and snapshot lives in our daemon's store.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.containerd import CTR_BINARY, Containerd, ContainerdFactory
from testbed.images import (
    LISTING_FIELDS,
    LISTING_SCRIPT,
    RUNTIME_MOUNTPOINTS,
    BuiltImage,
    build_sized_image,
    compare_manifests,
    parse_container_listing,
    push_image,
    snapshot_tree,
)
from testbed.peersyncd import PeerSyncDaemon, start_peersync
from testbed.procs import CommandError
from testbed.registry import Registry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SNAPSHOTTER = "peersync"


@pytest.fixture
def peersync(tmp_path: Path) -> Iterator[PeerSyncDaemon]:
    with start_peersync(tmp_path / "peersync") as daemon:
        yield daemon


@pytest.fixture
def containerd(containerd_factory: ContainerdFactory, peersync: PeerSyncDaemon) -> Containerd:
    return containerd_factory(extra_config=peersync.containerd_config())


@pytest.fixture(scope="session")
def sized_image_ref(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> tuple[BuiltImage, str]:
    """A ~96 MB 4-layer image: big enough that a pull is still running when we kill the daemon."""
    image = build_sized_image(tmp_path_factory.mktemp("sized"), 96 << 20, layers=4, tag="crash")
    return image, push_image(image, registry, "peersync/crash")


def test_containerd_uses_our_content_store(containerd: Containerd) -> None:
    plugins = containerd.ctr("plugins", "ls")
    assert "io.containerd.content.v1" in plugins and "peersync-content" in plugins
    assert "io.containerd.content.v1.content " not in plugins  # the builtin store is disabled


def test_pull_run_and_rootfs_match(
    containerd: Containerd, peersync: PeerSyncDaemon, test_image: BuiltImage, test_image_ref: str
) -> None:
    containerd.pull(test_image_ref, snapshotter=SNAPSHOTTER)
    # Every blob went to our store, none to containerd's builtin one.
    assert containerd.content_digests() == test_image.blob_digests
    assert peersync.blob_files() == test_image.blob_digests
    assert containerd.builtin_blob_files() == set()
    assert len(peersync.snapshot_dirs()) == len(test_image.layers)
    assert peersync.corrupt_blobs() == []

    assert containerd.run(test_image_ref, snapshotter=SNAPSHOTTER) == test_image.expected_output
    assert test_image.expected is not None
    with containerd.mount_image(test_image_ref, snapshotter=SNAPSHOTTER) as rootfs:
        assert compare_manifests(test_image.expected, snapshot_tree(rootfs)) == []
    listing = containerd.run(test_image_ref, ["sh", "-c", LISTING_SCRIPT], snapshotter=SNAPSHOTTER)
    actual = parse_container_listing(listing)
    assert compare_manifests(test_image.expected, actual, LISTING_FIELDS, RUNTIME_MOUNTPOINTS) == []


def test_rmi_and_gc_leave_only_cache_in_our_store(
    containerd: Containerd, peersync: PeerSyncDaemon, test_image: BuiltImage, test_image_ref: str
) -> None:
    containerd.pull(test_image_ref, snapshotter=SNAPSHOTTER)
    assert containerd.run(test_image_ref, snapshotter=SNAPSHOTTER) == test_image.expected_output
    assert peersync.blob_files() == test_image.blob_digests
    containerd.rmi(test_image_ref)
    assert containerd.content_digests() == set()
    assert containerd.snapshot_keys(SNAPSHOTTER) == set()
    # our blobs stay, as cache-only ones (containerd no longer sees them) until the budget needs
    # the room (tests/integration/test_cache.py)
    assert peersync.blob_files() == test_image.blob_digests and peersync.only_cache_left()
    assert peersync.snapshot_dirs() == set()
    assert not any((peersync.root / "snapshots").iterdir())  # Cleanup left nothing behind


def test_daemon_restart_between_pull_and_run(
    containerd: Containerd, peersync: PeerSyncDaemon, test_image: BuiltImage, test_image_ref: str
) -> None:
    containerd.pull(test_image_ref, snapshotter=SNAPSHOTTER)
    before = containerd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls")
    assert peersync.stop() == 0
    peersync.start()
    # containerd's gRPC client reconnects to a restarted plugin after its backoff (about 1 s):
    # until then its calls fail fast with UNAVAILABLE. Wait for it, then nothing must differ.
    retry(lambda: containerd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls"), attempts=20, delay=0.5)
    assert containerd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls") == before
    assert containerd.run(test_image_ref, snapshotter=SNAPSHOTTER) == test_image.expected_output
    assert test_image.expected is not None
    with containerd.mount_image(test_image_ref, snapshotter=SNAPSHOTTER) as rootfs:
        assert compare_manifests(test_image.expected, snapshot_tree(rootfs)) == []


def test_containerd_restart_between_pull_and_run(
    containerd: Containerd, peersync: PeerSyncDaemon, test_image: BuiltImage, test_image_ref: str
) -> None:
    containerd.pull(test_image_ref, snapshotter=SNAPSHOTTER)
    containerd.process.stop()
    containerd.process.start()
    containerd.process.wait_ready(lambda: containerd.address.is_socket(), 30, "serving its socket")
    wait_for_ctr(containerd)
    assert containerd.content_digests() == test_image.blob_digests
    assert containerd.run(test_image_ref, snapshotter=SNAPSHOTTER) == test_image.expected_output


def test_sigkill_during_pull_then_pull_again(
    containerd: Containerd, peersync: PeerSyncDaemon, sized_image_ref: tuple[BuiltImage, str]
) -> None:
    image, ref = sized_image_ref
    args = [CTR_BINARY, "--address", str(containerd.address), "--namespace", containerd.namespace]
    pull = subprocess.Popen(
        [*args, "images", "pull", "--plain-http", "--snapshotter", SNAPSHOTTER, ref],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(lambda: ingested_bytes(peersync.root) > (8 << 20), timeout=60, what="ingest started")
        peersync.kill()
        assert pull.wait(timeout=120) != 0, "the pull cannot succeed with its plugin killed"
    finally:
        if pull.poll() is None:
            pull.kill()
            pull.wait()
    assert peersync.corrupt_blobs() == []
    peersync.start()
    assert peersync.corrupt_blobs() == []
    retry(lambda: containerd.pull(ref, snapshotter=SNAPSHOTTER))
    assert image.blob_digests <= peersync.blob_files()
    assert peersync.corrupt_blobs() == []
    assert image.expected is not None
    with containerd.mount_image(ref, snapshotter=SNAPSHOTTER) as rootfs:
        assert compare_manifests(image.expected, snapshot_tree(rootfs)) == []


def ingested_bytes(root: Path) -> int:
    """Bytes in in-progress ingests plus committed blobs: how far a pull has got."""
    total = 0
    for sub in ("content/ingest", "content/blobs"):
        for dirpath, _dirs, files in os.walk(root / sub):  # entries vanish as ingests commit
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    total += os.stat(os.path.join(dirpath, name)).st_size
    return total


def wait_until(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.01)


def wait_for_ctr(containerd: Containerd) -> None:
    retry(lambda: containerd.ctr("version"))


def retry(call: object, attempts: int = 10, delay: float = 1.0) -> None:
    """containerd reconnects to a restarted plugin with backoff: the first RPCs may be refused."""
    for attempt in range(attempts):
        try:
            call()  # type: ignore[operator]
            return
        except CommandError:
            if attempt == attempts - 1:
                raise
            time.sleep(delay)
