"""`peersync-testbed site`: the emulated edge site benchmark, one command (needs root).

    peersync-testbed site [--nodes 8] [--image-mb 200] [--layers 6] [--uplink-mbit 100]
                     [--systems baseline,cache,bittorrent,peersync-full,peersync-mirror
                                [,peersync-full-insecure,peersync-mirror-insecure]]
                     [--scenarios burst,staggered,varying,node-death] [--out DIR] [--quick]
                     [--client cri|ctr]

For every (system, scenario) of the plan: a fresh `netns.Site` (N node namespaces, a tbf-shaped
uplink both ways), the origin registry on the WAN side holding the image, the system set up on the
nodes (`systems.py`), the scenario driven and measured (`scenarios.py`), and the site torn down
whatever happened. Before the runs, the unpack time of the image is measured on one idle node (for
the physical limit). Results go to `--out` (default bench/results/<timestamp>/) as results.json,
results.md and chart.png (`report.py`); results.json is rewritten after every run.

Nodes pull through containerd's CRI plugin by default, as kubelet does on a Kubernetes edge node
(`--client ctr` uses `ctr images pull` instead, which fetches the whole image before unpacking).

The plan: `burst` for every system; the other scenarios only for `--scenario-systems` (default
peersync-full), unless `--full-matrix`. That default fits the 15-minute budget on a 2-core machine
at N=8 / 200 MB / 100 Mbit/s (about 13 minutes); each baseline run takes about 150 s there, so
`--scenario-systems peersync-full,baseline` (about 8 minutes more) adds the baseline's staggered,
varying and node-death runs. `--quick` is the CI size: 3 nodes, a 16 MB
image, baseline and peersync-full, burst only.

The origin registry's storage is filled once (skopeo push into the first site) and hard-linked into
every later site's registry (`cp -al`): the same blobs, none of the push time per run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .scratchfs import fresh_ext4

REPO = Path(__file__).resolve().parents[1]
ALL_SYSTEMS = ("baseline", "cache", "bittorrent", "peersync-full", "peersync-mirror")
# PeerSync with [tls] insecure = true (plain HTTP between nodes): only when named, to measure
# TLS's cost side by side (`--systems peersync-full,peersync-full-insecure --scenarios burst`)
KNOWN_SYSTEMS = (*ALL_SYSTEMS, "peersync-full-insecure", "peersync-mirror-insecure")
ALL_SCENARIOS = ("burst", "staggered", "varying", "node-death")
DEFAULT_SCENARIO_SYSTEMS = ("peersync-full",)
# How nodes pull (systems.py). "go": containerd's Go client as nerdctl pulls (`client.Pull` +
# WithPullUnpack, no CRI handler: chain IDs only), testbed/go/pull; "chain": its Prepares alone, the
# stand-in from before the Go client (PeerSync's full mode only).
CLIENTS = ("cri", "ctr", "chain", "go")
CACHE = Path("/var/cache/peersync-testbed")
REPO_NAME = "bench/app"
QUICK = {"nodes": 3, "image_mb": 16, "layers": 4, "systems": "baseline,peersync-full", "scenarios": "burst"}
DEFAULTS = {"nodes": 8, "image_mb": 200, "layers": 6, "systems": ",".join(ALL_SYSTEMS)}
DEFAULTS["scenarios"] = ",".join(ALL_SCENARIOS)


@dataclass
class BenchConfig:
    nodes: int = 8
    image_mb: int = 200
    layers: int = 6
    compressibility: float = 0.0
    image: str = "generated"  # or "debian"
    uplink_mbit: float = 100.0
    systems: list[str] = field(default_factory=lambda: list(ALL_SYSTEMS))
    scenarios: list[str] = field(default_factory=lambda: list(ALL_SCENARIOS))
    scenario_systems: list[str] = field(default_factory=lambda: list(DEFAULT_SCENARIO_SYSTEMS))
    full_matrix: bool = False
    stagger_s: float = 2.0
    vary: list[tuple[float, float]] = field(default_factory=lambda: [(5.0, 0.3), (20.0, 1.0)])
    kill_fraction: float = 0.4
    timeout_s: float = 420.0
    client: str = "cri"
    static_peers: bool = True
    out: Path = Path("bench/results")
    quick: bool = False
    cache: Path = CACHE
    keep_logs: bool = False
    daemon_config: str = ""  # TOML appended to every PeerSync daemon's config (A/B of its knobs)
    compare_python: str = ""  # another installation's interpreter: its daemon runs each PeerSync system too
    disk: str = "ext4"  # "ext4": every run on a fresh journaled ext4 (testbed.scratchfs); "host": /var/tmp

    def plan(self) -> list[tuple[str, str]]:
        """(system, scenario) pairs in run order: all bursts first. With `compare_python` every
        PeerSync system also runs with that installation's daemon ("SYSTEM#base"), right after."""
        runs = []
        for scenario in self.scenarios:
            for system in self.systems:
                base = system.partition("@")[0]
                if scenario == "burst" or self.full_matrix or base in self.scenario_systems:
                    runs.append((system, scenario))
                    # (the chain client needs this branch's daemon: an older one would not provide)
                    if self.compare_python and base.startswith("peersync-") and not system.endswith("@chain"):
                        runs.append((f"{system}#base", scenario))
        return runs


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `peersync-testbed site` options (also used by `python -m testbed.bench`)."""
    p.add_argument("--nodes", type=int, help="edge nodes on the LAN (default 8; --quick 3)")
    p.add_argument("--image-mb", type=int, help="generated image payload in MB (default 200; --quick 16)")
    p.add_argument("--layers", type=int, help="generated image layers (default 6; --quick 4)")
    p.add_argument(
        "--compressibility", type=float, default=0.0, help="fraction of zeros in generated content (0)"
    )
    p.add_argument(
        "--image",
        choices=("generated", "debian"),
        default="generated",
        help="generated (build_sized_image) or debian (debootstrap Python+NumPy runtime)",
    )
    p.add_argument("--uplink-mbit", type=float, default=100.0, help="uplink rate, both ways (100)")
    p.add_argument(
        "--systems",
        help=f"comma-separated, from {','.join(KNOWN_SYSTEMS)} (default: {','.join(ALL_SYSTEMS)}); "
        "SYSTEM@CLIENT pulls with that client instead of --client, so one run can compare clients "
        "side by side (e.g. peersync-full@cri,peersync-full@ctr,peersync-mirror@ctr)",
    )
    p.add_argument("--scenarios", help=f"comma-separated, from {','.join(ALL_SCENARIOS)} (default: all)")
    p.add_argument(
        "--scenario-systems",
        default=",".join(DEFAULT_SCENARIO_SYSTEMS),
        help="systems that also run the non-burst scenarios (default peersync-full; "
        "adding baseline costs ~150 s per scenario at N=8)",
    )
    p.add_argument("--full-matrix", action="store_true", help="every system in every scenario")
    p.add_argument("--stagger", type=float, default=2.0, help="staggered: seconds between node starts (2)")
    p.add_argument(
        "--vary",
        default="5:0.3,20:1.0",
        help="varying: AT_SECONDS:FRACTION_OF_UPLINK,... (default 5:0.3,20:1.0 = 100->30->100 Mbit/s)",
    )
    p.add_argument(
        "--kill-fraction",
        type=float,
        default=0.4,
        help="node-death: kill when the uplink carried this fraction of the image (0.4)",
    )
    p.add_argument("--timeout", type=float, help="per-run timeout in seconds (420; --quick 120)")
    p.add_argument("--out", type=Path, help="output directory (default bench/results/<timestamp>/)")
    p.add_argument(
        "--quick", action="store_true", help="CI size: 3 nodes, 16 MB, baseline+peersync-full, burst"
    )
    p.add_argument(
        "--client",
        choices=CLIENTS,
        default="cri",
        help="how nodes pull: cri = containerd's CRI plugin, as kubelet does (default); "
        "ctr = `ctr images pull` (fetch all, then unpack); go = containerd's Go client with "
        "WithPullUnpack and no CRI labels, as nerdctl pulls (testbed/go/pull); chain = the Go "
        "client's Prepares alone (chain IDs only) driven over containerd's API, the old stand-in",
    )
    p.add_argument(
        "--no-static-peers",
        action="store_true",
        help="PeerSync configs name no other node (the control plane's discovery must find them)",
    )
    p.add_argument("--cache-dir", type=Path, default=CACHE, help=f"image and rootfs cache ({CACHE})")
    p.add_argument(
        "--daemon-config",
        default="",
        help='TOML appended to every PeerSync daemon\'s config, "\\n" for newlines '
        '(e.g. "[snapshotter]\\nprefetch_layers = 4")',
    )
    p.add_argument(
        "--compare-python",
        default="",
        help="the python of another PeerSync installation (e.g. main's checkout): each PeerSync system "
        "also runs with its daemon, labelled SYSTEM#base, right after ours (before/after in one run)",
    )
    p.add_argument(
        "--keep-logs", action="store_true", help="copy every run's logs to OUT/logs (default: failures)"
    )
    p.add_argument(
        "--disk",
        choices=("ext4", "host"),
        default="ext4",
        help="ext4 (default): each run on a fresh ext4 with a journal, on a loop device, as an edge "
        "node's disk is made; host: the machine's own /var/tmp (on this VM an ext4 without a journal, "
        "whose inode allocation slows as earlier runs delete files: testbed/scratchfs.py)",
    )


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    base = QUICK if args.quick else DEFAULTS

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return base[name] if value is None else value

    def names(text: str, known: tuple[str, ...], what: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [
            s for s in items if s.partition("@")[0] not in known or s.partition("@")[2] not in ("", *CLIENTS)
        ]
        if bad:
            raise SystemExit(
                f"peersync-testbed site: unknown {what}: {', '.join(bad)} (known: {', '.join(known)})"
            )
        return items

    vary = []
    for part in args.vary.split(","):
        at, _, frac = part.partition(":")
        vary.append((float(at), float(frac)))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = REPO if (REPO / "bench").is_dir() else Path.cwd()
    return BenchConfig(
        nodes=int(pick("nodes")),
        image_mb=int(pick("image_mb")),
        layers=int(pick("layers")),
        compressibility=args.compressibility,
        image=args.image,
        uplink_mbit=args.uplink_mbit,
        systems=names(pick("systems"), KNOWN_SYSTEMS, "system"),
        scenarios=names(pick("scenarios"), ALL_SCENARIOS, "scenario"),
        scenario_systems=names(args.scenario_systems, KNOWN_SYSTEMS, "system"),
        full_matrix=args.full_matrix,
        stagger_s=args.stagger,
        vary=vary,
        kill_fraction=args.kill_fraction,
        timeout_s=args.timeout or (120.0 if args.quick else 420.0),
        client=args.client,
        static_peers=not args.no_static_peers,
        out=args.out or root / "bench" / "results" / stamp,
        quick=args.quick,
        cache=args.cache_dir,
        keep_logs=args.keep_logs,
        daemon_config=args.daemon_config.replace("\\n", "\n"),
        compare_python=args.compare_python,
        disk=args.disk,
    )


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------
# Image and origin registry
# ---------------------------------------------------------------------------------------------------


def build_image(cfg: BenchConfig) -> tuple[Any, list[str], dict[str, Any]]:
    """(BuiltImage, check command, image info for the report)."""
    from .images import build_sized_image

    info: dict[str, Any] = {"kind": cfg.image}
    if cfg.image == "debian":
        from .debimage import CHECK_CMD, DebootstrapError, build_debian_image

        try:
            image = build_debian_image(cfg.cache, log=log)
            info["description"] = "Debian bookworm minbase + python3 + python3-numpy (debootstrap)"
            return image, list(CHECK_CMD), _image_info(image, info)
        except DebootstrapError as exc:
            log(f"DEBIAN IMAGE UNAVAILABLE, falling back to the generated image: {exc}")
            info = {"kind": "generated", "fallback_from": "debian", "fallback_reason": str(exc)}
    key = f"sized-{cfg.image_mb}mb-{cfg.layers}l-c{cfg.compressibility:g}"
    log(f"building/reusing the generated image {cfg.cache / key} ...")
    image = build_sized_image(
        cfg.cache / key,
        cfg.image_mb << 20,
        layers=cfg.layers,
        compressibility=cfg.compressibility,
        tag="bench",
    )
    info["description"] = (
        f"generated: {cfg.image_mb} MB payload in {cfg.layers} layers + busybox, "
        f"compressibility {cfg.compressibility:g}"
    )
    return image, ["true"], _image_info(image, info)


def _image_info(image: Any, info: dict[str, Any]) -> dict[str, Any]:
    blobs = image.layout / "blobs" / "sha256"
    total = sum((blobs / d[7:]).stat().st_size for d in image.blob_digests)
    return info | {
        "tag": image.tag,
        "manifest": image.manifest.digest,
        "layers": len(image.layers),
        "compressed_bytes": total,  # every blob a pull must fetch: manifest, config, layers
        "uncompressed_bytes": sum(layer.tar_size for layer in image.layers),
    }


class Origin:
    """Puts the image into a site's registry: push once, then hard-link the stored blobs."""

    def __init__(self, image: Any, work: Path) -> None:
        self.image = image
        self.golden = work / "golden-registry"

    def start(self, site: Any) -> str:
        storage = site.workdir / "registry" / "storage"
        if self.golden.exists():
            storage.parent.mkdir(parents=True, exist_ok=True)
            _copy_tree(self.golden, storage)
            registry = site.start_registry()
            ref = registry.ref(REPO_NAME, self.image.tag)
        else:
            site.start_registry()
            ref = site.push_image(self.image, REPO_NAME)
            _copy_tree(storage, self.golden)
        digest = site.call(site.registry_ns, site.registry.manifest_digest, REPO_NAME, self.image.tag)
        if digest != self.image.manifest.digest:
            raise RuntimeError(f"origin serves {digest}, expected {self.image.manifest.digest}")
        return str(ref)


