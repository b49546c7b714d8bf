"""Peer choice on an emulated site (issue 9, "Peer choice"): real daemons in network namespaces,
serving peers shaped to 10x different rates with tbf, one downloader per run choosing peers by the
policy under test (`[peer] choice`: "bound", the default; "ewma", the rule before it; "random").

    sudo .venv/bin/python bench/peer_choice.py [--blob-mib 256] [--rates 200,200,20] [--rounds 3]
        [--slow-peer 0 --slow-at 0.3 --slow-mbit 20] [--out bench/results/peer_choice.json]

Measures, in one invocation:
  (a) the slow peer's share of the chunks (steady state: rates fixed for the whole download);
  (b) a peer slowed mid-transfer (its tbf rate cut once the downloader's engine has `--slow-at` of the blob):
      its share of the chunks before and after (from 1 s after the cut), and how many seconds after
      the cut it last got half its former share of the requests launched in a 1 s window;
  (c) p99 chunk latency (from a chunk's first request to its bytes stored) of each policy over the
      steady-state runs pooled, and the ratios bound/ewma and bound/random.
Rounds interleave the policies (bound, ewma, random, bound, ...) so that machine noise spreads over
all of them; every download is a fresh daemon with an empty store and nothing measured yet.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from testbed.netns import Site, missing_tools  # noqa: E402
from testbed.peerchoice import PeerChoiceSite, Run, SlowDown  # noqa: E402

POLICIES = ("bound", "ewma", "random")


def pooled_quantile(runs: list[Run], q: float) -> float:
    values = sorted(t["chunk_seconds"] for r in runs for t in r.stored())
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blob-mib", type=int, default=256)
    ap.add_argument("--rates", default="200,200,20", help="Mbit/s of each serving peer")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument(
        "--slow-peer", type=int, default=0, help="index into --rates of the peer slowed mid-transfer"
    )
    ap.add_argument(
        "--slow-at", type=float, default=0.3, help="fraction of the blob downloaded when it is slowed"
    )
    ap.add_argument("--slow-mbit", type=float, default=20.0)
    ap.add_argument("--slow-rounds", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/peersync-bench-peerchoice"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "peer_choice.json")
    ap.add_argument("--raw", action="store_true", help="also write every run's chunk requests to the JSON")
    args = ap.parse_args()
    reason = missing_tools()
    if reason:
        sys.exit(f"cannot build a site here: {reason}")
    rates = [float(r) for r in args.rates.split(",")]
    policies = args.policies.split(",")
    slowest = min(range(len(rates)), key=lambda i: rates[i])
    steady: dict[str, list[Run]] = {p: [] for p in policies}
    slowed: dict[str, list[Run]] = {p: [] for p in policies}
    started = time.monotonic()
    with Site(nodes=1 + len(rates), uplink_mbit=None) as site:
        site.start_registry()
        pc = PeerChoiceSite(site, args.blob_mib, rates, cache=args.cache)
        pc.seed()
        print(f"seeded {pc.size / 2**20:.0f} MiB on {len(rates)} peers at {rates} Mbit/s", flush=True)
        for r in range(args.rounds):
            for policy in policies:
                run = pc.download(policy)
                steady[policy].append(run)
                s = run.summary()
                print(
                    f"round {r} steady {policy}: {s['seconds']} s, p99 {s['p99']} s, shares {s['shares']}",
                    flush=True,
                )
        cut = SlowDown(args.slow_peer, args.slow_at, args.slow_mbit)
        for r in range(args.slow_rounds):
            for policy in policies:
                run = pc.download(policy, cut)
                slowed[policy].append(run)
                s = run.summary()
                print(
                    f"round {r} slow-down {policy}: {s['seconds']} s, share {s['share_before']} -> "
                    f"{s['share_after_1s']}, lost within {s['loss_seconds']} s",
                    flush=True,
                )
    p99 = {p: pooled_quantile(steady[p], 0.99) for p in policies}
    report: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "seconds": round(time.monotonic() - started, 1),
        "slow_peer": pc.urls[slowest],
        "capacity_share": round(rates[slowest] / sum(rates), 4),
        "steady": {p: [r.summary() for r in runs] for p, runs in steady.items()},
        "slow_down": {p: [r.summary() for r in runs] for p, runs in slowed.items()},
        "p99": {p: round(v, 4) for p, v in p99.items()},
        "p50": {p: round(pooled_quantile(steady[p], 0.5), 4) for p in policies},
    }
    if args.raw:
        report["raw"] = {
            kind: {
                p: [{"changed_at": r.changed_at, "transfers": r.transfers} for r in runs]
                for p, runs in d.items()
            }
            for kind, d in (("steady", steady), ("slow_down", slowed))
        }
    if "bound" in p99:
        report["ratios"] = {
            f"bound/{p}": round(p99["bound"] / p99[p], 3) for p in policies if p != "bound" and p99[p]
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print_table(report, pc.urls[slowest], pc.urls[args.slow_peer], steady, slowed)
    print(f"\nwritten to {args.out}")


def print_table(
    report: dict[str, Any],
    slow_url: str,
    slowed_url: str,
    steady: dict[str, list[Run]],
    slowed: dict[str, list[Run]],
) -> None:
    print(f"\nslow peer {slow_url}: its share of the capacity is {report['capacity_share']:.3f}")
    print("\n| policy | slow peer's share (runs) | download s (median) | p50 chunk s | p99 chunk s |")
    print("|---|---|---|---|---|")
    for p, runs in steady.items():
        shares = ", ".join(f"{r.share(slow_url):.3f}" for r in runs)
        med = statistics.median(r.seconds for r in runs)
        print(f"| {p} | {shares} | {med:.2f} | {report['p50'][p]:.3f} | {report['p99'][p]:.3f} |")
    print(
        "\n| policy | slowed peer's share before -> after (+1 s) "
        "| last >= half its share of launches, s after the cut |"
    )
    print("|---|---|---|")
    for p, runs in slowed.items():
        cells = "; ".join(
            f"{r.share(slowed_url, until=r.changed_at):.3f} -> "
            f"{r.share(slowed_url, since=(r.changed_at or 0) + 1):.3f}"
            for r in runs
        )
        loss = ", ".join(f"{x:.2f}" for r in runs if (x := r.loss_seconds()) is not None)
        print(f"| {p} | {cells} | {loss} |")
    if "ratios" in report:
        print("\np99 ratios:", ", ".join(f"{k} = {v}" for k, v in report["ratios"].items()))


if __name__ == "__main__":
    main()
