"""Fault injection against a real `peersync daemon`: SIGKILL at random points of its write paths,
restart, and check that nothing acknowledged was lost, nothing is corrupt or half present, and
LMDB and the files agree.

A *workload* drives one write path over the daemon's real interfaces (gRPC on its unix socket,
HTTP on its mirror) in a thread, and writes what the daemon acknowledged into a `Ledger`: a blob
whose Commit answered, a snapshot whose Commit or Remove answered, a blob the mirror served whole.
`kill_cycle` starts the workloads, SIGKILLs the daemon after a random delay (so the kill lands
anywhere in the path: mid-Write, inside a commit, between a rename and its LMDB transaction,
mid-chunk, mid-unpack, mid-eviction), waits for the workloads to see the broken connection,
restarts the daemon on the same root and `verify`s:

- `kernel.store.storecheck.check_store` and `snapshotter.snapcheck.check_snapshots` find nothing;
- every acknowledged blob answers Info with its size and reads back to its digest;
- every acknowledged snapshot is committed, with the file written into it before its Commit;
- every acknowledged Remove stays removed;
- the daemon answers (List) at once after the restart: recovery needs no manual step.

What a workload does not know (a Commit in flight when the kill landed) may have happened or
not; both are allowed, half of it is not, and the checks above are what "half" would break.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import random
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from kernel.store.storecheck import check_store
from snapshotter.api import content_pb2, content_pb2_grpc, snapshots_pb2, snapshots_pb2_grpc
from snapshotter.remote import chain_ids
from snapshotter.snapcheck import check_snapshots, snapshot_ids
from testbed.chainunpack import PRESENT, PROVIDED, unpack_by_chain_ids
from testbed.images import BuiltImage, compare_manifests, snapshot_tree
from testbed.peersyncd import PeerSyncDaemon

SNAPSHOTTER = "peersync"
WRITE_PIECE = 256 * 1024
GRPC_TIMEOUT = 60.0


@dataclass
class Ledger:
    """What the daemon acknowledged, so far, to every workload of one run."""

    blobs: dict[str, int] = field(default_factory=dict)  # digest -> size: Commit answered
    snapshots: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # name -> (file, bytes)
    removed: set[str] = field(default_factory=set)  # snapshot names whose Remove answered
    served: dict[str, int] = field(default_factory=dict)  # digest -> size: the mirror served it whole
    lock: threading.Lock = field(default_factory=threading.Lock)


class Workload:
    """One write path driven in a thread until `stop` is set or the daemon goes away."""

    def __init__(self, daemon: PeerSyncDaemon, ledger: Ledger, rng: random.Random, tag: str) -> None:
        self.daemon, self.ledger, self.rng, self.tag = daemon, ledger, rng, tag
        self.stop = threading.Event()
        self.steps = 0
        self.error: BaseException | None = None  # an unexpected failure (not the daemon dying)
        self._thread = threading.Thread(target=self._run, name=f"workload-{tag}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float = 120.0) -> None:
        self.stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"workload {self.tag} did not stop within {timeout} s of the kill")

    def _run(self) -> None:
        try:
            with grpc.insecure_channel(f"unix:{self.daemon.socket}") as channel:
                while not self.stop.is_set():
                    self.step(channel)
                    self.steps += 1
        except grpc.RpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                self.error = exc
        except (OSError, urllib.error.URLError, http.client.HTTPException):
            pass  # the daemon was killed under the request
        except BaseException as exc:  # noqa: BLE001 - reported by the cycle, never swallowed
            self.error = exc

    def step(self, channel: grpc.Channel) -> None:
        raise NotImplementedError


class ContentWrites(Workload):
    """Content Writer streams of random sizes, each ending in a Commit (the ingest path)."""

    def step(self, channel: grpc.Channel) -> None:
        size = self.rng.choice([0, 1, 4096, 300_000, 1_500_000, 3_000_000])
        data = self.rng.randbytes(size)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        ref = f"{self.tag}-{self.steps}"
        stub = content_pb2_grpc.ContentStub(channel)
        try:
            for response in stub.Write(_write_stream(ref, data, digest), timeout=GRPC_TIMEOUT):
                if response.action == content_pb2.COMMIT:
                    self._acknowledged(digest, size)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:  # the same bytes committed before
                raise
            self._acknowledged(digest, size)

    def _acknowledged(self, digest: str, size: int) -> None:
        with self.ledger.lock:
            self.ledger.blobs[digest] = size


def _write_stream(ref: str, data: bytes, digest: str) -> Iterator[content_pb2.WriteContentRequest]:
    pieces = [data[i : i + WRITE_PIECE] for i in range(0, len(data), WRITE_PIECE)] or [b""]
    for index, piece in enumerate(pieces):
        last = index == len(pieces) - 1
        yield content_pb2.WriteContentRequest(
            action=content_pb2.COMMIT if last else content_pb2.WRITE,
            ref=ref,
            total=len(data),
            expected=digest,
            offset=index * WRITE_PIECE,
            data=piece,
        )


class SnapshotWrites(Workload):
    """Prepare (on a committed parent or none), write a file into the snapshot, Commit; now and
    then Remove a committed leaf or an active snapshot (the snapshot metadata and directory paths)."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.leaves: list[str] = []  # committed, acknowledged, no children made by us

    def step(self, channel: grpc.Channel) -> None:
        stub = snapshots_pb2_grpc.SnapshotsStub(channel)
        n = self.steps
        if self.leaves and self.rng.random() < 0.25:
            victim = self.leaves.pop(self.rng.randrange(len(self.leaves)))
            with self.ledger.lock:  # from now on either outcome is allowed, until the answer
                self.ledger.snapshots.pop(victim, None)
            stub.Remove(snapshots_pb2.RemoveSnapshotRequest(snapshotter=SNAPSHOTTER, key=victim),
                        timeout=GRPC_TIMEOUT)  # fmt: skip
            with self.ledger.lock:
                self.ledger.removed.add(victim)
            return
        parent = self.rng.choice(self.leaves) if self.leaves and self.rng.random() < 0.5 else ""
        key = f"{self.tag}-active-{n}"
        prepared = stub.Prepare(
            snapshots_pb2.PrepareSnapshotRequest(snapshotter=SNAPSHOTTER, key=key, parent=parent),
            timeout=GRPC_TIMEOUT,
        )
        upper = _upper_dir(prepared.mounts)
        name, content = f"file-{n}", self.rng.randbytes(self.rng.choice([0, 10, 50_000]))
        (upper / name).write_bytes(content)
        if self.rng.random() < 0.15:  # an abandoned active snapshot
            stub.Remove(
                snapshots_pb2.RemoveSnapshotRequest(snapshotter=SNAPSHOTTER, key=key), timeout=GRPC_TIMEOUT
            )
            return
        committed = f"{self.tag}-{n}"
        stub.Commit(snapshots_pb2.CommitSnapshotRequest(snapshotter=SNAPSHOTTER, name=committed, key=key),
                    timeout=GRPC_TIMEOUT)  # fmt: skip
        with self.ledger.lock:
            self.ledger.snapshots[committed] = (name, content)
        if parent:
            self.leaves.remove(parent)  # it has a child now: no longer removable
        self.leaves.append(committed)


