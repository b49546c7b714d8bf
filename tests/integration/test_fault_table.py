"""The fault table's bounded run: `bench/faults.py --quick --no-network` (every request class and
every SIGKILL class once, a full disk) must print the table with 0 in the loss, unauthorised-read
and crash columns. The full table is `python bench/faults.py` (bench/RESULTS.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]


def test_the_bounded_fault_table_has_no_loss_no_unauthorised_read_and_no_crash() -> None:
    proc = subprocess.run([sys.executable, "bench/faults.py", "--quick", "--no-network"], cwd=ROOT,
                          capture_output=True, text=True, timeout=850)  # fmt: skip
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert rows and rows[0][0].strip() == "class", proc.stdout + proc.stderr[-3000:]
    body = [[cell.strip() for cell in row] for row in rows[2:]]
    assert len(body) == 10, proc.stdout  # 4 request classes, 4 SIGKILL classes, ENOSPC, the total
    for name, tried, _recovered, lost, unauthorised, crashes in body:
        assert int(tried) > 0, name
        assert (lost, unauthorised, crashes) == ("0", "0", "0"), (name, proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
