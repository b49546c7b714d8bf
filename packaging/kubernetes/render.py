#!/usr/bin/env python3
"""Write peersync-daemonset.yaml, the plain manifest, from the Helm chart.

    .venv/bin/python packaging/kubernetes/render.py          # rewrite the manifest
    .venv/bin/python packaging/kubernetes/render.py --check  # exit 1 if it is out of date

The chart (packaging/helm/peersync) is rendered by Helm's own engine, through helm-python-sdk (a
dev dependency: Helm's Go SDK built as a shared library), with its default values, release
"peersync" in namespace "peersync". Helm's two bookkeeping labels are left out (kubectl, not Helm,
manages these objects) and a Namespace allowing privileged pods comes first. Edit the chart, not
the manifest; tests/packaging/test_kubernetes.py fails when they disagree.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHART = HERE.parent / "helm" / "peersync"
MANIFEST = HERE / "peersync-daemonset.yaml"
RELEASE = NAMESPACE = "peersync"
ORDER = ("configmap.yaml", "daemonset.yaml")  # the order kubectl applies them in
HELM_ONLY = re.compile(r"(?m)^[ \t]*(helm\.sh/chart|app\.kubernetes\.io/managed-by): .*\n")

HEADER = f"""\
# PeerSync for clusters without Helm: `kubectl apply -f peersync-daemonset.yaml`.
# Generated from packaging/helm/peersync (default values, namespace {NAMESPACE}) by
# packaging/kubernetes/render.py: change the chart, then run it. See packaging/kubernetes/README.md.
---
apiVersion: v1
kind: Namespace
metadata:
  name: {NAMESPACE}
  labels:
    # The daemon runs privileged (it unpacks layers for containerd's overlay snapshots).
    pod-security.kubernetes.io/enforce: privileged
"""


def render_chart(values: dict[str, object] | None = None, namespace: str = NAMESPACE) -> dict[str, str]:
    """Template name (e.g. "daemonset.yaml") -> rendered text, by Helm's engine."""
    import helm_python

    with helm_python.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values, name=RELEASE, namespace=namespace)
    return {Path(name).name: text for name, text in rendered.items()}


def plain_manifest() -> str:
    rendered = render_chart()
    assert set(ORDER) <= set(rendered), sorted(rendered)
    parts = [HEADER]
    for name in ORDER:
        doc = HELM_ONLY.sub("", rendered[name]).strip("\n")
        parts.append(f"---\n# Source: peersync/templates/{name}\n{doc}\n")
    return "".join(parts)


def main(argv: list[str]) -> int:
    text = plain_manifest()
    if argv == ["--check"]:
        if MANIFEST.read_text() != text:
            print(f"{MANIFEST} is out of date: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    MANIFEST.write_text(text)
    print(MANIFEST)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
