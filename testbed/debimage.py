"""A realistic benchmark image: a Debian bookworm Python + NumPy runtime made with debootstrap.

    image = build_debian_image(Path("/var/cache/peersync-testbed"))

The root filesystem comes from `debootstrap --variant=minbase --include=python3,python3-numpy` against
the Debian mirror this machine's apt uses (read from /etc/apt/sources.list*), with the downloaded .debs
and the finished rootfs cached under the cache directory, so only the first build touches the network.
It is packaged as a multi-layer OCI image with the `images.OciLayout` helpers, split by directory the
way a Dockerfile build would stack it: the base system, the shared libraries
(/usr/lib/<multiarch>, e.g. OpenBLAS), and the Python stdlib plus NumPy (/usr/lib/python3*).

If debootstrap cannot reach a mirror, `DebootstrapError` says why; the benchmark then reports that
and falls back to a generated image (it never pretends).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

from .images import BuiltImage, Descriptor, Layer, OciLayout

DEFAULT_CACHE = Path("/var/cache/peersync-testbed")
SUITE = "bookworm"
PACKAGES = ("python3", "python3-numpy")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
TAG = "python-numpy"
CHECK_CMD = ("python3", "-c", "import numpy; print('numpy', numpy.__version__)")
# Directories whose contents never belong in an image layer (the directory itself is kept).
EMPTY_DIRS = ("dev", "proc", "sys", "run", "tmp", "var/cache/apt", "var/lib/apt/lists", "var/log")
COMPLETE = ".peersync-rootfs-complete"


class DebootstrapError(RuntimeError):
    """debootstrap is missing or could not build the rootfs (e.g. no mirror reachable)."""


def apt_mirror(root: Path = Path("/")) -> str:
    """The Debian (not security) mirror URI that apt on this machine uses for bookworm."""
    candidates: list[str] = []
    sources = root / "etc/apt"
    files = [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*"))]
    for f in files:
        if not f.is_file() or f.name.endswith(".disabled") or "disabled" in f.name:
            continue
        text = f.read_text(errors="replace")
        if f.suffix == ".sources":  # deb822
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(
                    (k.strip().lower(), v.strip())
                    for k, _, v in (line.partition(":") for line in stanza.splitlines() if ":" in line)
                    if not k.startswith("#")
                )
                if "deb" in fields.get("types", "").split() and SUITE in fields.get("suites", "").split():
                    candidates += fields.get("uris", "").split()
        else:
            for line in text.splitlines():
                parts = line.split("#", 1)[0].split()
                if len(parts) >= 3 and parts[0] == "deb":
                    rest = [p for p in parts[1:] if not p.startswith("[")]
                    if len(rest) >= 2 and rest[1] == SUITE:
                        candidates.append(rest[0])
    for uri in candidates:
        if "security" not in uri and uri.startswith(("http://", "https://", "file:")):
            return uri
    return DEFAULT_MIRROR


def rootfs(
    cache: Path = DEFAULT_CACHE, mirror: str | None = None, log: Callable[[str], None] = print
) -> Path:
    """The cached debootstrap rootfs, built on first use (a few minutes; .debs cached too)."""
    target = cache / f"rootfs-{SUITE}-{'-'.join(PACKAGES)}"
    if (target / COMPLETE).exists():
        return target
    if shutil.which("debootstrap") is None:
        raise DebootstrapError("debootstrap is not installed (apt-get install debootstrap)")
    mirror = mirror or apt_mirror()
    tmp = cache / "rootfs.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    (cache / "debs").mkdir(parents=True, exist_ok=True)
    cmd = [
        "debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
        f"--cache-dir={cache / 'debs'}", SUITE, str(tmp), mirror,
    ]  # fmt: skip
    log(f"debootstrap {SUITE} from {mirror} into {target} (once; cached) ...")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip()[-1500:]
        shutil.rmtree(tmp, ignore_errors=True)
        raise DebootstrapError(f"debootstrap from {mirror} failed (exit {done.returncode}):\n{tail}")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    (target / COMPLETE).write_text(mirror + "\n")
    return target


def multiarch() -> str:
    machine = platform.machine()
    return {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(machine, f"{machine}-linux-gnu")


def layer_groups() -> list[tuple[str, tuple[str, ...]]]:
    """(name, path prefixes) of the layers above the base one, in stacking order."""
    return [("libs", (f"usr/lib/{multiarch()}",)), ("python", ("usr/lib/python3",))]


def classify(root: Path) -> list[list[str]]:
    """Relative paths of `root` per layer (base first), walked in sorted order, parents first."""
    groups = layer_groups()
    out: list[list[str]] = [[] for _ in range(len(groups) + 1)]

    def layer_of(rel: str) -> int:
        for index, (_, prefixes) in enumerate(groups, start=1):
            if any(rel == p or rel.startswith(p + "/") or rel.startswith(p + ".") for p in prefixes):
                # usr/lib/python3 and usr/lib/python3.11 (the stdlib) both go to the python layer
                return index
        return 0

    def walk(rel: str) -> None:
        with os.scandir(root / rel if rel else root) as it:
            entries = sorted(it, key=lambda d: d.name)
        for d in entries:
            path = f"{rel}/{d.name}" if rel else d.name
            if path == COMPLETE:
                continue
            out[layer_of(path)].append(path)
            if d.is_dir(follow_symlinks=False) and path not in EMPTY_DIRS:
                walk(path)

    walk("")
    return out


def _fill(root: Path, paths: list[str]) -> Callable[[tarfile.TarFile], None]:
    def fill(tar: tarfile.TarFile) -> None:
        for rel in paths:
            tar.add(root / rel, arcname=rel, recursive=False)

    return fill


def build_debian_image(
    cache: Path = DEFAULT_CACHE, mirror: str | None = None, log: Callable[[str], None] = print
) -> BuiltImage:
    """The Python + NumPy image as an OCI layout under `cache` (built once, then reused)."""
    root = rootfs(cache, mirror, log)
    layout_dir = cache / f"oci-{SUITE}-{TAG}"
    marker = layout_dir / "peersync-image.json"
    stamp = (root / COMPLETE).stat().st_mtime
    if marker.exists():
        saved = json.loads(marker.read_text())
        if saved.get("stamp") == stamp:
            layers = [Layer(Descriptor(**d), diff_id, size) for d, diff_id, size in saved["layers"]]
            blobs = layout_dir / "blobs" / "sha256"
            if all((blobs / layer.descriptor.digest[7:]).exists() for layer in layers):
                return BuiltImage(layout_dir, TAG, Descriptor(**saved["manifest"]), layers)
    log(f"packaging {root} as a {len(layer_groups()) + 1}-layer OCI image in {layout_dir} ...")
    shutil.rmtree(layout_dir, ignore_errors=True)
    layout = OciLayout(layout_dir)
    layers = [layout.add_layer(_fill(root, paths), compresslevel=6) for paths in classify(root)]
    manifest = layout.add_image(TAG, layers, cmd=list(CHECK_CMD))

    def desc(d: Descriptor) -> dict[str, object]:
        return {"media_type": d.media_type, "digest": d.digest, "size": d.size}

    saved = {
        "stamp": stamp,
        "manifest": desc(manifest),
        "layers": [(desc(layer.descriptor), layer.diff_id, layer.tar_size) for layer in layers],
    }
    marker.write_text(json.dumps(saved))
    return BuiltImage(layout_dir, TAG, manifest, layers)
