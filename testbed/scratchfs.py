"""A fresh ext4 filesystem, with a journal, on a loop device: one per benchmark run.

Why: this machine's root filesystem is ext4 *without* a journal, and on such a filesystem every
new inode costs a scan of the inodes freed in the last 60 s (360 s while their inode table block is
dirty: `recently_deleted()` in fs/ext4/ialloc.c). A benchmark run that unpacks ~10k files per node
right after the previous run's teardown deleted ~80k pays seconds of kernel time for it, more the
later it runs in a sequence, and that swung the 8-node Debian figures by up to 2x
(bench/RESULTS.md, "Where the Go client's extra daemon CPU went"). An edge node's disk is
`mkfs.ext4` as it comes, with a journal, which never runs that check. So each run gets its own
filesystem made that way, and every system compared runs on the same footing: its daemons' roots,
its containerds' roots and snapshots, its registry, all on it; it is unmounted and deleted after.

The image file is sparse (it takes what the run writes) and lives in /var/tmp; the mount point is
short (/tmp/psd-XXXX), because containerd's socket lives under it and unix socket paths are
limited to 108 bytes.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

DEFAULT_SIZE = 32 << 30  # sparse: only what a run writes is allocated


@contextlib.contextmanager
def fresh_ext4(size: int = DEFAULT_SIZE, image_dir: Path = Path("/var/tmp")) -> Iterator[Path]:
    """A new journaled ext4 mounted at a fresh /tmp/psd-XXXX; unmounted and deleted on exit."""
    fd, name = tempfile.mkstemp(prefix="psd-", suffix=".ext4", dir=image_dir)
    os.close(fd)
    image = Path(name)
    mount = Path(tempfile.mkdtemp(prefix="psd-", dir="/tmp"))
    mounted = False
    try:
        os.truncate(image, size)
        _run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image))
        _run("mount", "-o", "loop", str(image), str(mount))
        mounted = True
        yield mount
    finally:
        if mounted:
            _unmount(mount)
        with contextlib.suppress(OSError):
            mount.rmdir()
        image.unlink(missing_ok=True)


def _unmount(mount: Path) -> None:
    """Unmount, retrying while the run's last processes let go; lazily if they never do."""
    for _ in range(20):
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode == 0:
            return
        time.sleep(0.5)
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _run(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError(f"{' '.join(args)}: {done.stderr.strip() or done.returncode}")


__all__ = ["DEFAULT_SIZE", "fresh_ext4"]