def _upper_dir(mounts: object) -> Path:
    """Where a client's writes to an active snapshot land: a bind mount's source, or overlay's
    upperdir (what containerd's mount of it would write to)."""
    (mount,) = list(mounts)  # type: ignore[call-overload]
    if mount.type == "bind":
        return Path(mount.source)
    return Path(next(o for o in mount.options if o.startswith("upperdir="))[len("upperdir=") :])


class MirrorFetches(Workload):
    """Blob GETs through the daemon's mirror from a loopback registry (chunk fetches into partial
    blobs, their promotion, and, with a small cache budget, eviction). `blobs` are (repo, digest,
    size) of an image whose manifest `prime` fetched through the mirror (sizes come from it)."""

    def __init__(
        self,
        daemon: PeerSyncDaemon,
        ledger: Ledger,
        rng: random.Random,
        tag: str,
        registry: str,
        blobs: list[tuple[str, str, int]],
    ) -> None:
        super().__init__(daemon, ledger, rng, tag)
        self.registry, self.blobs = registry, blobs

    def step(self, channel: grpc.Channel) -> None:
        repo, digest, size = self.rng.choice(self.blobs)
        url = f"http://{self.daemon.mirror}/v2/{repo}/blobs/{digest}?ns={self.registry}"
        with urllib.request.urlopen(url, timeout=GRPC_TIMEOUT) as resp:
            body = resp.read()
        if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            raise AssertionError(f"the mirror served {len(body)} bytes for {digest} that do not match it")
        with self.ledger.lock:
            self.ledger.served[digest] = size


