"""The README's demo command runs end to end and says what it promises."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]


def test_demo() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "testbed", "demo"], capture_output=True, text=True, timeout=280, env=env
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    origin = [int(n.replace(",", "")) for n in re.findall(r"bytes from the origin: ([\d,]+)", out)]
    assert len(origin) == 3 and origin[0] > 0 and origin[1:] == [0, 0], out
    assert out.count("filesystem vs the layers") == 2 and "DIFFERENCES" not in out, out
    assert "layers containerd downloaded itself: 0 of" in out, out
    kept = re.findall(r"store: (\d+) blobs before, (\d+) \(0 containerd's or held, (\d+) kept as cache\) "
                      r"after; 0 snapshots left", out)
    assert len(kept) == 2 and all(before == after == cached for before, after, cached in kept), out
