"""The snapshots' consistency check over snapshots made through the snapshotter itself."""

from __future__ import annotations

import shutil
from pathlib import Path

from kernel.store.meta import Meta
from snapshotter import storage
from snapshotter.snapcheck import check_snapshots, garbage_dirs
from snapshotter.storage import Kind, Usage


def make(root: Path) -> None:
    """A committed base, an active child on it, and a view: records and directories."""
    meta = Meta(root)
    with meta.txn(write=True) as txn:
        base = storage.create_snapshot(txn, meta, Kind.ACTIVE, "base-key")
        storage.commit_active(txn, meta, "base-key", "base", Usage())
        child = storage.create_snapshot(txn, meta, Kind.ACTIVE, "child", "base")
        view = storage.create_snapshot(txn, meta, Kind.VIEW, "view", "base")
    meta.close()
    for snap_id, active in ((base.id, False), (child.id, True), (view.id, False)):
        (root / "snapshots" / snap_id / "fs").mkdir(parents=True)
        if active:
            (root / "snapshots" / snap_id / "work").mkdir()


def test_consistent_snapshots_have_no_problems(tmp_path: Path) -> None:
    make(tmp_path)
    assert check_snapshots(tmp_path) == []
    assert garbage_dirs(tmp_path) == []


def test_a_record_without_its_directory_is_a_problem_a_directory_without_a_record_is_garbage(
    tmp_path: Path,
) -> None:
    make(tmp_path)
    shutil.rmtree(tmp_path / "snapshots" / "2")
    assert check_snapshots(tmp_path) == [
        f"snapshot 'child' (active, id 2): no directory {tmp_path}/snapshots/2/fs"
    ]
    (tmp_path / "snapshots" / "99" / "fs").mkdir(parents=True)
    assert garbage_dirs(tmp_path) == ["99"]
