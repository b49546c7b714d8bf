"""What operators install: the wheel and the Debian package, built for real and inspected."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_wheel_carries_every_package_and_the_console_script(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("peersync-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in (
        "peersync/cli.py",
        "kernel/store/chunkstore.py",
        "kernel/py.typed",
        "snapshotter/api/snapshots_pb2.py",
        "snapshotter/h2server.py",
        "peer/engine.py",
        "peersync/py.typed",
    ):
        assert path in names, path
    assert not any(n.startswith(("tests/", "testbed/", "bench/")) for n in names)
    assert not any("demo" in n for n in names), "the demo is testbed tooling, not product"
    entry = zipfile.ZipFile(wheel).read(f"peersync-{VERSION}.dist-info/entry_points.txt").decode()
    assert "peersync = peersync.cli:main" in entry


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_deb_builds_and_its_peersync_runs(built_deb: Path, tmp_path: Path) -> None:
    deb = built_deb
    assert deb.name.startswith(f"peersync_{VERSION}_") and deb.exists()
    info = subprocess.run(["dpkg-deb", "-I", str(deb)], check=True, capture_output=True, text=True).stdout
    assert "Package: peersync" in info and "Depends: python3 (>= 3.11), containerd (>= 1.6)" in info
    files = subprocess.run(["dpkg-deb", "-c", str(deb)], check=True, capture_output=True, text=True).stdout
    for path in (
        "./usr/bin/peersync",
        "./lib/systemd/system/peersync.service",
        "./lib/systemd/system/peersync.socket",
        "./usr/share/peersync/containerd/peersync.toml",
        "./usr/share/peersync/containerd/peersync-no-cri.toml",
        "./usr/share/peersync/containerd-setup.py",
        "./etc/containerd/conf.d/",
        "./etc/containerd/certs.d/",
        "./etc/peersync/config.toml",
        "./opt/peersync/bin/peersync",
    ):
        assert path in files, path
    # The drop-in is postinst's link, not a file of the package (see build.sh: a conffile would
    # outlive `remove` and leave containerd without a content store).
    assert "./etc/containerd/conf.d/peersync.toml" not in files
    assert "/testbed/" not in files and "demo.py" not in files, "testbed tooling shipped in the .deb"
    control = tmp_path / "control"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True)
    assert (control / "conffiles").read_text().split() == ["/etc/peersync/config.toml"]
    root = tmp_path / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    share = root / "usr/share/peersync/containerd"
    for name in ("peersync.toml", "peersync-no-cri.toml"):
        assert (share / name).read_text() == (ROOT / "packaging/containerd" / name).read_text()
    # The packaged virtualenv runs the CLI with Debian's interpreter.
    shebang = (root / "opt/peersync/bin/peersync").read_text().splitlines()[0]
    assert shebang == "#!/opt/peersync/bin/python3"
    py = root / "opt/peersync/bin/python3"
    version = subprocess.run(
        [str(py), "-m", "peersync.cli", "--version"], check=True, capture_output=True, text=True
    ).stdout
    assert version.strip() == f"peersync {VERSION}"
    args = [str(py), "-m", "peersync.cli", "containerd-config", "--cri"]
    cfg = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    assert tomllib.loads(cfg) == tomllib.loads((share / "peersync.toml").read_text())


def _setup_check(root: Path) -> str:
    """`containerd-setup.py check`, what the .deb's postinst prints, on a host tree at `root`."""
    script = ROOT / "packaging" / "containerd" / "containerd-setup.py"
    done = subprocess.run([sys.executable, str(script), "check", f"--host-root={root}"],
                          capture_output=True, text=True, check=True)
    return done.stdout


def test_postinst_check_names_the_import_and_the_hidden_cri_settings(tmp_path: Path) -> None:
    etc = tmp_path / "etc" / "containerd"
    (etc / "conf.d").mkdir(parents=True)
    share = ROOT / "packaging" / "containerd"
    (etc / "conf.d" / "peersync.toml").symlink_to(share / "peersync.toml")
    config = etc / "config.toml"
    config.write_text('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]\n'
                      "  SystemdCgroup = true\n")
    out = _setup_check(tmp_path)
    assert 'imports = ["/etc/containerd/conf.d/*.toml"]' in out
    assert "containerd.runtimes.runc.options.SystemdCgroup" in out and "warning" in out
    # imported: no more import advice; the warning stays while the drop-in has the CRI section
    config.write_text('version = 2\nimports = ["/etc/containerd/conf.d/*.toml"]\n' + config.read_text()[12:])
    out = _setup_check(tmp_path)
    assert "imports =" not in out and "SystemdCgroup" in out
    # the opt-out: the no-CRI drop-in hides nothing
    (etc / "conf.d" / "peersync.toml").unlink()
    (etc / "conf.d" / "peersync.toml").symlink_to(share / "peersync-no-cri.toml")
    assert _setup_check(tmp_path) == ""
