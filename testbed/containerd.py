"""A private containerd 1.6 for tests: own root, state and sockets; nothing shared with a system one.

Extra configuration (e.g. the `[proxy_plugins.peersync]` sections and the `disabled_plugins` entry
that `peersync containerd-config` prints) is parsed with tomllib and deep-merged into the base
config, so callers pass TOML text as-is and lists such as `disabled_plugins` are unioned rather than
clashing as duplicate keys.

GC: containerd 1.6 has no "run GC now" command. `ctr images rm --sync` and `ctr leases rm --sync`
make the metadata store run a collection and wait for it (gc.ScheduleAndWait), snapshotter and
content-store cleanup included; `gc()` creates and sync-deletes an empty lease to get exactly that.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import signal
import tempfile
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapshotter.remote import chain_ids

from .procs import ManagedProcess, run_checked, running, unix_socket_accepts

CONTAINERD_BINARY = "/usr/bin/containerd"
CTR_BINARY = "/usr/bin/ctr"
DEFAULT_NAMESPACE = "peersync-test"
# Plugins that would fail or do work we do not want: CRI (needs CNI and would pull a sandbox image),
# and snapshotters this machine cannot or need not run. They only cost start-up time and log noise.
DEFAULT_DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.internal.v1.tracing",
    "io.containerd.tracing.processor.v1.otlp",
)
BUILTIN_CONTENT_PLUGIN = "io.containerd.content.v1.content"
GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------


def merge_config(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge `extra` into `base`: tables merge, lists are unioned in order, scalars are replaced."""
    out: dict[str, Any] = dict(base)
    for key, value in extra.items():
        old = out.get(key)
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            out[key] = merge_config(old, value)
        elif isinstance(old, list) and isinstance(value, list):
            out[key] = old + [v for v in value if v not in old]
        else:
            out[key] = value
    return out


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def toml_dumps(config: Mapping[str, Any], path: tuple[str, ...] = ()) -> str:
    """Minimal TOML writer for containerd configs (tables, strings, numbers, bools, lists)."""
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in config.items() if not isinstance(v, Mapping)]
    for key, value in config.items():
        if isinstance(value, Mapping):
            sub = path + (key,)
            lines += ["", "[" + ".".join(_toml_key(p) for p in sub) + "]", toml_dumps(value, sub)]
    return "\n".join(lines).strip("\n") + "\n"


def base_config(
    root: Path, state: Path, address: Path, log_level: str = "info", cri: bool = False
) -> dict[str, Any]:
    """containerd config version 2 with private paths and sockets, prompt GC; CRI only if asked."""
    disabled = [p for p in DEFAULT_DISABLED_PLUGINS if not (cri and p == "io.containerd.grpc.v1.cri")]
    return {
        "version": 2,
        "root": str(root),
        "state": str(state),
        "disabled_plugins": disabled,
        "grpc": {"address": str(address)},
        "ttrpc": {"address": f"{address}.ttrpc"},
        "debug": {"level": log_level},
        "metrics": {"address": ""},
        "plugins": {
            # Default is /opt/containerd, outside our sandbox dirs.
            "io.containerd.internal.v1.opt": {"path": str(root / "opt")},
            # Upstream defaults, spelled out because tests rely on deletion-triggered GC.
            "io.containerd.gc.v1.scheduler": {
                "pause_threshold": 0.02,
                "deletion_threshold": 0,
                "mutation_threshold": 100,
                "schedule_delay": "0s",
                "startup_delay": "100ms",
            },
        },
    }


