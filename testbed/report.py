"""Turn the testbed's results into results.md (tables, speedups, targets) and chart.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SYSTEM_ORDER = (
    "baseline",
    "cache",
    "bittorrent",
    "peersync-mirror",
    "peersync-mirror-insecure",
    "peersync-full",
    "peersync-full-insecure",
)
TARGET_SPEEDUP = 4.0
TARGET_UPLINK_X = 1.1
TARGET_VS_LIMIT = 1.5
TARGET_TLS_COST = 1.1  # mutual TLS between nodes vs plain HTTP ([tls] insecure), all runnable


def _f(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def one_line(run: dict[str, Any], image_bytes: int) -> str:
    """A progress line for the console."""
    head = f"{run['system']}/{run['scenario']}:"
    if "error" in run and "max_s" not in run:
        return f"{head} FAILED: {run['error'][:300]}"
    return (
        f"{head} {run['completed']}/{run['survivors']} done, p50 {_f(run['p50_s'])} s, "
        f"max {_f(run['max_s'])} s, all runnable {_f(run['all_runnable_s'])} s, "
        f"uplink {run['uplink_bytes'] / image_bytes:.2f}x, peak {run['peak_uplink_mbit']:.0f} Mbit/s, "
        f"CPU {run['cpu_total_s']:.0f} s (kernel {sum(run.get('cpu_kernel_s', {}).values()):.0f} s), "
        f"wall {run.get('wall_s', 0):.0f} s"
    )


def _runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    order = {s: i for i, s in enumerate(SYSTEM_ORDER)}
    scen = {s: i for i, s in enumerate(("burst", "staggered", "varying", "node-death"))}
    return sorted(
        results["runs"], key=lambda r: (scen.get(r["scenario"], 9), order.get(_base(r["system"]), 9))
    )


def _base(system: str) -> str:
    """The system of a `system@client` run label."""
    return system.partition("@")[0]


def _find(results: dict[str, Any], system: str, scenario: str) -> dict[str, Any] | None:
    runs: list[dict[str, Any]] = results["runs"]
    for r in runs:
        if _base(r["system"]) == system and r["scenario"] == scenario and r.get("all_runnable_s") is not None:
            return r
    return None


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets for the burst, computed from the runs (None where a run is missing)."""
    cfg, image = results["config"], results["image"]
    size = image["compressed_bytes"]
    unpack = results.get("unpack", {}).get("unpack_s")
    transfer = size * 8 / (cfg["uplink_mbit"] * 1e6)
    limit = None if unpack is None else transfer + unpack
    ps, base = _find(results, "peersync-full", "burst"), _find(results, "baseline", "burst")
    out: dict[str, Any] = {
        "conditions": f"{cfg['nodes']} nodes, {size / 1e6:.0f} MB image (compressed), "
        f"{cfg['uplink_mbit']:g} Mbit/s uplink, burst",
        "physical_limit_s": None if limit is None else round(limit, 2),
        "physical_limit_parts": {"transfer_s": round(transfer, 2), "unpack_s": unpack},
    }
    if ps is not None and base is not None:
        value = base["all_done_s"] / ps["all_done_s"]
        out["speedup_vs_baseline"] = {
            "value": round(value, 2),
            "runnable_value": round(base["all_runnable_s"] / ps["all_runnable_s"], 2),
            "target": f">= {TARGET_SPEEDUP:g}x",
            "met": value >= TARGET_SPEEDUP,
        }
    plain = _find(results, "peersync-full-insecure", "burst")
    if ps is not None and plain is not None:
        cost = ps["all_runnable_s"] / plain["all_runnable_s"]
        out["tls_cost"] = {
            "value": round(cost, 3),
            "tls_s": ps["all_runnable_s"],
            "plain_s": plain["all_runnable_s"],
            "target": f"<= {TARGET_TLS_COST}x",
            "met": cost <= TARGET_TLS_COST,
        }
    if ps is not None:
        ratio = ps["uplink_bytes"] / size
        out["uplink_x_image"] = {
            "value": round(ratio, 3),
            "target": f"<= {TARGET_UPLINK_X}x",
            "met": ratio <= 1.1,
        }
        if limit is not None:
            x = ps["all_done_s"] / limit
            out["vs_physical_limit"] = {
                "value": round(x, 2),
                "all_done_s": ps["all_done_s"],
                "target": f"<= {TARGET_VS_LIMIT}x",
                "met": x <= TARGET_VS_LIMIT,
            }
    return out


