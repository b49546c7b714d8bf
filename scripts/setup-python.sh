#!/usr/bin/env bash
# Make a virtualenv for another CPython (from pyenv) with PeerSync and the testbed installed in
# editable mode: `scripts/setup-python.sh 3.12` -> .venv312. Prints the venv's path.
# Run scripts/setup.sh first (Debian packages). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$1
root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
python=$(ls -d "$root"/versions/"$version".*/bin/python 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$python" ]; then
  echo "setup-python: no Python $version under $root/versions (pyenv install $version)" >&2
  exit 1
fi
venv=.venv${version/./}
if [ ! -x "$venv/bin/python" ]; then
  echo "setup-python: creating $venv from $python" >&2
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
"$venv/bin/python" -m pip install -q -e '.[dev]' -e ./testbed >&2
echo "$PWD/$venv"
