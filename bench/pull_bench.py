"""Pull + unpack through PeerSync vs containerd's builtin stores, side by side in one run.

    python bench/pull_bench.py [--size-mb 300] [--layers 6] [--rounds 3] [--compressibility 0.5]
                               [--client cri|ctr]

Builds a multi-layer image of the given size (cached under /tmp between runs), pushes it to a
loopback `docker-registry`, and starts two private containerds: one with the builtin content store
and overlayfs snapshotter (the reference), one configured by `peersync containerd-config` against a
running `peersync daemon`. Each round pulls the image into both, alternating which goes first, then
removes it (and waits for GC to empty both stores) before the next round. Reports median times, the
ratio ours/builtin, and the daemon's peak RSS (VmHWM). Targets (issue 2): ratio <= 1.5, RSS <= 150 MB.

Pulls go through containerd's CRI plugin by default (`--client cri`), as kubelet makes them: both
containerds unpack layers as they arrive; ours is configured with `containerd-config --cri` and
pulls through the daemon's mirror, so the daemon unpacks each layer itself. `--client ctr` uses
`ctr images pull` instead (fetch everything, then containerd unpacks, reading layers back through
the content plugin).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from testbed.containerd import Containerd, merge_config, parse_extra_config, start_containerd  # noqa: E402
from testbed.cri import CRI_NAMESPACE, cri_config, cri_pull, cri_remove  # noqa: E402
from testbed.images import build_sized_image, push_image  # noqa: E402
from testbed.peersyncd import loopback_config, start_peersync  # noqa: E402
from testbed.registry import start_registry  # noqa: E402
from testbed.systems import write_mirror_hosts, write_plain_hosts  # noqa: E402

CACHE = Path("/tmp/peersync-bench-images")


def timed_pull(ctrd: Containerd, ref: str, snapshotter: str, client: str) -> float:
    start = time.perf_counter()
    if client == "cri":
        cri_pull(ctrd, ref)
    else:
        ctrd.pull(ref, snapshotter=snapshotter)
    return time.perf_counter() - start


def remove(ctrd: Containerd, ref: str, client: str) -> None:
    """Remove the image and wait for GC to empty the stores."""
    if client == "cri":
        cri_remove(ctrd, ref)
    else:
        ctrd.rmi(ref)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    import os

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=300)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compressibility", type=float, default=0.5)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument(
        "--client",
        choices=("ctr", "cri"),
        default="cri",
        help="cri: the PullImage kubelet uses, both sides (default; ours through the daemon's mirror, "
        "which unpacks the layers); ctr: ctr images pull (fetch all, then unpack through Read RPCs)",
    )
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pullbench-"))
    key = f"{args.size_mb}mb-{args.layers}l-c{args.compressibility}"
    print(f"building {args.size_mb} MB image in {args.layers} layers (cache {CACHE / key}) ...", flush=True)
    image = build_sized_image(
        CACHE / key, args.size_mb << 20, layers=args.layers, compressibility=args.compressibility, tag="bench"
    )
    compressed = sum(layer.descriptor.size for layer in image.layers)
    with start_registry(work / "registry") as registry:
        ref = push_image(image, registry, "bench/pull")
        cri = args.client == "cri"
        namespace = CRI_NAMESPACE if cri else "peersync-test"
        # CRI: builtin pulls straight from the registry; ours through the daemon's mirror, as
        # `peersync hosts install` deploys it (the daemon needs the manifests to unpack layers).
        hosts_dirs = {
            "overlayfs": write_plain_hosts(work / "hosts-builtin", registry.address),
            "peersync": work / "hosts-ours",
        }

        def extra(snapshotter: str, base: dict) -> dict:
            if not cri:
                return base
            return merge_config(base, cri_config(snapshotter, hosts_dirs[snapshotter], work / snapshotter))

        config = loopback_config(plain_http=[registry.address])
        with (
            start_peersync(work / "ps", config=config) as daemon,
            start_containerd(
                work / "builtin", extra_config=extra("overlayfs", {}), cri=cri, namespace=namespace
            ) as builtin,
            start_containerd(
                work / "ours",
                extra_config=extra("peersync", parse_extra_config(daemon.containerd_config())),
                cri=cri,
                namespace=namespace,
            ) as ours,
        ):
            write_mirror_hosts(hosts_dirs["peersync"], registry.address, f"http://{daemon.mirror}")
            times: dict[str, list[float]] = {"builtin": [], "peersync": []}
            cpu0 = cpu_seconds(daemon.process.pid)
            for rnd in range(args.rounds):
                order = [("builtin", builtin, "overlayfs"), ("peersync", ours, "peersync")]
                for name, ctrd, snap in order if rnd % 2 == 0 else reversed(order):
                    t = timed_pull(ctrd, ref, snap, args.client)
                    times[name].append(t)
                    print(f"round {rnd + 1}: {name:8s} {t:6.2f} s", flush=True)
                for ctrd in (builtin, ours):
                    remove(ctrd, ref, args.client)
            rss = peak_rss_mb(daemon.process.pid)
            cpu = cpu_seconds(daemon.process.pid) - cpu0
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "image_mb": args.size_mb,
        "layers": args.layers,
        "compressed_mb": round(compressed / (1 << 20), 1),
        "rounds": args.rounds,
        "builtin_s": times["builtin"],
        "peersync_s": times["peersync"],
        "median_builtin_s": round(med["builtin"], 2),
        "median_peersync_s": round(med["peersync"], 2),
        "ratio": round(med["peersync"] / med["builtin"], 2),
        "daemon_peak_rss_mb": round(rss, 1),
        "daemon_cpu_s_per_pull": round(cpu / args.rounds, 2),
    }
    print()
    print(
        "| image | compressed | builtin (median) | peersync (median) | ratio "
        "| daemon peak RSS | daemon CPU/pull |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {args.size_mb} MB, {args.layers} layers | {result['compressed_mb']} MB "
        f"| {med['builtin']:.2f} s | {med['peersync']:.2f} s | {result['ratio']:.2f}x "
        f"| {rss:.0f} MB | {result['daemon_cpu_s_per_pull']} s |"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
