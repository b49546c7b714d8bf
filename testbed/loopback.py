"""One PeerSync node on loopback: a daemon, a containerd using it, and a hosts.toml pointing
containerd at the daemon's registry mirror. Several of them, listing each other as peers, make a
site on one machine without namespaces (the demo and the P2P tests); their site certificates come
from `pki.loopback_site()`, so they speak mutual TLS to each other as deployed nodes do."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peersync import hosts
from testbed.containerd import (
    DEFAULT_NAMESPACE,
    Containerd,
    containerd_base,
    containerd_socket,
    merge_config,
    parse_extra_config,
    start_containerd,
    with_setting,
)
from testbed.cri import CRI_NAMESPACE, cri_config, cri_pull, cri_remove
from testbed.images import BuiltImage, compare_manifests, snapshot_tree
from testbed.peersyncd import PeerSyncDaemon, loopback_config, start_peersync

SNAPSHOTTER = "peersync"


@dataclass
class LoopbackNode:
    daemon: PeerSyncDaemon
    containerd: Containerd
    hosts_dir: Path
    peer_url: str

    def pull(self, ref: str) -> str:
        """`ctr images pull` through this node's mirror into the peersync snapshotter."""
        args = ["--hosts-dir", str(self.hosts_dir)]
        return self.containerd.pull(ref, snapshotter=SNAPSHOTTER, plain_http=True, extra_args=args)

    def cri_pull(self, ref: str) -> str:
        """Pull as kubelet does (CRI PullImage, needs `start_node(cri=True)`); the image ID."""
        return cri_pull(self.containerd, ref)

    def cri_remove(self, ref: str) -> None:
        """CRI RemoveImage, then a GC pass that frees the image's content and snapshots."""
        cri_remove(self.containerd, ref)

    def run(self, ref: str, cmd: Sequence[str] = ()) -> str:
        return self.containerd.run(ref, list(cmd), snapshotter=SNAPSHOTTER)

    def stats(self) -> dict[str, Any]:
        """The daemon's transfer counters (`GET /peersync/v1/stats`, as a site member)."""
        stats: dict[str, Any] = self.daemon.peer_json("/peersync/v1/stats")
        return stats

    def rootfs_differences(self, ref: str, image: BuiltImage) -> list[str]:
        """How the image's rootfs in the peersync snapshotter differs from what its layers say
        (empty: identical). The snapshot itself is mounted (`Containerd.mount_image`), so this
        checks our snapshots whoever unpacked them, and needs no layer in containerd's content."""
        assert image.expected is not None
        with self.containerd.mount_image(ref, snapshotter=SNAPSHOTTER) as rootfs:
            return compare_manifests(image.expected, snapshot_tree(rootfs))


@contextlib.contextmanager
def start_node(
    workdir: Path,
    port: int,
    peers: Sequence[str],
    registry: str,
    cri: bool = False,
    extra: str = "",
    prepare: bool = True,
) -> Iterator[LoopbackNode]:
    """A node whose peer exchange listens on 127.0.0.1:`port`, pulling from the plain-HTTP
    `registry` (host:port) through its mirror, with `peers` (host:port or URLs: the scheme is the
    daemon's own) as the other nodes. With `cri` its containerd also serves CRI (snapshotter
    peersync, layer labels on) in namespace k8s.io. `extra` is appended to the daemon's config.
    With `prepare` the daemon is told its containerd's socket (`[snapshotter] containerd_address`,
    as an operator's config names /run/containerd/containerd.sock): it then commits the chains of
    images `ctr images pull` fetches before ctr's unpack looks for them (`snapshotter.preparer`)."""
    config = loopback_config(plain_http=[registry], peers=[p.split("://", 1)[-1] for p in peers], extra=extra)
    config = config.replace('listen = "127.0.0.1:', f'listen = "127.0.0.1:{port}"\n#', 1)
    base = containerd_base()
    if prepare:
        config = with_setting(config, "snapshotter", f'containerd_address = "{containerd_socket(base)}"')
    hosts_dir = workdir / "hosts.d"
    with start_peersync(workdir, config=config) as daemon:
        ctrd_config = parse_extra_config(daemon.containerd_config())
        if cri:
            ctrd_config = merge_config(ctrd_config, cri_config(SNAPSHOTTER, hosts_dir, workdir))
        namespace = CRI_NAMESPACE if cri else DEFAULT_NAMESPACE
        with start_containerd(
            workdir / "containerd", extra_config=ctrd_config, namespace=namespace, cri=cri, base=base
        ) as ctrd:
            hosts.install(registry, f"http://{daemon.mirror}", hosts_dir)
            toml = hosts_dir / registry / "hosts.toml"  # the test registry speaks plain HTTP
            toml.write_text(toml.read_text().replace(f"https://{registry}", f"http://{registry}"))
            yield LoopbackNode(daemon, ctrd, hosts_dir, daemon.peer_url)
