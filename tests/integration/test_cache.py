"""Dynamic cache management with a real containerd, a real registry and the real daemon, in both
integration modes, through sequences of pulls of different images under a small `[cache] budget`:

- the store stays within the budget (one chunk of slack), measured on disk by the test, not taken
  from the daemon's own numbers;
- nothing containerd references (full mode) is evicted: images keep running, and a pull that
  cannot fit is refused with an error naming the budget; once containerd deletes an image its
  blobs are cache-only and make room;
- the eviction order follows the documented score (`peer.policy.eviction`): the daemon's own
  ranking before a pull is what the evictions of that pull follow, and it puts the blobs used
  least recently and least often first;
- pins and restarts are respected (last uses survive a restart and keep ordering evictions);
- a size a registry declares larger than the manifest's is refused, and a HEAD's size never makes
  a partial file (a registry that lies about sizes sits in front of the real one).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kernel.store.meta import Meta
from kernel.store.ownership import Ownership
from peer.policy.eviction import Candidate, eviction_key, score
from peersync import hosts
from testbed.containerd import Containerd, start_containerd
from testbed.images import BuiltImage, build_sized_image, push_image
from testbed.liarorigin import HUGE, lying_origin
from testbed.peersyncd import PeerSyncDaemon, start_peersync
from testbed.procs import CommandError, free_port
from testbed.registry import Registry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

CHUNK = 1 << 20
MIB = 1 << 20
BUDGET = 12 * MIB
HIGH, LOW = 0.9, 0.6


# ---------------------------------------------------------------------------------------------------
# Images: four of about 5 MiB each (2 payload layers of 2 MiB, incompressible), sharing busybox
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    built: BuiltImage
    ref: str
    repo: str

    @property
    def blobs(self) -> set[str]:
        return self.built.blob_digests

    @property
    def payload(self) -> list[str]:
        """The image's own layers (not the busybox base every image shares), biggest first."""
        layers = sorted(self.built.layers[1:], key=lambda la: -la.descriptor.size)
        return [la.descriptor.digest for la in layers]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> list[Image]:
    out = []
    for i in range(4):
        built = build_sized_image(tmp_path_factory.mktemp(f"cache-{i}"), 4 * MIB, layers=2, tag=f"c{i}",
                                  seed=1000 + i)
        repo = f"peersync/cache{i}"
        out.append(Image(built, push_image(built, registry, repo), repo))
    return out


# ---------------------------------------------------------------------------------------------------
# A node: the daemon with a small budget, a containerd in one of the two modes, hosts.toml
# ---------------------------------------------------------------------------------------------------


