"""A node for the operator-surface tests: a daemon with its admin socket and metrics listener, a
containerd pulling through the daemon's mirror (mirror-only mode), the `peersync` CLI run as a
child process against it, and `/metrics` scraped and parsed.

Everything listens on loopback; the daemon and containerd are started here and stopped by their
PIDs when the `start_node` block ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peersync import hosts
from testbed.containerd import Containerd, start_containerd
from testbed.images import BuiltImage
from testbed.peersyncd import PeerSyncDaemon, start_peersync
from testbed.procs import free_port

REPO = Path(__file__).resolve().parents[1]
Scraped = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class OpsNode:
    daemon: PeerSyncDaemon
    containerd: Containerd
    hosts_dir: Path
    admin: Path
    metrics: str
    peer: str

    def pull(self, ref: str) -> None:
        self.containerd.pull(ref, extra_args=["--hosts-dir", str(self.hosts_dir)])

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return cli(*args, "--admin-socket", str(self.admin), check=check)

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def scrape(self) -> Scraped:
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=10) as resp:
            return parse_metrics(resp.read().decode())


def cli(*args: str, check: bool = True, user: int | None = None) -> subprocess.CompletedProcess[str]:
    """`peersync ARGS` as a child process (as `user`, a uid, when given)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="200")
    prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user is not None else []
    proc = subprocess.run([*prefix, sys.executable, "-m", "peersync.cli", *args], capture_output=True,
                          text=True, env=env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"peersync {' '.join(args)}: rc {proc.returncode}: {proc.stderr}")
    return proc


def parse_metrics(text: str) -> Scraped:
    """Prometheus text format -> {(name, labels): value} (no escapes in our label values)."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, value = line.rsplit(" ", 1)
        name, _, labels = series.partition("{")
        pairs = [p.split("=", 1) for p in labels.rstrip("}").split(",") if p]
        out[(name, frozenset((k, v.strip('"')) for k, v in pairs))] = float(value)
    return out


def metric(scraped: Scraped, name: str, **labels: str) -> float:
    return scraped[(name, frozenset(labels.items()))]


def node_config(registry: str, admin: Path, metrics: str, peers: list[str], peer_port: int) -> str:
    return "\n".join([
        "[log]", 'level = "debug"', "",
        "[peer]", f'listen = "127.0.0.1:{peer_port}"', f"peers = {json.dumps(peers)}", "",
        "[mirror]", f'listen = "127.0.0.1:{free_port()}"', "",
        "[origin]", f'plain_http = ["{registry}"]', "",
        "[discovery]", "mdns = false", "",
        "[admin]", f'socket = "{admin}"', f'listen = "{metrics}"', "",
        "[cache]", 'budget = ""', "",
    ])


@contextlib.contextmanager
def start_node(workdir: Path, registry: str, peers: list[str] | None = None) -> Iterator[OpsNode]:
    """A daemon (root `workdir/daemon/root`: put a seed there first to boot from it) and a
    containerd whose pulls of `registry` go through the daemon's mirror."""
    sockdir = Path(tempfile.mkdtemp(prefix="ps-admin-", dir="/tmp"))  # unix socket paths are short
    admin, metrics, peer_port = sockdir / "admin.sock", f"127.0.0.1:{free_port()}", free_port()
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: sockdir.rmdir() if sockdir.exists() and not any(sockdir.iterdir()) else None)
        config = node_config(registry, admin, metrics, peers or [], peer_port)
        daemon = stack.enter_context(start_peersync(workdir / "daemon", config=config))
        ctrd = stack.enter_context(start_containerd(workdir / "containerd"))
        hosts_dir = workdir / "hosts"
        hosts.install(registry, f"http://{daemon.mirror}", hosts_dir)
        toml = hosts_dir / registry / "hosts.toml"
        toml.write_text(toml.read_text().replace(f"https://{registry}", f"http://{registry}"))
        yield OpsNode(daemon, ctrd, hosts_dir, admin, metrics, daemon.peer_url)


def blob_sizes(image: BuiltImage) -> dict[str, int]:
    """Config and layers (what goes through the engine and the mirror's /blobs/): digest -> size."""
    blobs = image.layout / "blobs" / "sha256"
    return {d: (blobs / d[7:]).stat().st_size for d in image.blob_digests if d != image.manifest.digest}