def _copy_tree(source: Path, target: Path) -> None:
    """`cp -a` of `source` to `target`, as hard links when both are on one filesystem (a run on a
    disk of its own, `--disk ext4`, gets a real copy)."""
    same_fs = source.stat().st_dev == target.parent.stat().st_dev
    subprocess.run(["cp", "-al" if same_fs else "-a", str(source), str(target)], check=True)


# ---------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------


def measure_unpack(
    image: Any, check_cmd: list[str], origin: Origin, work: Path, rounds: int = 2
) -> dict[str, Any]:
    """Unpack time of the image on one idle node from already-fetched content (builtin overlayfs).

    One node, unshaped link: pull once (fetch + unpack), then drop the unpacked snapshots but keep the
    content, and time `ctr images pull` again: it finds every blob present and only unpacks.
    """
    from .netns import Site

    out: dict[str, Any] = {}
    with Site(nodes=1, uplink_mbit=None, workdir=work) as site:
        ref = origin.start(site)
        ctrd = site.nodes[0].start_containerd()
        t = time.monotonic()
        ctrd.pull(ref)
        out["first_pull_unshaped_s"] = round(time.monotonic() - t, 2)
        times = []
        for _ in range(rounds):
            remove_snapshots(ctrd)
            t = time.monotonic()
            ctrd.pull(ref)
            times.append(round(time.monotonic() - t, 2))
        ctrd.run(ref, check_cmd)
        out["unpack_s_rounds"] = times
        out["unpack_s"] = max(times)
    return out


