"""The store consistency check: a store written through its own API is consistent, and each way
the files and LMDB can disagree (the ones recovery must never leave behind) is reported."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel.store.chunkstore import ChunkStore
from kernel.store.meta import Meta
from kernel.store.storecheck import check_store

CHUNK = 64 * 1024
DATA = os.urandom(3 * CHUNK + 123)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    """A store holding one committed blob, a half-filled partial blob and an open ingest; closed."""
    root = tmp_path / "root"
    store = ChunkStore(root, Meta(root), CHUNK)
    store.recover()
    writer = store.ingests.open("committed", len(DATA))
    writer.write_at(0, DATA)
    writer.commit(len(DATA), DIGEST)
    other = os.urandom(2 * CHUNK)
    other_digest = "sha256:" + hashlib.sha256(other).hexdigest()
    store.partials.claim(other_digest, len(other))
    store.partials.set_hashes(
        other_digest, [hashlib.sha256(other[i : i + CHUNK]).digest() for i in (0, CHUNK)]
    )
    store.partials.put_chunk(other_digest, 0, other[:CHUNK])
    store.ingests.open("open", 10).write_at(0, b"12345")
    store.close()
    store.meta.close()
    yield root


def blob_file(root: Path) -> Path:
    return root / "content" / "blobs" / "sha256" / DIGEST[7:]


def test_a_store_written_through_its_api_is_consistent(root: Path) -> None:
    assert check_store(root) == []


def test_an_empty_root_is_consistent(tmp_path: Path) -> None:
    assert check_store(tmp_path / "never-opened") == []


def test_a_corrupt_blob_is_reported(root: Path) -> None:
    path = blob_file(root)
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.write(b"X")
    path.chmod(0o444)
    assert check_store(root) == [
        f"{DIGEST}: content hashes to sha256:{hashlib.sha256(b'X' + DATA[1:]).hexdigest()}"
    ]
    assert check_store(root, verify=False) == []


def test_a_record_without_its_file_and_a_file_without_its_record(root: Path) -> None:
    moved = root.parent / "moved"
    shutil.move(blob_file(root), moved)
    assert check_store(root) == [f"{DIGEST}: complete record without its file"]
    shutil.move(moved, blob_file(root))
    stray = root / "content" / "blobs" / "sha256" / ("0" * 64)
    stray.write_bytes(b"")
    assert check_store(root) == [f"complete file {'0' * 64} has no complete record"]


def test_a_truncated_or_writable_blob_is_reported(root: Path) -> None:
    path = blob_file(root)
    path.chmod(0o644)
    os.truncate(path, 10)
    problems = check_store(root)
    assert f"{DIGEST}: file has 10 bytes, record says {len(DATA)}" in problems
    assert any("is writable" in p for p in problems)


def test_a_partial_chunk_marked_present_but_wrong_is_reported(root: Path) -> None:
    (partial,) = (root / "content" / "partial" / "sha256").iterdir()
    with open(partial, "r+b") as f:
        f.write(b"garbage")
    assert check_store(root) == [f"sha256:{partial.name}: chunk 0 is marked present but does not match"]


def test_an_ingest_directory_without_its_record_is_reported(root: Path) -> None:
    (root / "content" / "ingest" / "abc").mkdir()
    assert check_store(root) == ["ingest directory abc has no record"]
