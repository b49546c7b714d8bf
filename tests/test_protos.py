"""The committed generated code in snapshotter/api/ must match protos/*.proto."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    pytest.importorskip("mypy_protobuf")  # the .pyi stubs beside the generated modules
    subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), str(tmp_path)], check=True)
    fresh = {p.name: p.read_text() for p in tmp_path.glob("*.py*")}
    committed = {p.name: p.read_text() for p in (ROOT / "snapshotter" / "api").glob("*_pb2*.py*")}
    assert fresh.keys() == committed.keys(), "run `make protos`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated code {stale}: run `make protos`"


def test_method_paths_match_containerd() -> None:
    from snapshotter.api import content_pb2, snapshots_pb2

    snap = snapshots_pb2.DESCRIPTOR.services_by_name["Snapshots"]
    assert snap.full_name == "containerd.services.snapshots.v1.Snapshots"
    assert {m.name for m in snap.methods} == {
        "Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "Update", "List", "Usage", "Cleanup",
    }
    content = content_pb2.DESCRIPTOR.services_by_name["Content"]
    assert content.full_name == "containerd.services.content.v1.Content"
    assert {m.name for m in content.methods} == {
        "Info", "Update", "List", "Delete", "Read", "Status", "ListStatuses", "Write", "Abort",
    }


def test_wire_field_numbers() -> None:
    """Spot-check field numbers against containerd-api.md: a wrong number breaks the wire silently."""
    from snapshotter.api import content_pb2, snapshots_pb2

    fields = {f.name: f.number for f in content_pb2.WriteContentRequest.DESCRIPTOR.fields}
    assert fields == {"action": 1, "ref": 2, "total": 3, "expected": 4, "offset": 5, "data": 6, "labels": 7}
    fields = {f.name: f.number for f in content_pb2.WriteContentResponse.DESCRIPTOR.fields}
    assert fields == {"action": 1, "started_at": 2, "updated_at": 3, "offset": 4, "total": 5, "digest": 6}
    fields = {f.name: f.number for f in snapshots_pb2.Info.DESCRIPTOR.fields}
    assert fields == {"name": 1, "parent": 2, "kind": 3, "created_at": 4, "updated_at": 5, "labels": 6}
    fields = {f.name: f.number for f in snapshots_pb2.CommitSnapshotRequest.DESCRIPTOR.fields}
    assert fields == {"snapshotter": 1, "name": 2, "key": 3, "labels": 4, "parent": 5}
