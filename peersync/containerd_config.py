"""The containerd configuration that plugs PeerSync in (config version 2).

containerd keys proxy plugins by name in one TOML table, so the two entries need distinct keys:
the snapshotter is `peersync` (what `--snapshotter peersync` and CRI's `snapshotter` select) and the
content store is `peersync-content`. Both dial the same socket. The builtin content store is
disabled: otherwise containerd picks one of the two content plugins at random on each start.

With `cri`, the CRI plugin (kubelet's pulls) is pointed at the snapshotter too, with the layer
annotations on (the daemon then unpacks layers itself, see `snapshotter/remote.py`) and registry
hosts read from `hosts_dir`, where `peersync hosts install` puts the mirror.
"""

from __future__ import annotations

from pathlib import Path

SNAPSHOTTER_NAME = "peersync"
CONTENT_NAME = "peersync-content"
BUILTIN_CONTENT = "io.containerd.content.v1.content"
CRI_PLUGIN = "io.containerd.grpc.v1.cri"
DEFAULT_HOSTS_DIR = Path("/etc/containerd/certs.d")


def render(socket: Path, content: bool = True, cri: bool = False, hosts_dir: Path = DEFAULT_HOSTS_DIR) -> str:
    """containerd config v2 text registering our plugins on `socket`.

    With `content=False` only the snapshotter is registered (mirror-only deployments keep the
    builtin content store); `cri` adds the CRI plugin's settings (see the module docstring)."""
    lines = ["version = 2", ""]
    if content:
        lines += [f'disabled_plugins = ["{BUILTIN_CONTENT}"]', ""]
    lines += [
        f"[proxy_plugins.{SNAPSHOTTER_NAME}]",
        '  type = "snapshot"',
        f'  address = "{socket}"',
    ]
    if content:
        lines += ["", f'[proxy_plugins."{CONTENT_NAME}"]', '  type = "content"', f'  address = "{socket}"']
    if cri:
        lines += [
            "",
            f'[plugins."{CRI_PLUGIN}".containerd]',
            f'  snapshotter = "{SNAPSHOTTER_NAME}"',
            "  disable_snapshot_annotations = false",
            "",
            f'[plugins."{CRI_PLUGIN}".registry]',
            f'  config_path = "{hosts_dir}"',
        ]
    return "\n".join(lines) + "\n"
