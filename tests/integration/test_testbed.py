"""`peersync-testbed site --quick`: the benchmark's own code path at CI size (3 nodes, ~16 MB, burst).

Runs the real command (as a subprocess, exactly as a user would) and checks that its outputs exist
and are sane: results.json parses, every node of every run completed and could run the image, the
Markdown table has a row per run, and PeerSync's uplink bytes are below the baseline's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.netns import missing_tools

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
if missing_tools():
    pytestmark.append(pytest.mark.skip(reason=missing_tools()))

REPO = Path(__file__).resolve().parents[2]


def test_quick_testbed_run(tmp_path: Path) -> None:
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "testbed", "site", "--quick", "--out", str(out)]
    cmd += ["--cache-dir", str(tmp_path / "cache")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"

    results = json.loads((out / "results.json").read_text())
    runs = {(r["system"], r["scenario"]): r for r in results["runs"]}
    assert set(runs) == {("baseline", "burst"), ("peersync-full", "burst")}
    size = results["image"]["compressed_bytes"]
    assert 14e6 < size < 24e6
    assert results["unpack"]["unpack_s"] > 0
    for r in runs.values():
        assert r["ok"], r.get("error") or [n["error"] for n in r["nodes"]]
        assert len(r["nodes"]) == 3 and r["completed"] == 3
        for n in r["nodes"]:
            assert n["error"] is None and 0 < n["pull_s"] <= n["runnable_at_s"]
        assert 0 < r["p50_s"] <= r["p95_s"] <= r["max_s"] <= r["all_runnable_s"]
        assert r["uplink_bytes"] >= 0.95 * size  # every byte crossed at least once
        assert r["peak_uplink_mbit"] <= 1.15 * results["config"]["uplink_mbit"]
        assert r["cpu_total_s"] > 0
    base, ps = runs[("baseline", "burst")], runs[("peersync-full", "burst")]
    assert ps["uplink_bytes"] < base["uplink_bytes"]
    assert ps["uplink_bytes"] <= 1.15 * size
    assert ps["peak_rss_mb"]["peersync"] > 0
    assert set(ps["node_stats"]) == {"n0", "n1", "n2"}

    md = (out / "results.md").read_text()
    assert "| baseline | burst | 3/3 |" in md and "| peersync-full | burst | 3/3 |" in md
    assert "## Targets" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
