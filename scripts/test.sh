#!/usr/bin/env bash
# Set everything up and run the whole test suite (unit, wire conformance and real-containerd
# integration tests). Needs root on Debian 12. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -ra "$@"