def remove_snapshots(ctrd: Any, snapshotter: str = "overlayfs") -> None:
    """Remove every snapshot of `snapshotter`, children first (the content store is untouched).

    Removing the top snapshot leaves its parents unreferenced, so containerd's GC may delete them
    while we go: "not found" is fine.
    """
    from .procs import CommandError

    for _ in range(200):
        listing = ctrd.ctr("snapshots", "--snapshotter", snapshotter, "ls").splitlines()[1:]
        rows = [line.split() for line in listing if line.strip()]
        if not rows:
            return
        parents = {r[1] for r in rows if len(r) >= 3}
        for key in [r[0] for r in rows if r[0] not in parents]:
            try:
                ctrd.ctr("snapshots", "--snapshotter", snapshotter, "rm", key)
            except CommandError as exc:
                if "not found" not in exc.stderr:
                    raise
        time.sleep(0.05)
    raise RuntimeError("snapshots did not go away")


def run_one(
    cfg: BenchConfig,
    system_name: str,
    scenario: str,
    image: Any,
    check_cmd: list[str],
    origin: Origin,
    work: Path,
) -> dict[str, Any]:
    """One fresh site, one system, one scenario, on a fresh filesystem (`cfg.disk`); always torn
    down. Never raises (errors are recorded)."""
    result: dict[str, Any] = {"system": system_name, "scenario": scenario, "ok": False, "disk": cfg.disk}
    variant = system_name.partition("#")[2]
    daemon_python = cfg.compare_python if variant == "base" else None
    with contextlib.ExitStack() as disk:
        if cfg.disk == "ext4":
            work = disk.enter_context(fresh_ext4())
        return _run_on(cfg, system_name, scenario, image, check_cmd, origin, work, result, daemon_python)


