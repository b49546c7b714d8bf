"""The layers of ARCHITECTURE.md, enforced: import-linter's contracts (pyproject.toml) and no
import cycle between any two product modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("kernel", "snapshotter", "peer", "peersync")


def test_import_linter_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "broken" not in proc.stdout.lower().replace("0 broken", "")


def test_no_import_cycle_between_product_modules() -> None:
    """Every import counts, late ones inside functions too: a late import that breaks a cycle at
    load time still ties the two modules into one."""
    graph = grimp.build_graph(*PRODUCT)
    modules = sorted(m for m in graph.modules if not m.startswith("snapshotter.api"))
    cycles = []
    for module in modules:
        for imported in graph.find_modules_directly_imported_by(module):
            if imported == module or imported.startswith(f"{module}.") or module.startswith(f"{imported}."):
                continue  # a package and its own modules (package __init__ re-exports)
            if graph.chain_exists(importer=imported, imported=module):
                cycles.append((module, imported))
    assert not cycles, f"import cycles: {cycles}"
