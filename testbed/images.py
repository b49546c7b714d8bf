"""Build OCI images without Docker, push them with skopeo, and describe filesystems exactly.

Layers are declared as lists of `Entry` (file, dir, symlink, hardlink, fifo, whiteout, opaque). From
the same declarations we (1) write the gzipped layer tars and an OCI image layout, and (2) apply the
layers in Python, with OCI whiteout semantics, to get the expected root filesystem: the truth that the
tests compare a mounted snapshot (`snapshot_tree`) or a running container (`container_listing`) against.

Everything is streamed: a layer goes tar -> sha256(diff_id) -> gzip -> sha256(digest) -> file, so a
300 MB image never sits in memory.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import os
import platform
import random
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .procs import run_checked
from .registry import Registry

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_MTIME = 1_700_000_000  # fixed, so the same specs always give the same digests
BUSYBOX = Path("/bin/busybox")
BUSYBOX_APPLETS = (
    "sh", "cat", "ls", "find", "stat", "md5sum", "sha256sum", "echo", "id", "readlink", "test", "env",
    "printf", "sleep", "true", "false", "wc", "head", "grep", "xargs", "mkdir", "touch", "rm", "sort",
)  # fmt: skip
# Mounts that runc puts over the image in every `ctr run` container; never part of the image view.
RUNTIME_MOUNTPOINTS = ("/proc", "/sys", "/dev", "/run")
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
CHUNK = 1 << 20


# ---------------------------------------------------------------------------------------------------
# Layer declarations
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One tar member of a layer. `path` is relative to / without a leading slash."""

    path: str
    kind: str  # file | dir | symlink | hardlink | fifo | whiteout | opaque
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    data: bytes = b""
    target: str = ""  # symlink target, or the path a hardlink points to
    xattrs: Mapping[str, str] = field(default_factory=dict)
    mtime: int = DEFAULT_MTIME


def file(path: str, data: bytes | str, mode: int = 0o644, uid: int = 0, gid: int = 0, **kw: Any) -> Entry:
    """A regular file with exact content and mode (setuid/setgid bits allowed)."""
    raw = data.encode() if isinstance(data, str) else data
    return Entry(path, "file", mode, uid, gid, data=raw, **kw)


def directory(path: str, mode: int = 0o755, uid: int = 0, gid: int = 0, **kw: Any) -> Entry:
    """A directory; re-declaring a lower directory replaces its metadata, keeps its children."""
    return Entry(path, "dir", mode, uid, gid, **kw)


def symlink(path: str, target: str, uid: int = 0, gid: int = 0) -> Entry:
    """A symlink; the target is stored verbatim (relative, absolute or dangling)."""
    return Entry(path, "symlink", 0o777, uid, gid, target=target)


def hardlink(path: str, target: str) -> Entry:
    """A hard link to a regular file declared earlier in the same layer (shares its inode)."""
    return Entry(path, "hardlink", target=target)


