#!/usr/bin/env bash
# Install everything PeerSync's demo and tests need on a Debian 12 machine, as root:
# the Debian packages (containerd, runc, a real registry, image tools) and a virtualenv in .venv
# with peersync installed in editable mode. Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# pigz: containerd decompresses layers with unpigz when present, reading the blob concurrently
# (bench/RESULTS.md shows what that is worth through the proxy plugin).
# opentracker, aria2, mktorrent, debootstrap: the BitTorrent reference system and the Debian image of
# `peersync-testbed site`.
# golang-go, golang-github-containerd-containerd-dev: containerd 1.6's own Go sources (its snapshots and
# content conformance suites, proxy clients and pull client) with their dependencies as a GOPATH tree
# under /usr/share/gocode, so testbed/gotools.py builds testbed/go/ offline (tests/integration/test_go_*.py).
APT_PACKAGES=(containerd runc docker-registry skopeo umoci busybox-static pigz iproute2 python3-venv python3-pip
  ca-certificates opentracker aria2 mktorrent debootstrap golang-go golang-github-containerd-containerd-dev)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The Debian containerd package starts a system containerd where systemd runs; our demo and tests
# start their own private containerd instances and never touch the system one.

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating virtualenv .venv"
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[dev,bench]' -e ./testbed
echo "setup: done ($(.venv/bin/peersync --version))"
