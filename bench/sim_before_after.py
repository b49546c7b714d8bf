"""One site's burst at a few sizes, simulated by the code under ROOT: for before/after tables.

    git archive <commit> | tar -x -C /tmp/before
    python bench/sim_before_after.py /tmp/before 100,316,1000      # "before", this virtualenv
    python bench/sim_before_after.py . 100,316,1000                # "after"

Seed 0, the tracker's service time fixed at 150 µs per sync (so the simulated figures do not
depend on the machine's load), the study's production topology and layer (`testbed.sim.study`).
One JSON line per size: p50/p99 pull times, the physical limit, uplink bytes over the image, and
the simulator's own CPU seconds.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path


def main(root: str, sizes: str) -> None:
    sys.path.insert(0, str(Path(root).resolve()))
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    from testbed.sim.site import SimSite
    from testbed.sim.study import LAYER, physical_limit, production

    for n in (int(x) for x in sizes.split(",")):
        t0 = time.process_time()
        res = SimSite(production(n), [LAYER], seed=0, tracker_cost=150e-6).run()
        limit = physical_limit(production(n), res.image_bytes)
        row = {
            "root": root,
            "nodes": n,
            "p50_s": round(res.quantile(0.5), 2),
            "p99_s": round(res.quantile(0.99), 2),
            "limit_s": round(limit, 2),
            "p99_over_limit": round(res.quantile(0.99) / limit, 2),
            "uplink_x": round(res.uplink_x(), 3),
            "unfinished": res.unfinished,
            "cpu_s": round(time.process_time() - t0, 1),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