@dataclass
class Node:
    daemon: PeerSyncDaemon
    containerd: Containerd
    hosts_dir: Path
    mode: str
    peer_url: str
    registry: str

    @property
    def snapshotter(self) -> str:
        return "peersync" if self.mode == "full" else "overlayfs"

    def pull(self, ref: str) -> None:
        self.containerd.pull(ref, snapshotter=self.snapshotter, plain_http=True,
                             extra_args=["--hosts-dir", str(self.hosts_dir)])

    def run(self, image: Image) -> str:
        return self.containerd.run(image.ref, snapshotter=self.snapshotter)

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.peer_url}/peersync/v1/stats", timeout=10) as resp:
            cache: dict[str, Any] = json.loads(resp.read())["cache"]
        return cache

    def mirror_get(self, image: Image, digest: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        url = f"http://{self.daemon.mirror}/v2/{image.repo}/blobs/{digest}?ns={self.registry}"
        req = urllib.request.Request(url, method=method)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def evicted(self) -> list[str]:
        return [e["digest"] for e in self.status()["evictions"]["last"]]


def daemon_config(registry: str, peer_port: int) -> str:
    return "\n".join([
        "[peer]", f'listen = "127.0.0.1:{peer_port}"', "peers = []", "",
        "[mirror]", f'listen = "127.0.0.1:{free_port()}"', "",
        "[origin]", f'plain_http = ["{registry}"]', "",
        "[store]", f"chunk_size = {CHUNK}", "",
        "[cache]", f'budget = "{BUDGET}"', f"high_watermark = {HIGH}", f"low_watermark = {LOW}", "",
    ])


@contextlib.contextmanager
def start_node(workdir: Path, registry: str, mode: str) -> Iterator[Node]:
    peer_port = free_port()
    with contextlib.ExitStack() as stack:
        config = daemon_config(registry, peer_port)
        daemon = stack.enter_context(start_peersync(workdir / "daemon", config=config))
        extra = daemon.containerd_config() if mode == "full" else None
        ctrd = stack.enter_context(start_containerd(workdir / "containerd", extra_config=extra))
        hosts_dir = workdir / "hosts"
        hosts.install(registry, f"http://{daemon.mirror}", hosts_dir)
        toml = hosts_dir / registry / "hosts.toml"
        toml.write_text(toml.read_text().replace(f"https://{registry}", f"http://{registry}"))
        yield Node(daemon, ctrd, hosts_dir, mode, f"http://127.0.0.1:{peer_port}", registry)


class DiskUsage:
    """The store's bytes as the budget counts them, sampled on disk every few milliseconds while
    the block runs: complete blobs, partial blobs at their full (sparse) size, ingests. Listed in
    the order files move (blobs first), so a file renamed between two listings is missed, never
    counted twice."""

    def __init__(self, root: Path) -> None:
        self.content = root / "content"
        self.peak = 0
        self.peak_partial = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        total = 0
        dirs = [self.content / "blobs" / "sha256", self.content / "partial" / "sha256"]
        files = [p for d in dirs if d.exists() for p in d.iterdir()]
        ingest = self.content / "ingest"
        files += [p / "data" for p in ingest.iterdir()] if ingest.exists() else []
        for path in files:
            with contextlib.suppress(FileNotFoundError):
                size = path.stat().st_size
                total += size
                if path.parent.name == "sha256" and path.parent.parent.name == "partial":
                    self.peak_partial = max(self.peak_partial, size)
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.sample())

    def __enter__(self) -> DiskUsage:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.sample())


def retry(action: Callable[[], object], attempts: int = 20, delay: float = 0.5) -> None:
    for attempt in range(attempts):
        try:
            action()
            return
        except CommandError as exc:
            if attempt == attempts - 1 or "does not fit" in exc.stderr:
                raise
            time.sleep(delay)


def check_order(status: dict[str, Any]) -> list[str]:
    """The daemon's eviction ranking, checked against the documented score: each entry's score
    is the formula of its own fields, and the ranking sorts by (tier, score, last use, -size)."""
    now = time.time()
    entries = status["next"]
    keys = []
    for e in entries:
        c = Candidate(e["digest"], e["size"], e["last_use"], e["local"], e["site"], e["replicas"])
        # the daemon computed its score a moment ago: the same formula gives the same value
        assert score(c, now) == pytest.approx(e["score"], rel=1e-2), e
        keys.append(eviction_key(c, now)[:1] + (e["score"],) + eviction_key(c, now)[2:])
    assert keys == sorted(keys)
    return [e["digest"] for e in entries]


# ---------------------------------------------------------------------------------------------------
# Full mode
# ---------------------------------------------------------------------------------------------------


