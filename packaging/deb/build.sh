#!/usr/bin/env bash
# Build peersync_<version>_<arch>.deb for edge OS images (Debian 12).
#
# The package carries a self-contained virtualenv in /opt/peersync (built here with pip, so the
# target needs no PyPI access), the systemd unit, the containerd drop-in and a default config.
# It does not edit /etc/containerd/config.toml: postinst says what to add, since an operator's
# containerd config is theirs.
#
# Usage: packaging/deb/build.sh [OUTDIR]     (needs python3-venv and dpkg-deb)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-dist}
version=$(python3 -c 'import tomllib;print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])')
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

# Debian's own interpreter: the venv must point at a python3 that exists on the target.
/usr/bin/python3 -m venv "$stage/opt/peersync"
"$stage/opt/peersync/bin/python" -m pip install -q --no-compile .
# The venv was built in $stage; rewrite script shebangs to the installed path.
sed -i "1s|^#!$stage/opt/peersync/bin/python.*|#!/opt/peersync/bin/python3|" "$stage"/opt/peersync/bin/*
sed -i "s|$stage/opt/peersync|/opt/peersync|g" "$stage/opt/peersync/pyvenv.cfg" "$stage"/opt/peersync/bin/activate*
find "$stage/opt/peersync" -name __pycache__ -prune -exec rm -rf {} +

install -d "$stage/usr/bin" "$stage/lib/systemd/system" "$stage/etc/containerd/conf.d" "$stage/etc/peersync" \
  "$stage/usr/share/doc/peersync" "$stage/DEBIAN"
ln -s /opt/peersync/bin/peersync "$stage/usr/bin/peersync"
install -m 0644 packaging/systemd/peersync.service "$stage/lib/systemd/system/peersync.service"
install -m 0644 packaging/systemd/peersync.socket "$stage/lib/systemd/system/peersync.socket"
install -m 0644 packaging/containerd/peersync.toml "$stage/etc/containerd/conf.d/peersync.toml"
"$stage/opt/peersync/bin/python" -m peersync.cli config-defaults > "$stage/etc/peersync/config.toml"
install -m 0644 README.md "$stage/usr/share/doc/peersync/README.md"

cat > "$stage/DEBIAN/control" <<CONTROL
Package: peersync
Version: $version
Architecture: $arch
Maintainer: PeerSync developers <dev@peersync.local>
Depends: python3 (>= 3.11), containerd (>= 1.6)
Recommends: runc, pigz
Section: admin
Priority: optional
Description: peer-to-peer container image distribution for containerd at the edge
 PeerSync serves containerd's snapshots and content APIs as proxy plugins and
 shares image blob chunks between nodes of a site, so the shared uplink carries
 each blob about once.
CONTROL
printf '/etc/peersync/config.toml\n/etc/containerd/conf.d/peersync.toml\n' > "$stage/DEBIAN/conffiles"
cat > "$stage/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
  if ! grep -qs 'conf.d/\*.toml' /etc/containerd/config.toml; then
    echo "peersync: add this line to the top of /etc/containerd/config.toml, then restart containerd:"
    echo '  imports = ["/etc/containerd/conf.d/*.toml"]'
  fi
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
    systemctl enable --now peersync.socket peersync.service >/dev/null || true
  fi
fi
POSTINST
cat > "$stage/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
  systemctl disable --now peersync.service peersync.socket >/dev/null || true
fi
PRERM
chmod 0755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/prerm"

mkdir -p "$out"
dpkg-deb --root-owner-group --build "$stage" "$out/peersync_${version}_${arch}.deb" >/dev/null
echo "$out/peersync_${version}_${arch}.deb"
