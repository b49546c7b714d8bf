"""The simulation study of bench/SIMULATION.md: validation against the emulated testbed, then scale.

Each experiment returns rows (plain dicts, JSON-ready); `bench/simulate.py` runs them, writes
`simulation.json`, a markdown table and the plots. Every run is seeded: the same command gives the
same simulated figures (the tracker's measured CPU, `tracker_cores`, is real CPU time and varies).

- `validate`: the emulated testbed's shape (`bench/scale.py`: 100 Mbit/s uplink, busybox + 20 MB
  in one 22.0 MB layer, every node pulling at once through CRI, all daemons and containerds on
  one 2-core machine) with the testbed profile (`testbed_profile`), against the figures of the
  emulated run recorded in `EMULATED` (bench/simulation/scale-emulated.json).
- `scale`: one site of N nodes, 1 Gbit/s nodes, 100 Mbit/s uplink, the same image, a burst;
  all-done p50/p99 against the physical limit (`physical_limit`), uplink bytes, tracker load.
- `election`: the tracker killed in a settled site of N (`testbed.sim.election`).
- `churn`: a share of the nodes die at random moments of the pull.
- `sites`: several sites under one registry whose egress they share.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from testbed.sim.election import ElectionSim
from testbed.sim.network import MBIT, Host, Topology
from testbed.sim.node import Blob
from testbed.sim.site import Profile, SimSite, SiteResult

LAYER = Blob("sha256:" + "5c" * 32, 22_011_359)  # bench/scale.py's layer (busybox + 20 MB)
IMAGE_BYTES = 22_011_359


def physical_limit(topo: Topology, size: int, chunk: int = 1 << 20) -> float:
    """A lower bound on the last node's pull time: every byte crosses the uplink once (size /
    uplink), and the last chunk to cross it must still reach the other N - 1 nodes, which at best
    doubles its holders per chunk time of a node's up link (ceil(log2 N) hops), each hop also
    paying a LAN round trip; no node receives faster than its down link."""
    hops = math.ceil(math.log2(max(topo.nodes, 1))) if topo.nodes > 1 else 0
    relay = hops * (chunk / topo.up + topo.lan_rtt)
    return max(size / topo.uplink + topo.wan_rtt + relay, size / topo.down)


def testbed_profile(host_mbit: float, unpack_mb_s: float, pre: float, post: float = 0.0) -> Profile:
    """The emulated testbed's costs besides the links: one 2-core host copying every LAN byte at
    `host_mbit` for all nodes together, unpacking at `unpack_mb_s` per core, and `pre` + `post`
    seconds of fixed work per pull (CRI, containerd, resolving the image)."""
    host = Host(rate=host_mbit * MBIT, cores=2, unpack_rate=unpack_mb_s * 1e6)
    return Profile(pre=pre, post=post, host=host)


def row(kind: str, n: int, res: SiteResult, topo: Topology, **extra: Any) -> dict[str, Any]:
    """One result as a table row."""
    return {
        "kind": kind,
        "nodes": n,
        "all_done_s": round(res.all_done, 3),
        "p50_s": round(res.quantile(0.5), 3),
        "p99_s": round(res.quantile(0.99), 3),
        "limit_s": round(physical_limit(topo, res.image_bytes), 3),
        "uplink_x": round(max(res.uplink_x(s) for s in range(topo.sites)), 4),
        "unfinished": res.unfinished,
        "syncs_per_node_per_s": round(res.syncs_per_node_per_s, 2),
        "tracker_syncs_per_s": round(max(res.tracker_syncs_per_s), 1),
        "tracker_cores": round(max(res.tracker_cores), 3),
        "tracker_busy": round(max(res.tracker_busy), 3),
        "tracker_mib": round(max(res.tracker_memory) / 2**20, 2),
        "wall_s": round(res.wall, 1),
        **extra,
    }


# -- validation --------------------------------------------------------------------------------

EMULATED = Path(__file__).resolve().parents[2] / "bench" / "simulation" / "scale-emulated.json"
CALIBRATION = {"host_mbit": 160.0, "unpack_mb_s": 100.0, "pre": 0.40}  # fitted at N=1 and N=4 only


def emulated() -> dict[int, dict[str, Any]]:
    """The emulated runs recorded (bench/scale.py's scale.json), by N."""
    data = json.loads(EMULATED.read_text())
    return {int(r["nodes"]): r for r in data["runs"] if "error" not in r}


def validate(sizes: Sequence[int] = (8, 16, 32), seed: int = 0) -> list[dict[str, Any]]:
    """The simulator beside the emulated testbed at `sizes`: ratios of all-done and uplink bytes."""
    ref = emulated()
    rows = []
    for n in sizes:
        topo = Topology(nodes=n, up=10_000 * MBIT, down=10_000 * MBIT, wan_rtt=0.001)
        res = SimSite(topo, [LAYER], testbed_profile(**CALIBRATION), seed=seed).run()
        r = row("validate", n, res, topo)
        em = ref.get(n)
        if em is not None:
            r["emulated_all_done_s"] = em["all_done_s"]
            r["emulated_uplink_x"] = em["uplink_x"]
            r["all_done_ratio"] = round(res.all_done / em["all_done_s"], 3)
            r["uplink_ratio"] = round(res.uplink_bytes[0] / em["uplink_bytes"], 3)
        rows.append(r)
    return rows


# -- scale -------------------------------------------------------------------------------------


def production(n: int, sites: int = 1, **kw: Any) -> Topology:
    """A site of `n` 1 Gbit/s nodes behind a 100 Mbit/s uplink."""
    return Topology(nodes=n, sites=sites, **kw)


def scale(sizes: Sequence[int], seed: int = 0) -> list[dict[str, Any]]:
    """All-done, uplink bytes and tracker load against N, one site, a burst."""
    rows = []
    for n in sizes:
        topo = production(n)
        res = SimSite(topo, [LAYER], seed=seed, tracker_cost=None).run()
        rows.append(row("scale", n, res, topo))
    return rows


def election(sizes: Sequence[int], seed: int = 0) -> list[dict[str, Any]]:
    """Election time after the tracker's death against N."""
    rows = []
    for n in sizes:
        r = ElectionSim(n, seed=seed).run()
        rows.append(
            {
                "kind": "election",
                "nodes": n,
                "seconds": round(r.seconds, 3),
                "claims": r.claims,
                "whois": r.whois,
                "announcements": r.announcements,
                "winner_rank": r.winner_rank,
            }
        )
    return rows


def churn(n: int, shares: Sequence[float], seed: int = 0) -> list[dict[str, Any]]:
    """A share of the nodes (never the tracker) die at random moments of the first 3 s."""
    rows = []
    for share in shares:
        rng = random.Random(seed)
        dead = rng.sample(range(1, n), int(share * n))
        kill = [(0, i, rng.uniform(0.0, 3.0)) for i in dead]
        topo = production(n)
        res = SimSite(topo, [LAYER], seed=seed, kill=kill).run()
        rows.append(row("churn", n, res, topo, killed=len(dead), share=share))
    return rows


def sites(counts: Sequence[int], per_site: int, registry_mbit: float, seed: int = 0) -> list[dict[str, Any]]:
    """`count` sites of `per_site` nodes under one registry with `registry_mbit` of egress."""
    rows = []
    for count in counts:
        topo = production(per_site, sites=count, registry=registry_mbit * MBIT)
        res = SimSite(topo, [LAYER], seed=seed).run()
        rows.append(row("sites", per_site * count, res, topo, sites=count, registry_mbit=registry_mbit))
    return rows


# -- output ------------------------------------------------------------------------------------

COLUMNS = {
    "validate": [
        "nodes", "all_done_s", "emulated_all_done_s", "all_done_ratio", "uplink_x", "emulated_uplink_x",
        "uplink_ratio",
    ],
    "scale": [
        "nodes", "p50_s", "p99_s", "limit_s", "uplink_x", "syncs_per_node_per_s", "tracker_syncs_per_s",
        "tracker_cores", "tracker_busy", "tracker_mib", "wall_s",
    ],
    "election": ["nodes", "seconds", "claims", "whois", "announcements", "winner_rank"],
    "churn": ["nodes", "share", "killed", "p50_s", "p99_s", "uplink_x", "unfinished"],
    "sites": ["sites", "nodes", "registry_mbit", "p50_s", "p99_s", "uplink_x"],
}  # fmt: skip


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One markdown table per kind of row."""
    out = []
    for kind, cols in COLUMNS.items():
        mine = [r for r in rows if r["kind"] == kind]
        if not mine:
            continue
        out += [f"### {kind}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in mine]
        out.append("")
    return "\n".join(out)


def plots(rows: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """The study's plots as PNGs in `out` (needs matplotlib, the bench extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    sc = [r for r in rows if r["kind"] == "scale"]
    if sc:
        n = [r["nodes"] for r in sc]
        fig, ax = plt.subplots(1, 3, figsize=(15, 4))
        ax[0].plot(n, [r["p50_s"] for r in sc], "o-", label="p50")
        ax[0].plot(n, [r["p99_s"] for r in sc], "s-", label="p99")
        ax[0].plot(n, [r["limit_s"] for r in sc], "k--", label="physical limit")
        ax[0].plot(n, [2 * r["limit_s"] for r in sc], "k:", label="2x limit")
        ax[0].set(xscale="log", xlabel="nodes", ylabel="seconds", title="all done (burst, one site)")
        ax[0].legend()
        ax[1].plot(n, [r["uplink_x"] for r in sc], "o-")
        ax[1].axhline(1.1, color="k", ls=":")
        ax[1].set(xscale="log", xlabel="nodes", ylabel="uplink bytes / image", title="uplink")
        ax[2].plot(n, [r["tracker_syncs_per_s"] for r in sc], "o-", label="syncs/s")
        ax2 = ax[2].twinx()
        ax2.plot(n, [r["tracker_cores"] for r in sc], "rs-", label="cores (real CPU)")
        ax2.plot(n, [r["tracker_mib"] / 1024 for r in sc], "g^-", label="GiB")
        ax[2].set(xscale="log", xlabel="nodes", title="tracker load")
        ax[2].set_ylabel("syncs / s")
        ax2.set_ylabel("cores, GiB")
        ax2.legend(loc="upper left")
        fig.tight_layout()
        made.append(out / "scale.png")
        fig.savefig(made[-1], dpi=100)
        plt.close(fig)
    el = [r for r in rows if r["kind"] == "election"]
    if el:
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.plot([r["nodes"] for r in el], [r["seconds"] for r in el], "o-")
        ax.set(xscale="log", xlabel="nodes", ylabel="seconds", title="election after the tracker's death")
        fig.tight_layout()
        made.append(out / "election.png")
        fig.savefig(made[-1], dpi=100)
        plt.close(fig)
    return made
