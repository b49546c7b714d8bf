"""Proves the harness against containerd's BUILTIN content store and overlayfs snapshotter.

If these pass, a failure of the same checks with the peersync plugin is the plugin's fault, not the
harness's. The checks that the plugin must also pass take `snapshotter_name` and the fixture-level
containerd config, so they run unchanged once those two fixtures are overridden.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import tomllib
from pathlib import Path

import pytest

from testbed.containerd import Containerd, ContainerdFactory, merge_config, toml_dumps
from testbed.images import (
    LISTING_FIELDS,
    LISTING_SCRIPT,
    RUNTIME_MOUNTPOINTS,
    TEST_IMAGE_REPO,
    BuiltImage,
    build_sized_image,
    compare_manifests,
    parse_container_listing,
    push_image,
    snapshot_tree,
)
from testbed.procs import ManagedProcess, ProcessError, free_port, running, tcp_port_accepts
from testbed.registry import Credentials, Registry, start_registry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


# --- processes --------------------------------------------------------------------------------------


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(tmp_path: Path) -> None:
    """A daemon that ignores SIGTERM must still be gone after stop(), or tests would leak it."""
    port = free_port()
    code = (
        "import signal, socket, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(60)"
    )
    proc = ManagedProcess([sys.executable, "-c", code], tmp_path / "stubborn.log").start()
    try:
        proc.wait_ready(lambda: tcp_port_accepts("127.0.0.1", port))
        started = time.monotonic()
        assert proc.stop(timeout=1) == -9
        assert not proc.alive()
    finally:
        proc.stop(timeout=1)
    assert time.monotonic() - started < 5


def test_readiness_failure_reports_the_log(tmp_path: Path) -> None:
    """A daemon that dies at start-up fails fast, and the error shows its own output."""
    proc = ManagedProcess(
        [sys.executable, "-c", "print('boom: bad config'); raise SystemExit(3)"], tmp_path / "dies.log"
    )
    with pytest.raises(ProcessError, match="boom: bad config"), running(proc, lambda: False, timeout=10):
        pass


# --- registry ---------------------------------------------------------------------------------------


def test_registry_serves_pushed_image(
    registry: Registry, test_image: BuiltImage, test_image_ref: str
) -> None:
    """skopeo pushed the layout with its digests intact, so tests can reason in our digests."""
    assert TEST_IMAGE_REPO in registry.catalog()
    assert registry.manifest_digest(TEST_IMAGE_REPO, test_image.tag) == test_image.manifest.digest
    for digest in test_image.blob_digests - {test_image.manifest.digest}:
        assert registry.has_blob(TEST_IMAGE_REPO, digest), digest


def test_registry_basic_auth(tmp_path: Path, test_image: BuiltImage, containerd: Containerd) -> None:
    """htpasswd auth: anonymous and wrong-password requests get 401, the right user pushes and pulls."""
    creds = Credentials("edge", "s3cret-pw")
    with start_registry(tmp_path / "auth-registry", auth=creds) as reg:
        anonymous = Registry(reg.host, reg.port, reg.root, reg.process)
        assert anonymous.get("/v2/")[0] == 401
        wrong = Registry(reg.host, reg.port, reg.root, reg.process, Credentials("edge", "nope"))
        assert wrong.get("/v2/")[0] == 401
        assert reg.get("/v2/")[0] == 200
        ref = push_image(test_image, reg, "private/app")
        containerd.pull(ref, user=creds.colon)
        assert ref in containerd.images()


def test_registry_proxy_mode_pulls_through(
    tmp_path: Path, registry: Registry, test_image: BuiltImage, test_image_ref: str, containerd: Containerd
) -> None:
    """A pull-through cache in front of the session registry serves the image and caches the repo."""
    with start_registry(tmp_path / "proxy", proxy_remote=registry.url) as proxy:
        assert proxy.catalog() == []
        ref = proxy.ref(TEST_IMAGE_REPO, test_image.tag)
        containerd.pull(ref)
        assert containerd.run(ref) == test_image.expected_output
        assert proxy.catalog() == [TEST_IMAGE_REPO]


# --- containerd + builtin stores --------------------------------------------------------------------


def test_pull_and_run_prints_expected_output(
    containerd: Containerd, test_image: BuiltImage, test_image_ref: str, snapshotter_name: str
) -> None:
    """The image's own Cmd prints a file from layer 4; a command sees later-layer overwrites."""
    containerd.pull(test_image_ref, snapshotter=snapshotter_name)
    assert containerd.run(test_image_ref, snapshotter=snapshotter_name) == test_image.expected_output
    out = containerd.run(
        test_image_ref,
        ["sh", "-c", "cat /data/plain.txt; stat -c %a /data/setuid-bin"],
        snapshotter=snapshotter_name,
    )
    assert out == "hello v2\n4755\n"