def parse_extra_config(extra: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """Accept TOML text (as `peersync containerd-config` prints it), a dict, or None."""
    if extra is None:
        return {}
    if isinstance(extra, str):
        return tomllib.loads(extra)
    return dict(extra)


# ---------------------------------------------------------------------------------------------------
# The running daemon
# ---------------------------------------------------------------------------------------------------


@dataclass
class Containerd:
    """A running private containerd and `ctr` helpers bound to its socket and a test namespace."""

    address: Path
    root: Path
    state: Path
    config_path: Path
    process: ManagedProcess
    namespace: str = DEFAULT_NAMESPACE
    config: dict[str, Any] = field(default_factory=dict)
    # Command prefix for `ctr` too (e.g. nsenter --net): ctr itself resolves and fetches on pull.
    prefix: list[str] = field(default_factory=list)

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    def ctr(
        self,
        *args: str,
        timeout: float = 180.0,
        namespace: str | None = None,
        input_bytes: bytes | None = None,
    ) -> str:
        """Run `ctr --address SOCK --namespace NS args...`; return stdout, raise CommandError with stderr."""
        ns = namespace or self.namespace
        cmd = [*self.prefix, CTR_BINARY, "--address", str(self.address), "--namespace", ns, *args]
        return run_checked(cmd, timeout=timeout, input_bytes=input_bytes)

    def pull(
        self,
        ref: str,
        snapshotter: str = "overlayfs",
        plain_http: bool = True,
        user: str | None = None,
        extra_args: Sequence[str] = (),
        timeout: float = 600.0,
    ) -> str:
        """`ctr images pull` (fetch + unpack into `snapshotter`); `user` is "name:password"."""
        args = ["images", "pull", "--snapshotter", snapshotter]
        if plain_http:
            args.append("--plain-http")
        if user:
            args += ["--user", user]
        return self.ctr(*args, *extra_args, ref, timeout=timeout)

    def run(
        self,
        ref: str,
        cmd: Sequence[str] = (),
        snapshotter: str = "overlayfs",
        net_host: bool = False,
        extra_args: Sequence[str] = (),
        timeout: float = 120.0,
    ) -> str:
        """`ctr run --rm` a throw-away container (unique ID) and return its stdout.

        An empty `cmd` runs the image's own Entrypoint/Cmd, which checks the image config too.
        """
        args = ["run", "--rm", "--snapshotter", snapshotter]
        if net_host:
            args.append("--net-host")
        container_id = f"t-{uuid.uuid4().hex[:12]}"
        return self.ctr(*args, *extra_args, ref, container_id, *cmd, timeout=timeout)

    def rmi(self, *refs: str, sync: bool = True) -> None:
        """Remove images; with `sync`, wait for the GC pass that frees their content and snapshots."""
        self.ctr("images", "rm", *(["--sync"] if sync else []), *refs)

    def gc(self) -> None:
        """Run containerd's garbage collector now and wait for it (via a sync lease deletion)."""
        lease = self.ctr("leases", "create").strip().split()[0]
        self.ctr("leases", "rm", "--sync", lease)

    def images(self) -> list[str]:
        return self.ctr("images", "ls", "-q").split()

    def content_digests(self) -> set[str]:
        """Digests in the content store as containerd's metadata sees them (this namespace)."""
        return set(self.ctr("content", "ls", "-q").split())

    def snapshot_keys(self, snapshotter: str = "overlayfs") -> set[str]:
        """Snapshot names in `snapshotter` visible in this namespace."""
        lines = self.ctr("snapshots", "--snapshotter", snapshotter, "ls").splitlines()[1:]
        return {line.split()[0] for line in lines if line.strip()}

    def builtin_blob_files(self) -> set[str]:
        """Digests present on disk in the builtin content store (namespace-independent truth)."""
        blobs = self.root / "io.containerd.content.v1.content" / "blobs" / "sha256"
        return {f"sha256:{p.name}" for p in blobs.iterdir()} if blobs.exists() else set()

    def builtin_overlay_snapshot_dirs(self) -> set[str]:
        """Snapshot directories on disk in the builtin overlayfs snapshotter."""
        snaps = self.root / "io.containerd.snapshotter.v1.overlayfs" / "snapshots"
        return {p.name for p in snaps.iterdir()} if snaps.exists() else set()

    def image_target(self, ref: str) -> str:
        """The digest the image record `ref` points at (its manifest, or an index)."""
        for line in self.ctr("images", "ls").splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 3 and fields[0] == ref:
                return fields[2]
        raise LookupError(f"no image {ref!r} in namespace {self.namespace}")

    def image_chain_id(self, ref: str) -> str:
        """The chain ID of the image's whole rootfs (the committed snapshot an unpack of it ends
        in), from its manifest and config in containerd's content store, as containerd computes it
        (`image.RootFS`, `identity.ChainID`); an index resolves to this machine's platform."""
        document = json.loads(self.ctr("content", "get", self.image_target(ref)))
        if "manifests" in document:  # an index: the manifest of this platform, as ctr picks it
            document = json.loads(self.ctr("content", "get", _platform_manifest(document)))
        config = json.loads(self.ctr("content", "get", document["config"]["digest"]))
        return chain_ids(list(config["rootfs"]["diff_ids"]))[-1]

    def is_unpacked(self, ref: str, snapshotter: str) -> bool:
        """Whether containerd considers the image unpacked into `snapshotter`: `image.IsUnpacked`
        (its rootfs chain ID is a snapshot in containerd's metadata), as `ctr images check` asks."""
        out = self.ctr("images", "check", "--snapshotter", snapshotter)
        rows = [line.split() for line in out.splitlines()[1:] if line.strip()]
        return any(row[0] == ref and row[-1] == "true" for row in rows)

    @contextlib.contextmanager
    def mount_image(self, ref: str, snapshotter: str = "overlayfs", rw: bool = False) -> Iterator[Path]:
        """Mount the image's unpacked rootfs from `snapshotter` on the host (a View snapshot of
        it, or a Prepare with `rw`); the snapshot goes again on exit.

        For the builtin overlayfs this is `ctr images mount`, which unpacks the image first if it
        is not unpacked yet. For any other snapshotter it is not: ctr 1.6's `images mount` reads
        its `--snapshotter` flag with `GlobalString` (cmd/ctr/commands/images/mount.go), which
        looks only at the parent commands, where no such flag exists, so it always unpacks and
        mounts into the default overlayfs, from the layer blobs in containerd's content store.
        That would compare containerd's own unpack instead of the snapshotter's, and fails for
        layers the snapshotter unpacked itself (containerd never fetched their blobs). So the
        image must be unpacked in `snapshotter` already (by its pull): its rootfs snapshot,
        found by chain ID as containerd finds it, is mounted directly (`mount_snapshot`).
        """
        if snapshotter == "overlayfs":
            target = Path(tempfile.mkdtemp(prefix="imgmnt-", dir=self.state.parent))
            args = ["images", "mount", "--snapshotter", snapshotter] + (["--rw"] if rw else [])
            self.ctr(*args, ref, str(target))
            try:
                yield target
            finally:
                self.ctr("images", "unmount", "--rm", str(target))
                target.rmdir()
            return
        if not self.is_unpacked(ref, snapshotter):
            raise RuntimeError(f"{ref} is not unpacked in snapshotter {snapshotter!r}")
        with self.mount_snapshot(self.image_chain_id(ref), snapshotter=snapshotter, rw=rw) as rootfs:
            yield rootfs

    @contextlib.contextmanager
    def mount_snapshot(self, name: str, snapshotter: str = "overlayfs", rw: bool = False) -> Iterator[Path]:
        """Mount a view of committed snapshot `name` on the host (an active snapshot on it with
        `rw`); removed on exit.

        Unlike `ctr images mount` this touches no content: it works for images whose layers the
        snapshotter unpacked itself (CRI and Go-client pulls with peersync), which containerd never
        fetched."""
        key = f"view-{uuid.uuid4().hex[:12]}"
        # An unreferenced snapshot is garbage, and ctr cannot label it as it creates it: run the GC
        # pass that earlier deletions scheduled now, then root the view before another can start.
        self.gc()
        verb = "prepare" if rw else "view"
        out = self.ctr("snapshots", "--snapshotter", snapshotter, verb, "--mounts", key, name)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.ctr("snapshots", "--snapshotter", snapshotter, "label", key, f"containerd.io/gc.root={stamp}")
        target = Path(tempfile.mkdtemp(prefix="snapmnt-", dir=self.state.parent))
        try:
            for m in json.loads(out):
                options = ",".join(m.get("options") or m.get("Options") or [])
                kind, source = m.get("type") or m.get("Type"), m.get("source") or m.get("Source")
                args = ["-o", options, source] if kind == "bind" else ["-t", kind, "-o", options, source]
                run_checked(["mount", *args, str(target)], timeout=30)
            try:
                yield target
            finally:
                run_checked(["umount", str(target)], timeout=30)
        finally:
            target.rmdir()
            self.ctr("snapshots", "--snapshotter", snapshotter, "rm", key)

    def cleanup_tasks(self) -> None:
        """Kill and delete leftover tasks and containers so shims exit and mounts go away."""
        for ns in self.ctr("namespaces", "ls", "-q").split():
            for line in self.ctr("tasks", "ls", namespace=ns).splitlines()[1:]:
                task = line.split()[0]
                with contextlib.suppress(Exception):
                    self.ctr("tasks", "kill", "-s", "SIGKILL", task, namespace=ns)
                with contextlib.suppress(Exception):
                    self.ctr("tasks", "rm", "-f", task, namespace=ns)
            for container in self.ctr("containers", "ls", "-q", namespace=ns).split():
                with contextlib.suppress(Exception):
                    self.ctr("containers", "rm", container, namespace=ns)


def containerd_base(parent: Path = Path("/tmp")) -> Path:
    """A fresh dir for a private containerd's root, state and socket (short: <parent>/ctrd-XXXX)."""
    return Path(tempfile.mkdtemp(prefix="ctrd-", dir=parent))


def containerd_socket(base: Path) -> Path:
    """The socket of the containerd started in `base`."""
    return base / "containerd.sock"


def with_setting(config: str, table: str, line: str) -> str:
    """TOML text `config` with `line` (key = value) in `[table]`: under its header if it has one,
    else in a new table at the end."""
    header = f"[{table}]\n"
    if config.startswith(header) or f"\n{header}" in config:
        at = 0 if config.startswith(header) else config.index(f"\n{header}") + 1
        at += len(header)
        return config[:at] + line + "\n" + config[at:]
    return config + ("" if not config or config.endswith("\n") else "\n") + header + line + "\n"


@contextlib.contextmanager
def start_containerd(
    workdir: Path | None = None,
    extra_config: str | Mapping[str, Any] | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    log_level: str = "info",
    ready_timeout: float = 30.0,
    prefix: Sequence[str] = (),
    cri: bool = False,
    base: Path | None = None,
) -> Iterator[Containerd]:
    """Run a private containerd; on exit kill its tasks, stop it, its shims and unmount its dirs.

    `extra_config` is TOML text or a dict merged into the base config, e.g. the output of
    `peersync containerd-config --socket PATH`. Root, state and sockets live under one short temp
    dir in /tmp (unix socket paths are limited to 108 bytes), `workdir` only receives the logs.
    `prefix` is a command containerd is launched under, e.g. `nsenter --net=/var/run/netns/NS --`
    to put it (and the shims and containers it starts) in a network namespace; it must exec
    containerd (nsenter without --fork does) so the PID we stop is containerd's. `ctr` helpers run
    under the same prefix: `ctr images pull` resolves and fetches from the ctr process itself.
    `cri` keeps the CRI plugin enabled (configure it with `cri.cri_config` in `extra_config`).
    `base` is that dir made beforehand (`containerd_base`), for a daemon told the socket first.
    """
    base = base or containerd_base()
    root, state, address = base / "root", base / "state", containerd_socket(base)
    config = merge_config(base_config(root, state, address, log_level, cri), parse_extra_config(extra_config))
    config_path = base / "config.toml"
    config_path.write_text(toml_dumps(config))
    log_dir = Path(workdir) if workdir is not None else base
    process = ManagedProcess(
        [*prefix, CONTAINERD_BINARY, "--config", str(config_path)], log_dir / "containerd.log"
    )
    daemon = Containerd(address, root, state, config_path, process, namespace, config, list(prefix))
    try:
        with running(process, lambda: unix_socket_accepts(address), ready_timeout, "serving its socket"):
            try:
                yield daemon
            finally:
                with contextlib.suppress(Exception):
                    daemon.cleanup_tasks()
    finally:
        kill_shims(address)
        unmount_under(base)
        shutil.rmtree(base, ignore_errors=True)


def _platform_manifest(index: Mapping[str, Any]) -> str:
    """The digest of the manifest an image index lists for this machine (linux and its GOARCH)."""
    arch = GO_ARCH.get(platform.machine(), platform.machine())
    for entry in index["manifests"]:
        plat = entry.get("platform") or {}
        if plat.get("os") == "linux" and plat.get("architecture") == arch:
            return str(entry["digest"])
    raise LookupError(f"the image index has no manifest for linux/{arch}")


def kill_shims(address: Path) -> None:
    """SIGKILL shim processes started by the containerd at `address` (matched by PID via /proc).

    Shims outlive containerd by design; only those whose command line names our socket are ours.
    """
    needle = str(address).encode()
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            cmdline = (pid_dir / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and b"containerd-shim" in cmdline[0] and needle in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_dir.name), signal.SIGKILL)


def unmount_under(base: Path) -> None:
    """Lazily unmount anything still mounted below `base`, deepest first, so rmtree cannot escape."""
    prefix = str(base) + "/"
    for _ in range(3):
        points = [m for m in _mountpoints() if m.startswith(prefix)]
        if not points:
            return
        for point in sorted(points, key=len, reverse=True):
            with contextlib.suppress(Exception):
                run_checked(["umount", "-l", point], timeout=30)
        time.sleep(0.1)


def _mountpoints() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        raw = line.split()[4]
        points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), raw))
    return points


ContainerdFactory = Callable[..., Containerd]
"""What the `containerd_factory` fixture yields: `factory(extra_config=..., **start_containerd kwargs)`."""
