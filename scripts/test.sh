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
# The other interpreters' virtualenvs are made while the 3.11 suite runs (one after the other: two
# editable installs of one tree at once would share its build files); their log is printed if it fails.
setup_log=$(mktemp)
(for version in 3.12 3.13; do bash scripts/setup-python.sh "$version" >/dev/null; done) >"$setup_log" 2>&1 &
setup_pid=$!
status=0
.venv/bin/python -m pytest -q -ra --durations=20 || status=$?
if ! wait "$setup_pid"; then
  cat "$setup_log" >&2
  echo "test.sh: making the 3.12/3.13 virtualenvs failed" >&2
  exit 1
fi
rm -f "$setup_log"
if [ "$status" -ne 0 ]; then
  exit "$status"
fi
for version in 3.12 3.13; do
  venv=$PWD/.venv${version/./}  # made by scripts/setup-python.sh above
  echo "== Python $version: unit and wire suites, real-containerd pulls ($venv)"
  "$venv/bin/python" -m pytest -q -ra -p no:cacheprovider \
    tests/kernel tests/snapshotter tests/peer tests/peersync \
    tests/integration/test_plugin.py tests/integration/test_cri.py
done