def fifo(path: str, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Entry:
    """A named pipe (exercises non-regular, non-directory inodes)."""
    return Entry(path, "fifo", mode, uid, gid)


def whiteout(path: str) -> Entry:
    """Delete `path` (file or whole directory) from the lower layers: tar member `dir/.wh.name`."""
    return Entry(path, "whiteout", 0o600)


def opaque(dir_path: str) -> Entry:
    """Hide every lower-layer child of `dir_path`: tar member `dir/.wh..wh..opq`."""
    return Entry(dir_path, "opaque", 0o600)


# ---------------------------------------------------------------------------------------------------
# Filesystem manifests (expected and observed)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """What the tests compare for one path. Fields that do not apply to the type are None.

    mode is S_IMODE (permission bits plus setuid/setgid/sticky); symlink modes are not compared
    (always 0777 on Linux). mtime is kept for files, symlinks and fifos, not directories, because
    unpacking later layers legitimately touches directory mtimes. `hardlink_group` is the
    lexicographically first path sharing this inode when several visible paths do, else None.
    """

    type: str
    mode: int | None
    uid: int
    gid: int
    size: int | None = None
    sha256: str | None = None
    target: str | None = None
    xattrs: Mapping[str, bytes] = field(default_factory=dict)
    mtime: int | None = None
    hardlink_group: str | None = None


Manifest = dict[str, Node]  # "/abs/path" -> Node; the root directory itself is not included
ALL_FIELDS = ("type", "mode", "uid", "gid", "size", "sha256", "target", "xattrs", "mtime", "hardlink_group")


class _Inode:
    """Mutable holder so hard links in the expected tree share one identity."""

    def __init__(self, entry: Entry) -> None:
        self.entry = entry


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def _remove_subtree(tree: dict[str, _Inode], path: str) -> None:
    prefix = path + "/"
    for p in [p for p in tree if p == path or p.startswith(prefix)]:
        del tree[p]


def _apply_layer(tree: dict[str, _Inode], layer: list[Entry]) -> None:
    """Apply one layer with OCI semantics: whiteouts hide lower content, then members are written."""
    lower = set(tree)
    for e in layer:
        if e.kind == "whiteout":
            if e.path not in lower:
                raise ValueError(f"whiteout of {e.path}: nothing in the lower layers to delete")
            _remove_subtree(tree, e.path)
        elif e.kind == "opaque":
            if tree.get(e.path) is None or tree[e.path].entry.kind != "dir":
                raise ValueError(f"opaque marker in {e.path}: no such lower directory")
            kept = tree[e.path]
            _remove_subtree(tree, e.path)
            tree[e.path] = kept  # the directory stays; only its lower children go
    for e in layer:
        if e.kind in ("whiteout", "opaque"):
            continue
        parent = _parent(e.path)
        if parent and (parent not in tree or tree[parent].entry.kind != "dir"):
            raise ValueError(f"{e.path}: parent directory not declared (the harness wants explicit parents)")
        existing = tree.get(e.path)
        if existing is not None and not (existing.entry.kind == "dir" and e.kind == "dir"):
            _remove_subtree(tree, e.path)
        if e.kind == "hardlink":
            tree[e.path] = _hardlink_target(tree, layer, e)
        elif existing is not None and existing.entry.kind == "dir" and e.kind == "dir":
            existing.entry = e  # metadata replaced, children kept
        else:
            tree[e.path] = _Inode(e)


def _hardlink_target(tree: dict[str, _Inode], layer: list[Entry], e: Entry) -> _Inode:
    target = tree.get(e.target)
    if target is None or target.entry.kind != "file" or target.entry not in layer:
        raise ValueError(f"hardlink {e.path} -> {e.target}: target must be a file of the same layer")
    return target


def expected_manifest(layers: Iterable[list[Entry]]) -> Manifest:
    """The root filesystem that unpacking `layers` in order must produce."""
    tree: dict[str, _Inode] = {}
    for layer in layers:
        _apply_layer(tree, layer)
    groups: dict[int, list[str]] = {}
    for path, inode in tree.items():
        groups.setdefault(id(inode), []).append(path)
    manifest: Manifest = {}
    for path, inode in sorted(tree.items()):
        same = groups[id(inode)]
        group = "/" + min(same) if len(same) > 1 else None
        manifest["/" + path] = _node_from_entry(inode.entry, group)
    return manifest


def _node_from_entry(e: Entry, group: str | None) -> Node:
    xattrs = {k: v.encode() for k, v in e.xattrs.items()}
    if e.kind == "file":
        digest = hashlib.sha256(e.data).hexdigest()
        return Node("file", e.mode, e.uid, e.gid, len(e.data), digest, None, xattrs, e.mtime, group)
    if e.kind == "dir":
        return Node("dir", e.mode, e.uid, e.gid, xattrs=xattrs)
    if e.kind == "symlink":
        return Node("symlink", None, e.uid, e.gid, target=e.target, mtime=e.mtime)
    if e.kind == "fifo":
        return Node("fifo", e.mode, e.uid, e.gid, xattrs=xattrs, mtime=e.mtime)
    raise ValueError(f"unexpected entry kind {e.kind}")


_TYPE_OF_MODE = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo"}


def snapshot_tree(
    root: Path | str,
    exclude: Iterable[str] = (),
    hidden_xattr_prefixes: tuple[str, ...] = ("trusted.overlay.",),
) -> Manifest:
    """Describe the tree under `root` exactly, from the host, with lstat and listxattr.

    This is the exact comparison: unlike a listing made inside a container it sees xattrs, true
    inode identity (hard links) and raw modes. `exclude` holds absolute paths (as seen from the
    root) whose subtrees are skipped. Overlay's own trusted.overlay.* xattrs are hidden by the kernel
    in a merged view anyway; they are dropped here too so a raw upper dir can be compared as well.
    """
    root = Path(root)
    skip = {p.rstrip("/") for p in exclude}
    manifest: Manifest = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    for rel, st in _walk(root, "", skip):
        manifest[rel] = _node_from_stat(root / rel.lstrip("/"), st, hidden_xattr_prefixes)
        if stat.S_ISREG(st.st_mode):
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
    for paths in inodes.values():
        if len(paths) > 1:
            for p in paths:
                manifest[p] = replace(manifest[p], hardlink_group=min(paths))
    return dict(sorted(manifest.items()))


def _walk(root: Path, rel: str, skip: set[str]) -> Iterator[tuple[str, os.stat_result]]:
    with os.scandir(root / rel.lstrip("/") if rel else root) as it:
        entries = sorted(it, key=lambda d: d.name)
    for d in entries:
        path = f"{rel}/{d.name}"
        if path in skip:
            continue
        st = d.stat(follow_symlinks=False)
        yield path, st
        if stat.S_ISDIR(st.st_mode):
            yield from _walk(root, path, skip)


def _node_from_stat(path: Path, st: os.stat_result, hidden: tuple[str, ...]) -> Node:
    kind = _TYPE_OF_MODE.get(stat.S_IFMT(st.st_mode), f"other:{stat.S_IFMT(st.st_mode):o}")
    xattrs = _xattrs(path, hidden) if kind != "symlink" else {}
    mode = stat.S_IMODE(st.st_mode)
    mtime = int(st.st_mtime)
    if kind == "file":
        return Node(kind, mode, st.st_uid, st.st_gid, st.st_size, sha256_file(path), None, xattrs, mtime)
    if kind == "symlink":
        return Node(kind, None, st.st_uid, st.st_gid, target=os.readlink(path), mtime=mtime)
    if kind == "dir":
        return Node(kind, mode, st.st_uid, st.st_gid, xattrs=xattrs)
    return Node(kind, mode, st.st_uid, st.st_gid, xattrs=xattrs, mtime=mtime)


def _xattrs(path: Path, hidden: tuple[str, ...]) -> dict[str, bytes]:
    names = os.listxattr(path, follow_symlinks=False)
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names) if not n.startswith(hidden)}


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def compare_manifests(
    expected: Manifest,
    actual: Manifest,
    fields: Iterable[str] = ALL_FIELDS,
    ignore: Iterable[str] = (),
) -> list[str]:
    """Human-readable differences (empty list = identical on `fields`), for assertion messages.

    `ignore` holds absolute paths whose subtrees are left out on both sides.
    """
    fields = tuple(fields)
    skipped = tuple(p.rstrip("/") for p in ignore)

    def kept(p: str) -> bool:
        return not any(p == s or p.startswith(s + "/") for s in skipped)

    exp = {p: n for p, n in expected.items() if kept(p)}
    act = {p: n for p, n in actual.items() if kept(p)}
    diffs = [f"missing: {p}" for p in sorted(exp.keys() - act.keys())]
    diffs += [f"unexpected: {p} ({act[p].type})" for p in sorted(act.keys() - exp.keys())]
    for p in sorted(exp.keys() & act.keys()):
        for f in fields:
            e, a = getattr(exp[p], f), getattr(act[p], f)
            if e is None and f not in ("hardlink_group", "target") and exp[p].type == act[p].type:
                continue  # not applicable for this type
            if e != a:
                diffs.append(f"{p}: {f} expected {_fmt(f, e)} got {_fmt(f, a)}")
    return diffs


def _fmt(f: str, value: object) -> str:
    return oct(value) if f == "mode" and isinstance(value, int) else repr(value)


# ---------------------------------------------------------------------------------------------------
# Listing from inside a container (busybox), the runtime view
# ---------------------------------------------------------------------------------------------------

# One `find` pass for metadata, one for content hashes, one for link targets. busybox stat's %a
# includes the setuid/setgid/sticky bits. Names may contain spaces; none of ours contain '|' or '\n'.
LISTING_SCRIPT = r"""
find / -xdev -mindepth 1 -exec stat -c 'T|%n|%F|%a|%u|%g|%s' {} +
find / -xdev -type f -exec sha256sum {} + | sed 's/^/H|/'
find / -xdev -type l | while IFS= read -r f; do printf 'L|%s|%s\n' "$f" "$(readlink "$f")"; done
"""
_STAT_TYPES = {
    "regular file": "file", "regular empty file": "file", "directory": "dir",
    "symbolic link": "symlink", "fifo": "fifo",
}  # fmt: skip
LISTING_FIELDS = ("type", "mode", "uid", "gid", "size", "sha256", "target")


def parse_container_listing(output: str) -> Manifest:
    """Turn LISTING_SCRIPT output into a Manifest (no xattrs, mtimes or hardlink groups: the
    container's busybox cannot see those, so compare with `fields=LISTING_FIELDS`)."""
    rows: dict[str, dict[str, Any]] = {}
    for line in output.splitlines():
        tag, _, rest = line.partition("|")
        if tag == "T":
            path, kind, mode, uid, gid, size = rest.rsplit("|", 5)
            ftype = _STAT_TYPES.get(kind, kind)
            rows[path] = {
                "type": ftype, "mode": int(mode, 8), "uid": int(uid), "gid": int(gid),
                "size": int(size) if ftype == "file" else None,
            }  # fmt: skip
        elif tag == "H":
            digest, _, path = rest.partition("  ")
            rows.setdefault(path, {})["sha256"] = digest
        elif tag == "L":
            path, _, target = rest.partition("|")
            rows.setdefault(path, {})["target"] = target
    manifest: Manifest = {}
    missing: dict[str, Any] = {"uid": -1, "gid": -1, "type": "?", "mode": None}
    for path, r in sorted(rows.items()):
        if r.get("type") == "symlink":
            r["mode"] = None
        manifest[path] = Node(**missing | r)
    return manifest


# ---------------------------------------------------------------------------------------------------
# Writing layers and OCI layouts
# ---------------------------------------------------------------------------------------------------


class _HashingWriter(io.RawIOBase):
    """Write-through sink that hashes and counts what passes, for digest and diff_id in one pass."""

    def __init__(self, sink: io.BufferedIOBase) -> None:
        super().__init__()
        self.sink = sink
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.sha.update(data)
        self.size += len(data)
        self.sink.write(data)
        return len(data)


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class Layer:
    """A written layer blob: `descriptor.digest` is of the gzip, `diff_id` of the tar inside."""

    descriptor: Descriptor
    diff_id: str
    tar_size: int


TarFiller = Callable[[tarfile.TarFile], None]


class OciLayout:
    """An OCI image layout directory (oci-layout, index.json, blobs/sha256/...) written blob by blob."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.blobs = self.path / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)
        (self.path / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        self.manifests: list[dict[str, Any]] = []

    def blob_path(self, digest: str) -> Path:
        return self.blobs / digest.removeprefix("sha256:")

    def add_json(self, obj: Any, media_type: str) -> Descriptor:
        """Store a JSON document (config, manifest) as a blob."""
        data = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blob_path(digest).write_bytes(data)
        return Descriptor(media_type, digest, len(data))

    def add_layer(self, fill: TarFiller, compresslevel: int = 6) -> Layer:
        """Stream a layer: `fill` adds members to a PAX tar that is gzipped straight to disk."""
        fd, tmp = tempfile.mkstemp(dir=self.blobs, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                compressed = _HashingWriter(out)
                with gzip.GzipFile(fileobj=compressed, mode="wb", compresslevel=compresslevel, mtime=0) as gz:
                    raw = _HashingWriter(gz)
                    with tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                        fill(tar)
            digest = "sha256:" + compressed.sha.hexdigest()
            os.replace(tmp, self.blob_path(digest))
        except BaseException:
            os.unlink(tmp)
            raise
        desc = Descriptor(MEDIA_LAYER_GZIP, digest, compressed.size)
        return Layer(desc, "sha256:" + raw.sha.hexdigest(), raw.size)

    def add_image(
        self, tag: str, layers: list[Layer], cmd: list[str] | None = None, entrypoint: list[str] | None = None
    ) -> Descriptor:
        """Write config + manifest for `layers` and register the manifest in index.json under `tag`."""
        config = image_config(layers, cmd, entrypoint)
        config_desc = self.add_json(config, MEDIA_CONFIG)
        manifest = {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": config_desc.to_json(),
            "layers": [layer.descriptor.to_json() for layer in layers],
        }
        manifest_desc = self.add_json(manifest, MEDIA_MANIFEST)
        entry = manifest_desc.to_json() | {"annotations": {"org.opencontainers.image.ref.name": tag}}
        self.manifests = [
            m for m in self.manifests if m["annotations"]["org.opencontainers.image.ref.name"] != tag
        ]
        self.manifests.append(entry)
        index = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": self.manifests}
        (self.path / "index.json").write_text(json.dumps(index, indent=1))
        return manifest_desc


def oci_arch() -> str:
    """This machine's architecture in OCI terms (containerd pulls only the matching platform)."""
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)


def image_config(layers: list[Layer], cmd: list[str] | None, entrypoint: list[str] | None) -> dict[str, Any]:
    """An OCI image config whose rootfs.diff_ids match the layers (containerd verifies them on unpack)."""
    created = "2023-11-14T22:13:20Z"
    cfg: dict[str, Any] = {"Env": [DEFAULT_PATH_ENV], "WorkingDir": "/"}
    if cmd is not None:
        cfg["Cmd"] = cmd
    if entrypoint is not None:
        cfg["Entrypoint"] = entrypoint
    return {
        "created": created,
        "architecture": oci_arch(),
        "os": "linux",
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [
            {"created": created, "created_by": f"peersync test layer {i}"} for i in range(len(layers))
        ],
    }


def add_entries(tar: tarfile.TarFile, entries: Iterable[Entry]) -> None:
    """Write declared entries as tar members (xattrs as PAX SCHILY.xattr.* records)."""
    written: dict[str, Entry] = {}
    for e in entries:
        if e.kind == "hardlink":
            # Like docker/GNU tar: a link header repeats its target's metadata. containerd applies
            # the link header's mode/owner to the shared inode, so anything else would change it.
            t = written[e.target]
            e = replace(e, mode=t.mode, uid=t.uid, gid=t.gid, mtime=t.mtime, xattrs=t.xattrs)
        written[e.path] = e
        info, data = _tarinfo(e)
        tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _tarinfo(e: Entry) -> tuple[tarfile.TarInfo, bytes | None]:
    name = e.path
    if e.kind == "whiteout":
        name = _join(_parent(e.path), WHITEOUT_PREFIX + e.path.rsplit("/", 1)[-1])
    elif e.kind == "opaque":
        name = _join(e.path, OPAQUE_MARKER)
    info = tarfile.TarInfo(name)
    info.mode, info.uid, info.gid, info.mtime = e.mode, e.uid, e.gid, e.mtime
    info.uname = info.gname = ""
    info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in e.xattrs.items()}
    data: bytes | None = None
    if e.kind in ("file", "whiteout", "opaque"):
        data = e.data
        info.type, info.size = tarfile.REGTYPE, len(e.data)
    elif e.kind == "dir":
        info.type = tarfile.DIRTYPE
    elif e.kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, e.target
    elif e.kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, e.target
    elif e.kind == "fifo":
        info.type = tarfile.FIFOTYPE
    else:
        raise ValueError(f"unknown entry kind {e.kind}")
    return info, data


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