def prime_mirror(daemon: PeerSyncDaemon, registry: str, repo: str, tag: str) -> None:
    """GET the image's manifest through the mirror, as containerd's resolver does first."""
    accept = (
        "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
    )
    request = urllib.request.Request(
        f"http://{daemon.mirror}/v2/{repo}/manifests/{tag}?ns={registry}", headers={"Accept": accept}
    )
    with urllib.request.urlopen(request, timeout=GRPC_TIMEOUT) as resp:
        resp.read()


class ChainUnpacks(Workload):
    """The daemon's own unpack (snapshotter/unpacker.py), driven as containerd's Go client and
    CRI drive it: Prepares naming each layer's chain ID; each finished image's snapshots are
    removed again so the next step unpacks anew. `diff_ids` are the image's, its manifest and
    config fetched through the mirror first (`testbed.chainunpack.diff_ids_through_mirror`)."""

    def __init__(
        self, daemon: PeerSyncDaemon, ledger: Ledger, rng: random.Random, tag: str, diff_ids: list[str]
    ) -> None:
        super().__init__(daemon, ledger, rng, tag)
        self.diff_ids = diff_ids

    def step(self, channel: grpc.Channel) -> None:
        outcome = unpack_by_chain_ids(
            self.daemon.socket, "default", SNAPSHOTTER, self.diff_ids, timeout=GRPC_TIMEOUT
        )
        if outcome != [PROVIDED] * len(self.diff_ids):
            raise AssertionError(f"unpack by chain IDs: {outcome}")
        stub = snapshots_pb2_grpc.SnapshotsStub(channel)
        for chain in reversed(chain_ids(self.diff_ids)):
            stub.Remove(
                snapshots_pb2.RemoveSnapshotRequest(snapshotter=SNAPSHOTTER, key=chain), timeout=GRPC_TIMEOUT
            )


def unpacked_differences(daemon: PeerSyncDaemon, image: BuiltImage) -> list[str]:
    """Unpack `image` by chain IDs to the end on a restarted daemon and compare its root
    filesystem (a read-only view of the top chain, mounted here) with the image's."""
    diff_ids = [layer.diff_id for layer in image.layers]
    outcome = unpack_by_chain_ids(daemon.socket, "default", SNAPSHOTTER, diff_ids, timeout=GRPC_TIMEOUT)
    if set(outcome) - {PROVIDED, PRESENT}:
        return [f"unpack after the restart: {outcome}"]
    assert image.expected is not None
    with mounted_view(daemon, chain_ids(diff_ids)[-1]) as rootfs:
        return compare_manifests(image.expected, snapshot_tree(rootfs))


