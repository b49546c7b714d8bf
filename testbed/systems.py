"""The image distribution systems the testbed compares, each set up on a fresh `netns.Site`.

Every system gets the same site (N node namespaces, a tbf-shaped uplink, the origin registry on the
WAN side holding the image) and implements the same steps, so the scenarios in `scenarios.py` drive
them all alike:

- `setup()`: start what the system needs (not timed);
- `pull(i, timeout)`: node i gets the image until it is unpacked in its containerd (timed);
- `run_check(i)`: `ctr run --rm` a trivial command of the image on node i (proves it is runnable);
- `kill_node(i)`: SIGKILL node i's agents (daemon and/or containerd) mid-pull;
- `processes()`: (role, node, pid) of the site-side processes whose CPU and RSS are reported.

Systems:
- baseline: each node's containerd (builtin content store + overlayfs) pulls from the origin.
- cache: `docker-registry` in pull-through proxy mode inside node 0's namespace; every node's
  containerd pulls through it (hosts.toml mirror), the origin stays the image's name.
- bittorrent: opentracker + an aria2c seeder on the registry host (WAN side, behind the uplink) seed
  the image's OCI layout as fetched from the registry; every node downloads it with aria2c (and keeps
  seeding), then `ctr images import` (tar streamed from the downloaded layout) unpacks it.
- peersync-full / peersync-mirror: `cluster.Cluster` in the two integration modes.

Clients (`client`): "cri" pulls as kubelet does, through containerd's CRI plugin (layers are
unpacked as they arrive; PeerSync's full mode unpacks them in the daemon); "ctr" uses
`ctr images pull` (everything fetched, then unpacked). BitTorrent always imports with ctr.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from . import torrent
from .cluster import Cluster, ClusterNode
from .containerd import CTR_BINARY, Containerd
from .cri import CRI_NAMESPACE, cri_config, cri_pull
from .images import BuiltImage
from .netns import REGISTRY_IP, REGISTRY_PORT, Site, SiteNode
from .procs import ManagedProcess, http_answers, tcp_port_accepts
from .registry import REGISTRY_BINARY, registry_config

T = TypeVar("T")
R = TypeVar("R")
SYSTEMS = ("baseline", "cache", "bittorrent", "peersync-full", "peersync-mirror")
PROXY_PORT = 5000
SETUP_WORKERS = 4  # parallel service starts; more only queues on a 2-core machine


def pmap(fn: Callable[[T], R], items: Sequence[T], workers: int = SETUP_WORKERS) -> list[R]:
    with ThreadPoolExecutor(max(1, min(workers, len(items)))) as pool:
        return list(pool.map(fn, items))


def _sigkill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


class System:
    """Common parts: containerd on every node, the run check, the process list."""

    name = "?"
    snapshotter = "overlayfs"

    def __init__(
        self,
        site: Site,
        image: BuiltImage,
        ref: str,
        workdir: Path,
        check_cmd: Sequence[str],
        client: str = "cri",
    ) -> None:
        self.site, self.image, self.ref, self.workdir = site, image, ref, workdir
        self.check_cmd = list(check_cmd)
        self.client = client
        self.ctrds: list[Containerd] = []
        self.hosts_dir: Path | None = None  # registry hosts (hosts.toml) the nodes pull with
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def nodes(self) -> list[SiteNode]:
        return self.site.nodes

    def setup(self) -> None:
        if self.hosts_dir is None and self.client == "cri":  # CRI has no --plain-http flag
            self.hosts_dir = write_plain_hosts(self.workdir / "hosts.d", f"{REGISTRY_IP}:{REGISTRY_PORT}")
        self.ctrds = pmap(self._start_containerd, self.nodes)

    def _start_containerd(self, node: SiteNode) -> Containerd:
        if self.client != "cri":
            return node.start_containerd()
        assert self.hosts_dir is not None
        config = cri_config(self.snapshotter, self.hosts_dir, node.workdir)
        return node.start_containerd(extra_config=config, cri=True, namespace=CRI_NAMESPACE)

    def pull(self, i: int, timeout: float) -> None:
        """Node i pulls the image (ctr or CRI), through `hosts_dir` if the system set one."""
        ctrd = self.ctrds[i]
        if self.client == "cri":
            cri_pull(ctrd, self.ref, timeout=timeout)
            return
        extra = ["--hosts-dir", str(self.hosts_dir)] if self.hosts_dir else []
        ctrd.pull(self.ref, snapshotter=self.snapshotter, extra_args=extra, timeout=timeout)

    def run_check(self, i: int, timeout: float = 120.0) -> str:
        return self.ctrds[i].run(self.ref, self.check_cmd, snapshotter=self.snapshotter, timeout=timeout)

    def kill_node(self, i: int) -> None:
        _sigkill(self.ctrds[i].process.pid)

    def processes(self) -> list[tuple[str, int, int]]:
        """(role, node index, pid) of long-running site-side processes (the LAN side of the uplink)."""
        return [("containerd", i, c.process.pid) for i, c in enumerate(self.ctrds)]

    def wan_processes(self) -> list[tuple[str, int]]:
        """(role, pid) of processes this system runs on the WAN side (reported separately)."""
        return []

    def node_stats(self, i: int) -> dict[str, Any] | None:
        return None

    def agent_role(self) -> str:
        """The per-node agent whose peak RSS the summary table shows."""
        return "containerd"


class Baseline(System):
    """containerd's builtin stores, every node pulling straight from the origin over the uplink."""

    name = "baseline"