def test_full_mode_never_evicts_what_containerd_references_and_refuses_what_cannot_fit(
    tmp_path: Path, registry: Registry, images: list[Image]
) -> None:
    a, b, c, _ = images
    with start_node(tmp_path, registry.address, "full") as node, DiskUsage(node.daemon.root) as disk:
        node.pull(a.ref)
        node.pull(b.ref)
        assert node.run(a) == node.run(b) == "ready\n"
        # Everything here is containerd's: a third image cannot fit, and the pull says why.
        with pytest.raises(CommandError) as refused:
            node.pull(c.ref)
        assert "does not fit the cache budget" in refused.value.stderr, refused.value.stderr[-2000:]
        assert f"cache.budget = '{BUDGET}'" in refused.value.stderr
        status = node.status()
        assert status["evictions"]["refused_downloads"] >= 1
        # what may have gone to make room is only what containerd does not reference (of C, which
        # the refused pull left unreferenced)
        assert not set(node.evicted()) & (a.blobs | b.blobs), (node.evicted(), [c.blobs])
        assert node.run(a) == node.run(b) == "ready\n"
        # containerd removes A: its own blobs are kept, but as cache, out of containerd's sight
        # (or evicted at once, if the store is above its high watermark: what the refused pull
        # of C brought counts too)
        node.containerd.rmi(a.ref)
        a_only = a.blobs - b.blobs
        assert set(a.payload) <= node.daemon.blob_files() | set(node.evicted())
        assert node.containerd.content_digests() & a_only == set()
        # a restart keeps who owns what: B still containerd's, A's blobs cache-only
        node.daemon.restart()
        # now C fits: A's cache-only blobs make room, and nothing containerd references goes
        retry(lambda: node.pull(c.ref))  # containerd reconnects to a restarted plugin after a backoff
        assert node.run(c) == node.run(b) == "ready\n"
        # what went was A's, or what the refused pull of C had left and containerd's GC deleted
        # with A; never anything of B, which containerd referenced throughout
        evicted = set(node.evicted())
        assert evicted & a_only and evicted <= a_only | c.blobs and not evicted & b.blobs, evicted
        referenced = node.containerd.content_digests()
        assert referenced >= (b.blobs | c.blobs)
        assert referenced <= node.daemon.blob_files()
        assert node.daemon.corrupt_blobs() == []
    assert disk.peak <= BUDGET + CHUNK, disk.peak


# ---------------------------------------------------------------------------------------------------
# Mirror-only mode: everything we store is cache-only
# ---------------------------------------------------------------------------------------------------


def test_mirror_only_stays_within_budget_evicting_by_the_score(
    tmp_path: Path, registry: Registry, images: list[Image]
) -> None:
    a, b, c, d = images
    with start_node(tmp_path, registry.address, "mirror-only") as node, DiskUsage(node.daemon.root) as disk:
        node.pull(a.ref)
        node.pull(b.ref)
        assert node.status()["evictions"]["count"] == 0
        # A is wanted again (a second client through the mirror, after the dedup window): it is
        # used later and more often than B
        time.sleep(11)
        for digest in a.payload:
            status, _, body = node.mirror_get(a, digest)
            assert status == 200 and len(body) > 0
        ranking = check_order(node.status())
        b_first = [x for x in ranking if x in b.payload]
        assert b_first and ranking.index(b_first[-1]) < min(ranking.index(x) for x in a.payload), ranking
        node.pull(c.ref)  # no room: what goes is what the ranking put first
        evicted = node.evicted()
        assert evicted and evicted == ranking[: len(evicted)], (evicted, ranking)
        assert set(b.payload) <= set(evicted) and not set(a.payload) & set(evicted)
        assert b.built.manifest.digest in evicted  # a manifest fetched by tag is cache-only too
        # and on: D pushes out what the score ranks lowest now (C, requested once, before A's
        # layers, requested twice: the last copies of hot blobs go last); blobs that came with D's
        # pull after the ranking was taken (its manifest) may be ranked in between
        ranking = check_order(node.status())
        node.pull(d.ref)
        later = node.evicted()[len(evicted):]
        ranked = [x for x in later if x in ranking]
        assert ranked and ranked == ranking[: len(ranked)], (later, ranking)
        assert set(later) - set(ranking) <= d.blobs and not set(a.payload) & set(later)
        assert not set(d.payload) & set(node.evicted())
        for image in images:  # containerd kept its own copies all along
            assert node.run(image) == "ready\n"
        status = node.status()
        assert status["usage"]["total"] <= HIGH * BUDGET
        assert status["blobs"]["containerd"] == 0  # in mirror-only mode containerd owns nothing here
        assert node.daemon.corrupt_blobs() == []
    assert disk.peak <= BUDGET + CHUNK, disk.peak


