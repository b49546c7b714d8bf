"""Scale: how the all-done time, the uplink bytes and the control traffic grow with the site (issue 9).

    python bench/scale.py [--nodes 4,16,32] [--payload-mb 20] [--uplink-mbit 100] [--rounds 1]
                          [--no-static-peers] [--extra-config FILE] [--out DIR]

For each N: a fresh `testbed.netns.Site` of N nodes behind a tbf-shaped uplink, the origin registry
across it holding a small image (busybox + `--payload-mb` of random payload in one layer: about
21 MB compressed at the default), a `testbed.cluster.Cluster` in full mode (every node runs
`peersync daemon` and a containerd using it, pulling through containerd's CRI plugin as kubelet
does), and every node pulling the image at once. Measured per run:

- all done: seconds from the start until the last node's pull returned (image fetched and unpacked);
- uplink: WAN->LAN bytes on the uplink / the image's compressed size (the ideal is 1.0);
- control requests per node per second: the daemons' `control_requests` counter (every `/have`
  poll the engine sends, and every tracker sync once the control plane runs) summed over the nodes,
  divided by N and by the all-done time. All-to-all polling makes it grow with N; the tracker
  index must keep it flat.

`--no-static-peers` writes configs naming no other node (the control plane's discovery must find
them); `--extra-config` appends a TOML fragment to every node's config (e.g. a `[site]` or
`[discovery]` section). Results: OUT/scale.json and a markdown table on stdout (OUT defaults to
bench/results/scale-<timestamp>). Needs root and the testbed's binaries (containerd, runc,
docker-registry, skopeo); a 32-node run takes a few minutes, most of it starting the daemons.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from testbed.cluster import Cluster  # noqa: E402
from testbed.images import BuiltImage, build_sized_image  # noqa: E402
from testbed.netns import Site, missing_tools  # noqa: E402
from testbed.scratchfs import fresh_ext4  # noqa: E402

CACHE = Path("/var/cache/peersync-testbed")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def image_bytes(image: BuiltImage) -> int:
    """Every blob a pull fetches: manifest, config and layers."""
    blobs = image.layout / "blobs" / "sha256"
    return sum((blobs / d[7:]).stat().st_size for d in image.blob_digests)


def run_one(n: int, image: BuiltImage, size: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One fresh site of `n` nodes, every node pulling at once; always torn down."""
    extra = args.extra_config.read_text() if args.extra_config else ""
    result: dict[str, Any] = {"nodes": n, "disk": args.disk}
    with contextlib.ExitStack() as disk:
        if args.disk == "ext4":  # a fresh journaled ext4 per round, as the site bench (testbed/scratchfs.py)
            work = disk.enter_context(fresh_ext4())
        return _run_on(n, image, size, args, work, extra, result)


def _run_on(
    n: int,
    image: BuiltImage,
    size: int,
    args: argparse.Namespace,
    work: Path,
    extra: str,
    result: dict[str, Any],
) -> dict[str, Any]:
    scratch = work if args.disk == "ext4" else None
    with Site(nodes=n, uplink_mbit=args.uplink_mbit, workdir=work / f"n{n}", scratch=scratch) as site:
        site.start_registry()
        ref = site.push_image(image, "scale/app")
        t = time.monotonic()
        cluster = Cluster(
            site, mode="full", client="cri", extra_config=extra, discovery=args.no_static_peers
        )
        result["setup_s"] = round(time.monotonic() - t, 1)
        time.sleep(args.settle)  # let discovery and election (if any) settle before the burst
        before = [cn.stats() for cn in cluster.nodes]
        up0 = site.uplink_bytes()
        t0 = time.monotonic()
        times = cluster.pull_all(ref)
        all_done = time.monotonic() - t0
        uplink = site.uplink_bytes() - up0
        after = [cn.stats() for cn in cluster.nodes]
        pairs = list(zip(after, before, strict=True))

        def delta(key: str) -> list[int]:
            return [int(a.get(key, 0)) - int(b.get(key, 0)) for a, b in pairs]

        control = delta("control_requests")
        result |= {
            "all_done_s": round(all_done, 2),
            "p50_s": round(statistics.median(times), 2),
            "uplink_bytes": uplink,
            "uplink_x": round(uplink / size, 3),
            "peak_uplink_mbit": round(site.sampler.peak_mbit(since=t0), 1),
            "control_requests": sum(control),
            "control_per_node_per_s": round(sum(control) / n / all_done, 1),
            "control_max_node": max(control),
            "origin_bytes": sum(delta("origin_bytes")),
            "peer_bytes": sum(delta("peer_bytes")),
        }
        bad = [cn.node.name for cn in cluster.nodes if cn.daemon.corrupt_blobs()]
        if bad:
            result["corrupt_blobs_on"] = bad
    return result


def markdown(results: dict[str, Any]) -> str:
    rows = [
        "| N | all done s | p50 s | uplink (x image) | control req / node / s | max node's requests "
        "| setup s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        if "error" in r:
            rows.append(f"| {r['nodes']} | error: {r['error'][:80]} | | | | | |")
            continue
        rows.append(
            f"| {r['nodes']} | {r['all_done_s']} | {r['p50_s']} | {r['uplink_x']} | "
            f"{r['control_per_node_per_s']} | {r['control_max_node']} | {r['setup_s']} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/scale.py", description=__doc__.split("\n")[0])
    p.add_argument("--nodes", default="4,16,32", help="comma-separated site sizes (4,16,32)")
    p.add_argument("--payload-mb", type=int, default=20, help="random payload on top of busybox (20)")
    p.add_argument("--uplink-mbit", type=float, default=100.0, help="uplink rate, both ways (100)")
    p.add_argument("--rounds", type=int, default=1, help="runs per N (1)")
    p.add_argument("--settle", type=float, default=0.0, help="seconds between setup and the burst (0)")
    p.add_argument("--no-static-peers", action="store_true", help="configs name no other node")
    p.add_argument("--extra-config", type=Path, help="TOML appended to every node's config")
    p.add_argument(
        "--disk",
        choices=("ext4", "host"),
        default="ext4",
        help="ext4 (default): each round on a fresh journaled ext4 (testbed/scratchfs.py); host: /var/tmp",
    )
    p.add_argument("--out", type=Path, help="output directory (bench/results/scale-<timestamp>)")
    args = p.parse_args(argv)
    reason = missing_tools()
    if reason:
        raise SystemExit(f"bench/scale.py: {reason}")
    out = args.out or REPO / "bench" / "results" / f"scale-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    image = build_sized_image(
        CACHE / f"scale-{args.payload_mb}mb", args.payload_mb << 20, layers=1, tag="scale"
    )
    size = image_bytes(image)
    log(f"image {image.manifest.digest[:19]}: {size / 1e6:.1f} MB compressed")
    results: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "image_bytes": size,
        "runs": [],
    }
    work = out / "work"
    for n in [int(x) for x in args.nodes.split(",") if x.strip()]:
        for rnd in range(args.rounds):
            log(f"N={n} round {rnd + 1} ...")
            try:
                res = run_one(n, image, size, args, work)
            except Exception as exc:  # recorded; the other sizes still run
                res = {"nodes": n, "error": f"{type(exc).__name__}: {exc}"[:2000]}
            results["runs"].append(res)
            log(json.dumps(res))
            (out / "scale.json").write_text(json.dumps(results, indent=1))
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    print(markdown(results))
    return 0 if all("error" not in r for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