def write_plain_hosts(hosts_dir: Path, registry: str) -> Path:
    """A containerd hosts dir that reaches `registry` over plain HTTP; returns the dir."""
    path = hosts_dir / registry / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    # containerd 1.6 ignores a hosts.toml without a [host] table, so the server is listed as one
    path.write_text(
        f'server = "http://{registry}"\n\n[host."http://{registry}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    return hosts_dir


def write_mirror_hosts(hosts_dir: Path, registry: str, mirror_url: str) -> Path:
    """A containerd hosts.toml for `registry` (plain HTTP) whose first host is `mirror_url`."""
    path = hosts_dir / registry / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'server = "http://{registry}"\n\n[host."{mirror_url}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    return path


class Cache(System):
    """An edge pull-through cache: `docker-registry` in proxy mode on node 0, used by every node."""

    name = "cache"

    def setup(self) -> None:
        host = self.nodes[0]
        base = self.workdir / "proxy"
        base.mkdir(parents=True, exist_ok=True)
        origin = f"http://{REGISTRY_IP}:{REGISTRY_PORT}"
        config = registry_config(base / "storage", PROXY_PORT, host=host.ip, proxy_remote=origin)
        config_path = base / "config.yml"
        config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.proxy = host.spawn([REGISTRY_BINARY, "serve", str(config_path)], base / "registry.log")
        url = f"http://{host.ip}:{PROXY_PORT}"
        self.proxy.wait_ready(lambda: host.call(http_answers, f"{url}/v2/"), 30, "answering /v2/")
        self.hosts_dir = self.workdir / "hosts.d"
        write_mirror_hosts(self.hosts_dir, f"{REGISTRY_IP}:{REGISTRY_PORT}", url)
        super().setup()

    def processes(self) -> list[tuple[str, int, int]]:
        return [*super().processes(), ("proxy-registry", 0, self.proxy.pid)]

    def agent_role(self) -> str:
        return "proxy-registry"


class BitTorrent(System):
    """opentracker + aria2c: the image's OCI layout as one torrent, then `ctr images import`."""

    name = "bittorrent"

    def setup(self) -> None:
        torrent.ensure_tools()
        site, reg_ns = self.site, self.site.registry_ns
        seed = self.workdir / "seed"
        layout = seed / "image"  # the torrent's name: nodes get <dir>/image/{oci-layout,index.json,blobs}
        seed.mkdir(parents=True, exist_ok=True)
        # The seeder's copy comes from the origin registry itself (inside the registry namespace, so
        # over its loopback, not the uplink), blob for blob with the same digests.
        copy = ["skopeo", "--insecure-policy", "copy", "--quiet", "--preserve-digests"]
        copy += ["--src-tls-verify=false", f"docker://{self.ref}", f"oci:{layout}:{self.image.tag}"]
        site.run(reg_ns, copy, timeout=600)
        self.tracker_url = f"http://{REGISTRY_IP}:{torrent.TRACKER_PORT}/announce"
        self.torrent = seed / "image.torrent"
        self.info_hash = torrent.make_torrent(layout, self.torrent, self.tracker_url)
        chroot = self.workdir / "tracker"
        config = torrent.tracker_files(chroot, [self.info_hash])
        self.tracker = site.spawn(
            reg_ns, torrent.tracker_command(REGISTRY_IP, chroot, config), self.workdir / "opentracker.log"
        )
        self.tracker.wait_ready(
            lambda: site.call(reg_ns, tcp_port_accepts, REGISTRY_IP, torrent.TRACKER_PORT), 20, "listening"
        )
        self.seeder = site.spawn(
            reg_ns, torrent.aria2_command(self.torrent, seed, seeder=True), self.workdir / "seeder.log"
        )
        self.seeder.wait_ready(
            lambda: site.call(reg_ns, torrent.scrape_complete, self.tracker_url, self.info_hash) >= 1,
            60,
            "announced as a seeder",
        )
        self.aria: dict[int, ManagedProcess] = {}
        super().setup()

    def pull(self, i: int, timeout: float) -> None:
        node = self.nodes[i]
        deadline = time.monotonic() + timeout
        d = node.workdir / "bt"
        d.mkdir(parents=True, exist_ok=True)
        marker = d / "downloaded"
        hook = torrent.completion_hook(d / "on-complete.sh", marker)
        proc = node.spawn(torrent.aria2_command(self.torrent, d, hook=hook), d / "aria2c.log")
        self.aria[i] = proc
        while not marker.exists():
            if not proc.alive():
                raise RuntimeError(proc.describe_failure("aria2c exited before the download completed"))
            if time.monotonic() > deadline:
                raise TimeoutError(f"n{i}: aria2c not done after {timeout:.0f}s")
            time.sleep(0.05)
        self._import(i, d / "image", max(1.0, deadline - time.monotonic()))

    def _import(self, i: int, layout: Path, timeout: float) -> None:
        """Stream the downloaded OCI layout as a tar into `ctr images import` (which also unpacks)."""
        ctrd = self.ctrds[i]
        base_name = self.ref.rsplit(":", 1)[0]  # the image gets the same name as everywhere else
        members = ["oci-layout", "index.json", "blobs"]
        tar = subprocess.Popen(
            ["tar", "-C", str(layout), "-cf", "-", *members], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        ctr = [*ctrd.prefix, CTR_BINARY, "--address", str(ctrd.address), "--namespace", ctrd.namespace]
        ctr += ["images", "import", "--base-name", base_name, "--snapshotter", self.snapshotter, "-"]
        try:
            done = subprocess.run(ctr, stdin=tar.stdout, capture_output=True, timeout=timeout)
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar_err = tar.stderr.read() if tar.stderr else b""
            tar.wait(timeout=30)
        if tar.returncode != 0 or done.returncode != 0:
            raise RuntimeError(
                f"n{i}: import failed: tar {tar.returncode} {tar_err.decode()[-500:]}; "
                f"ctr {done.returncode} {done.stderr.decode()[-1000:]}"
            )

    def kill_node(self, i: int) -> None:
        if i in self.aria:
            _sigkill(self.aria[i].pid)
        super().kill_node(i)

    def processes(self) -> list[tuple[str, int, int]]:
        return [*super().processes(), *(("aria2c", i, p.pid) for i, p in sorted(self.aria.items()))]

    def wan_processes(self) -> list[tuple[str, int]]:
        return [("opentracker", self.tracker.pid), ("aria2c-seeder", self.seeder.pid)]

    def agent_role(self) -> str:
        return "aria2c"


class PeerSync(System):
    """`peersync daemon` + containerd on every node (`cluster.Cluster`), full or mirror-only mode."""

    def __init__(
        self, *args: Any, mode: str = "full", daemon_config: str = "", daemon_python: str | None = None,
        static_peers: bool = True, **kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.mode = mode
        self.static_peers = static_peers  # False: configs name no peers (discovery finds them)
        self.name = f"peersync-{mode}"
        self.daemon_config = daemon_config
        self.daemon_python = daemon_python

    def setup(self) -> None:
        self.cluster = Cluster(
            self.site, self.mode, self.daemon_config, client=self.client, daemon_python=self.daemon_python,
            discovery=not self.static_peers,
        )  # fmt: skip
        self.ctrds = [cn.containerd for cn in self.cluster.nodes]
        self.snapshotter = self.cluster.nodes[0].snapshotter

    def _cn(self, i: int) -> ClusterNode:
        return self.cluster.nodes[i]

    def pull(self, i: int, timeout: float) -> None:
        self._cn(i).pull(self.ref, timeout=timeout)

    def kill_node(self, i: int) -> None:
        cn = self._cn(i)
        with contextlib.suppress(Exception):
            cn.daemon.kill()
        super().kill_node(i)

    def processes(self) -> list[tuple[str, int, int]]:
        daemons = [("peersync", i, cn.daemon.process.pid) for i, cn in enumerate(self.cluster.nodes)]
        return [*super().processes(), *daemons]

    def node_stats(self, i: int) -> dict[str, Any] | None:
        return self._cn(i).stats()

    def agent_role(self) -> str:
        return "peersync"


def _check_client(client: str) -> None:
    if client == "go":  # see cluster.Cluster: wired when testbed/go/pull merges
        raise NotImplementedError("the Go test client (testbed/go/pull) is not merged yet")


def make_system(
    name: str,
    site: Site,
    image: BuiltImage,
    ref: str,
    workdir: Path,
    check_cmd: Sequence[str],
    client: str = "cri",
    daemon_config: str = "",
    daemon_python: str | None = None,
    static_peers: bool = True,
) -> System:
    _check_client(client)
    args = (site, image, ref, workdir, check_cmd, client)
    if name == "baseline":
        return Baseline(*args)
    if name == "cache":
        return Cache(*args)
    if name == "bittorrent":
        return BitTorrent(*args)
    if name in ("peersync-full", "peersync-mirror"):
        mode = name.split("-", 1)[1]
        return PeerSync(
            *args, mode=mode, daemon_config=daemon_config, daemon_python=daemon_python,
            static_peers=static_peers,
        )  # fmt: skip
    raise ValueError(f"unknown system {name!r} (known: {', '.join(SYSTEMS)})")
