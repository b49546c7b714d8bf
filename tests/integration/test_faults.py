"""The fault suite, bounded for CI: SIGKILL a real daemon at random points of its write paths,
restart it on the same root, and check that LMDB and the files agree, nothing acknowledged is
lost, corrupt or half present, and the daemon serves again with no manual step
(`testbed.faults`); then fill its disk (a small loop-mounted ext4) and check for a clear gRPC
error and no loss. The full run, with a hundred cycles, is `bench/faults.py`.

Peer death, a corrupt peer and tracker loss mid-pull are tests of their own
(tests/integration/test_cluster.py, test_p2p.py); bench/faults.py counts them in its table."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from snapshotter.api import snapshots_pb2, snapshots_pb2_grpc
from testbed.chainunpack import diff_ids_through_mirror
from testbed.faults import (
    ChainUnpacks,
    ContentWrites,
    Ledger,
    MirrorFetches,
    SnapshotWrites,
    fill_disk,
    kill_cycle,
    prime_mirror,
    refetched_differences,
    unpacked_differences,
    verify,
    wipe_store,
)
from testbed.images import BuiltImage, build_sized_image, push_image
from testbed.loopfs import loop_filesystem
from testbed.peersyncd import PeerSyncDaemon, loopback_config, start_peersync
from testbed.registry import Registry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

CYCLES = 2
REPO = "peersync/faults"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> tuple[BuiltImage, str]:
    """~24 MB in 3 layers (and busybox): enough chunks for a kill to land mid-fetch."""
    built = build_sized_image(tmp_path_factory.mktemp("faults-image"), 24 << 20, layers=3, tag="faults")
    return built, push_image(built, registry, REPO)


@pytest.fixture
def daemon(tmp_path: Path, registry: Registry) -> Iterator[PeerSyncDaemon]:
    with start_peersync(tmp_path / "d", config=loopback_config(plain_http=[registry.address])) as d:
        yield d


def layer_blobs(image: BuiltImage) -> list[tuple[str, str, int]]:
    return [(REPO, layer.descriptor.digest, layer.descriptor.size) for layer in image.layers]


@pytest.mark.parametrize("seed", range(CYCLES))
def test_sigkill_during_content_writes_commits_and_snapshot_prepare_commit_remove(
    daemon: PeerSyncDaemon, seed: int
) -> None:
    rng, ledger = random.Random(seed), Ledger()
    for cycle in range(2):
        workloads = [
            ContentWrites(daemon, ledger, rng, f"c{cycle}"),
            SnapshotWrites(daemon, ledger, rng, f"s{cycle}"),
        ]
        result = kill_cycle(daemon, workloads, ledger, rng)
        assert result.problems == [] and not result.crashed


@pytest.mark.parametrize("seed", range(CYCLES))
def test_sigkill_during_chunk_fetches_through_the_mirror(
    daemon: PeerSyncDaemon, registry: Registry, image: tuple[BuiltImage, str], seed: int
) -> None:
    built, _ref = image
    rng, ledger = random.Random(seed), Ledger()
    prime_mirror(daemon, registry.address, REPO, built.tag)
    fetches = [
        MirrorFetches(daemon, ledger, rng, f"m{i}", registry.address, layer_blobs(built)) for i in range(2)
    ]
    result = kill_cycle(daemon, fetches, ledger, rng, max_delay=3.0)
    assert result.problems == [] and not result.crashed
    assert refetched_differences(daemon, registry.address, layer_blobs(built)) == []


def test_sigkill_during_eviction(tmp_path: Path, registry: Registry, image: tuple[BuiltImage, str]) -> None:
    """A budget smaller than the image: every fetch evicts cache-only blobs as it is admitted."""
    built, _ref = image
    config = loopback_config(plain_http=[registry.address], extra='[cache]\nbudget = "20MB"\n')
    rng, ledger = random.Random(7), Ledger()
    with start_peersync(tmp_path / "d", config=config) as daemon:
        for cycle in range(CYCLES):
            prime_mirror(daemon, registry.address, REPO, built.tag)
            blobs = layer_blobs(built)
            fetches = [MirrorFetches(daemon, ledger, rng, f"e{cycle}{i}", registry.address, blobs)
                       for i in range(2)]  # fmt: skip
            result = kill_cycle(daemon, fetches, ledger, rng, max_delay=3.0)
            assert result.problems == [] and not result.crashed
        assert refetched_differences(daemon, registry.address, layer_blobs(built)) == []


def test_sigkill_during_the_daemons_own_unpack(daemon: PeerSyncDaemon, image: tuple[BuiltImage, str]) -> None:
    built, ref = image
    rng, ledger = random.Random(11), Ledger()
    for cycle in range(CYCLES):
        _config, diff_ids = diff_ids_through_mirror(daemon.mirror, ref)
        result = kill_cycle(daemon, [ChainUnpacks(daemon, ledger, rng, f"u{cycle}", diff_ids)], ledger, rng,
                            max_delay=3.0)  # fmt: skip
        assert result.problems == [] and not result.crashed
        assert unpacked_differences(daemon, built) == []
        wipe_store(daemon)


def test_a_full_disk_is_a_clear_error_and_loses_nothing_committed(tmp_path: Path) -> None:
    """ENOSPC on a 48 MiB ext4 (no cache budget, so the filesystem is what runs out)."""
    rng, ledger = random.Random(5), Ledger()
    with (
        loop_filesystem(tmp_path / "loop", 48) as mnt,
        start_peersync(mnt / "d", config=loopback_config(extra='[cache]\nbudget = ""\n')) as daemon,
    ):
        errors = fill_disk(daemon, ledger, rng)
        with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
            snaps = snapshots_pb2_grpc.SnapshotsStub(channel)
            snaps.Prepare(snapshots_pb2.PrepareSnapshotRequest(snapshotter="peersync", key="still-answers"))
        assert len(errors) == 3, "48 MiB never ran full"
        for exc in errors:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
            assert "no space left on the store's filesystem" in (exc.details() or "")
        assert ledger.blobs and verify(daemon, ledger) == []
        assert "Traceback" not in (daemon.root.parent / "peersync.log").read_text()
        daemon.kill()
        daemon.start()
        assert verify(daemon, ledger) == []