@contextlib.contextmanager
def mounted_view(daemon: PeerSyncDaemon, name: str) -> Iterator[Path]:
    """A read-only view of committed snapshot `name`, mounted from the Mounts the daemon returns
    (as containerd mounts them); unmounted and removed on exit."""
    key = f"faults-view-{time.monotonic_ns()}"
    target = Path(tempfile.mkdtemp(prefix="faults-view-", dir="/tmp"))
    with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
        stub = snapshots_pb2_grpc.SnapshotsStub(channel)
        view = stub.View(
            snapshots_pb2.ViewSnapshotRequest(snapshotter=SNAPSHOTTER, key=key, parent=name),
            timeout=GRPC_TIMEOUT,
        )
        (mount,) = view.mounts
        subprocess.run(
            ["mount", "-t", mount.type, "-o", ",".join(mount.options), mount.source, str(target)],
            check=True,
            capture_output=True,
        )
        try:
            yield target
        finally:
            subprocess.run(["umount", str(target)], check=True, capture_output=True)
            target.rmdir()
            stub.Remove(
                snapshots_pb2.RemoveSnapshotRequest(snapshotter=SNAPSHOTTER, key=key), timeout=GRPC_TIMEOUT
            )


def refetched_differences(
    daemon: PeerSyncDaemon, registry: str, blobs: list[tuple[str, str, int]]
) -> list[str]:
    """Fetch every blob through the restarted daemon's mirror to the end: each must be whole."""
    problems = []
    for repo, digest, size in blobs:
        url = f"http://{daemon.mirror}/v2/{repo}/blobs/{digest}?ns={registry}"
        with urllib.request.urlopen(url, timeout=GRPC_TIMEOUT) as resp:
            body = resp.read()
        if len(body) != size or "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            problems.append(
                f"blob {digest}: the mirror served {len(body)} bytes that do not match it after the restart"
            )
    return problems


def fill_disk(
    daemon: PeerSyncDaemon, ledger: Ledger, rng: random.Random, refusals: int = 3, most: int = 200
) -> list[grpc.RpcError]:
    """Content writes until the daemon refused `refusals` of them (its disk is full): the
    refusals, for the caller to judge; what it acknowledged is in `ledger`."""
    writer = ContentWrites(daemon, ledger, rng, f"full-{time.monotonic_ns()}")
    refused: list[grpc.RpcError] = []
    with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
        while len(refused) < refusals and writer.steps < most:
            try:
                writer.step(channel)
            except grpc.RpcError as exc:
                refused.append(exc)
            writer.steps += 1
    return refused


# -- checks --------------------------------------------------------------------------------------


def verify(daemon: PeerSyncDaemon, ledger: Ledger) -> list[str]:
    """Everything wrong with the restarted daemon's store against what it acknowledged ([] = ok)."""
    problems = settled_check(daemon.root)
    with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
        content = content_pb2_grpc.ContentStub(channel)
        snaps = snapshots_pb2_grpc.SnapshotsStub(channel)
        list(snaps.List(snapshots_pb2.ListSnapshotsRequest(snapshotter=SNAPSHOTTER), timeout=GRPC_TIMEOUT))
        for digest, size in sorted(ledger.blobs.items()):
            problems += _check_blob(content, digest, size)
        ids = snapshot_ids(daemon.root)
        for name, (filename, data) in sorted(ledger.snapshots.items()):
            problems += _check_snapshot(snaps, daemon.root, ids, name, filename, data)
        for name in sorted(ledger.removed - set(ledger.snapshots)):
            with contextlib.suppress(grpc.RpcError):
                snaps.Stat(
                    snapshots_pb2.StatSnapshotRequest(snapshotter=SNAPSHOTTER, key=name), timeout=GRPC_TIMEOUT
                )
                problems.append(f"snapshot {name}: removed (acknowledged) but back after the restart")
    return problems


def settled_check(root: Path, runs: int = 4, pause: float = 0.3) -> list[str]:
    """The store and snapshot checks of a live daemon, keeping only problems every one of `runs`
    checks found: a restarted daemon resumes its partial downloads at once, and a promotion
    landing between the checker's LMDB read and its look at the files is a race of the checker,
    not of the store; a real inconsistency stays until something repairs it."""
    found = set(check_store(root) + check_snapshots(root))
    for _ in range(runs - 1):
        if not found:
            break
        time.sleep(pause)
        found &= set(check_store(root) + check_snapshots(root))
    return sorted(found)


