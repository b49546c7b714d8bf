"""The table of bench/RESULTS.md "Mutual TLS between the nodes", from testbed result directories.

    python bench/tls_burst.py bench/tls/after-1 bench/tls/after-2 ...

Each directory is one `peersync-testbed site --nodes 8 --systems peersync-full,peersync-full-insecure
--scenarios burst` invocation (either order). Per invocation: which system ran first, all runnable
s with mutual TLS and plain, their ratio, p50, the 8 daemons' CPU seconds, the peak daemon RSS, and
the connections the daemons opened (`connections_opened` + `control.connections_opened` of each
node's stats: under TLS each is a full handshake). Last line: the median ratio.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

TLS, PLAIN = "peersync-full", "peersync-full-insecure"


def connections(run: dict[str, Any]) -> str:
    stats = [s for s in run.get("node_stats", {}).values() if s]
    if not stats or "connections_opened" not in stats[0]:
        return "-"
    data = sum(s["connections_opened"] for s in stats)
    control = sum(s.get("control", {}).get("connections_opened", 0) for s in stats)
    return f"{data} + {control}"


def main(dirs: list[str]) -> int:
    head = (
        "| run | first | all runnable s, TLS | plain | TLS / plain | p50 s, TLS / plain | daemons' CPU s, "
        "TLS / plain | peak daemon RSS MB, TLS / plain | connections opened (data + control), TLS / plain |"
    )
    print(head + "\n|---|---|---|---|---|---|---|---|---|")
    ratios = []
    for i, d in enumerate(dirs, 1):
        runs = json.loads((Path(d) / "results.json").read_text())["runs"]
        by = {r["system"]: r for r in runs if r["scenario"] == "burst"}
        t, p = by[TLS], by[PLAIN]
        first = "TLS" if runs[0]["system"] == TLS else "plain"
        ratio = t["all_runnable_s"] / p["all_runnable_s"]
        ratios.append(ratio)
        cpu = f"{t['cpu_s']['peersync']:.1f} / {p['cpu_s']['peersync']:.1f}"
        rss = f"{t['peak_rss_mb']['peersync']:.0f} / {p['peak_rss_mb']['peersync']:.0f}"
        print(
            f"| {i} | {first} | {t['all_runnable_s']:.1f} | {p['all_runnable_s']:.1f} | {ratio:.2f} | "
            f"{t['p50_s']:.1f} / {p['p50_s']:.1f} | {cpu} | {rss} | {connections(t)} / {connections(p)} |"
        )
    print(f"\nmedian TLS / plain over {len(ratios)} invocations: {statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
