"""Install the .deb on this machine, run its service, pull through it with `ctr` and CRI, purge it.

What an operator does on an edge node, for real: `dpkg -i`, start the service, configure containerd
the way postinst says, pull, `dpkg --purge`, and then nothing of the package is left and nothing of
the machine's own containerd configuration has changed.

No systemd here: this machine (like CI's) has no systemd as PID 1 (`/run/systemd/system` is
missing, so postinst enables nothing), so "starting the service" is done the way systemd would do
it, from the installed unit files: `peersync.socket`'s ListenStream socket is created with its
SocketMode and DirectoryMode and passed as fd 3 with LISTEN_FDS/LISTEN_PID (socket activation, as
`Requires=peersync.socket` makes systemd do), then exactly the ExecStart command line of
`peersync.service` runs as a child with the unit's environment (systemd's PATH plus Environment=),
its StateDirectory created, LimitNOFILE applied, cwd /; it is stopped with its KillSignal and
TimeoutStopSec. `systemd-analyze verify` checks the units where it exists.

containerd is a private instance (`testbed.containerd`: own root, state and socket) whose config
is only `imports = ["/etc/containerd/conf.d/*.toml"]`, the line postinst tells operators to add,
on top of the testbed's private paths: the installed drop-in configures the proxy plugins and CRI.
The system containerd's config is never edited (its /etc/containerd/config.toml is only read, and
the whole /etc/containerd tree is compared before and after). The registry is a local
`docker-registry` on loopback; the daemon's peer exchange and mirror are moved to free loopback
ports in /etc/peersync/config.toml (as an operator edits it) and the mirror entry is re-pointed with
`peersync hosts install`, so nothing listens beyond loopback. The node's site certificate is made
with the installed `peersync site init` / `site issue --out /etc/peersync/tls` (where the default
config looks for it), and the test reads the daemon's stats over mutual TLS as a site member.

Restoring the machine: the test refuses to run when the package or any of its paths is already
there (it never purges someone else's install), holds a lock against a concurrent run from another
checkout, and purges in `finally` (with the maintainer scripts out of the way if they fail), with
every daemon it started stopped by PID first.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import tempfile
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kernel.config import Config
from peersync.containerd_config import render
from testbed.containerd import start_containerd
from testbed.cri import CRI_NAMESPACE, CriClient
from testbed.images import BUSYBOX, BuiltImage, build_test_image, push_image
from testbed.procs import free_port, tcp_port_accepts
from testbed.registry import REGISTRY_BINARY, start_registry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
UNIT_DIR = Path("/lib/systemd/system")
DROPIN = Path("/etc/containerd/conf.d/peersync.toml")
HOSTS_DIR = Path("/etc/containerd/certs.d")
CONTAINERD_CONFIG = Path("/etc/containerd/config.toml")
# Everything the package or its daemon may create; none may exist before, none may be left after.
OWNED = [
    Path(p)
    for p in (
        "/opt/peersync", "/usr/bin/peersync", "/usr/share/peersync", "/usr/share/doc/peersync",
        "/lib/systemd/system/peersync.service", "/lib/systemd/system/peersync.socket",
        "/etc/peersync", "/var/lib/peersync", "/run/peersync", str(DROPIN), str(HOSTS_DIR / "_default"),
    )
]
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"  # systemd's default for services
LOCK = Path("/run/lock/peersync-deb-install-test.lock")
UNPACKED = "peersync.io/unpacked-layer"


# -- systemd, the parts the units use ----------------------------------------------------------


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file's sections -> (key, value) in order (keys repeat: Environment=)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    text = re.sub(r"\\\n", " ", path.read_text())
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None and "=" in line, f"{path}: cannot parse {raw!r}"
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def one(entries: list[tuple[str, str]], key: str, default: str | None = None) -> str:
    values = [v for k, v in entries if k == key]
    assert len(values) <= 1, f"{key} given {len(values)} times"
    if not values:
        assert default is not None, f"{key} missing"
        return default
    return values[0]


def unit_environment(service: list[tuple[str, str]]) -> dict[str, str]:
    env = {"PATH": SYSTEMD_PATH}
    for key, value in service:
        if key == "Environment":
            env.update(item.split("=", 1) for item in shlex.split(value))
        elif key == "EnvironmentFile":
            optional, name = value.startswith("-"), value.lstrip("-")
            if Path(name).exists() or not optional:
                for line in Path(name).read_text().splitlines():
                    if line.strip() and not line.lstrip().startswith("#"):
                        k, _, v = line.partition("=")
                        env[k.strip()] = v.strip().strip('"')
    return env


# Socket activation: fd 3 is the listening socket, LISTEN_PID the PID that exec()s the service.
_ACTIVATE = """import os, resource, sys
fd, nofile = int(sys.argv[1]), int(sys.argv[2])
if nofile:
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
os.execvpe(sys.argv[3], sys.argv[3:], os.environ)
"""


class Service:
    """peersync.service + peersync.socket as systemd would run them (see the module docstring)."""

    def __init__(self, log: Path) -> None:
        units = parse_unit(UNIT_DIR / "peersync.service")
        self.service = units["Service"]
        self.socket_unit = parse_unit(UNIT_DIR / "peersync.socket")["Socket"]
        exec_start = one(self.service, "ExecStart")
        assert exec_start[0] not in "-@+!:" and "%" not in exec_start, "ExecStart needs systemd expansion"
        self.argv = shlex.split(exec_start)
        self.listen = Path(one(self.socket_unit, "ListenStream"))
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None

    def start(self) -> None:
        assert one(self.service, "User", "root") == "root"
        for name in one(self.service, "StateDirectory", "").split():
            Path("/var/lib", name).mkdir(mode=0o755, parents=True, exist_ok=True)
        for name in one(self.service, "RuntimeDirectory", "").split():
            Path("/run", name).mkdir(mode=0o755, parents=True, exist_ok=True)
        dir_mode = int(one(self.socket_unit, "DirectoryMode", "0755"), 8)
        missing = [p for p in [self.listen.parent, *self.listen.parent.parents] if not p.exists()]
        for parent in reversed(missing):
            parent.mkdir(mode=dir_mode)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(self.listen))
        os.chmod(self.listen, int(one(self.socket_unit, "SocketMode", "0666"), 8))
        self.sock.listen(socket.SOMAXCONN)
        nofile = one(self.service, "LimitNOFILE", "0")
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        nofile_value = min(int(nofile), hard) if nofile.isdigit() else 0
        fd = self.sock.fileno()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["/usr/bin/python3", "-c", _ACTIVATE, str(fd), str(nofile_value), *self.argv],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=unit_environment(self.service), cwd="/", pass_fds=(fd,), start_new_session=True,
            )

    def wait_serving(self, timeout: float = 60.0) -> None:
        """The daemon answers gRPC on the socket (the socket itself accepts from the start)."""
        assert self.proc is not None
        with grpc.insecure_channel(f"unix://{self.listen}") as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=timeout)
            except grpc.FutureTimeoutError:
                log = self.log.read_text()[-4000:]
                raise AssertionError(f"the daemon never served; log:\n{log}") from None
        assert self.proc.poll() is None, self.log.read_text()[-4000:]

    def stop(self) -> int | None:
        """KillSignal, TimeoutStopSec, then SIGKILL; then the socket unit stops (closed, unlinked)."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                sig = getattr(signal, one(self.service, "KillSignal", "SIGTERM"))
                os.kill(self.proc.pid, sig)
                try:
                    self.proc.wait(timeout=float(one(self.service, "TimeoutStopSec", "90")))
                except subprocess.TimeoutExpired:
                    os.kill(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
            code = self.proc.returncode
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            with contextlib.suppress(FileNotFoundError):
                self.listen.unlink()
        return code


# -- the machine -------------------------------------------------------------------------------


def tree_state(top: Path) -> dict[str, tuple[str, int, str]]:
    """Every path under `top` -> (kind, mode, content hash or link target)."""
    out: dict[str, tuple[str, int, str]] = {}
    if not top.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[str(path)] = ("link", 0, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[str(path)] = ("dir", st.st_mode, "")
            else:
                out[str(path)] = ("file", st.st_mode, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def dpkg_installed(package: str = "peersync") -> bool:
    done = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return done.returncode == 0 and "installed" in done.stdout and "not-installed" not in done.stdout


def dpkg(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(["dpkg", *args], capture_output=True, text=True, env=env, timeout=300)


def force_purge() -> None:
    """Purge even when a maintainer script fails, so a broken package cannot stay on the machine."""
    if dpkg("--purge", "peersync").returncode == 0 and not dpkg_installed():
        return
    for script in ("prerm", "postrm"):
        Path(f"/var/lib/dpkg/info/peersync.{script}").unlink(missing_ok=True)
    dpkg("--purge", "--force-all", "peersync")


def requirements() -> str | None:
    if os.geteuid() != 0:
        return "installs a package: needs root"
    tools = ["dpkg", "containerd", "ctr", "skopeo", "runc", REGISTRY_BINARY, str(BUSYBOX), "/usr/bin/python3"]
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        return f"missing: {', '.join(missing)}"
    if dpkg_installed():
        return "peersync is installed on this machine: not touching someone else's install"
    present = [str(p) for p in OWNED if p.exists() or p.is_symlink()]
    if present:
        return f"paths of the package exist already: {', '.join(present)}"
    return None


@pytest.fixture
def machine_lock() -> Iterator[None]:
    """One install test at a time on this machine (another checkout may run the suite too)."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} is not in the packaged config exactly once"
    return text.replace(old, new)


def stats(peer_port: int) -> dict[str, int]:
    """The daemon's counters, asked with the node's own certificate (a site member's client)."""
    tls = Config().tls
    context = ssl.create_default_context(cafile=str(tls.ca))
    context.load_cert_chain(tls.cert, tls.key)
    url = f"https://127.0.0.1:{peer_port}/peersync/v1/stats"
    with urllib.request.urlopen(url, timeout=10, context=context) as resp:
        data: dict[str, int] = json.loads(resp.read())
    return data


# -- the test ----------------------------------------------------------------------------------


def test_install_pull_with_ctr_and_cri_then_purge(
    built_deb: Path, tmp_path: Path, machine_lock: None
) -> None:
    reason = requirements()
    if reason:
        pytest.skip(reason)
    listing = subprocess.run(["dpkg-deb", "-c", str(built_deb)], check=True, capture_output=True, text=True)
    package_paths = [Path(line.split()[5].removeprefix(".").rstrip("/") or "/") for line in
                     listing.stdout.splitlines()]
    new_paths = [p for p in package_paths if not (p.exists() or p.is_symlink())]
    etc_containerd = tree_state(Path("/etc/containerd"))
    cni_existed = Path("/etc/cni").exists()
    image = build_test_image(tmp_path / "image")
    service: Service | None = None
    try:
        with start_registry(tmp_path / "registry") as registry:
            ref = push_image(image, registry, "peersync/deb-test")
            installed = dpkg("-i", str(built_deb))
            assert installed.returncode == 0, installed.stdout + installed.stderr
            _check_installed(installed.stdout + installed.stderr)
            peer_port, mirror_port = free_port(), free_port()
            _configure_as_an_operator(registry.address, peer_port, mirror_port, tmp_path / "site")
            service = Service(tmp_path / "peersync.log")  # from the installed unit files
            service.start()
            service.wait_serving()
            assert tcp_port_accepts("127.0.0.1", mirror_port)
            _pull_with_ctr_and_cri(tmp_path, ref, image, peer_port)
            assert service.stop() == 0, service.log.read_text()[-4000:]
        purged = dpkg("--purge", "peersync")
        assert purged.returncode == 0, purged.stdout + purged.stderr
    finally:
        if service is not None:
            service.stop()
        if dpkg_installed() or Path("/var/lib/dpkg/info/peersync.list").exists():
            force_purge()
        if not cni_existed:  # the private containerd's CRI plugin makes its default CNI conf dir
            shutil.rmtree("/etc/cni", ignore_errors=True)
        left = [p for p in OWNED + new_paths if p.exists() or p.is_symlink()]
        etc_after = tree_state(Path("/etc/containerd"))
        restore(left, etc_containerd, etc_after)
    assert not dpkg_installed()
    assert [str(p) for p in left] == [], "left behind by purge"
    assert etc_after == etc_containerd, "purge did not restore /etc/containerd"


def restore(left: list[Path], etc_before: dict[str, tuple[str, int, str]],
            etc_after: dict[str, tuple[str, int, str]]) -> None:
    """Put the machine back after a failed purge: remove what the package left (the test fails on
    it anyway) and what appeared under /etc/containerd; a changed file there is reported only."""
    added = sorted((Path(p) for p in set(etc_after) - set(etc_before)), key=lambda p: -len(p.parts))
    for path in [*left, *added]:
        if path.is_symlink() or path.is_file():
            path.unlink(missing_ok=True)
        elif path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _check_installed(output: str) -> None:
    """What postinst did: the drop-in link, the mirror in _default, config.toml untouched."""
    assert DROPIN.is_symlink() and os.readlink(DROPIN) == "/usr/share/peersync/containerd/peersync.toml"
    assert tomllib.loads(DROPIN.read_text()) == tomllib.loads(render(Path("/run/peersync/peersync.sock"),
                                                                     cri=True, hosts_dir=HOSTS_DIR))
    hosts = tomllib.loads((HOSTS_DIR / "_default" / "hosts.toml").read_text())
    assert list(hosts["host"]) == ["http://127.0.0.1:5380"], hosts  # the packaged config's mirror
    # This Debian machine's config.toml has no imports line: postinst says to add it.
    assert 'imports = ["/etc/containerd/conf.d/*.toml"]' in output, output
    own = tomllib.loads(CONTAINERD_CONFIG.read_text()) if CONTAINERD_CONFIG.exists() else {}
    cri = own.get("plugins", {}).get("io.containerd.grpc.v1.cri")
    if cri:  # Debian's default config.toml sets CRI's cni dirs, which the drop-in would hide
        assert "ignores these CRI settings" in output and "cni.bin_dir" in output, output
        _check_the_warning_is_true()
    if shutil.which("systemd-analyze"):
        verify = subprocess.run(["systemd-analyze", "verify", str(UNIT_DIR / "peersync.service"),
                                 str(UNIT_DIR / "peersync.socket")], capture_output=True, text=True)
        assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr


def _check_the_warning_is_true() -> None:
    """containerd itself (`config dump` of config.toml plus the imports line) shows the drop-in's CRI
    settings and config.toml's own CRI settings gone: what postinst warns about."""
    text = CONTAINERD_CONFIG.read_text()
    probe = Path(tempfile.mkdtemp(prefix="ctrd-dump-", dir="/tmp"))
    try:
        (probe / "config.toml").write_text('imports = ["/etc/containerd/conf.d/*.toml"]\n' + text)
        dumped = subprocess.run(["containerd", "--config", str(probe / "config.toml"), "config", "dump"],
                                capture_output=True, text=True, check=True).stdout
    finally:
        shutil.rmtree(probe)
    cri = tomllib.loads(dumped)["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["containerd"]["snapshotter"] == "peersync"
    assert cri["containerd"]["disable_snapshot_annotations"] is False
    assert cri["registry"]["config_path"] == str(HOSTS_DIR)
    own_bin_dir = tomllib.loads(text)["plugins"]["io.containerd.grpc.v1.cri"].get("cni", {}).get("bin_dir")
    if own_bin_dir not in (None, "/opt/cni/bin"):  # Debian's /usr/lib/cni: replaced by the default
        assert cri["cni"]["bin_dir"] == "/opt/cni/bin", cri["cni"]


def _configure_as_an_operator(registry: str, peer_port: int, mirror_port: int, site: Path) -> None:
    """Loopback ports and the plain-HTTP test registry in /etc/peersync/config.toml, the mirror
    entry re-pointed at the new port: what an operator does after changing `mirror.listen`; a
    site CA in `site` (the operator's machine) and this node's certificate where the config
    looks for it by default."""
    env = {"PATH": SYSTEMD_PATH}
    subprocess.run(["/usr/bin/peersync", "site", "init", "--dir", str(site)], check=True, env=env,
                   capture_output=True)
    subprocess.run(["/usr/bin/peersync", "site", "issue", "node", "--dir", str(site), "--ip", "127.0.0.1",
                    "--out", "/etc/peersync/tls"], check=True, env=env, capture_output=True)
    path = Path("/etc/peersync/config.toml")
    text = path.read_text()
    text = replace_once(text, 'listen = "0.0.0.0:5381"', f'listen = "127.0.0.1:{peer_port}"')
    text = replace_once(text, 'listen = "127.0.0.1:5380"', f'listen = "127.0.0.1:{mirror_port}"')
    text = replace_once(text, "plain_http = []", f'plain_http = ["{registry}"]')
    path.write_text(text)
    out = subprocess.run(["/usr/bin/peersync", "hosts", "install", "--dir", str(HOSTS_DIR), "--mirror",
                          f"http://127.0.0.1:{mirror_port}", "_default"], capture_output=True, text=True,
                         check=True, env={"PATH": SYSTEMD_PATH}).stdout
    assert out.startswith("_default: replaced"), out


def _pull_with_ctr_and_cri(tmp_path: Path, ref: str, image: BuiltImage, peer_port: int) -> None:
    layers = {layer.descriptor.digest for layer in image.layers}
    assert sorted(Path("/etc/containerd/conf.d").glob("*.toml")) == [DROPIN]
    extra = {"imports": ["/etc/containerd/conf.d/*.toml"]}  # the line postinst asks for
    with start_containerd(tmp_path / "containerd", extra_config=extra, cri=True) as ctrd:
        plugins = ctrd.ctr("plugins", "ls")
        assert re.search(r"io\.containerd\.snapshotter\.v1\s+peersync\s+.*\bok\b", plugins), plugins
        assert re.search(r"io\.containerd\.content\.v1\s+peersync-content\s+.*\bok\b", plugins), plugins
        # ctr, full mode: through the mirror (hosts.toml) into the proxy plugins.
        ctrd.pull(ref, snapshotter="peersync", extra_args=["--hosts-dir", str(HOSTS_DIR)])
        assert ctrd.run(ref, snapshotter="peersync") == image.expected_output
        through_mirror = stats(peer_port)
        assert through_mirror["origin_bytes"] >= image.compressed_size, through_mirror
        blobs = Path("/var/lib/peersync/content/blobs/sha256")
        assert layers <= {f"sha256:{p.name}" for p in blobs.iterdir()}
        # CRI, as kubelet pulls: the drop-in's CRI section picks the snapshotter, turns the layer
        # annotations on (the daemon unpacks every layer itself) and reads hosts from certs.d.
        with CriClient(ctrd.address) as cri:
            assert cri.pull(ref) == image.config_digest
        names = ctrd.ctr("snapshots", "--snapshotter", "peersync", "ls", namespace=CRI_NAMESPACE)
        unpacked = set()
        for line in names.splitlines()[1:]:
            info = json.loads(ctrd.ctr("snapshots", "--snapshotter", "peersync", "info", line.split()[0],
                                       namespace=CRI_NAMESPACE))
            unpacked.add((info.get("Labels") or {}).get(UNPACKED))
        assert unpacked == layers, unpacked
        assert not layers & set(ctrd.ctr("content", "ls", "-q", namespace=CRI_NAMESPACE).split())
        again = stats(peer_port)["origin_bytes"] - through_mirror["origin_bytes"]
        assert again < image.compressed_size, f"{again} more bytes from the origin: layers fetched again"
        ctrd.ctr("images", "rm", "--sync", ref)
        ctrd.ctr("images", "rm", "--sync", ref, namespace=CRI_NAMESPACE)

