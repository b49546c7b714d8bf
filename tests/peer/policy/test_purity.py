"""What keeps peer.policy pure beyond its import-linter contract (`policy-pure` in pyproject.toml,
which forbids the event loop, network, store, clocks and the engine's I/O modules): no use of the
global random generator, and a documented, fully typed surface."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

POLICY = Path(__file__).resolve().parents[3] / "peer" / "policy"
MODULES = sorted(POLICY.glob("*.py"))


def test_the_policy_modules_are_all_here() -> None:
    names = {m.stem for m in MODULES}
    assert {
        "holdings",
        "history",
        "peerstats",
        "subnet",
        "choice",
        "window",
        "schedule",
        "striping",
        "hedging",
        "gathering",
        "membership",
        "election",
        "index",
        "popularity",
        "eviction",
        "replication",
    } <= names


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.stem)
def test_no_global_randomness(module: Path) -> None:
    """Randomness comes in as a random.Random: `random.<anything but Random>` would be the
    module's hidden global generator, which a simulator could not seed per node."""
    tree = ast.parse(module.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "random":
            assert [a.name for a in node.names] == ["Random"], ast.unparse(node)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "random":
            assert node.attr == "Random", ast.unparse(node)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.stem)
def test_documented_and_typed(module: Path) -> None:
    tree = ast.parse(module.read_text())
    assert ast.get_docstring(tree), f"{module.name}: the module docstring explains the model"
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
            untyped = [a.arg for a in args if a.annotation is None and a.arg not in ("self", "cls")]
            assert not untyped and node.returns is not None, f"{module.name}:{node.name} needs type hints"
            body = node.body[0] if len(node.body) == 1 else None
            stub = (
                isinstance(body, ast.Expr)
                and isinstance(body.value, ast.Constant)
                and body.value.value is ...
            )
            if not node.name.startswith("_") and not stub:  # a Protocol's members: the class says it
                assert ast.get_docstring(node), f"{module.name}:{node.name} needs a docstring"
        if isinstance(node, ast.ClassDef):
            assert ast.get_docstring(node), f"{module.name}:{node.name} needs a docstring"
