"""A PeerSync site: every node of a `netns.Site` runs `peersync daemon` and a containerd using it.

    with Site(nodes=4, uplink_mbit=50) as site:
        site.start_registry()
        ref = site.push_image(image, "app")
        cluster = Cluster(site, mode="full")
        cluster.pull_all(ref)          # all nodes at once

Modes: "full" (content + snapshotter proxy, lazy reads, pulls through the node's mirror) and
"mirror" (containerd's builtin stores; only the mirror in hosts.toml is ours).

Clients: "ctr" (`ctr images pull`: fetch everything, then unpack), "cri" (containerd's CRI
plugin, as kubelet pulls: layers unpacked as they arrive; in full mode the daemon unpacks them),
"go" (containerd's Go client as nerdctl pulls with a snapshotter it does not know,
`client.Pull(WithPullUnpack)` without CRI's labels: testbed/go/pull, run in the node's namespace;
in full mode the daemon unpacks the layers from their chain IDs), or "chain": the Go client's
Prepares driven over containerd's snapshots API by `testbed.chainunpack` after resolving through
the mirror, then `ctr content fetch` for the image record (every blob present by then), the
stand-in used before the Go client existed (full mode only).

Peers: by default each node's config lists the others (`[peer] peers`); with `discovery=True`
every node gets the same config naming no peer, listening on the wildcard address, and the
nodes find each other by multicast DNS on the site's LAN (the control plane runs in both cases).

Transport: every node gets a certificate from the site's CA (`Site.pki`, `peersync site issue
--ip <node>`) and the nodes speak mutual TLS, the product's default; `insecure=True` gives every
node `[tls] insecure = true` instead (plain HTTP: the benchmark's reference for TLS's cost).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peersync import hosts
from peersync.containerd_config import render
from snapshotter.remote import chain_ids
from testbed import gotools
from testbed.chainunpack import PRESENT, PROVIDED, diff_ids_through_mirror, unpack_by_chain_ids
from testbed.containerd import (
    Containerd,
    containerd_base,
    containerd_socket,
    merge_config,
    parse_extra_config,
    with_setting,
)
from testbed.cri import CRI_NAMESPACE, cri_config, cri_pull
from testbed.netns import REGISTRY_IP, Site, SiteNode
from testbed.peersyncd import PeerSyncDaemon

PEER_PORT = 5381
MIRROR = "127.0.0.1:5380"
REGISTRY = f"{REGISTRY_IP}:5000"


def node_config(
    node: SiteNode, site: Site, extra: str = "", discovery: bool = False, insecure: bool = False
) -> str:
    """A node's daemon config: listing the other nodes, or (`discovery`) the same for every node;
    without `[tls]` (the harness issues the node's certificate) unless `insecure`."""
    if discovery:
        peer = f'[peer]\nlisten = "0.0.0.0:{PEER_PORT}"\n'
    else:
        peers = [f"{n.ip}:{PEER_PORT}" for n in site.nodes if n is not node]
        peer = f'[peer]\nlisten = "{node.ip}:{PEER_PORT}"\npeers = {json.dumps(peers)}\n'
    tls = "[tls]\ninsecure = true\n" if insecure else ""
    origin = f'[origin]\nplain_http = ["{REGISTRY}"]\n'
    return peer + f'[mirror]\nlisten = "{MIRROR}"\n' + origin + tls + extra


@dataclass
class ClusterNode:
    node: SiteNode
    daemon: PeerSyncDaemon
    containerd: Containerd
    hosts_dir: Path
    snapshotter: str
    client: str = "ctr"
    go_pulls: list[gotools.PullResult] = field(default_factory=list)  # what each Go pull reported

    def pull(self, ref: str, timeout: float = 600.0) -> float:
        """Pull through this node's mirror (with the cluster's client); returns the seconds it took."""
        started = time.monotonic()
        if self.client == "cri":
            cri_pull(self.containerd, ref, timeout=timeout)
        elif self.client == "chain":
            self._pull_by_chain_ids(ref, timeout)
        elif self.client == "go":
            ctrd, sn = self.containerd, self.snapshotter
            pulled = gotools.go_pull(
                ctrd.address, ctrd.namespace, sn, self.hosts_dir, ref, timeout, prefix=ctrd.prefix
            )
            self.go_pulls.append(pulled)
        else:
            extra = ["--hosts-dir", str(self.hosts_dir)]
            self.containerd.pull(ref, snapshotter=self.snapshotter, extra_args=extra, timeout=timeout)
        return time.monotonic() - started

    def _pull_by_chain_ids(self, ref: str, timeout: float) -> None:
        """The chain client's pull: resolve, the Prepares, the image record; the unpacked snapshot
        referenced from the config as containerd's unpacker does (so GC keeps it)."""
        ctrd, sn = self.containerd, self.snapshotter
        config, diff_ids = self.node.call(diff_ids_through_mirror, MIRROR, ref, timeout)
        lease = ctrd.ctr("leases", "create").split()[0]
        try:
            outcome = unpack_by_chain_ids(ctrd.address, ctrd.namespace, sn, diff_ids, lease, timeout)
            if outcome.count(PROVIDED) + outcome.count(PRESENT) != len(diff_ids):
                raise RuntimeError(f"the daemon did not provide every layer: {outcome}")
            ctrd.ctr("content", "fetch", "--hosts-dir", str(self.hosts_dir), ref, timeout=timeout)
            top = chain_ids(diff_ids)[-1]
            ctrd.ctr("content", "label", config, f"containerd.io/gc.ref.snapshot.{sn}={top}")
        finally:
            ctrd.ctr("leases", "rm", lease)

    def run(self, ref: str, cmd: tuple[str, ...] = ()) -> str:
        return self.containerd.run(ref, list(cmd), snapshotter=self.snapshotter)

    def stats(self) -> dict[str, Any]:
        """The daemon's transfer counters (asked inside the node's namespace)."""
        return self._get("/peersync/v1/stats")

    def control(self) -> dict[str, Any]:
        """The daemon's control-plane status (role, tracker, members, message counters)."""
        return self._get("/peersync/v1/control/status")

    def _get(self, path: str) -> dict[str, Any]:
        """GET `path` on the daemon's peer port, as a site member, from inside its namespace."""
        body: dict[str, Any] = self.node.call(self.daemon.peer_json, path)
        return body


class Cluster:
    """Daemons, containerds and hosts.toml on every node of `site`."""

    def __init__(
        self,
        site: Site,
        mode: str = "full",
        extra_config: str = "",
        client: str = "ctr",
        daemon_python: str | None = None,
        discovery: bool = False,
        insecure: bool = False,
    ) -> None:
        if mode not in ("full", "mirror"):
            raise ValueError(f"mode must be full or mirror, not {mode!r}")
        if client not in ("ctr", "cri", "go", "chain"):
            raise ValueError(f"client must be ctr, cri, go or chain, not {client!r}")
        if client == "go":
            gotools.build("pull")  # now, not inside the first timed pull
        if client == "chain" and mode != "full":
            raise ValueError("the chain client needs full mode (it drives the peersync snapshotter)")
        self.site, self.mode, self.client, self.discovery = site, mode, client, discovery
        self.insecure = insecure
        self.daemon_python = daemon_python  # another installation's daemon (before/after runs)
        self.nodes: list[ClusterNode] = []
        for node in site.nodes:
            self.nodes.append(self._start(node, extra_config))

    def _start(self, node: SiteNode, extra_config: str) -> ClusterNode:
        daemon_config = node_config(node, self.site, extra_config, self.discovery, self.insecure)
        full = self.mode == "full"
        base = containerd_base(self.site.scratch)
        if full and self.daemon_python is None:  # as an operator's config names containerd's socket
            line = f'containerd_address = "{containerd_socket(base)}"'
            daemon_config = with_setting(daemon_config, "snapshotter", line)
        daemon = node.start_peersync(config=daemon_config, python=self.daemon_python)
        snapshotter = "peersync" if full else "overlayfs"
        hosts_dir = node.workdir / "hosts.d"
        hosts.install(REGISTRY, f"http://{MIRROR}", hosts_dir)
        toml = hosts_dir / REGISTRY / "hosts.toml"
        toml.write_text(toml.read_text().replace(f"https://{REGISTRY}", f"http://{REGISTRY}"))
        config = parse_extra_config(render(daemon.socket, content=True) if full else None)
        if self.client == "cri":
            config = merge_config(config, cri_config(snapshotter, hosts_dir, node.workdir))
            ctrd = node.start_containerd(extra_config=config, cri=True, namespace=CRI_NAMESPACE, base=base)
        else:
            ctrd = node.start_containerd(extra_config=config, base=base)
        return ClusterNode(node, daemon, ctrd, hosts_dir, snapshotter, self.client)

    def pull_all(self, ref: str, stagger: float = 0.0) -> list[float]:
        """Every node pulls `ref` at once (or `stagger` seconds apart); seconds per node."""

        def pull(i: int) -> float:
            time.sleep(i * stagger)
            return self.nodes[i].pull(ref)

        with ThreadPoolExecutor(len(self.nodes)) as pool:
            return list(pool.map(pull, range(len(self.nodes))))
