"""Filesystem primitives of the store, below everything else in it: durable directory updates
(the fsync that makes a rename or unlink survive a crash, see `kernel.store.schema`) and
streaming hashes (whole-blob SHA-256 plus per-chunk SHA-256 in one pass, bounded memory)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

STREAM_BUFFER = 1 << 20  # read size when hashing files from disk
HASH_LEN = 32  # bytes of one per-chunk digest: one entry of the chunk table `HashState.table` builds


class HashState:
    """Incremental hashes of a byte stream cut into `chunk_size` chunks.

    Feeding is append-only; the table of finished chunk digests grows by 32 bytes per chunk,
    the only state proportional to the blob (32 bytes per MiB at the default chunk size)."""

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self.size = 0
        self._whole = hashlib.sha256()
        self._chunk = hashlib.sha256()
        self._fill = 0
        self._table = bytearray()

    def update(self, data: bytes | memoryview) -> None:
        """Feed the next bytes of the stream (any length: chunk boundaries are tracked here)."""
        self._whole.update(data)
        self.size += len(data)
        view = memoryview(data)
        while view:
            take = min(self.chunk_size - self._fill, len(view))
            self._chunk.update(view[:take])
            self._fill += take
            view = view[take:]
            if self._fill == self.chunk_size:
                self._table += self._chunk.digest()
                self._chunk = hashlib.sha256()
                self._fill = 0

    def digest(self) -> str:
        """The digest of everything fed so far (the state stays usable)."""
        return "sha256:" + self._whole.hexdigest()

    def table(self) -> bytes:
        """The chunk table so far, including the trailing partial chunk if any."""
        tail = self._chunk.digest() if self._fill else b""
        return bytes(self._table) + tail


def hash_fd(fd: int, chunk_size: int) -> HashState:
    """Hash a whole open file with pread, STREAM_BUFFER at a time."""
    state = HashState(chunk_size)
    while data := os.pread(fd, STREAM_BUFFER, state.size):
        state.update(data)
    return state


def hash_file(path: Path, chunk_size: int) -> HashState:
    """Hash a whole file by path (recovery re-verifying a blob file it found on disk)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return hash_fd(fd, chunk_size)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make renames and unlinks in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_path(path: Path) -> None:
    """Remove a file or a directory tree; missing is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