def markdown(results: dict[str, Any]) -> str:
    cfg, image = results["config"], results["image"]
    size = image["compressed_bytes"]
    lines = [
        "# PeerSync edge testbed results",
        "",
        f"- Site: {cfg['nodes']} nodes on one LAN bridge, uplink {cfg['uplink_mbit']:g} Mbit/s (tbf, both "
        f"ways), origin registry behind the uplink; {results['machine']['cpus']} CPUs.",
        f"- Image: {image.get('description', image['kind'])}; {size / 1e6:.1f} MB compressed "
        f"({image['layers']} layers), {image['uncompressed_bytes'] / 1e6:.1f} MB unpacked.",
    ]
    client = cfg.get("client", "ctr")
    if client == "cri":
        lines.append(
            "- Pulls: containerd's CRI plugin (PullImage, as kubelet pulls; layers unpacked as they arrive); "
            "bittorrent imports with `ctr images import`."
        )
    elif client == "go":
        lines.append(
            "- Pulls: containerd's Go client as nerdctl pulls (`client.Pull` + WithPullUnpack, chain IDs "
            "only); bittorrent imports with `ctr images import`."
        )
    else:
        lines.append("- Pulls: `ctr images pull` (all blobs fetched, then unpacked).")
    if any("@" in str(r.get("system", "")) for r in results.get("runs", [])):
        lines.append("- `SYSTEM@CLIENT` rows pull with that client (cri, ctr, go, chain) instead.")
    if image.get("fallback_reason"):
        lines.append(f"- **The Debian image could not be built**: {image['fallback_reason'][:500]}")
    unpack = results.get("unpack", {})
    if "unpack_s" in unpack:
        lines.append(
            f"- Unpack of the fetched image on one idle node (builtin overlayfs): {unpack['unpack_s']:.2f} s "
            f"(rounds {unpack['unpack_s_rounds']}); first pull over an unshaped link "
            f"{unpack['first_pull_unshaped_s']:.2f} s."
        )
    elif unpack.get("error"):
        lines.append(f"- Unpack measurement failed: {unpack['error'][:300]}")
    lines.append(f"- Wall time of the whole run: {results.get('wall_s', 0):.0f} s.")
    lines += [
        "",
        "| system | scenario | nodes done | p50 s | p95 s | max s | all runnable s | uplink (x image) "
        "| peak uplink Mbit/s | LAN MB | CPU s | RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in _runs(results):
        if "max_s" not in r:
            lines.append(
                f"| {r['system']} | {r['scenario']} | failed: {r.get('error', '?')[:120]} | | | | | | | | | |"
            )
            continue
        done = f"{r['completed']}/{r['survivors']}" + (" (+1 killed)" if r.get("victim") else "")
        lines.append(
            f"| {r['system']} | {r['scenario']} | {done} | {_f(r['p50_s'])} | {_f(r['p95_s'])} "
            f"| {_f(r['max_s'])} | {_f(r['all_runnable_s'])} | {r['uplink_bytes'] / size:.2f} "
            f"| {r['peak_uplink_mbit']:.0f} | {r['lan_bytes'] / 1e6:.0f} | {r['cpu_total_s']:.0f} "
            f"| {_f(r.get('agent_rss_mb'), 0)} |"
        )
    lines += [
        "",
        "p50/p95/max: per-node pull time (from the node's own start until its image is fetched and "
        "unpacked; survivors only). all runnable: from t=0 until `ctr run` of the check command succeeded "
        "on every surviving node. uplink: WAN->LAN bytes on the uplink / the image's compressed size. "
        "LAN MB: bytes received by all nodes' LAN interfaces (uplink traffic forwarded by the router plus "
        "peer-to-peer). CPU s: CPU of all the system's site-side processes during the run (containerd, "
        "peersync daemons, proxy registry, aria2c) plus the ctr/tar clients; WAN-side seeder and tracker "
        "are in results.json, and so is each role's kernel part (`cpu_kernel_s`). RSS MB: the largest peak RSS (VmHWM) of the system's per-node agent "
        "(peersync daemon; containerd for baseline; the proxy registry for cache; aria2c for bittorrent).",
    ]
    speed = _speedups(results)
    if speed:
        header = "| scenario | vs | speedup (all runnable) | speedup (p50) | uplink: peersync-full / other |"
        lines += ["", "## PeerSync (full) vs the others", "", header, "|---|---|---|---|---|"]
        lines += speed
    red = _uplink_reduction(results)
    if red:
        lines += ["", "Uplink reduction vs baseline: " + "; ".join(red) + "."]
    t = results.get("targets") or targets(results)
    lines += ["", f"## Targets ({t['conditions']})", ""]
    if t.get("physical_limit_s") is not None:
        parts = t["physical_limit_parts"]
        lines.append(
            f"Physical limit = image / uplink rate + unpack = {parts['transfer_s']:.2f} s + "
            f"{parts['unpack_s']:.2f} s = {t['physical_limit_s']:.2f} s."
        )
        lines.append("")
    for key, label in (
        ("speedup_vs_baseline", "PeerSync all-nodes-done speedup over baseline"),
        ("uplink_x_image", "PeerSync uplink bytes (x image)"),
        ("vs_physical_limit", "PeerSync all-nodes-done / physical limit"),
        ("tls_cost", "PeerSync all runnable, mutual TLS / plain HTTP (peersync-full-insecure)"),
    ):
        if key in t:
            v = t[key]
            lines.append(
                f"- {label}: **{v['value']}** (target {v['target']}): {'MET' if v['met'] else 'NOT MET'}"
            )
        else:
            lines.append(f"- {label}: not measured in this run")
    errors = [r for r in results["runs"] if r.get("error") or any(n.get("error") for n in r.get("nodes", []))]
    if errors:
        lines += ["", "## Errors", ""]
        for r in errors:
            if r.get("error"):
                lines.append(f"- {r['system']}/{r['scenario']}: {r['error'][:400]}")
            for n in r.get("nodes", []):
                if n.get("error"):
                    tag = " (killed on purpose)" if n.get("killed") else ""
                    lines.append(f"- {r['system']}/{r['scenario']} {n['node']}{tag}: {n['error'][:300]}")
    return "\n".join(lines) + "\n"


def _speedups(results: dict[str, Any]) -> list[str]:
    rows = []
    for scenario in ("burst", "staggered", "varying", "node-death"):
        ps = _find(results, "peersync-full", scenario)
        if ps is None:
            continue
        for system in SYSTEM_ORDER:
            other = _find(results, system, scenario)
            if system == "peersync-full" or other is None:
                continue
            runnable = other["all_runnable_s"] / ps["all_runnable_s"]
            p50 = other["p50_s"] / ps["p50_s"]
            uplink = ps["uplink_bytes"] / max(1, other["uplink_bytes"])
            rows.append(f"| {scenario} | {system} | {runnable:.2f}x | {p50:.2f}x | {uplink:.2f} |")
    return rows


def _uplink_reduction(results: dict[str, Any]) -> list[str]:
    out = []
    for scenario in ("burst", "staggered", "varying", "node-death"):
        base = _find(results, "baseline", scenario)
        if base is None:
            continue
        for system in SYSTEM_ORDER[1:]:
            r = _find(results, system, scenario)
            if r is not None:
                out.append(f"{system} {scenario} {100 * (1 - r['uplink_bytes'] / base['uplink_bytes']):.0f}%")
    return out


def chart(results: dict[str, Any], path: Path) -> Path | None:
    """chart.png: completion times and uplink bytes per system and scenario, and the burst's uplink."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("chart.png skipped: matplotlib is not installed (pip install 'peersync[bench]')")
        return None
    runs = [r for r in _runs(results) if "max_s" in r]
    if not runs:
        return None
    size = results["image"]["compressed_bytes"]
    scenarios = [
        s for s in ("burst", "staggered", "varying", "node-death") if any(r["scenario"] == s for r in runs)
    ]
    systems = list(dict.fromkeys(r["system"] for r in runs))  # labels (system or system@client), in order
    palette = ("#888888", "#d08c2c", "#7b4fb0", "#3b8fd0", "#1a9e4a", "#c0392b", "#16a085", "#2c3e50")
    colors = {s: palette[i % len(palette)] for i, s in enumerate(systems)}
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    width = 0.8 / max(1, len(systems))
    for k, system in enumerate(systems):
        xs, done, p50, up = [], [], [], []
        for j, scenario in enumerate(scenarios):
            r = next((r for r in runs if r["system"] == system and r["scenario"] == scenario), None)
            if r is None:
                continue
            xs.append(j + (k - (len(systems) - 1) / 2) * width)
            done.append(r["all_runnable_s"] or r["max_s"] or 0)
            p50.append(r["p50_s"] or 0)
            up.append(r["uplink_bytes"] / size)
        axes[0].bar(xs, done, width, color=colors[system], label=system)
        axes[0].scatter(xs, p50, color="black", marker="_", s=120, zorder=3)
        axes[1].bar(xs, up, width, color=colors[system], label=system)
    for ax, title, ylabel in (
        (axes[0], "Time until every node can run the image (bar)\nand per-node p50 (tick)", "seconds"),
        (axes[1], "Uplink bytes (WAN->LAN)", "x image size"),
    ):
        ax.set_xticks(range(len(scenarios)), scenarios)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[1].axhline(1.0, color="black", lw=0.8, ls="--")
    axes[0].legend(fontsize=8)
    for system in systems:
        r = next((r for r in runs if r["system"] == system and r["scenario"] == "burst"), None)
        if r and r.get("uplink_series"):
            t, v = zip(*r["uplink_series"], strict=True)
            axes[2].plot(t, v, color=colors[system], label=system, lw=1.2)
    axes[2].set_title("Uplink throughput during the burst")
    axes[2].set_xlabel("seconds since t=0")
    axes[2].set_ylabel("Mbit/s")
    axes[2].grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    cfg = results["config"]
    fig.suptitle(
        f"PeerSync testbed: {cfg['nodes']} nodes, {size / 1e6:.0f} MB image, "
        f"{cfg['uplink_mbit']:g} Mbit/s uplink"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