def _run_on(
    cfg: BenchConfig,
    system_name: str,
    scenario: str,
    image: Any,
    check_cmd: list[str],
    origin: Origin,
    work: Path,
    result: dict[str, Any],
    daemon_python: str | None,
) -> dict[str, Any]:
    from .netns import Site
    from .scenarios import ScenarioOptions, run_scenario
    from .systems import make_system

    label, _, _ = system_name.partition("#")
    base_name, _, client = label.partition("@")
    run_dir = work / f"{system_name.replace('@', '-').replace('#', '-')}-{scenario}"
    scratch = work if cfg.disk == "ext4" else None
    site = Site(nodes=cfg.nodes, uplink_mbit=cfg.uplink_mbit, workdir=run_dir / "site", scratch=scratch)
    started = time.monotonic()
    try:
        site.start()
        ref = origin.start(site)
        client = client or cfg.client
        result["client"] = client
        system = make_system(
            base_name, site, image, ref, run_dir / "system", check_cmd, client, cfg.daemon_config,
            daemon_python, cfg.static_peers,
        )  # fmt: skip
        t = time.monotonic()
        system.setup()
        result["setup_s"] = round(time.monotonic() - t, 2)
        opts = ScenarioOptions(cfg.stagger_s, cfg.vary, cfg.kill_fraction, 30.0, cfg.timeout_s)
        image_bytes = sum(layer.descriptor.size for layer in image.layers)
        result |= run_scenario(site, system, scenario, image_bytes, opts)
        result["ok"] = bool(result["all_completed"])
    except BaseException as exc:  # recorded; KeyboardInterrupt re-raised after teardown
        result["error"] = f"{type(exc).__name__}: {exc}"[:3000]
        result["traceback"] = traceback.format_exc()[-4000:]
        if not isinstance(exc, Exception):
            _teardown(site, result, run_dir, cfg, keep=True)
            raise
    _teardown(site, result, run_dir, cfg, keep=cfg.keep_logs or not result["ok"])
    result["wall_s"] = round(time.monotonic() - started, 2)
    return result


