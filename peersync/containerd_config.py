"""The containerd configuration that plugs PeerSync in (config version 2).

containerd keys proxy plugins by name in one TOML table, so the two entries need distinct keys:
the snapshotter is `peersync` (what `--snapshotter peersync` and CRI's `snapshotter` select) and the
content store is `peersync-content`. Both dial the same socket. The builtin content store is
disabled: otherwise containerd picks one of the two content plugins at random on each start.
"""

from __future__ import annotations

from pathlib import Path

SNAPSHOTTER_NAME = "peersync"
CONTENT_NAME = "peersync-content"
BUILTIN_CONTENT = "io.containerd.content.v1.content"


def render(socket: Path, content: bool = True) -> str:
    """containerd config v2 text registering our plugins on `socket`.

    With `content=False` only the snapshotter is registered (mirror-only deployments keep the
    builtin content store)."""
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
    return "\n".join(lines) + "\n"
