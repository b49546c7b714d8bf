"""The `peersync daemon` process: start-up checks, serving both services, clean shutdown."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from kernel.config import Config
from kernel.errors import PeerSyncError
from snapshotter.api import content_pb2, content_pb2_grpc, snapshots_pb2, snapshots_pb2_grpc
from testbed.peersyncd import check_host_config, loopback_config, with_certificate

ROOT = Path(__file__).resolve().parents[2]


def loopback_ports(root: Path) -> list[str]:
    """`--config` with the peer exchange and the mirror on free loopback ports: the defaults
    (5381, 5380) would clash with any other daemon on this host, another test run's included;
    with a site certificate, so the peer port is opened as on a deployed node."""
    base = next(d for d in root.parents if d.is_dir())  # some tests give an unusable root
    name = f"{root.name}-loopback-{os.urandom(4).hex()}"
    config = base / f"{name}.toml"
    config.write_text(with_certificate(loopback_config(), base / name)[0])
    return ["--config", str(config)]


def start_daemon(root: Path, sock: Path, *extra: str) -> subprocess.Popen[bytes]:
    """A daemon on this host: its config must keep multicast DNS off the host's networks."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if "--config" not in extra:
        extra = (*extra, *loopback_ports(root))
    config = Path(extra[extra.index("--config") + 1])
    with contextlib.suppress(PeerSyncError):  # a test of a bad config: the daemon refuses it itself
        check_host_config(config.read_text(), str(config))
    return subprocess.Popen(
        [sys.executable, "-m", "peersync.cli", "daemon", "--root", str(root), "--socket", str(sock), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def wait_for_socket(proc: subprocess.Popen[bytes], sock: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited early: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
        if sock.is_socket():
            return
        time.sleep(0.05)
    raise AssertionError("daemon did not create its socket")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    root, sock = tmp_path / "root", tmp_path / "run" / "ps.sock"
    proc = start_daemon(root, sock)
    try:
        wait_for_socket(proc, sock)
        yield proc, root, sock
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


Daemon = tuple[subprocess.Popen[bytes], Path, Path]


def test_serves_both_services_and_stops_on_sigterm(daemon: Daemon) -> None:
    proc, _root, sock = daemon
    assert oct(sock.stat().st_mode & 0o777) == "0o660"
    with grpc.insecure_channel(f"unix:{sock}") as channel:
        snaps = snapshots_pb2_grpc.SnapshotsStub(channel)
        snaps.Prepare(snapshots_pb2.PrepareSnapshotRequest(snapshotter="peersync", key="k"))
        info = snaps.Stat(snapshots_pb2.StatSnapshotRequest(snapshotter="peersync", key="k")).info
        assert info.kind == snapshots_pb2.ACTIVE
        content = content_pb2_grpc.ContentStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            content.Info(content_pb2.InfoRequest(digest="sha256:" + "0" * 64))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert not sock.exists(), "socket file left behind"


def test_refuses_socket_in_use(tmp_path: Path, daemon: Daemon) -> None:
    _proc, _root, sock = daemon
    second = start_daemon(tmp_path / "other-root", sock)
    _out, err = second.communicate(timeout=30)
    assert second.returncode == 2
    assert b"in use by another process" in err


def test_refuses_root_in_use(tmp_path: Path, daemon: Daemon) -> None:
    _proc, root, _sock = daemon
    second = start_daemon(root, tmp_path / "other.sock")
    _out, err = second.communicate(timeout=30)
    assert second.returncode == 2
    assert b"in use by another peersync daemon" in err


@pytest.mark.parametrize("section", ["peer", "mirror", "admin"])
def test_refuses_a_port_in_use_and_says_which(tmp_path: Path, section: str) -> None:
    """Two daemons on one host with the default config both want 5381, 5380 and 5382: the second must
    stop at once, naming the address and the config key, and leave the first one serving."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        config, _cert = with_certificate(loopback_config(), tmp_path / "node")
        start = config.index(f"[{section}]\nlisten = ") + len(f"[{section}]\nlisten = ")
        end = config.index("\n", start)
        cfg = tmp_path / "c.toml"
        cfg.write_text(config[:start] + f'"{address}"' + config[end:])
        sock = tmp_path / "s.sock"
        proc = start_daemon(tmp_path / "root", sock, "--config", str(cfg))
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert f"cannot listen on {address}: address already in use".encode() in err, err
    assert f"[{section}] listen in the config".encode() in err, err
    assert not sock.exists(), "socket file left behind"
    assert not (tmp_path / "admin.sock").exists(), "admin socket left behind"


def test_refuses_an_admin_socket_in_use(tmp_path: Path, daemon: Daemon) -> None:
    """A second daemon (its own root and plugin socket) told to use the first one's admin socket
    stops, naming it, and the first keeps answering on it."""
    _proc, _root, sock = daemon
    admin = sock.parent / "admin.sock"  # the default: beside the plugins' socket
    deadline = time.monotonic() + 30
    while not admin.is_socket() and time.monotonic() < deadline:  # made just after the plugins'
        time.sleep(0.05)
    assert admin.is_socket() and (admin.stat().st_mode & 0o777) == 0o600
    cfg = tmp_path / "c.toml"
    cfg.write_text(loopback_config().replace("[admin]\n", f'[admin]\nsocket = "{admin}"\n'))
    second = start_daemon(tmp_path / "root2", tmp_path / "other.sock", "--config", str(cfg))
    _out, err = second.communicate(timeout=30)
    assert second.returncode == 2
    assert f"socket {admin} is in use by another process".encode() in err, err
    assert admin.is_socket()


def test_replaces_stale_socket(tmp_path: Path) -> None:
    sock = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))
    s.close()  # a socket file nobody listens on, as a crash leaves it
    proc = start_daemon(tmp_path / "root", sock)
    try:
        wait_for_socket(proc, sock)
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


def test_refuses_non_socket_path(tmp_path: Path) -> None:
    path = tmp_path / "precious.txt"
    path.write_text("keep me")
    proc = start_daemon(tmp_path / "root", path)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert b"is not a socket" in err
    assert path.read_text() == "keep me"


def test_refuses_unusable_root(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = start_daemon(blocker / "root", tmp_path / "s.sock")
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert b"is unusable" in err


def test_bad_config_is_reported(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[store]\nchunk_sise = 4096\n")
    proc = start_daemon(tmp_path / "root", tmp_path / "s.sock", "--config", str(cfg))
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert b"unknown key 'chunk_sise'" in err


def test_containerd_config_cli(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-m", "peersync.cli", "containerd-config", "--socket", str(tmp_path / "x.sock")],
        capture_output=True,
        check=True,
        env=env,
    ).stdout.decode()
    import tomllib

    parsed = tomllib.loads(out)
    assert parsed["version"] == 2
    assert parsed["disabled_plugins"] == ["io.containerd.content.v1.content"]
    assert parsed["proxy_plugins"]["peersync"] == {"type": "snapshot", "address": str(tmp_path / "x.sock")}
    address = str(tmp_path / "x.sock")
    assert parsed["proxy_plugins"]["peersync-content"] == {"type": "content", "address": address}


def test_packaged_dropin_matches_cli() -> None:
    """The .deb's drop-ins are what `peersync containerd-config [--cri]` prints, comments aside."""
    from peersync.containerd_config import render

    def body(name: str) -> str:
        text = (ROOT / "packaging" / "containerd" / name).read_text()
        return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")) + "\n"

    assert body("peersync.toml") == render(Path("/run/peersync/peersync.sock"), cri=True)
    assert body("peersync-no-cri.toml") == render(Path("/run/peersync/peersync.sock"))


def start_activated(listener: socket.socket, root: Path, sock: Path) -> subprocess.Popen[bytes]:
    """Start the daemon the way systemd does with socket activation: the listening socket as fd 3,
    LISTEN_FDS=1 and LISTEN_PID = the daemon's own pid (set just before exec, which keeps the pid)."""
    code = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); "
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
        "os.execv(sys.executable, [sys.executable, '-m', 'peersync.cli', *sys.argv[2:]])"
    )
    args = [
        sys.executable,
        "-c",
        code,
        str(listener.fileno()),
        "daemon",
        "--root",
        str(root),
        "--socket",
        str(sock),
        *loopback_ports(root),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(args, pass_fds=(listener.fileno(),), env=env, stderr=subprocess.PIPE)


def test_socket_activation_keeps_clients_waiting_across_a_restart(tmp_path: Path) -> None:
    """With a socket held by 'systemd' (this test), a call made while the daemon is down waits in
    the backlog and is answered by the next daemon: no connection refused, nothing lost."""
    sock = tmp_path / "act.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))
    listener.listen(64)
    root = tmp_path / "root"
    first = start_activated(listener, root, sock)
    try:
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            snaps = snapshots_pb2_grpc.SnapshotsStub(channel)
            snaps.Prepare(snapshots_pb2.PrepareSnapshotRequest(snapshotter="peersync", key="k"), timeout=30)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=20) == 0
        assert sock.is_socket(), "the daemon must not remove a socket systemd owns"
        with grpc.insecure_channel(f"unix:{sock}") as channel:  # connects at once: the backlog takes it
            snaps = snapshots_pb2_grpc.SnapshotsStub(channel)
            pending = snaps.Stat.future(
                snapshots_pb2.StatSnapshotRequest(snapshotter="peersync", key="k"), timeout=30
            )
            time.sleep(0.5)
            assert not pending.done(), "answered while no daemon was running?"
            second = start_activated(listener, root, sock)
            try:
                assert pending.result().info.kind == snapshots_pb2.ACTIVE
            finally:
                second.send_signal(signal.SIGTERM)
                assert second.wait(timeout=20) == 0
    finally:
        for proc in (first,):
            if proc.poll() is None:
                proc.kill()
        listener.close()


def test_socket_activation_refuses_a_socket_for_another_path(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "other.sock"))
    listener.listen(1)
    proc = start_activated(listener, tmp_path / "root", tmp_path / "configured.sock")
    _out, err = proc.communicate(timeout=30)
    listener.close()
    assert proc.returncode == 2
    assert b"systemd passed socket" in err