def _teardown(site: Any, result: dict[str, Any], run_dir: Path, cfg: BenchConfig, keep: bool) -> None:
    try:
        problems = site.close()
    except Exception as exc:
        problems = [f"{type(exc).__name__}: {exc}"]
    if problems:
        result["teardown_problems"] = problems
    if keep:
        dest = cfg.out / "logs" / run_dir.name
        for path in run_dir.rglob("*.log"):
            if path.is_file():
                target = dest / path.relative_to(run_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(OSError), open(path, "rb") as src, open(target, "wb") as dst:
                    src.seek(max(0, path.stat().st_size - (2 << 20)))  # the last 2 MiB is enough
                    shutil.copyfileobj(src, dst)
        result["logs"] = str(dest)
    shutil.rmtree(run_dir, ignore_errors=True)


def run(cfg: BenchConfig) -> dict[str, Any]:
    """The whole benchmark; writes results.json/.md and chart.png into cfg.out; returns the results."""
    from . import report
    from .netns import missing_tools

    reason = missing_tools()
    if reason:
        raise SystemExit(f"peersync-testbed site: {reason}")
    cfg.out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    plan = cfg.plan()
    log(f"plan ({len(plan)} runs): " + ", ".join(f"{s}/{c}" for s, c in plan))
    image, check_cmd, image_info = build_image(cfg)
    log(f"image {image_info['manifest'][:19]}: {image_info['compressed_bytes'] / 1e6:.1f} MB compressed")
    results: dict[str, Any] = {
        "config": _jsonable(asdict(cfg)),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "image": image_info,
        "runs": [],
    }
    work = Path(tempfile.mkdtemp(prefix="peersync-testbed-", dir="/var/tmp"))
    try:
        origin = Origin(image, work)
        log("measuring the unpack time on one idle node ...")
        try:
            results["unpack"] = measure_unpack(image, check_cmd, origin, work / "unpack")
            log(f"unpack: {results['unpack']}")
        except Exception as exc:  # the comparison still runs; the limit is then unknown
            results["unpack"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            log(f"unpack measurement failed: {exc}")
        for system_name, scenario in plan:
            log(f"run {system_name} / {scenario} ...")
            res = run_one(cfg, system_name, scenario, image, check_cmd, origin, work)
            results["runs"].append(res)
            log(report.one_line(res, image_info["compressed_bytes"]))
            results["wall_s"] = round(time.monotonic() - t_start, 1)
            (cfg.out / "results.json").write_text(json.dumps(results, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["targets"] = report.targets(results)
    results["wall_s"] = round(time.monotonic() - t_start, 1)
    (cfg.out / "results.json").write_text(json.dumps(results, indent=1))
    (cfg.out / "results.md").write_text(report.markdown(results))
    chart = report.chart(results, cfg.out / "chart.png")
    if chart is not None:
        log(f"chart: {chart}")
    return results


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def main_from_args(args: argparse.Namespace) -> int:
    from . import report

    cfg = config_from_args(args)
    results = run(cfg)
    print()
    print(report.markdown(results))
    print(f"results: {cfg.out} (results.json, results.md, chart.png); wall {results['wall_s']:.0f} s")
    return 0 if all(r["ok"] for r in results["runs"]) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.bench", description=__doc__.split("\n")[0]
    )
    add_arguments(parser)
    return main_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
