"""Run the real `peersync daemon` for tests, the demo and benchmarks, and look into its store."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from testbed.procs import ManagedProcess, free_port, unix_socket_accepts

REPO = Path(__file__).resolve().parents[2]


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
    """A daemon config with the peer exchange and the mirror on free loopback ports."""
    return (
        f'[peer]\nlisten = "127.0.0.1:{free_port()}"\npeers = {list(peers)!r}\n'.replace("'", '"')
        + f'[mirror]\nlisten = "127.0.0.1:{free_port()}"\n'
        + f"[origin]\nplain_http = {list(plain_http)!r}\n".replace("'", '"')
        + extra
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
    `python` runs another installation's daemon (the benchmark's before/after), default this one.
    """
    sockdir = Path(tempfile.mkdtemp(prefix="ps-", dir="/tmp"))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    workdir.mkdir(parents=True, exist_ok=True)
    if config is None:
        config = loopback_config()
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
