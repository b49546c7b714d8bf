"""The Debian package, built once per session for the tests that inspect or install it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def deb_build_unavailable() -> str | None:
    """Why the .deb cannot be built here, or None."""
    if os.geteuid() != 0 or shutil.which("dpkg-deb") is None or not Path("/usr/bin/python3").exists():
        return "needs root, dpkg-deb and Debian's python3 (with python3-venv)"
    return None


@pytest.fixture(scope="session")
def built_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`packaging/deb/build.sh` run for real (pip builds the packaged virtualenv: minutes)."""
    reason = deb_build_unavailable()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        ["bash", str(ROOT / "packaging" / "deb" / "build.sh"), str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0, f"build.sh failed:\n{done.stderr[-4000:]}"
    return Path(done.stdout.strip().splitlines()[-1])
