"""mypy over the product packages and the testbed, as `[tool.mypy]` in pyproject.toml configures
it: a type error anywhere in them fails the suite. The incremental cache lives in the repo's (gitignored)
`.mypy_cache/`, so a rerun checks only what changed."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("kernel", "snapshotter", "peer", "peersync")
CACHE = ROOT / ".mypy_cache" / "test_types"


def test_mypy_passes() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(CACHE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = proc.stdout[-12000:] + proc.stderr[-4000:]
    if "No module named mypy" in proc.stderr:
        output += "\nmypy is in the dev extra: pip install -e '.[dev]'"
    assert proc.returncode == 0, output
    assert "Success: no issues found" in proc.stdout, output


def test_mypy_checks_every_product_package() -> None:
    """A package left out of `files` would never be checked, and nothing would say so."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert set(PRODUCT) <= set(config["files"])
