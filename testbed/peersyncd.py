"""Run the real `peersync daemon` for tests, the demo and benchmarks, and look into its store.

Traffic rule: a daemon started in the host's network namespace (no `nsenter --net` prefix) must
not speak multicast DNS on any interface but loopback: mDNS multicasts on every interface it is
given, and the host's are real networks. `start_peersync` refuses such a config before anything
runs (`check_host_config`); inside a test network namespace mDNS is fine. `loopback_config`
turns mDNS off: daemons on the host that should meet each other list each other as peers.

Site certificates: a daemon whose config has a peer listen address and no `[tls]` section gets a
node certificate from a site CA (`testbed.pki`, made with `peersync site init/issue`), so the
harness runs the product's default, mutual TLS, unless a test says otherwise (`[tls] insecure =
true`, or its own `[tls]` paths). Daemons on the host share `pki.loopback_site()`; a network
namespace site passes its own CA and the node's address. `daemon.peer_json(path)` asks the
daemon's peer port as a site member would.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import ssl
import sys
import tempfile
import tomllib
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernel.config import Config, hostport, loads
from peer.control.discovery import beyond_loopback
from testbed.pki import NodeCert, SiteCA, loopback_site
from testbed.procs import ManagedProcess, free_port, unix_socket_accepts

REPO = Path(__file__).resolve().parents[1]


@dataclass
class PeerSyncDaemon:
    """A `peersync daemon` child process with its root and socket."""

    root: Path
    socket: Path
    process: ManagedProcess
    peer_url: str = ""  # how peers reach it ("" without a peer listen address)
    tls: NodeCert | None = None  # its site certificate when the harness issued one

    def client_context(self) -> ssl.SSLContext | None:
        """A site member's client context for this daemon's peer port (None: plain HTTP)."""
        return self.tls.client_context() if self.tls is not None else None

    def peer_json(self, path: str, timeout: float = 10.0) -> Any:
        """GET `path` on the peer port as a site member (with this node's own certificate: the
        caller has to be in the daemon's network namespace)."""
        context = self.client_context()
        with urllib.request.urlopen(self.peer_url + path, timeout=timeout, context=context) as resp:
            return json.loads(resp.read())

    def start(self, timeout: float = 30.0) -> None:
        self.process.start()
        self.process.wait_ready(lambda: unix_socket_accepts(self.socket), timeout, "serving its socket")

    def stop(self) -> int | None:
        """SIGTERM (then SIGKILL after 20 s); returns the exit status."""
        return self.process.stop(timeout=20)

    def kill(self) -> None:
        """SIGKILL: what a crash or the OOM killer does."""
        os.kill(self.process.pid, signal.SIGKILL)  # .pid raises if it never started
        proc = self.process.proc
        assert proc is not None
        proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def mirror(self) -> str:
        """host:port of the daemon's registry mirror (from its config)."""
        import tomllib

        return str(tomllib.loads((self.root.parent / "peersync.toml").read_text())["mirror"]["listen"])

    def containerd_config(self) -> str:
        from peersync.containerd_config import render

        return render(self.socket)

    def blob_files(self) -> set[str]:
        """Digests of committed blob files on disk in our store."""
        blobs = self.root / "content" / "blobs" / "sha256"
        return {f"sha256:{p.name}" for p in blobs.iterdir()} if blobs.exists() else set()

    def stats(self) -> dict[str, Any]:
        """The daemon's counters, its cache's status among them (`GET /peersync/v1/stats` on its
        peer port, as a site member)."""
        stats: dict[str, Any] = self.peer_json("/peersync/v1/stats")
        return stats

    def only_cache_left(self) -> bool:
        """True if every blob in the store is cache-only: nothing containerd's, held, pinned or in
        flight (what a store holds once containerd removed everything: bytes kept for peers and
        for later pulls until the budget needs the room)."""
        blobs = self.stats()["cache"]["blobs"]
        every = blobs["cache_only"] == blobs["complete"] == len(self.blob_files())
        return bool(every and not blobs["partial"])

    def corrupt_blobs(self) -> list[str]:
        """Committed blob files whose content does not hash to their name (must always be empty)."""
        bad = []
        for digest in self.blob_files():
            h = hashlib.sha256()
            with open(self.root / "content" / "blobs" / "sha256" / digest[7:], "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            if "sha256:" + h.hexdigest() != digest:
                bad.append(digest)
        return bad

    def snapshot_dirs(self) -> set[str]:
        """Snapshot directories on disk (numeric ids; temp and removal names excluded)."""
        snaps = self.root / "snapshots"
        return {p.name for p in snaps.iterdir() if p.name.isdigit()} if snaps.exists() else set()


def loopback_config(plain_http: Sequence[str] = (), peers: Sequence[str] = (), extra: str = "") -> str:
    """A daemon config with the peer exchange, the mirror and /metrics on free loopback ports and
    multicast DNS off (the host's daemons meet through `peers`, never by multicast)."""
    return (
        f'[peer]\nlisten = "127.0.0.1:{free_port()}"\npeers = {list(peers)!r}\n'.replace("'", '"')
        + f'[mirror]\nlisten = "127.0.0.1:{free_port()}"\n'
        + f'[admin]\nlisten = "127.0.0.1:{free_port()}"\n'
        + f"[origin]\nplain_http = {list(plain_http)!r}\n".replace("'", '"')
        + "[discovery]\nmdns = false\n"
        + extra
    )


def with_own_metrics_port(config: str) -> str:
    """`config` with /metrics on a free loopback port unless it says where: the default port
    (5382) would clash between the daemons that tests and benchmarks run side by side."""
    if "admin" in tomllib.loads(config):
        return config
    return config + f'\n[admin]\nlisten = "127.0.0.1:{free_port()}"\n'


class UnsafeDaemonConfig(RuntimeError):
    """A daemon for the host's network namespace would multicast beyond loopback."""


def in_test_namespace(prefix: Sequence[str]) -> bool:
    """Whether a command run under `prefix` enters a named network namespace (`ip netns`'s, as
    the test sites make them): `--net=/proc/1/ns/net` would be the host's own."""
    return any(str(arg).startswith(("--net=/var/run/netns/", "--net=/run/netns/")) for arg in prefix)


def check_host_config(config: str | Config, where: str = "daemon config") -> None:
    """Refuse a config whose daemon, run in the host's network namespace, would speak multicast
    DNS beyond loopback (see the module docstring)."""
    if isinstance(config, str):
        config = loads(config, where)
    exposed = beyond_loopback(config)
    if exposed:
        raise UnsafeDaemonConfig(
            f"{where}: a daemon in the host's network namespace would speak multicast DNS on "
            f"{', '.join(exposed)}; set [discovery] mdns = false (or listen on 127.0.0.1), or run "
            "it in a test network namespace"
        )


def peer_side(config: str, addresses: Sequence[str] = ()) -> tuple[str, str, bool]:
    """(scheme, the host peers dial, whether the harness should issue a certificate) for a
    daemon config: a certificate when it listens for peers and has no `[tls]` section."""
    cfg = loads(config)
    if not cfg.peer.listen:
        return "https", "", False
    host, _port = hostport(cfg.peer.listen)
    if host in ("", "0.0.0.0", "::"):
        host = addresses[0] if addresses else "127.0.0.1"
    scheme = "http" if cfg.tls.insecure else "https"
    return scheme, host, "tls" not in tomllib.loads(config)


def with_certificate(
    config: str, workdir: Path, site: SiteCA | None = None, addresses: Sequence[str] = ()
) -> tuple[str, NodeCert | None]:
    """`config` with a `[tls]` section for a node certificate issued into `workdir/tls` by
    `site` (default `pki.loopback_site()`) for `addresses` (default: the listen host), when it
    listens for peers and has no `[tls]` of its own; else `config` as it is, and None."""
    _scheme, host, issue = peer_side(config, addresses)
    if not issue:
        return config, None
    name = re.sub(r"[^A-Za-z0-9._-]", "-", workdir.name)[:64].lstrip(".-_") or "node"
    tls = (site or loopback_site()).issue(name, workdir / "tls", ips=list(addresses) or [host])
    return config.rstrip("\n") + "\n\n" + tls.toml(), tls


def daemon_env() -> dict[str, str]:
    """The daemon's environment: this checkout first on PYTHONPATH (its code, installed or not)."""
    return dict(os.environ, PYTHONPATH=str(REPO))


def interpreter(python: str | None = None) -> list[str]:
    """How to start Python for a daemon: this interpreter, or `python` isolated (`-I`).

    Isolated, another installation imports its own code: with `daemon_env()`'s PYTHONPATH, or
    with this checkout as the current directory (on sys.path for `-m`), it would import this
    checkout's, and a before/after run would compare this code with itself."""
    return [python, "-I"] if python else [sys.executable]


@contextlib.contextmanager
def start_peersync(
    workdir: Path,
    *extra_args: str,
    prefix: Sequence[str] = (),
    config: str | None = None,
    site: SiteCA | None = None,
    addresses: Sequence[str] = (),
    python: str | None = None,
) -> Iterator[PeerSyncDaemon]:
    """A running daemon with its root under `workdir` and its socket under a short /tmp path.

    `prefix` is a command the daemon is launched under (e.g. `nsenter --net=/var/run/netns/NS --`,
    which execs it, so the PID we stop is the daemon's). `config` is the daemon's TOML config; by
    default the peer exchange and the mirror listen on free loopback ports (`daemon.mirror`).
    Without a network-namespace `prefix` the daemon runs on the host: a config whose multicast
    DNS would speak beyond loopback is refused (`UnsafeDaemonConfig`) before anything is made.
    A config that listens for peers without a `[tls]` section gets a node certificate from `site`
    (default: `pki.loopback_site()`) for `addresses` (default: the listen address; 127.0.0.1 for
    a wildcard) in `workdir/tls`.
    `python` runs another installation's daemon (the benchmark's before/after), default this one.
    That one runs isolated, so that it imports its own installation's code (`interpreter`).
    """
    if config is None:
        config = loopback_config()
    if not in_test_namespace(prefix):
        check_host_config(config)
        config = with_own_metrics_port(config)
    scheme, host, _issue = peer_side(config, addresses)
    sockdir = Path(tempfile.mkdtemp(prefix="ps-", dir="/tmp"))
    env = daemon_env()
    workdir.mkdir(parents=True, exist_ok=True)
    config, tls = with_certificate(config, workdir, site, addresses)
    peer_url = ""
    if host:
        peer_url = f"{scheme}://{host}:{hostport(loads(config).peer.listen)[1]}"
    (workdir / "peersync.toml").write_text(config)
    args = [*prefix, *interpreter(python), "-m", "peersync.cli", "daemon", "--root", str(workdir / "root")]
    args += [
        "--socket",
        str(sockdir / "peersync.sock"),
        "--config",
        str(workdir / "peersync.toml"),
        *extra_args,
    ]
    daemon = PeerSyncDaemon(
        workdir / "root",
        sockdir / "peersync.sock",
        ManagedProcess(args, workdir / "peersync.log", env),
        peer_url,
        tls,
    )
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        with contextlib.suppress(OSError):
            (sockdir / "peersync.sock").unlink()
        with contextlib.suppress(OSError):
            sockdir.rmdir()
