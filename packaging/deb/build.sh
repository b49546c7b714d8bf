#!/usr/bin/env bash
# Build peersync_<version>_<arch>.deb for edge OS images (Debian 12).
#
# The package carries a self-contained virtualenv in /opt/peersync (built here with pip, so the
# target needs no PyPI access), the systemd units, the containerd drop-ins and a default config.
#
# What the maintainer scripts do to containerd's files (all undone by remove; README "Packaging"):
# - /etc/containerd/conf.d/peersync.toml: a symlink to /usr/share/peersync/containerd/peersync.toml
#   (proxy plugins + CRI section), made by postinst only if that name is free, removed by prerm only
#   if it still points into /usr/share/peersync. Not a conffile on purpose: a conffile stays after
#   `remove`, and a containerd importing it would then have no content store (the builtin one is
#   disabled). The opt-out of the CRI part is pointing the link at peersync-no-cri.toml.
# - /etc/containerd/certs.d/_default/hosts.toml: the mirror becomes the first host (`peersync hosts
#   install`, merged into an existing file, never clobbering it); prerm takes every peersync entry
#   out again (`peersync hosts remove --all`), since the mirror goes away with the package.
# - /etc/containerd/config.toml is never edited: postinst says what to add (the imports line) and
#   which of its CRI settings the drop-in would hide.
# purge also removes the daemon's state (/var/lib/peersync: the blob cache and snapshots) and
# /etc/peersync (the node's site certificate in /etc/peersync/tls included).
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

install -d "$stage/usr/bin" "$stage/lib/systemd/system" "$stage/etc/containerd/conf.d" \
  "$stage/etc/containerd/certs.d" "$stage/etc/peersync" "$stage/usr/share/peersync/containerd" \
  "$stage/usr/share/doc/peersync" "$stage/DEBIAN"
ln -s /opt/peersync/bin/peersync "$stage/usr/bin/peersync"
install -m 0644 packaging/systemd/peersync.service "$stage/lib/systemd/system/peersync.service"
install -m 0644 packaging/systemd/peersync.socket "$stage/lib/systemd/system/peersync.socket"
install -m 0644 packaging/containerd/peersync.toml packaging/containerd/peersync-no-cri.toml \
  "$stage/usr/share/peersync/containerd/"
install -m 0755 packaging/containerd/containerd-setup.py "$stage/usr/share/peersync/containerd-setup.py"
"$stage/opt/peersync/bin/python" -m peersync.cli config-defaults > "$stage/etc/peersync/config.toml"
# The packaged node runs beside the system containerd: name its socket, so `ctr images pull` finds
# every layer the daemon unpacked committed (snapshotter/preparer.py).
sed -i 's|^containerd_address = ""$|containerd_address = "/run/containerd/containerd.sock"|' \
  "$stage/etc/peersync/config.toml"
grep -q '^containerd_address = "/run/containerd/containerd.sock"$' "$stage/etc/peersync/config.toml"
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
printf '/etc/peersync/config.toml\n' > "$stage/DEBIAN/conffiles"
cat > "$stage/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
SHARE=/usr/share/peersync
DROPIN=/etc/containerd/conf.d/peersync.toml
if [ "$1" = configure ]; then
  # The drop-in: a link to the packaged file, made once. An existing link or file is the
  # operator's choice (e.g. the no-CRI variant) and is left alone.
  if [ ! -e "$DROPIN" ] && [ ! -L "$DROPIN" ]; then
    ln -s "$SHARE/containerd/peersync.toml" "$DROPIN"
  fi
  # The mirror first in containerd's catch-all hosts.toml, at the address the config gives it.
  mirror=$(/opt/peersync/bin/python3 -c 'from pathlib import Path
from kernel import config
listen = config.load(Path("/etc/peersync/config.toml")).mirror.listen
host, _, port = listen.rpartition(":")
host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}.get(host, host)
print(f"http://{host}:{port}" if listen else "")') || {
    echo "peersync: cannot read /etc/peersync/config.toml: the mirror is not in hosts.toml" >&2; mirror=; }
  if [ -n "$mirror" ]; then
    /usr/bin/peersync hosts install --dir /etc/containerd/certs.d --mirror "$mirror" _default ||
      echo "peersync: the mirror is not in /etc/containerd/certs.d/_default/hosts.toml (see above)" >&2
  fi
  /opt/peersync/bin/python3 "$SHARE/containerd-setup.py" check || true
  # Byte-code now (prerm removes it again), so the daemon writes none into /opt at run time.
  /opt/peersync/bin/python3 -m compileall -q /opt/peersync/lib >/dev/null || true
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
    systemctl enable --now peersync.socket peersync.service >/dev/null || true
  fi
fi
POSTINST
cat > "$stage/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
DROPIN=/etc/containerd/conf.d/peersync.toml
if [ "$1" = remove ]; then
  if [ -d /run/systemd/system ]; then
    systemctl disable --now peersync.service peersync.socket >/dev/null || true
  fi
  # The mirror and the plugins go away with the package: take containerd's pointers to them out
  # (a containerd importing the drop-in without the daemon would have no content store).
  /usr/bin/peersync hosts remove --all --dir /etc/containerd/certs.d ||
    echo "peersync: could not take the mirror out of /etc/containerd/certs.d (see above)" >&2
  case "$(readlink "$DROPIN" 2>/dev/null)" in
    /usr/share/peersync/*) rm -f "$DROPIN" ;;
    *) if [ -e "$DROPIN" ]; then
         echo "peersync: $DROPIN is not the package's link; remove it before restarting containerd" >&2
       fi ;;
  esac
fi
if [ "$1" = remove ] || [ "$1" = upgrade ]; then
  # Byte-code is not in the package's file list: dpkg would leave /opt/peersync behind for it.
  find /opt/peersync -type d -name __pycache__ -prune -exec rm -rf {} + 2>/dev/null || true
fi
PRERM
cat > "$stage/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
case "$1" in
  remove|purge)
    # The socket unit's directory (systemd removes it at boot; the package now).
    rm -rf /run/peersync
    if [ -d /run/systemd/system ]; then
      systemctl daemon-reload >/dev/null || true
    fi
    ;;
esac
if [ "$1" = purge ]; then
  # The daemon's state: blob cache, snapshots and metadata. --one-file-system: never descend into
  # something mounted below it.
  rm -rf --one-file-system /var/lib/peersync
  # The node's site certificate and private key (`peersync site issue --out /etc/peersync/tls`):
  # a purged node is no longer a site member, and its key must not outlive the package.
  rm -rf --one-file-system /etc/peersync/tls
  rm -f /etc/peersync/config.toml.dpkg-old /etc/peersync/config.toml.dpkg-dist
  rmdir /etc/peersync 2>/dev/null || true
fi
POSTRM
chmod 0755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/prerm" "$stage/DEBIAN/postrm"

mkdir -p "$out"
dpkg-deb --root-owner-group --build "$stage" "$out/peersync_${version}_${arch}.deb" >/dev/null
echo "$out/peersync_${version}_${arch}.deb"
