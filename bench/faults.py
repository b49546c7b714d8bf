"""The fault table (issue 10): adversarial requests, SIGKILL/restart cycles over the write paths,
a full disk, peer death, a corrupt peer and tracker loss, each class with how many cases were
tried, how many ended recovered, and the counts that must be 0: data lost or corrupt,
unauthorised reads, daemon crashes.

    python bench/faults.py            # the full table: 1,200 requests, 100 SIGKILL cycles, ...
    python bench/faults.py --quick    # the bounded version the suite runs (tests/integration)

Needs root (overlay mounts, a loop device), the registry binary, containerd and network
namespaces for the peer classes (`--no-network` leaves those out). Everything runs on loopback
or in namespaces it makes. Columns:

- cases tried: requests sent, kill cycles run, disks filled, pull runs;
- recovered: a good answer (any clear refusal or success: no INTERNAL/UNKNOWN, no 500, no hang);
  a kill cycle after which the restarted daemon's store passes every check of
  `testbed.faults.verify` and the blobs or image come out whole; a pull test that passed;
- data lost or corrupt: problems `verify` found (an acknowledged blob or snapshot missing or
  wrong, LMDB and the files disagreeing), a blob or image that did not come out right, a failed
  pull test;
- unauthorised reads: the mirror serving a held blob's bytes to a request naming an origin that
  does not have it (`testbed.adversary`);
- daemon crashes: the daemon dead before the test killed it, or unable to restart.

Adversarial requests are drawn by hypothesis from `testbed.adversary`'s strategies; kill cycles
use `testbed.faults`'s workloads; the peer classes run the integration tests that own them
(tests/integration/test_cluster.py, test_p2p.py) `--network-runs` times each.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from testbed import faults  # noqa: E402
from testbed.adversary import attacked_daemon, campaign, strategies  # noqa: E402
from testbed.chainunpack import diff_ids_through_mirror  # noqa: E402
from testbed.images import BuiltImage, build_sized_image, push_image  # noqa: E402
from testbed.loopfs import loop_filesystem  # noqa: E402
from testbed.peersyncd import PeerSyncDaemon, loopback_config, start_peersync  # noqa: E402
from testbed.registry import Registry, start_registry  # noqa: E402

REPO = "peersync/faults"
CLASS_NAMES = {
    "content": "gRPC content",
    "snapshots": "gRPC snapshots",
    "exchange": "HTTP peer exchange",
    "mirror": "HTTP mirror",
}
NETWORK_TESTS = {
    "peer death mid-pull": ["tests/integration/test_cluster.py::test_killing_a_serving_peer_mid_pull"],
    "corrupt peer (flip, liar)": ["tests/integration/test_p2p.py::test_corrupt_peer_is_detected_and_dropped"],
    "tracker loss mid-pull": [
        "tests/integration/test_cluster.py::test_the_tracker_dies_mid_pull_on_a_site_that_names_no_peers"
    ],
}


@dataclass
class Row:
    """One line of the table."""

    name: str
    tried: int = 0
    recovered: int = 0
    lost: int = 0
    unauthorised: int = 0
    crashes: int = 0


@dataclass
class Sizes:
    requests: int  # per adversarial class (4 classes)
    writes: int  # SIGKILL cycles over content + snapshot writes
    fetches: int
    evictions: int
    unpacks: int
    disks: int
    network_runs: int


FULL = Sizes(requests=300, writes=40, fetches=20, evictions=20, unpacks=20, disks=3, network_runs=1)
QUICK = Sizes(requests=25, writes=1, fetches=1, evictions=1, unpacks=1, disks=1, network_runs=0)


def _alive(daemon: PeerSyncDaemon) -> bool:
    return daemon.process.proc is not None and daemon.process.proc.poll() is None


def adversarial_rows(work: Path, registry: Registry, image: BuiltImage, count: int, seed: int) -> list[Row]:
    """The four request classes against one daemon holding blobs and snapshots."""
    rows = []
    with attacked_daemon(work, registry, image, REPO, seed) as (daemon, ledger, target):
        for kind, strategy in strategies(target).items():
            verdicts = campaign(target, strategy, count, seed)
            row = Row(
                f"adversarial requests: {CLASS_NAMES[kind]}",
                len(verdicts),
                sum(1 for v in verdicts if not v.bad),
                unauthorised=sum(1 for v in verdicts if v.unauthorised),
            )
            for v in verdicts:
                if v.bad:
                    print(f"  bad answer: {v.request[:160]} -> {v.bad[:160]}", file=sys.stderr)
            if not _alive(daemon):
                row.crashes += 1
                daemon.start()
            row.lost = len(faults.verify(daemon, ledger))
            rows.append(row)
    return rows


def _cycles(
    row: Row,
    daemon: PeerSyncDaemon,
    count: int,
    rng: random.Random,
    make: object,
    after: object = None,
    max_delay: float = 1.5,
) -> None:
    ledger = faults.Ledger()
    for cycle in range(count):
        result = faults.kill_cycle(daemon, make(ledger, cycle), ledger, rng, max_delay=max_delay)  # type: ignore[operator]
        extra = after(ledger) if after is not None and not result.problems else []  # type: ignore[operator]
        row.tried += 1
        row.crashes += int(result.crashed)
        problems = [*result.problems, *extra]
        row.lost += len(problems)
        row.recovered += int(not problems)
        for p in problems:
            print(f"  {row.name}: {p[:300]}", file=sys.stderr)


def kill_rows(
    work: Path, registry: Registry, image: BuiltImage, ref: str, sizes: Sizes, seed: int
) -> list[Row]:
    rng = random.Random(seed)
    blobs = [(REPO, layer.descriptor.digest, layer.descriptor.size) for layer in image.layers]
    plain = loopback_config(plain_http=[registry.address])
    rows = [
        Row("SIGKILL: content writes, commits, snapshot prepare/commit/remove"),
        Row("SIGKILL: chunk fetches (mirror from the origin)"),
        Row("SIGKILL: eviction (budget below the image)"),
        Row("SIGKILL: the daemon's own unpack (chain IDs, as CRI)"),
    ]
    with start_peersync(work / "writes", config=plain) as daemon:
        _cycles(
            rows[0],
            daemon,
            sizes.writes,
            rng,
            lambda led, c: [
                faults.ContentWrites(daemon, led, rng, f"c{c}"),
                faults.SnapshotWrites(daemon, led, rng, f"s{c}"),
            ],
        )
    with start_peersync(work / "fetches", config=plain) as daemon:

        def fetches(led: faults.Ledger, c: int) -> list[faults.MirrorFetches]:
            faults.prime_mirror(daemon, registry.address, REPO, image.tag)
            return [
                faults.MirrorFetches(daemon, led, rng, f"m{c}{i}", registry.address, blobs) for i in range(2)
            ]

        def refetch_and_wipe(led: faults.Ledger) -> list[str]:
            problems = faults.refetched_differences(daemon, registry.address, blobs)
            faults.wipe_store(daemon)
            return problems

        _cycles(rows[1], daemon, sizes.fetches, rng, fetches, refetch_and_wipe, max_delay=3.0)
    with start_peersync(work / "evict", config=plain + '[cache]\nbudget = "20MB"\n') as daemon:
        _cycles(
            rows[2],
            daemon,
            sizes.evictions,
            rng,
            fetches,
            lambda led: faults.refetched_differences(daemon, registry.address, blobs),
            max_delay=3.0,
        )
    with start_peersync(work / "unpack", config=plain) as daemon:

        def unpacks(led: faults.Ledger, c: int) -> list[faults.ChainUnpacks]:
            return [
                faults.ChainUnpacks(daemon, led, rng, f"u{c}", diff_ids_through_mirror(daemon.mirror, ref)[1])
            ]

        def compare_and_wipe(led: faults.Ledger) -> list[str]:
            problems = faults.unpacked_differences(daemon, image)
            faults.wipe_store(daemon)
            return problems

        _cycles(rows[3], daemon, sizes.unpacks, rng, unpacks, compare_and_wipe, max_delay=3.0)
    return rows


def disk_row(work: Path, count: int, seed: int) -> Row:
    """Fill a 48 MiB ext4 with content writes: every refusal must be RESOURCE_EXHAUSTED, nothing
    acknowledged lost, before and after a SIGKILL and restart on the full disk."""
    row = Row("ENOSPC: content writes on a full 48 MiB loop-mounted ext4")
    rng = random.Random(seed)
    for case in range(count):
        row.tried += 1
        with (
            loop_filesystem(work / f"loop{case}", 48) as mnt,
            start_peersync(mnt / "d", config=loopback_config(extra='[cache]\nbudget = ""\n')) as daemon,
        ):
            ledger = faults.Ledger()
            refusals = [exc.code() for exc in faults.fill_disk(daemon, ledger, rng)]
            clear = bool(refusals) and all(code == grpc.StatusCode.RESOURCE_EXHAUSTED for code in refusals)
            problems = faults.verify(daemon, ledger)
            row.crashes += int(not _alive(daemon))
            daemon.kill()
            daemon.start()
            problems += faults.verify(daemon, ledger)
            row.lost += len(problems)
            row.recovered += int(clear and not problems)
    return row


def network_rows(runs: int) -> list[Row]:
    rows = []
    for name, tests in NETWORK_TESTS.items():
        row = Row(name)
        for _ in range(runs):
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                                  cwd=REPO_ROOT, capture_output=True, text=True)  # fmt: skip
            cases = len(tests) * (2 if "corrupt" in name else 1)
            passed = _count(proc.stdout, "passed")
            row.tried += cases
            row.recovered += passed
            row.lost += cases - passed
            if passed < cases:
                print(f"  {name}: {proc.stdout[-3000:]}", file=sys.stderr)
        rows.append(row)
    return rows


def _count(output: str, word: str) -> int:
    tail = output.strip().splitlines()[-1] if output.strip() else ""
    for part in tail.replace(",", " ").split(" in ")[0].split("  "):
        for i, token in enumerate(part.split()):
            if token == word and i:
                return int(part.split()[i - 1])
    return 0


def table(rows: list[Row]) -> str:
    lines = [
        "| class | cases tried | recovered | data lost or corrupt | unauthorised reads | daemon crashes |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r.name} | {r.tried} | {r.recovered} | {r.lost} | {r.unauthorised} | {r.crashes} |" for r in rows
    ]
    total = Row(
        "**total**",
        *(
            sum(getattr(r, f) for r in rows)
            for f in ("tried", "recovered", "lost", "unauthorised", "crashes")
        ),
    )
    lines.append(
        f"| {total.name} | {total.tried} | {total.recovered} | {total.lost} | {total.unauthorised} | "
        f"{total.crashes} |"
    )
    return "\n".join(lines)


@contextlib.contextmanager
def origin(work: Path) -> Iterator[tuple[Registry, BuiltImage, str]]:
    with start_registry(work / "registry") as registry:
        image = build_sized_image(work / "image", 24 << 20, layers=3, tag="faults")
        yield registry, image, push_image(image, registry, REPO)


def run(sizes: Sizes, network: bool, seed: int) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="faults-", dir="/tmp") as tmp:
        work = Path(tmp)
        with origin(work) as (registry, image, ref):
            rows = adversarial_rows(work, registry, image, sizes.requests, seed)
            rows += kill_rows(work, registry, image, ref, sizes, seed)
        rows.append(disk_row(work, sizes.disks, seed))
    if network and sizes.network_runs:
        rows += network_rows(sizes.network_runs)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the bounded version the suite runs")
    parser.add_argument("--no-network", action="store_true", help="leave out the peer classes (netns sites)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = run(QUICK if args.quick else FULL, not args.no_network, args.seed)
    print(table(rows))
    bad = any(r.lost or r.unauthorised or r.crashes for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
