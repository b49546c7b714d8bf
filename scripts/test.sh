#!/usr/bin/env bash
# Set everything up and run the whole test suite (unit, wire conformance and real-containerd
# integration tests). Needs root on Debian 12. This is exactly what CI runs (.ci/run).
#
# The daemon must work on Python 3.11, 3.12 and 3.13: the whole suite runs on 3.11 (.venv), then
# the unit and gRPC-wire conformance suites of the product's packages plus real-containerd
# full-mode pulls (ctr and CRI) on pyenv's 3.12 and 3.13 (.venv312, .venv313); the type, layer and
# packaging checks and the testbed's own tests say the same on every interpreter, so they run
# once. With arguments, only the 3.11 run happens and the arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest -q -ra "$@"
fi
.venv/bin/python -m pytest -q -ra
for version in 3.12 3.13; do
  venv=$(bash scripts/setup-python.sh "$version")
  echo "== Python $version: unit and wire suites, real-containerd pulls ($venv)"
  "$venv/bin/python" -m pytest -q -ra -p no:cacheprovider \
    tests/kernel tests/snapshotter tests/peer tests/peersync \
    tests/integration/test_plugin.py tests/integration/test_cri.py
done
