"""A small ext4 filesystem in a file, loop-mounted, for tests that need a disk to run full
(ENOSPC) without filling the host's: `losetup` + `mkfs.ext4` on a sparse file under the test's
own directory; unmounted, detached and deleted on exit, whatever happened inside."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path


def _run(*args: str) -> str:
    return subprocess.run(list(args), check=True, capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def loop_filesystem(workdir: Path, size_mib: int) -> Iterator[Path]:
    """A fresh ext4 of `size_mib` MiB mounted at `workdir/mnt` (needs root)."""
    workdir.mkdir(parents=True, exist_ok=True)
    image, mountpoint = workdir / "fs.img", workdir / "mnt"
    with open(image, "wb") as f:
        f.truncate(size_mib << 20)
    device = _run("losetup", "--find", "--show", str(image))
    try:
        _run("mkfs.ext4", "-q", "-m", "0", "-F", device)
        mountpoint.mkdir(exist_ok=True)
        _run("mount", device, str(mountpoint))
        try:
            yield mountpoint
        finally:
            subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True)
    finally:
        subprocess.run(["losetup", "-d", device], check=False, capture_output=True)
        image.unlink(missing_ok=True)


__all__ = ["loop_filesystem"]
