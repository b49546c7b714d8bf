"""The simulator's before/after of the index's lease windows (bench/SIMULATION.md, "Product
changes"): a burst of N nodes on one image, seeds 0-2, mean all-done and p50 time and the worst
uplink factor. Run it on a commit before the windows (ebf8186) and on one after to compare.

    python bench/sim_lease_windows.py
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed.sim.network import Topology  # noqa: E402
from testbed.sim.node import Blob  # noqa: E402
from testbed.sim.site import SimSite  # noqa: E402

IMAGES = {
    "4 layers x 6.5 MB": [Blob("sha256:" + f"{i:02x}" * 32, 6_500_000) for i in range(4)],
    "1 layer x 22 MB": [Blob("sha256:" + "cd" * 32, 22_000_000)],
}


def main() -> None:
    for name, blobs in IMAGES.items():
        for n in (8, 32, 100):
            done, p50, up = [], [], []
            for seed in (0, 1, 2):
                r = SimSite(Topology(nodes=n), blobs, seed=seed).run(until=200.0)
                done.append(max(r.times))
                p50.append(statistics.median(r.times))
                up.append(r.uplink_x())
            print(
                f"{name}  N={n}  all done {statistics.mean(done):.2f} s  p50 {statistics.mean(p50):.2f} s"
                f"  uplink {max(up):.3f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
