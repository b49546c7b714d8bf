"""The scale simulation study (issue 12): validation against the emulated testbed, then 8 -> 10,000 nodes.

    python bench/simulate.py --all [--out DIR] [--seed 0]
    python bench/simulate.py --validate | --scale 8,100,1000 | --election 8,1000 | --churn | --sites

Runs `testbed.sim.study`'s experiments (the product's tracker, index section and policy over
simulated nodes and links: `testbed/sim/`), writes OUT/simulation.json, OUT/simulation.md (the
tables) and OUT/*.png (the plots); OUT defaults to bench/results/simulation-<timestamp>. The
validation compares with the emulated run recorded in bench/simulation/scale-emulated.json
(`python bench/scale.py --nodes 1,4,8,16,32 --no-static-peers --settle 3`). The report is
bench/SIMULATION.md. Needs the dev or bench extra (simpy; matplotlib for the plots).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import structlog  # noqa: E402

from testbed.sim import study  # noqa: E402

ALL_SCALE = "8,32,100,316,1000,3162"  # 10,000 does not finish inside the study (bench/SIMULATION.md)
ALL_ELECTION = "8,100,1000,10000"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sizes(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/simulate.py", description=__doc__.split("\n")[0])
    p.add_argument("--all", action="store_true", help="every experiment below at its default sizes")
    p.add_argument("--validate", action="store_true", help="N = 8, 16, 32 beside the emulated testbed")
    p.add_argument("--scale", help=f"site sizes of the burst ({ALL_SCALE} with --all)")
    p.add_argument("--election", help=f"site sizes of the election ({ALL_ELECTION} with --all)")
    p.add_argument("--churn", action="store_true", help="100 nodes, 0 / 5 / 20%% dying mid-pull")
    p.add_argument("--sites", action="store_true", help="1 / 4 sites of 64 nodes, one 200 Mbit/s registry")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="output directory (bench/results/simulation-<timestamp>)")
    args = p.parse_args(argv)
    # the product's own modules log as in a daemon (members dropped, ...): only warnings here
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    out = args.out or REPO / "bench" / "results" / f"simulation-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    t0 = time.monotonic()

    def record(new: list[dict[str, Any]]) -> None:
        for r in new:
            log(json.dumps(r))
        rows.extend(new)
        (out / "simulation.json").write_text(json.dumps({"seed": args.seed, "rows": rows}, indent=1))

    if args.all or args.validate:
        record(study.validate(seed=args.seed))
    if args.all or args.election:
        record(study.election(sizes(args.election or ALL_ELECTION), seed=args.seed))
    if args.all or args.churn:
        record(study.churn(100, [0.0, 0.05, 0.2], seed=args.seed))
    if args.all or args.sites:
        record(study.sites([1, 4], 64, registry_mbit=200.0, seed=args.seed))
    if args.all or args.scale:
        for n in sizes(args.scale or ALL_SCALE):  # one at a time: the largest last, recorded as they end
            record(study.scale([n], seed=args.seed))
    table = study.markdown(rows)
    (out / "simulation.md").write_text(table)
    try:
        made = study.plots(rows, out)
    except ImportError:
        made = []
        log("matplotlib missing (the bench extra): no plots")
    print(table)
    log(f"done in {time.monotonic() - t0:.0f} s: {out} ({', '.join(m.name for m in made)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