# ---------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------


@dataclass
class BuiltImage:
    """An image in an OCI layout on disk, plus what a test needs to check it after a pull."""

    layout: Path
    tag: str
    manifest: Descriptor
    layers: list[Layer]
    expected: Manifest | None = None
    expected_output: str | None = None  # what the image's default Cmd prints

    @property
    def config_digest(self) -> str:
        manifest = json.loads((self.layout / "blobs" / "sha256" / self.manifest.digest[7:]).read_bytes())
        return str(manifest["config"]["digest"])

    @property
    def blob_digests(self) -> set[str]:
        """Every blob a full pull stores: manifest, config, layers."""
        return {self.manifest.digest, self.config_digest} | {layer.descriptor.digest for layer in self.layers}

    @property
    def compressed_size(self) -> int:
        return sum(layer.descriptor.size for layer in self.layers)


def push_image(image: BuiltImage, registry: Registry, repo: str, tag: str | None = None) -> str:
    """Copy the OCI layout to the registry with skopeo (plain HTTP, digests preserved); return the ref.

    --insecure-policy: the host's policy.json is not ours to rely on. --preserve-digests: the
    manifest digest in the registry is the one we computed, so tests can assert on it.
    """
    tag = tag or image.tag
    ref = registry.ref(repo, tag)
    args = ["skopeo", "--insecure-policy", "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false"]
    if registry.credentials is not None:
        args += ["--dest-creds", registry.credentials.colon]
    run_checked([*args, f"oci:{image.layout}:{image.tag}", f"docker://{ref}"], timeout=600)
    return ref


