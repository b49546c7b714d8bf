#!/usr/bin/env bash
# Set everything up and run the demo: three PeerSync nodes on loopback, a local registry, real
# containerd and runc. Needs root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/peersync-testbed demo
