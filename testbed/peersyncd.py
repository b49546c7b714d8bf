"""Run the real `peersync daemon` for tests, the demo and benchmarks, and look into its store.

Traffic rule: a daemon started in the host's network namespace (no `nsenter --net` prefix) must
not speak multicast DNS on any interface but loopback: mDNS multicasts on every interface it is
given, and the host's are real networks. `start_peersync` refuses such a config before anything
runs (`check_host_config`); inside a test network namespace mDNS is fine. `loopback_config`
turns mDNS off: daemons on the host that should meet each other list each other as peers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
import tempfile
import tomllib
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernel.config import Config, loads
from peer.control.discovery import beyond_loopback
from testbed.procs import ManagedProcess, free_port, unix_socket_accepts

REPO = Path(__file__).resolve().parents[1]


@dataclass
class PeerSyncDaemon:
    """A `peersync daemon` child process with its root and socket."""

    root: Path
    socket: Path
    process: ManagedProcess

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
        """The daemon's counters, its cache's status among them (`GET /peersync/v1/stats` on the
        peer listener named in its config)."""
        listen = tomllib.loads((self.root.parent / "peersync.toml").read_text())["peer"]["listen"]
        with urllib.request.urlopen(f"http://{listen}/peersync/v1/stats", timeout=10) as resp:
            stats: dict[str, Any] = json.loads(resp.read())
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
    """A daemon config with the peer exchange and the mirror on free loopback ports and
    multicast DNS off (the host's daemons meet through `peers`, never by multicast)."""
    return (
        f'[peer]\nlisten = "127.0.0.1:{free_port()}"\npeers = {list(peers)!r}\n'.replace("'", '"')
        + f'[mirror]\nlisten = "127.0.0.1:{free_port()}"\n'
        + f"[origin]\nplain_http = {list(plain_http)!r}\n".replace("'", '"')
        + "[discovery]\nmdns = false\n"
        + extra
    )


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


@contextlib.contextmanager
def start_peersync(
    workdir: Path,
    *extra_args: str,
    prefix: Sequence[str] = (),
    config: str | None = None,
    python: str | None = None,
) -> Iterator[PeerSyncDaemon]:
    """A running daemon with its root under `workdir` and its socket under a short /tmp path.

    `prefix` is a command the daemon is launched under (e.g. `nsenter --net=/var/run/netns/NS --`,
    which execs it, so the PID we stop is the daemon's). `config` is the daemon's TOML config; by
    default the peer exchange and the mirror listen on free loopback ports (`daemon.mirror`).
    Without a network-namespace `prefix` the daemon runs on the host: a config whose multicast
    DNS would speak beyond loopback is refused (`UnsafeDaemonConfig`) before anything is made.
    `python` runs another installation's daemon (the benchmark's before/after), default this one.
    """
    if config is None:
        config = loopback_config()
    if not in_test_namespace(prefix):
        check_host_config(config)
    sockdir = Path(tempfile.mkdtemp(prefix="ps-", dir="/tmp"))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "peersync.toml").write_text(config)
    interpreter = python or sys.executable
    args = [*prefix, interpreter, "-m", "peersync.cli", "daemon", "--root", str(workdir / "root")]
    args += [
        "--socket",
        str(sockdir / "peersync.sock"),
        "--config",
        str(workdir / "peersync.toml"),
        *extra_args,
    ]
    daemon = PeerSyncDaemon(
        workdir / "root", sockdir / "peersync.sock", ManagedProcess(args, workdir / "peersync.log", env)
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
