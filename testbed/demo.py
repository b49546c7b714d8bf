"""`peersync-testbed demo`: a three-node site on loopback, end to end, with real parts only.

1. a `docker-registry` on 127.0.0.1 (the origin) and a generated 5-layer image pushed to it;
2. three nodes, each a `peersync daemon` plus its own containerd configured by
   `peersync containerd-config`, listing each other as peers, pulling through their own mirror;
3. node A pulls (everything comes from the origin) and runs the image;
4. node B pulls: every chunk comes from node A, none from the origin; it runs the image too, and
   its unpacked filesystem is compared with what the layers say, attribute by attribute;
5. B removes the image; containerd's garbage collector empties B's store through the plugin;
6. node C pulls the way kubelet does (containerd's CRI plugin): the daemon itself streams each layer
   from A into its snapshot (containerd downloads and applies nothing), and the filesystem is
   compared again; removing the image through CRI empties C's store too.

Needs root and the Debian packages `scripts/setup.sh` installs. Everything stays on loopback and is
stopped (by PID) and removed at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from testbed.images import build_test_image, push_image
from testbed.loopback import LoopbackNode, start_node
from testbed.procs import free_port
from testbed.registry import start_registry

REQUIRED = ("containerd", "ctr", "runc", "docker-registry", "skopeo", "busybox")
T = TypeVar("T")


def main() -> int:
    problem = _missing()
    if problem:
        print(f"peersync-testbed demo: {problem}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="peersync-demo-"))
    try:
        _run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (containerd, runc and overlay mounts); run it as root"
    absent = [b for b in REQUIRED if shutil.which(b) is None]
    if absent:
        return f"missing {', '.join(absent)}: run scripts/setup.sh (installs the Debian packages)"
    return None


def _run(work: Path) -> None:
    image = _step(
        "building a 5-layer test image (files, links, whiteouts, xattrs)",
        lambda: build_test_image(work / "image"),
    )
    with contextlib.ExitStack() as stack:
        registry = stack.enter_context(start_registry(work / "registry"))
        ref = _step(
            f"pushing it to a local registry at {registry.address}",
            lambda: push_image(image, registry, "demo/app"),
        )
        ports = [free_port(), free_port(), free_port()]
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        a, b, c = (
            stack.enter_context(
                start_node(work / name, port, [u for u in urls if u != url], registry.address, cri=cri)
            )
            for name, port, url, cri in (
                ("node-a", ports[0], urls[0], False),
                ("node-b", ports[1], urls[1], False),
                ("node-c", ports[2], urls[2], True),
            )
        )
        for name, node in (("A", a), ("B", b), ("C (CRI)", c)):
            print(f"  node {name}: peer exchange {node.peer_url}, mirror http://{node.daemon.mirror}")
        layers = sum(layer.descriptor.size for layer in image.layers)

        took = _timed("node A pulls (alone: from the origin)", lambda: a.pull(ref))
        _report(a, layers, took)
        print(f"  node A runs it: {a.run(ref).strip()!r}")

        took = _timed("node B pulls (node A already holds every chunk)", lambda: b.pull(ref))
        _report(b, layers, took)
        print(f"  node B runs it: {b.run(ref).strip()!r}")
        diffs = b.rootfs_differences(ref, image)
        assert image.expected is not None
        verdict = "identical" if not diffs else f"{len(diffs)} DIFFERENCES: {diffs[:5]}"
        print(f"  node B's unpacked filesystem vs the layers ({len(image.expected)} paths): {verdict}")

        before = len(b.daemon.blob_files())
        _step(
            "node B removes the image (containerd GC runs through the plugin)", lambda: b.containerd.rmi(ref)
        )
        print(f"  node B's store: {before} blobs before, {_kept(b)} after; "
              f"{len(b.daemon.snapshot_dirs())} snapshots left")

        took = _timed(
            "node C pulls as kubelet does (CRI PullImage; the daemon unpacks)", lambda: c.cri_pull(ref)
        )
        _report(c, layers, took)
        fetched = set(c.containerd.content_digests()) & {layer.descriptor.digest for layer in image.layers}
        print(f"  layers containerd downloaded itself: {len(fetched)} of {len(image.layers)}")
        print(f"  node C runs it: {c.run(ref).strip()!r}")
        diffs = c.rootfs_differences(ref, image)
        verdict = "identical" if not diffs else f"{len(diffs)} DIFFERENCES: {diffs[:5]}"
        print(f"  node C's unpacked filesystem vs the layers: {verdict}")
        before = len(c.daemon.blob_files())
        _step("node C removes the image through CRI (then containerd GC)", lambda: c.cri_remove(ref))
        print(f"  node C's store: {before} blobs before, {_kept(c)} after; "
              f"{len(c.daemon.snapshot_dirs())} snapshots left")
        print("\ndone: nodes B and C never touched the origin; everything is stopped and removed.")


def _kept(node: LoopbackNode) -> str:
    """What an image's removal leaves in a node's store: its blobs stay as cache-only ones (for
    peers and later pulls, out of containerd's sight) until the budget needs the room."""
    blobs = node.stats()["cache"]["blobs"]
    owned = blobs["containerd"] + blobs["held"] + blobs["pinned"]
    return f"{blobs['complete']} ({owned} containerd's or held, {blobs['cache_only']} kept as cache)"


def _report(node: LoopbackNode, layers: int, seconds: float) -> None:
    s = node.stats()
    print(
        f"  {seconds:.2f} s; bytes from the origin: {s['origin_bytes']:,}, from peers: {s['peer_bytes']:,} "
        f"(layers: {layers:,}); corrupt chunks: {s['corrupt_chunks']}"
    )


def _step(what: str, action: Callable[[], T]) -> T:
    print(f"- {what} ...", flush=True)
    return action()


def _timed(what: str, action: Callable[[], object]) -> float:
    print(f"- {what} ...", flush=True)
    started = time.monotonic()
    action()
    return time.monotonic() - started