def test_mirror_only_pins_and_restarts_are_respected(
    tmp_path: Path, registry: Registry, images: list[Image]
) -> None:
    a, b, c, _ = images
    with start_node(tmp_path, registry.address, "mirror-only") as node, DiskUsage(node.daemon.root) as disk:
        node.pull(a.ref)
        node.pull(b.ref)
        pinned, unpinned = a.payload
        node.daemon.stop()
        # the last uses were written on the way down; an operator pins one of A's layers
        meta = Meta(node.daemon.root)
        owners = Ownership(meta)
        assert owners.last_use_ns(unpinned) < owners.last_use_ns(b.payload[0])
        owners.pin(pinned)
        meta.close()
        node.daemon.start()
        assert node.status()["pins"] == [pinned]
        node.pull(c.ref)
        evicted = node.evicted()
        assert pinned not in evicted and pinned in node.daemon.blob_files()
        # the order still follows the last uses from before the restart: what A's pull brought
        # (but the pin; the busybox layer too: B's pull found it in containerd's own store) goes
        # before anything of B's
        a_first = [x for x in evicted if x in a.blobs]
        assert unpinned in a_first and evicted[: len(a_first)] == a_first, evicted
        node.daemon.restart()
        assert node.status()["pins"] == [pinned] and pinned in node.daemon.blob_files()
        assert node.run(c) == "ready\n"
    assert disk.peak <= BUDGET + CHUNK, disk.peak


# ---------------------------------------------------------------------------------------------------
# Sizes come from manifests
# ---------------------------------------------------------------------------------------------------


def test_a_head_declared_size_never_makes_a_partial_file(
    tmp_path: Path, registry: Registry, images: list[Image]
) -> None:
    a, _, _, d = images
    with lying_origin(registry, "head") as liar:
        with start_node(tmp_path, liar.address, "mirror-only") as node, DiskUsage(node.daemon.root) as disk:
            through = Image(a.built, f"{liar.address}/{a.repo}:{a.built.tag}", a.repo)
            node.pull(through.ref)
            assert node.run(through) == "ready\n"
            # a catalogued blob's size is the manifest's, whatever the registry's HEAD says
            layer = a.built.layers[1].descriptor
            status, headers, _ = node.mirror_get(a, layer.digest, "HEAD")
            assert status == 200 and int(headers["Content-Length"]) == layer.size
            # a blob no manifest we served names is relayed, never stored: the lie reaches the
            # client (which checks the digest), never the disk
            other = next(la.descriptor for la in d.built.layers if la.descriptor.digest == d.payload[0])
            status, headers, _ = node.mirror_get(d, other.digest, "HEAD")
            assert status == 200 and int(headers["Content-Length"]) == HUGE and liar.lies >= 1
            status, _, body = node.mirror_get(d, other.digest, "GET")
            assert status == 200 and len(body) == other.size
            assert other.digest not in node.daemon.blob_files()
            assert not any((node.daemon.root / "content" / "partial" / "sha256").iterdir())
    assert disk.peak_partial <= max(la.descriptor.size for la in a.built.layers), disk.peak_partial


def test_a_registry_declaring_a_blob_larger_than_its_manifest_is_refused(
    tmp_path: Path, registry: Registry, images: list[Image]
) -> None:
    a = images[0]
    with lying_origin(registry, "range") as liar:
        with start_node(tmp_path, liar.address, "mirror-only") as node, DiskUsage(node.daemon.root) as disk:
            with pytest.raises(CommandError):
                node.pull(f"{liar.address}/{a.repo}:{a.built.tag}")
            assert liar.lies >= 1
            log = node.daemon.process.log_path.read_text()
            assert f"the registry declares {HUGE} bytes, the manifest" in log
            assert not set(a.payload) & node.daemon.blob_files()
            deadline = time.monotonic() + 60  # the refused downloads give up and drop their files
            while any((node.daemon.root / "content" / "partial" / "sha256").iterdir()):
                assert time.monotonic() < deadline
                time.sleep(0.2)
    assert disk.peak_partial <= max(la.descriptor.size for la in a.built.layers), disk.peak_partial
