"""The root's lock: one process at a time owns a store (a daemon, or `peersync seed import`).

An exclusive `flock` on `<root>/lock`, held for the owner's lifetime and dropped by the kernel
when it dies, so a crash never leaves a root locked.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from kernel.errors import FailedPrecondition


def lock_root(root: Path) -> int:
    """Create `root` if needed and take its exclusive lock; returns the lock's fd."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise FailedPrecondition(f"root {root} is unusable: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FailedPrecondition(f"root {root} is in use by another peersync daemon") from None
    if not os.access(root, os.W_OK):
        os.close(fd)
        raise FailedPrecondition(f"root {root} is not writable")
    return fd
