"""containerd's own conformance suites against the real daemon, through containerd's proxy clients.

testbed/go/conformance runs containerd 1.6's `snapshots/testsuite.SnapshotterSuite` and
`content/testsuite.ContentSuite` (Debian's sources, built offline by testbed/gotools.py) over
`snapshots/proxy` and `content/proxy` on a gRPC connection dialled as containerd dials a proxy
plugin. Every case gets a `peersync daemon` of its own, rooted where the suite says, with its own
loopback ports; the snapshot cases mount what the daemon returns (root, overlayfs). Our Python
ports of the suites (tests/snapshotter/) run in-process; these run the upstream code itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed import gotools

GO_MISSING = gotools.missing_requirements()  # no Go or no containerd sources: skip, saying which
pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(1200),
    pytest.mark.skipif(GO_MISSING is not None, reason=GO_MISSING or ""),
]

# Cases the upstream suite skips itself, on every machine, with its reason.
UPSTREAM_SKIPS = {("snapshots", "Rename"): "rename test still fails on some kernels with overlay"}
# containerd 1.6.20 has 21 snapshot cases and 12 content cases: fewer means the suite did not run.
MIN_CASES = {"snapshots": 21, "content": 12}


@pytest.fixture(scope="module")
def conformance_binary() -> Path:
    """Built once per session (and only when testbed/go/conformance changed since the last build)."""
    return gotools.build("conformance")


@pytest.mark.parametrize("suite", ["snapshots", "content"])
def test_containerd_suite_passes_against_the_daemon(
    suite: str, conformance_binary: Path, tmp_path: Path
) -> None:
    run = gotools.run_suite(suite, tmp_path)
    top = gotools.SUITES[suite]
    outcomes = run.outcomes(top)
    failed = sorted(name for name, outcome in outcomes.items() if outcome == "fail")
    details = "\n".join(f"--- {name}:\n{run.output(f'{top}/{name}')[-3000:]}" for name in failed)
    assert not failed, f"{suite} suite: failing cases {failed}\n{details}\ndaemon logs: {tmp_path / 'logs'}"
    assert run.result(top) == "pass" and run.returncode == 0, run.tail()
    assert len(outcomes) >= MIN_CASES[suite], (sorted(outcomes), run.tail())
    for name in sorted(n for n, outcome in outcomes.items() if outcome == "skip"):
        reason = UPSTREAM_SKIPS.get((suite, name))
        assert reason is not None and reason in run.output(f"{top}/{name}"), (
            f"{suite} case {name} skipped:\n{run.output(f'{top}/{name}')}"
        )