def busybox_layer() -> list[Entry]:
    """Base layer: static busybox with applet symlinks and the dirs a runc container needs."""
    dirs = [
        directory("bin"), directory("etc"), directory("root", 0o700), directory("tmp", 0o1777),
        directory("proc", 0o555), directory("sys", 0o555), directory("dev"), directory("run"),
        directory("usr"), directory("usr/bin"),
    ]  # fmt: skip
    files = [
        file("bin/busybox", BUSYBOX.read_bytes(), 0o755),
        file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"),
        file("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
    ]
    links = [symlink(f"bin/{applet}", "busybox") for applet in BUSYBOX_APPLETS]
    return dirs + files + links


TEST_GREETING = "hello from peersync layer 4"
TEST_IMAGE_REPO = "peersync/conformance"


def test_image_layers(big_file_bytes: int = 3 * CHUNK + 12345) -> list[list[Entry]]:
    """The 5 layers of the conformance image; each tricky case is commented where it is declared."""
    big = random.Random(42).randbytes(big_file_bytes)  # multi-chunk content for streaming reads
    layer2 = [
        directory("data"),
        file("data/plain.txt", "hello\n"),
        file("data/secret", "top secret\n", 0o600, uid=1000, gid=1000),
        file("data/setuid-bin", "#!/bin/sh\necho suid\n", 0o4755),  # chown must not clear setuid
        file("data/setgid-file", "sgid\n", 0o2750, gid=50),
        file("data/exec.sh", "#!/bin/sh\necho run\n", 0o755),
        file("data/empty", b""),
        file("data/big.bin", big, 0o640, uid=33, gid=33),
        file("data/ünïcode name.txt", "utf-8 path with a space\n"),
        file("data/xattr.txt", "has xattrs\n", xattrs={"user.foo": "bar", "user.peersync.note": "layer2"}),
        directory("data/private", 0o700, uid=1000, gid=1000),
        file("data/private/key", "k\n", 0o400, uid=1000, gid=1000),
        directory("data/sticky", 0o1777),
        directory("data/sub", 0o750, uid=2, gid=3),
        symlink("data/link-rel", "plain.txt"),
        symlink("data/link-abs", "/data/plain.txt"),
        symlink("data/link-dangling", "/nonexistent/target"),
        symlink("data/link-dir", "private", uid=1000, gid=1000),  # symlink ownership is lchown'd
        file("data/hard1", "shared inode\n", 0o751, uid=7, gid=8),
        hardlink("data/hard2", "data/hard1"),
        hardlink("data/sub/hard3", "data/hard1"),  # hard link across directories
        fifo("data/fifo", 0o620),
        file("data/to-delete.txt", "deleted in layer 3\n"),
        directory("data/gone"),  # whole directory deleted in layer 3, recreated empty-ish in layer 4
        file("data/gone/a", "a\n"),
        directory("data/gone/sub"),
        file("data/gone/sub/b", "b\n"),
        directory("opq"),  # made opaque in layer 3
        file("opq/old1", "old\n"),
        directory("opq/olddir"),
        file("opq/olddir/old2", "old\n"),
        file("data/replace-me", "file that becomes a directory\n"),
        directory("data/becomes-file"),
        file("data/becomes-file/child", "child of a dir that becomes a file\n"),
        file("etc/motd", "deleted in layer 5\n"),
    ]
    layer3 = [
        whiteout("data/to-delete.txt"),
        whiteout("data/gone"),
        directory("opq", 0o750),
        opaque("opq"),
        file("opq/new1", "new\n"),  # same layer as the opaque marker: must stay visible
        file("data/plain.txt", "hello v2\n", 0o640),  # overwrite with new content and mode
        directory("data/replace-me", 0o711),  # file -> directory
        file("data/replace-me/inner", "inner\n"),
        file("data/becomes-file", "now a file\n"),  # directory (with a child) -> file
    ]
    layer4 = [
        file("etc/greeting", TEST_GREETING + "\n"),
        directory("etc/peersync", 0o750, uid=1234, gid=5678, xattrs={"user.dir": "yes"}),
        file("etc/peersync/conf", "x=1\n", 0o600, uid=1234, gid=5678, xattrs={"user.layer": "4"}),
        directory("data/gone"),  # recreated: the old children must stay deleted
        file("data/gone/reborn", "reborn\n"),
    ]
    layer5 = [
        whiteout("etc/motd"),  # delete a file from the base layer, two layers down
        whiteout("data/link-dir"),  # delete a symlink
        directory("data/private", 0o750, uid=1000, gid=100),  # metadata-only change, child kept
        file("data/l5-a", "layer five\n", 0o750, uid=1000),
        hardlink("data/l5-b", "data/l5-a"),
    ]
    return [busybox_layer(), layer2, layer3, layer4, layer5]


def build_test_image(workdir: Path, tag: str = "v1") -> BuiltImage:
    """Write the 5-layer conformance image to `workdir` (an OCI layout) with its expected rootfs.

    The default Cmd prints TEST_GREETING, which only exists in layer 4, so a correct `ctr run`
    output proves every layer was unpacked in order.
    """
    layout = OciLayout(workdir)
    specs = test_image_layers()
    layers = [layout.add_layer(functools.partial(add_entries, entries=spec)) for spec in specs]
    manifest = layout.add_image(tag, layers, cmd=["/bin/cat", "/etc/greeting"])
    return BuiltImage(workdir, tag, manifest, layers, expected_manifest(specs), TEST_GREETING + "\n")


# ---------------------------------------------------------------------------------------------------
# Sized images for benchmarks
# ---------------------------------------------------------------------------------------------------


class _GeneratedContent(io.RawIOBase):
    """A readable stream of `size` deterministic bytes, generated chunk by chunk and hashed on the way.

    Each 1 MiB chunk is `compressibility` zeros and the rest pseudo-random bytes, so gzip shrinks a
    layer to about (1 - compressibility) of its size. Pseudo-random (not repeated) data keeps every
    chunk distinct: chunk-level dedup cannot flatter a benchmark.
    """

    def __init__(self, size: int, seed: int, compressibility: float) -> None:
        super().__init__()
        self.remaining = size
        self.rng = random.Random(seed)
        self.compressibility = min(max(compressibility, 0.0), 1.0)
        self.sha = hashlib.sha256()
        self.buf = b""

    def readable(self) -> bool:
        return True

    def _chunk(self, n: int) -> bytes:
        zeros = int(n * self.compressibility)
        return self.rng.randbytes(n - zeros) + bytes(zeros)

    def read(self, n: int | None = -1) -> bytes:
        """Return exactly `n` bytes unless the end is reached (tarfile's copy loop insists on it)."""
        want = self.remaining + len(self.buf) if n is None or n < 0 else n
        parts: list[bytes] = []
        while want > 0 and (self.buf or self.remaining > 0):
            if not self.buf:
                self.buf = self._chunk(min(CHUNK, self.remaining))
                self.remaining -= len(self.buf)
                self.sha.update(self.buf)
            part, self.buf = self.buf[:want], self.buf[want:]
            parts.append(part)
            want -= len(part)
        return b"".join(parts)


def build_sized_image(
    workdir: Path,
    total_bytes: int,
    layers: int = 4,
    compressibility: float = 0.0,
    tag: str = "sized",
    file_size: int = 16 * CHUNK,
    seed: int = 0,
    with_busybox: bool = True,
    compresslevel: int = 1,
) -> BuiltImage:
    """An image of about `total_bytes` uncompressed payload in `layers` layers, streamed to disk.

    Payload files are /payload/layerN/file-M.bin of at most `file_size` bytes; a busybox base layer
    (not counted in total_bytes) makes the image runnable. Content is a pure function of the
    arguments, so digests repeat across runs; if `workdir` already holds an image built with the
    same arguments it is reused (building 300 MB costs seconds of gzip). The expected manifest
    covers every path, with content hashes taken while generating.
    """
    params = {k: v for k, v in locals().items() if k != "workdir"}
    cached = _load_cached(workdir, params)
    if cached is not None:
        return cached
    layout = OciLayout(workdir)
    specs: list[list[Entry]] = [busybox_layer()] if with_busybox else []
    built = [layout.add_layer(functools.partial(add_entries, entries=spec)) for spec in specs]
    base = expected_manifest(specs)
    per_layer = [total_bytes // layers + (1 if i < total_bytes % layers else 0) for i in range(layers)]
    for index, size in enumerate(per_layer):
        nodes: Manifest = {}
        built.append(
            layout.add_layer(
                functools.partial(
                    _payload_layer, index=index, size=size, nodes=nodes, file_size=file_size, seed=seed,
                    comp=compressibility,
                ),
                compresslevel,
            )
        )
        base |= nodes
    manifest = layout.add_image(tag, built, cmd=["/bin/sh", "-c", "echo ready"])
    image = BuiltImage(Path(workdir), tag, manifest, built, dict(sorted(base.items())), "ready\n")
    _save_cache(workdir, params, image)
    return image


def _payload_layer(
    tar: tarfile.TarFile, index: int, size: int, nodes: Manifest, file_size: int, seed: int, comp: float
) -> None:
    """Add /payload/layerN/ and its generated files to `tar`, recording each file's Node."""
    dirs = ["payload", f"payload/layer{index}"]
    for d in dirs:
        add_entries(tar, [directory(d)])
        nodes["/" + d] = Node("dir", 0o755, 0, 0)
    offset, number = 0, 0
    while offset < size:
        length = min(file_size, size - offset)
        path = f"payload/layer{index}/file-{number}.bin"
        info = tarfile.TarInfo(path)
        info.size, info.mode, info.mtime, info.uname, info.gname = length, 0o644, DEFAULT_MTIME, "", ""
        content = _GeneratedContent(length, seed * 1_000_003 + index * 10_007 + number, comp)
        tar.addfile(info, content)
        nodes["/" + path] = Node(
            "file", 0o644, 0, 0, length, content.sha.hexdigest(), None, {}, DEFAULT_MTIME
        )
        offset, number = offset + length, number + 1


def _load_cached(workdir: Path, params: dict[str, Any]) -> BuiltImage | None:
    marker = Path(workdir) / "harness-params.json"
    try:
        saved = json.loads(marker.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if saved.get("params") != params:
        return None
    blobs = Path(workdir) / "blobs" / "sha256"
    digests = [saved["manifest"]["digest"]] + [d["digest"] for d, _, _ in saved["layers"]]
    if not all((blobs / d.removeprefix("sha256:")).exists() for d in digests):
        return None  # a half-deleted layout: rebuild
    layers = [Layer(Descriptor(**d), diff_id, tar_size) for d, diff_id, tar_size in saved["layers"]]
    expected = {p: Node(**{**n, "xattrs": {}}) for p, n in saved["expected"].items()}
    return BuiltImage(
        Path(workdir), saved["tag"], Descriptor(**saved["manifest"]), layers, expected, "ready\n"
    )


def _save_cache(workdir: Path, params: dict[str, Any], image: BuiltImage) -> None:
    def desc(d: Descriptor) -> dict[str, Any]:
        return {"media_type": d.media_type, "digest": d.digest, "size": d.size}

    saved = {
        "params": params,
        "tag": image.tag,
        "manifest": desc(image.manifest),
        "layers": [(desc(layer.descriptor), layer.diff_id, layer.tar_size) for layer in image.layers],
        "expected": {p: {**n.__dict__, "xattrs": {}} for p, n in (image.expected or {}).items()},
    }
    (Path(workdir) / "harness-params.json").write_text(json.dumps(saved))