def test_unpacked_rootfs_matches_expected_manifest(
    containerd: Containerd, test_image: BuiltImage, test_image_ref: str, snapshotter_name: str
) -> None:
    """The exact check: mount the image view on the host and compare every path and attribute."""
    expected = test_image.expected
    assert expected is not None
    assert_expected_covers_tricky_cases(expected)
    containerd.pull(test_image_ref, snapshotter=snapshotter_name)
    with containerd.mount_image(test_image_ref, snapshotter=snapshotter_name) as rootfs:
        actual = snapshot_tree(rootfs)
    assert compare_manifests(expected, actual) == []
    assert actual["/data/xattr.txt"].xattrs == {"user.foo": b"bar", "user.peersync.note": b"layer2"}
    assert actual["/data/sub/hard3"].hardlink_group == "/data/hard1"


def assert_expected_covers_tricky_cases(expected: dict) -> None:
    """Guard against the expected manifest silently losing the cases it exists to test."""
    assert expected["/data/setuid-bin"].mode == 0o4755
    assert expected["/data/secret"].mode == 0o600 and expected["/data/secret"].uid == 1000
    assert expected["/tmp"].mode == 0o1777
    assert expected["/data/link-dangling"].target == "/nonexistent/target"
    assert expected["/data/hard2"].hardlink_group == "/data/hard1"
    assert expected["/data/fifo"].type == "fifo"
    assert expected["/etc/peersync"].xattrs == {"user.dir": b"yes"}
    assert expected["/data/replace-me"].type == "dir" and expected["/data/becomes-file"].type == "file"
    assert "/opq/new1" in expected
    for gone in (
        "/data/to-delete.txt",
        "/data/gone/a",
        "/data/gone/sub",
        "/opq/old1",
        "/opq/olddir",
        "/etc/motd",
        "/data/link-dir",
        "/data/becomes-file/child",
    ):
        assert gone not in expected, gone


def test_container_view_matches_expected_manifest(
    containerd: Containerd, test_image: BuiltImage, test_image_ref: str, snapshotter_name: str
) -> None:
    """The runtime view: busybox inside a runc container lists the same tree (minus runc's mounts)."""
    assert test_image.expected is not None
    containerd.pull(test_image_ref, snapshotter=snapshotter_name)
    listing = containerd.run(test_image_ref, ["sh", "-c", LISTING_SCRIPT], snapshotter=snapshotter_name)
    actual = parse_container_listing(listing)
    assert compare_manifests(test_image.expected, actual, LISTING_FIELDS, RUNTIME_MOUNTPOINTS) == []
    assert actual["/data/big.bin"].sha256 == test_image.expected["/data/big.bin"].sha256


def test_rmi_sync_removes_content_and_snapshots(
    containerd: Containerd, test_image: BuiltImage, test_image_ref: str
) -> None:
    """`ctr images rm --sync` waits for GC: blobs and snapshots are gone from metadata AND disk."""
    containerd.pull(test_image_ref)
    assert containerd.content_digests() == test_image.blob_digests
    assert containerd.builtin_blob_files() == test_image.blob_digests
    assert len(containerd.snapshot_keys()) == len(test_image.layers)
    assert len(containerd.builtin_overlay_snapshot_dirs()) == len(test_image.layers)
    containerd.rmi(test_image_ref)
    assert containerd.images() == []
    assert containerd.content_digests() == set()
    assert containerd.builtin_blob_files() == set()
    assert containerd.snapshot_keys() == set()
    assert containerd.builtin_overlay_snapshot_dirs() == set()


def test_gc_collects_unreferenced_content_synchronously(containerd_factory: ContainerdFactory) -> None:
    """With the automatic GC triggers pushed far out, only `gc()` can have removed the blob.

    Automatic triggers in 1.6: one run at start-up (startup_delay), deletion/mutation thresholds
    (then schedule_delay), and a pause_threshold-derived interval. startup_delay must stay short:
    a sync deletion (ScheduleAndWait) blocks until the start-up collection has run.
    """
    slow_gc = """
        [plugins."io.containerd.gc.v1.scheduler"]
        startup_delay = "50ms"
        schedule_delay = "1h"
        deletion_threshold = 0
        mutation_threshold = 1000000
    """
    containerd = containerd_factory(extra_config=slow_gc, log_level="debug")
    time.sleep(0.5)  # let the start-up collection pass, or it may take the blob before we look
    data = b"unreferenced blob\n"
    digest = ingest(containerd, data)
    time.sleep(1.0)  # a deletion- or interval-triggered GC would have run by now
    assert digest in containerd.content_digests()
    containerd.gc()
    assert digest not in containerd.content_digests()
    assert digest not in containerd.builtin_blob_files()