def _check_blob(content: content_pb2_grpc.ContentStub, digest: str, size: int) -> list[str]:
    try:
        info = content.Info(content_pb2.InfoRequest(digest=digest), timeout=GRPC_TIMEOUT).info
        h = hashlib.sha256()
        for part in content.Read(content_pb2.ReadContentRequest(digest=digest), timeout=GRPC_TIMEOUT):
            h.update(part.data)
    except grpc.RpcError as exc:
        return [f"blob {digest}: committed (acknowledged) but {exc.code().name}: {exc.details()}"]
    if info.size != size or "sha256:" + h.hexdigest() != digest:
        return [
            f"blob {digest}: committed with {size} bytes, now {info.size} bytes "
            f"hashing to sha256:{h.hexdigest()}"
        ]
    return []


def _check_snapshot(
    snaps: snapshots_pb2_grpc.SnapshotsStub,
    root: Path,
    ids: dict[str, str],
    name: str,
    filename: str,
    data: bytes,
) -> list[str]:
    try:
        info = snaps.Stat(
            snapshots_pb2.StatSnapshotRequest(snapshotter=SNAPSHOTTER, key=name), timeout=GRPC_TIMEOUT
        ).info
    except grpc.RpcError as exc:
        return [f"snapshot {name}: committed (acknowledged) but {exc.code().name}: {exc.details()}"]
    if info.kind != snapshots_pb2.COMMITTED:
        return [f"snapshot {name}: committed (acknowledged) but now of kind {info.kind}"]
    path = root / "snapshots" / ids[name] / "fs" / filename
    if not path.is_file() or path.read_bytes() != data:
        return [f"snapshot {name}: {filename} is not what was written before its Commit"]
    return []


# -- cycles --------------------------------------------------------------------------------------


@dataclass
class CycleResult:
    """One SIGKILL/restart cycle: how many steps the workloads completed before the kill, and
    what was wrong afterwards (empty: recovered)."""

    steps: int
    problems: list[str]
    crashed: bool  # the daemon died on its own before the kill, or failed to restart


def kill_cycle(
    daemon: PeerSyncDaemon,
    workloads: list[Workload],
    ledger: Ledger,
    rng: random.Random,
    max_delay: float = 1.5,
) -> CycleResult:
    """Run `workloads`, SIGKILL the daemon after a random delay, restart it and `verify`."""
    for w in workloads:
        w.start()
    time.sleep(rng.uniform(0.05, max_delay))
    crashed = daemon.process.proc is None or daemon.process.proc.poll() is not None
    daemon.kill()
    for w in workloads:
        w.join()
    problems = [f"workload {w.tag}: {w.error!r}" for w in workloads if w.error is not None]
    try:
        daemon.start()
    except Exception as exc:  # noqa: BLE001 - a daemon that cannot restart is the finding
        return CycleResult(sum(w.steps for w in workloads), [*problems, f"restart failed: {exc}"], True)
    problems += verify(daemon, ledger)
    return CycleResult(sum(w.steps for w in workloads), problems, crashed)


def wipe_store(daemon: PeerSyncDaemon) -> None:
    """Stop the daemon, delete its root, start it again empty (a fresh node for the next cycle)."""
    daemon.stop()
    shutil.rmtree(daemon.root)
    daemon.start()


WorkloadFactory = Callable[[random.Random, str], list[Workload]]

__all__ = [
    "ChainUnpacks",
    "mounted_view",
    "refetched_differences",
    "unpacked_differences",
    "ContentWrites",
    "CycleResult",
    "Ledger",
    "MirrorFetches",
    "SnapshotWrites",
    "Workload",
    "fill_disk",
    "kill_cycle",
    "prime_mirror",
    "settled_check",
    "verify",
    "wipe_store",
]