def test_containerd_config_cri_points_kubelet_pulls_at_peersync(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    args = ["containerd-config", "--socket", str(tmp_path / "x.sock"), "--cri", "--hosts-dir", "/etc/hosts.d"]
    out = subprocess.run(
        [sys.executable, "-m", "peersync.cli", *args], capture_output=True, check=True, env=env
    ).stdout.decode()
    import tomllib

    cri = tomllib.loads(out)["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["containerd"] == {"snapshotter": "peersync", "disable_snapshot_annotations": False}
    assert cri["registry"] == {"config_path": "/etc/hosts.d"}


def peer_and_mirror(config: str) -> tuple[int, int]:
    cfg = tomllib.loads(config)
    return int(cfg["peer"]["listen"].rsplit(":", 1)[1]), int(cfg["mirror"]["listen"].rsplit(":", 1)[1])


def local_status(mirror: int) -> dict[str, Any]:
    """The control plane's status as a local caller sees it (on the loopback mirror listener)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{mirror}/peersync/v1/control/status", timeout=10) as resp:
        status: dict[str, Any] = json.loads(resp.read())
    return status


@pytest.mark.parametrize("how", ["missing-files", "defaults"])
def test_without_a_site_certificate_containerd_is_served_and_no_peer(tmp_path: Path, how: str) -> None:
    """The chosen default (docs/tls.md): no usable certificate and no `insecure` -> the daemon
    starts (containerd depends on it), its peer port stays closed, the mirror works, and the
    log and the status say why."""
    config = loopback_config()
    if how == "defaults":
        if Config().tls.cert.exists():
            pytest.skip(f"{Config().tls.cert} exists on this machine: not the no-certificate default")
        expected = str(Config().tls.ca)
    else:
        none = tmp_path / "not-installed"
        config += f'[tls]\nca = "{none}/ca.crt"\ncert = "{none}/node.crt"\nkey = "{none}/node.key"\n'
        expected = f"{none}/ca.crt"
    (tmp_path / "c.toml").write_text(config)
    peer, mirror = peer_and_mirror(config)
    root, sock = tmp_path / "root", tmp_path / "s.sock"
    proc = start_daemon(root, sock, "--config", str(tmp_path / "c.toml"))
    try:
        wait_for_socket(proc, sock)
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            snaps = snapshots_pb2_grpc.SnapshotsStub(channel)
            snaps.Prepare(snapshots_pb2.PrepareSnapshotRequest(snapshotter="peersync", key="k"), timeout=30)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", peer), timeout=5).close()
        status = local_status(mirror)
        assert status["role"] == "disabled" and status["transport"]["mode"] == "disabled"
        assert expected in status["transport"]["reason"]
        with urllib.request.urlopen(f"http://127.0.0.1:{mirror}/v2/", timeout=10) as resp:
            assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert b"PEER SIDE DISABLED" in err and b"error" in err


def test_insecure_serves_plain_http_on_the_peer_port_and_warns(tmp_path: Path) -> None:
    config = loopback_config(extra="[tls]\ninsecure = true\n")
    (tmp_path / "c.toml").write_text(config)
    peer, mirror = peer_and_mirror(config)
    sock = tmp_path / "s.sock"
    proc = start_daemon(tmp_path / "root", sock, "--config", str(tmp_path / "c.toml"))
    try:
        wait_for_socket(proc, sock)
        with urllib.request.urlopen(f"http://127.0.0.1:{peer}/peersync/v1/stats", timeout=10) as resp:
            assert resp.status == 200
        transport = local_status(mirror)["transport"]
        assert transport["mode"] == "insecure" and "without authentication" in transport["reason"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert b"PEER PORT UNAUTHENTICATED" in err and b"warning" in err