def ingest(containerd: Containerd, data: bytes) -> str:
    """Write a blob with no labels or lease (what GC must collect) through `ctr content ingest`."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    containerd.ctr(
        "content",
        "ingest",
        "--expected-digest",
        digest,
        "--expected-size",
        str(len(data)),
        "test-ingest",
        input_bytes=data,
    )
    return digest


def test_runc_cgroups_and_network_namespaces(containerd: Containerd, test_image_ref: str) -> None:
    """runc works here: the task lands in our namespace's cgroup; --net-host shares host interfaces."""
    containerd.pull(test_image_ref)
    cgroups = containerd.run(test_image_ref, ["cat", "/proc/self/cgroup"])
    assert f"/{containerd.namespace}/t-" in cgroups
    isolated = interfaces(containerd.run(test_image_ref, ["cat", "/proc/net/dev"]))
    assert isolated == {"lo"}
    shared = interfaces(containerd.run(test_image_ref, ["cat", "/proc/net/dev"], net_host=True))
    assert shared == interfaces(Path("/proc/net/dev").read_text())


def interfaces(proc_net_dev: str) -> set[str]:
    return {line.split(":")[0].strip() for line in proc_net_dev.splitlines()[2:] if ":" in line}


def test_extra_config_registers_proxy_plugins(containerd_factory: ContainerdFactory) -> None:
    """The peersync path: proxy_plugins TOML merges in, and disabled_plugins lists are unioned."""
    extra = (
        'disabled_plugins = ["io.containerd.content.v1.content"]\n'
        '[proxy_plugins.fakesync]\ntype = "snapshot"\naddress = "/nonexistent/fakesync.sock"\n'
    )
    containerd = containerd_factory(extra_config=extra)
    config = containerd.config
    assert "io.containerd.grpc.v1.cri" in config["disabled_plugins"]
    assert "io.containerd.content.v1.content" in config["disabled_plugins"]
    plugins = containerd.ctr("plugins", "ls")
    assert any(
        line.split()[:2] == ["io.containerd.snapshotter.v1", "fakesync"] for line in plugins.splitlines()
    )
    content_rows = [
        line.split() for line in plugins.splitlines() if line.startswith("io.containerd.content.v1")
    ]
    assert content_rows == [], "builtin content store must be gone once disabled"


def test_toml_writer_round_trips() -> None:
    """The config writer's output parses back to the same data (containerd would reject bad TOML)."""
    config = merge_config(
        {"version": 2, "disabled_plugins": ["a"], "plugins": {"x.y": {"n": 1, "s": 'q"uote'}}},
        {"disabled_plugins": ["a", "b"], "plugins": {"x.y": {"flag": True}, "z": {"l": ["1", "2"]}}},
    )
    assert tomllib.loads(toml_dumps(config)) == {
        "version": 2,
        "disabled_plugins": ["a", "b"],
        "plugins": {"x.y": {"n": 1, "s": 'q"uote', "flag": True}, "z": {"l": ["1", "2"]}},
    }


# --- sized images -----------------------------------------------------------------------------------


def test_sized_image_builds_pushes_and_unpacks(
    tmp_path: Path, registry: Registry, containerd: Containerd, snapshotter_name: str
) -> None:
    """A small instance of the benchmark image: size, compressibility, cache reuse and exact content."""
    total = 6 * 1024 * 1024 + 321
    image = build_sized_image(tmp_path / "sized", total, layers=3, compressibility=0.5, file_size=1 << 20)
    payload = [n for p, n in (image.expected or {}).items() if p.startswith("/payload/") and n.type == "file"]
    assert sum(n.size or 0 for n in payload) == total
    payload_layers = image.layers[1:]
    compressed = sum(layer.descriptor.size for layer in payload_layers)
    assert 0.4 * total < compressed < 0.6 * total
    again = build_sized_image(tmp_path / "sized", total, layers=3, compressibility=0.5, file_size=1 << 20)
    assert again.manifest == image.manifest and again.expected == image.expected
    index = json.loads((tmp_path / "sized" / "index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [image.manifest.digest]

    ref = push_image(image, registry, "peersync/sized")
    containerd.pull(ref, snapshotter=snapshotter_name)
    assert containerd.run(ref, snapshotter=snapshotter_name) == "ready\n"
    with containerd.mount_image(ref, snapshotter=snapshotter_name) as rootfs:
        assert compare_manifests(image.expected or {}, snapshot_tree(rootfs)) == []


# --- another installation's daemon (the benchmark's --compare-python) ---------------------------------


def test_another_installations_daemon_imports_its_own_code(tmp_path: Path) -> None:
    """Regression: `--compare-python` ran the other interpreter with this checkout on PYTHONPATH
    (and as the current directory), so the "before" daemon imported this checkout's code."""
    import subprocess

    from testbed.peersyncd import REPO, daemon_env, interpreter

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    other = tmp_path / "other-checkout"
    (other / "peersync").mkdir(parents=True)
    (other / "peersync" / "__init__.py").write_text("")
    (Path(purelib) / "other-checkout.pth").write_text(f"{other}\n")  # as `pip install -e` there does

    def imported_from(command: list[str]) -> Path:
        done = subprocess.run(
            [*command, "-c", "import peersync; print(peersync.__file__)"],
            cwd=REPO, env=daemon_env(), capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        return Path(done.stdout.strip()).parent

    assert imported_from(interpreter(python)) == other / "peersync"
    assert imported_from(interpreter()) == REPO / "peersync"
