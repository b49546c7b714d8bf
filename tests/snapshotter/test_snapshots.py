"""Snapshotter conformance suite, in the spirit of containerd's snapshots/testsuite.

Every case in the first part runs twice: against `Snapshotter` directly and over the gRPC wire
(our `SnapshotsServicer` on a unix socket, with a thin client that maps status codes back to
`kernel.errors`), so the same assertions hold both ways. Crash-safety cases run against the
object only: a crash is the process dying, which the wire adds nothing to. A simulated crash is
a BaseException raised at one filesystem step, which skips every `except Exception` cleanup
just as a dead process would; LMDB discards the open transaction as it would after a crash,
and the harness then reopens the store like a restarted daemon.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from kernel import errors
from kernel.store.meta import Meta
from snapshotter import snapshots as snapshots_module
from snapshotter import storage
from snapshotter.api import snapshots_pb2, snapshots_pb2_grpc
from snapshotter.grpc_snapshots import SnapshotsServicer
from snapshotter.server import new_server
from snapshotter.snapshots import Info, Kind, Mount, Snapshotter, Usage

LIST_BATCH = 7  # small, so List batching is exercised with few snapshots
GC_ROOT = {"containerd.io/gc.root": "2024-01-01T00:00:00Z"}


# --- the gRPC client adapter: same methods as Snapshotter, errors mapped back by code -------------

ERRORS: dict[grpc.StatusCode, type[errors.PeerSyncError]] = {
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.OUT_OF_RANGE: errors.OutOfRange,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.UNIMPLEMENTED: errors.Unimplemented,
}


def from_grpc(exc: grpc.aio.AioRpcError) -> Exception:
    """As containerd's errdefs.FromGRPC; an unmapped code is not a PeerSyncError, so tests notice."""
    cls = ERRORS.get(exc.code())
    return cls(exc.details()) if cls else RuntimeError(f"{exc.code()}: {exc.details()}")


def info_from_wire(message: snapshots_pb2.Info) -> Info:
    return Info(
        name=message.name,
        parent=message.parent,
        kind=Kind(message.kind),
        created=message.created_at.ToDatetime(tzinfo=UTC),
        updated=message.updated_at.ToDatetime(tzinfo=UTC),
        labels=dict(message.labels),
    )


class GrpcSnapshotter:
    """containerd's snapshots proxy client, in Python."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = snapshots_pb2_grpc.SnapshotsStub(channel)
        self.list_batches: list[int] = []

    async def _call(self, method: Callable[[Any], Awaitable[Any]], request: Any) -> Any:
        try:
            return await method(request)
        except grpc.aio.AioRpcError as exc:
            raise from_grpc(exc) from exc

    @staticmethod
    def _mounts(response: Any) -> list[Mount]:
        return [Mount(m.type, m.source, tuple(m.options)) for m in response.mounts]

    async def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        request = snapshots_pb2.PrepareSnapshotRequest(snapshotter="peersync", key=key, parent=parent)
        request.labels.update(labels or {})
        return self._mounts(await self._call(self.stub.Prepare, request))

    async def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        request = snapshots_pb2.ViewSnapshotRequest(snapshotter="peersync", key=key, parent=parent)
        request.labels.update(labels or {})
        return self._mounts(await self._call(self.stub.View, request))

    async def mounts(self, key: str) -> list[Mount]:
        request = snapshots_pb2.MountsRequest(snapshotter="peersync", key=key)
        return self._mounts(await self._call(self.stub.Mounts, request))

    async def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        request = snapshots_pb2.CommitSnapshotRequest(snapshotter="peersync", name=name, key=key)
        request.labels.update(labels or {})
        await self._call(self.stub.Commit, request)

    async def remove(self, key: str) -> None:
        await self._call(
            self.stub.Remove, snapshots_pb2.RemoveSnapshotRequest(snapshotter="peersync", key=key)
        )

    async def stat(self, key: str) -> Info:
        request = snapshots_pb2.StatSnapshotRequest(snapshotter="peersync", key=key)
        return info_from_wire((await self._call(self.stub.Stat, request)).info)

    async def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        message = snapshots_pb2.Info(
            name=info.name, parent=info.parent, kind=int(info.kind), labels=info.labels
        )
        request = snapshots_pb2.UpdateSnapshotRequest(snapshotter="peersync", info=message)
        if fieldpaths:
            request.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=list(fieldpaths)))
        return info_from_wire((await self._call(self.stub.Update, request)).info)

    async def walk(self, filters: Sequence[str] = ()) -> list[Info]:
        request = snapshots_pb2.ListSnapshotsRequest(snapshotter="peersync", filters=list(filters))
        infos: list[Info] = []
        self.list_batches = []
        try:
            async for response in self.stub.List(request):
                self.list_batches.append(len(response.info))
                infos.extend(info_from_wire(message) for message in response.info)
        except grpc.aio.AioRpcError as exc:
            raise from_grpc(exc) from exc
        return infos

    async def usage(self, key: str) -> Usage:
        response = await self._call(
            self.stub.Usage, snapshots_pb2.UsageRequest(snapshotter="peersync", key=key)
        )
        return Usage(size=response.size, inodes=response.inodes)

    async def cleanup(self) -> None:
        await self._call(self.stub.Cleanup, snapshots_pb2.CleanupRequest(snapshotter="peersync"))


# --- harnesses: a fresh root per test, restartable ------------------------------------------------


class DirectHarness:
    """The Snapshotter object itself; `restart` reopens LMDB on the same root like a new daemon."""

    name = "direct"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.meta: Meta
        self.snapshotter: Snapshotter
        self.api: Snapshotter | GrpcSnapshotter

    @property
    def snapshots_dir(self) -> Path:
        return self.root / "snapshots"

    def _open(self) -> None:
        self.meta = Meta(self.root)
        self.snapshotter = Snapshotter(self.root, self.meta, index_off=False)

    async def start(self) -> None:
        self._open()
        self.api = self.snapshotter

    async def stop(self) -> None:
        self.meta.close()

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    def close(self) -> None:
        pass

    def ids(self) -> dict[str, str]:
        with self.meta.txn() as txn:
            return storage.id_map(txn, self.meta)


class WireHarness(DirectHarness):
    """The same Snapshotter behind SnapshotsServicer on a unix socket, reached by GrpcSnapshotter."""

    name = "wire-grpcio"
    implementation = "grpcio"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.socket_dir = Path(tempfile.mkdtemp(prefix="psn-"))  # unix socket paths must be short
        self.address = f"unix://{self.socket_dir / 'snapshots.sock'}"

    async def start(self) -> None:
        self._open()
        self.server = new_server([], self.implementation)
        servicer = SnapshotsServicer(self.snapshotter, list_batch=LIST_BATCH)
        snapshots_pb2_grpc.add_SnapshotsServicer_to_server(servicer, self.server)
        self.server.add_insecure_port(self.address)
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(self.address)
        self.api = GrpcSnapshotter(self.channel)

    async def stop(self) -> None:
        await self.channel.close()
        await self.server.stop(None)
        await super().stop()

    def close(self) -> None:
        shutil.rmtree(self.socket_dir, ignore_errors=True)


class H2WireHarness(WireHarness):
    """The same, over PeerSync's own HTTP/2 gRPC server (the daemon's default)."""

    name = "wire-h2"
    implementation = "h2"


@pytest.fixture(params=[DirectHarness, WireHarness, H2WireHarness], ids=lambda cls: cls.name)
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[DirectHarness]:
    h = request.param(tmp_path / "root")
    await h.start()
    try:
        yield h
    finally:
        await h.stop()
        h.close()


@pytest.fixture
async def direct(tmp_path: Path) -> AsyncIterator[DirectHarness]:
    h = DirectHarness(tmp_path / "root")
    await h.start()
    try:
        yield h
    finally:
        await h.stop()


def snapshot_dir(h: DirectHarness, mount_source: str) -> Path:
    """The `<root>/snapshots/<id>` a bind mount source names, checked to be inside the root."""
    source = Path(mount_source)
    assert source.name == "fs" and source.parent.parent == h.snapshots_dir, source
    assert source.parent.name.isdigit()
    return source.parent


def options_dict(mount: Mount) -> dict[str, str]:
    return dict(option.split("=", 1) for option in mount.options if "=" in option)


def upper_of(h: DirectHarness, key_id: str) -> str:
    return str(h.snapshots_dir / key_id / "fs")


async def base_snapshots(api: Snapshotter | GrpcSnapshotter) -> None:
    """containerd's baseTestSnapshots: c1 <- c2 committed; a1 on c2, a2 alone; v1 on c2, v2 alone."""
    await api.prepare("c1-a", "", GC_ROOT)
    await api.commit("c1", "c1-a", GC_ROOT)
    await api.prepare("c2-a", "c1", GC_ROOT)
    await api.commit("c2", "c2-a", GC_ROOT)
    await api.prepare("a1", "c2", GC_ROOT)
    await api.prepare("a2", "", GC_ROOT)
    await api.view("v1", "c2", GC_ROOT)
    await api.view("v2", "", GC_ROOT)


def assert_consistent(h: DirectHarness, *, exact: bool) -> None:
    """Every record has its directory; with `exact`, nothing else is under snapshots/."""
    ids = h.ids()
    for snap_id, key in ids.items():
        assert (h.snapshots_dir / snap_id / "fs").is_dir(), f"{key!r} lost its directory {snap_id}"
    if exact:
        assert sorted(os.listdir(h.snapshots_dir)) == sorted(ids)


# --- lifecycle ----------------------------------------------------------------------------------


async def test_prepare_commit_chain_and_mounts(harness: DirectHarness) -> None:
    api = harness.api
    [base] = await api.prepare("default/1/extract sha256:l1", "", GC_ROOT)
    assert base.type == "bind" and base.options == ("rw", "rbind")
    l1_dir = snapshot_dir(harness, base.source)
    assert (l1_dir / "work").is_dir()
    (l1_dir / "fs" / "hello").write_text("layer 1")
    await api.commit("default/2/sha256:l1", "default/1/extract sha256:l1", GC_ROOT)

    [mid] = await api.prepare("default/3/extract sha256:l2", "default/2/sha256:l1")
    assert (mid.type, mid.source) == ("overlay", "overlay")
    assert [o.split("=")[0] for o in mid.options] == ["workdir", "upperdir", "lowerdir"]
    opts = options_dict(mid)
    l2_dir = Path(opts["upperdir"]).parent
    assert opts["workdir"] == str(l2_dir / "work") and opts["lowerdir"] == str(l1_dir / "fs")
    await api.commit("default/4/sha256:l2", "default/3/extract sha256:l2")

    [top] = await api.prepare("default/5/container", "default/4/sha256:l2")
    assert options_dict(top)["lowerdir"] == f"{l2_dir / 'fs'}:{l1_dir / 'fs'}"
    assert await api.mounts("default/5/container") == [top]

    committed = await api.stat("default/4/sha256:l2")
    assert (committed.kind, committed.parent, committed.labels) == (Kind.COMMITTED, "default/2/sha256:l1", {})
    with pytest.raises(errors.NotFound):
        await api.stat("default/3/extract sha256:l2")


async def test_view_mounts(harness: DirectHarness) -> None:
    api = harness.api
    [bare] = await api.view("v0", "")
    assert bare.type == "bind" and bare.options == ("ro", "rbind")
    assert not (snapshot_dir(harness, bare.source) / "work").exists()

    await api.prepare("a", "")
    await api.commit("c1", "a")
    [one] = await api.view("v1", "c1")
    c1_fs = one.source
    assert one == Mount("bind", c1_fs, ("ro", "rbind"))
    assert Path(c1_fs).is_dir()

    await api.prepare("b", "c1")
    await api.commit("c2", "b")
    [two] = await api.view("v2", "c2")
    assert two.type == "overlay" and len(two.options) == 1
    lowers = options_dict(two)["lowerdir"].split(":")
    assert lowers[1] == c1_fs and len(lowers) == 2
    assert await api.mounts("v2") == [two]


async def test_mounts_errors(harness: DirectHarness) -> None:
    await harness.api.prepare("a", "")
    await harness.api.commit("c", "a")
    with pytest.raises(errors.FailedPrecondition):
        await harness.api.mounts("c")
    with pytest.raises(errors.NotFound):
        await harness.api.mounts("a")


async def test_index_off_leads_overlay_options(tmp_path: Path) -> None:
    meta = Meta(tmp_path)
    try:
        sn = Snapshotter(tmp_path, meta, index_off=True)
        await sn.prepare("a", "")
        await sn.commit("c", "a")
        [mount] = await sn.prepare("b", "c")
        assert mount.options[0] == "index=off" and mount.options[-1].startswith("lowerdir=")
        [bind] = await sn.prepare("d", "")
        assert bind.options == ("rw", "rbind")  # bind mounts never get overlay options
    finally:
        meta.close()


async def test_kind_transitions(harness: DirectHarness) -> None:
    api = harness.api
    await api.prepare("k", "")
    assert (await api.stat("k")).kind is Kind.ACTIVE
    await api.commit("n", "k")
    assert (await api.stat("n")).kind is Kind.COMMITTED
    await api.view("v", "n")
    assert (await api.stat("v")).kind is Kind.VIEW
    with pytest.raises(errors.FailedPrecondition):
        await api.commit("from-view", "v")
    with pytest.raises(errors.FailedPrecondition):
        await api.commit("from-committed", "n")
    assert {i.name: i.kind for i in await api.walk()} == {"n": Kind.COMMITTED, "v": Kind.VIEW}


async def test_info_kind_is_always_set_on_the_wire(tmp_path: Path) -> None:
    """containerd reads Kind UNKNOWN (0) as committed, so an active snapshot must say ACTIVE."""
    h = WireHarness(tmp_path / "root")
    await h.start()
    try:
        await h.api.prepare("a", "")
        await h.api.view("v", "")
        raw = await h.api.stub.Stat(snapshots_pb2.StatSnapshotRequest(key="a"))
        assert raw.info.kind == snapshots_pb2.ACTIVE
        listed = [r async for r in h.api.stub.List(snapshots_pb2.ListSnapshotsRequest())]
        assert {i.name: i.kind for r in listed for i in r.info} == {
            "a": snapshots_pb2.ACTIVE,
            "v": snapshots_pb2.VIEW,
        }
        assert raw.info.created_at.seconds > 0 and raw.info.updated_at == raw.info.created_at
    finally:
        await h.stop()
        h.close()


# --- errors -------------------------------------------------------------------------------------


async def test_prepare_and_view_errors(harness: DirectHarness) -> None:
    api = harness.api
    await api.prepare("active", "")
    await api.view("view", "")
    with pytest.raises(errors.NotFound):
        await api.prepare("x", "missing-parent")
    with pytest.raises(errors.InvalidArgument):
        await api.prepare("x", "active")
    with pytest.raises(errors.InvalidArgument):
        await api.view("x", "view")
    for create in (api.prepare, api.view):
        for taken in ("active", "view"):
            with pytest.raises(errors.AlreadyExists):
                await create(taken, "")
    with pytest.raises(errors.InvalidArgument):
        await api.prepare("", "")
    with pytest.raises(errors.InvalidArgument):
        await api.prepare("k" * 512, "")
    await api.prepare("k" * 511, "")
    assert sorted(i.name for i in await api.walk()) == ["active", "k" * 511, "view"]
    assert_consistent(harness, exact=True)  # failed creates leave no directory behind


async def test_commit_errors(harness: DirectHarness) -> None:
    api = harness.api
    await api.prepare("a", "")
    await api.prepare("b", "")
    await api.commit("c", "a")
    with pytest.raises(errors.NotFound):
        await api.commit("n", "a")
    with pytest.raises(errors.AlreadyExists):
        await api.commit("c", "b")
    with pytest.raises(errors.AlreadyExists):
        await api.commit("b", "b")  # containerd creates the name first: it exists
    assert (await api.stat("b")).kind is Kind.ACTIVE


async def test_unknown_keys_are_not_found(harness: DirectHarness) -> None:
    api = harness.api
    calls = [
        api.stat("nope"),
        api.usage("nope"),
        api.remove("nope"),
        api.mounts("nope"),
        api.update(Info(name="nope", labels={"a": "b"})),
        api.stat(""),
        api.stat("k" * 600),
    ]
    for call in calls:
        with pytest.raises(errors.NotFound):
            await call


# --- remove -------------------------------------------------------------------------------------


async def test_remove_reuses_keys(harness: DirectHarness) -> None:
    """containerd's checkRemove."""
    api = harness.api
    await api.prepare("committed-a", "", GC_ROOT)
    await api.commit("committed-1", "committed-a", GC_ROOT)
    await api.prepare("reuse-1", "committed-1", GC_ROOT)
    await api.remove("reuse-1")
    await api.view("reuse-1", "committed-1", GC_ROOT)
    await api.remove("reuse-1")
    await api.prepare("reuse-1", "", GC_ROOT)
    await api.remove("committed-1")
    await api.commit("committed-1", "reuse-1", GC_ROOT)
    assert [i.name for i in await api.walk()] == ["committed-1"]
    assert_consistent(harness, exact=True)


async def test_remove_children_first(harness: DirectHarness) -> None:
    """containerd's checkRemoveIntermediateSnapshot, plus: the directory goes with the record."""
    api = harness.api
    [base] = await api.prepare("base", "")
    await api.commit("committed-base", "base")
    await api.prepare("intermediate", "committed-base")
    await api.commit("committed-inter", "intermediate")
    await api.prepare("top", "committed-inter")
    await api.view("top-view", "committed-inter")
    for parent in ("committed-inter", "committed-base"):
        with pytest.raises(errors.FailedPrecondition):
            await api.remove(parent)
    await api.remove("top")
    with pytest.raises(errors.FailedPrecondition):
        await api.remove("committed-inter")  # the view is still a child
    await api.remove("top-view")
    await api.remove("committed-inter")
    await api.remove("committed-base")
    assert await api.walk() == []
    assert not Path(base.source).exists()
    assert os.listdir(harness.snapshots_dir) == []


# --- update -------------------------------------------------------------------------------------


async def test_update_labels(harness: DirectHarness) -> None:
    """containerd's checkUpdate, for every kind."""
    api = harness.api
    t1 = datetime.now(UTC) - timedelta(milliseconds=1)
    await base_snapshots(api)
    t2 = datetime.now(UTC) + timedelta(milliseconds=1)
    expected_kinds = {"c1": Kind.COMMITTED, "c2": Kind.COMMITTED, "a1": Kind.ACTIVE}
    expected_kinds |= {"a2": Kind.ACTIVE, "v1": Kind.VIEW, "v2": Kind.VIEW}
    parents = {"c2": "c1", "a1": "c2", "v1": "c2"}
    for name, kind in expected_kinds.items():
        st = await api.stat(name)
        assert t1 <= st.created <= t2 and st.created == st.updated
        assert (st.name, st.kind, st.parent, st.labels) == (name, kind, parents.get(name, ""), GC_ROOT)

        root_label = {"containerd.io/gc.root": "later"}
        wanted = {"l1": "v1", "l2": "v2", "l3": "v3"} | root_label
        st.parent, st.labels = "doesnotexist", wanted
        st = await api.update(st)
        assert st.labels == wanted and st.parent == parents.get(name, "") and st.kind is kind
        assert st.updated > st.created

        st.labels = {"l1": "updated", "l4": "v4"}
        st = await api.update(st, ["labels.l1", "labels.l2"])
        assert st.labels == {"l1": "updated", "l3": "v3"} | root_label  # l2 absent in info: dropped

        st.labels = {"l4": "v4"} | root_label
        st = await api.update(st, ["labels"])
        assert st.labels == {"l4": "v4"} | root_label
        assert await api.stat(name) == st

        st.parent = "doesnotexist"
        for path in ("parent", "name", "kind", "created_at", "labelsx"):
            with pytest.raises(errors.InvalidArgument):
                await api.update(st, [path])
        with pytest.raises(errors.InvalidArgument):
            await api.update(Info(name=name, labels={}), ["labels", "parent"])
        assert (await api.stat(name)).labels == {"l4": "v4"} | root_label  # failed update wrote nothing


async def test_labels_on_commit_replace_and_empty_values_drop(harness: DirectHarness) -> None:
    api = harness.api
    await api.prepare("a", "", {"keep": "no", "containerd.io/snapshot.ref": "sha256:chain", "empty": ""})
    assert (await api.stat("a")).labels == {"keep": "no", "containerd.io/snapshot.ref": "sha256:chain"}
    await api.commit("c", "a", {"new": "yes"})
    assert (await api.stat("c")).labels == {"new": "yes"}
    info = await api.update(Info(name="c", labels={"new": ""}), ["labels.new"])
    assert info.labels == {}


# --- walk ---------------------------------------------------------------------------------------


async def test_walk_filters(harness: DirectHarness) -> None:
    api = harness.api
    await base_snapshots(api)
    await api.update(
        Info(name="a1", labels={"containerd.io/snapshot/cri.layer-digest": "sha256:x"}), ["labels"]
    )

    async def names(*filters: str) -> list[str]:
        return sorted(i.name for i in await api.walk(list(filters)))

    assert await names() == ["a1", "a2", "c1", "c2", "v1", "v2"]
    assert await names("kind==committed") == ["c1", "c2"]
    assert await names("kind==active", "kind==view") == ["a1", "a2", "v1", "v2"]
    assert await names("parent==c2") == ["a1", "v1"]
    assert await names("parent==c2,kind==view") == ["v1"]
    assert await names('labels."containerd.io/snapshot/cri.layer-digest"==sha256:x') == ["a1"]
    assert await names('labels."containerd.io/gc.root"') == ["a2", "c1", "c2", "v1", "v2"]
    assert await names("name~=^c") == ["c1", "c2"]
    assert await names("name==nothing") == []
    with pytest.raises(errors.InvalidArgument):
        await api.walk(["kind=committed"])


async def test_walk_infos_equal_stat(harness: DirectHarness) -> None:
    """containerd's checkStatInWalk."""
    await base_snapshots(harness.api)
    for info in await harness.api.walk():
        assert await harness.api.stat(info.name) == info


async def test_list_streams_in_batches(tmp_path: Path) -> None:
    h = WireHarness(tmp_path / "root")
    await h.start()
    try:
        await asyncio.gather(*(h.api.view(f"v{i:02}", "") for i in range(2 * LIST_BATCH + 3)))
        infos = await h.api.walk()
        assert h.api.list_batches == [LIST_BATCH, LIST_BATCH, 3]
        assert [i.name for i in infos] == [f"v{i:02}" for i in range(2 * LIST_BATCH + 3)]
        assert await h.api.walk(["name==none"]) == [] and h.api.list_batches == []
    finally:
        await h.stop()
        h.close()


# --- usage --------------------------------------------------------------------------------------


def du(path: Path) -> Usage:
    """GNU du as the oracle: bytes of allocated blocks and inodes, hard links counted once."""
    size = subprocess.run(["du", "-s", "-B1", str(path)], check=True, capture_output=True, text=True)
    inodes = subprocess.run(["du", "-s", "--inodes", str(path)], check=True, capture_output=True, text=True)
    return Usage(size=int(size.stdout.split()[0]), inodes=int(inodes.stdout.split()[0]))


async def test_usage(harness: DirectHarness) -> None:
    api = harness.api
    [mount] = await api.prepare("a", "")
    upper = Path(mount.source)
    assert await api.usage("a") == du(upper) and (await api.usage("a")).inodes == 1
    (upper / "dir").mkdir()
    (upper / "dir" / "data").write_bytes(os.urandom(10_000))
    os.link(upper / "dir" / "data", upper / "hardlink")
    os.symlink("dir/data", upper / "symlink")
    measured = await api.usage("a")
    assert measured == du(upper) and measured.inodes == 4 and measured.size >= 10_000

    await api.commit("c", "a")
    (upper / "after-commit").write_bytes(os.urandom(50_000))
    assert await api.usage("c") == measured  # recorded at commit, not measured again

    await api.view("v", "c")
    assert await api.usage("v") == Usage(0, 0)


# --- keys are opaque ----------------------------------------------------------------------------

ODD_KEYS = [
    "../../escape",
    "/etc/passwd",
    "a/../../../b",
    "default/3/sha256:" + "ab" * 32,
    "new-1",
    "rm-1",
    "1",
    "with space\nand newline",
    "ünïcødé/キー",
    ".",
]


async def test_path_like_keys_never_reach_the_filesystem(harness: DirectHarness, tmp_path: Path) -> None:
    api = harness.api
    before = sorted(p.name for p in tmp_path.iterdir())
    parent = ""
    for i, key in enumerate(ODD_KEYS):
        [mount] = await api.prepare(key, parent)
        if mount.type == "bind":
            snapshot_dir(harness, mount.source)
        else:
            opts = options_dict(mount)
            assert Path(opts["upperdir"]).parent.parent == harness.snapshots_dir
        name = f"{key}/committed-{i}"
        await api.commit(name, key)
        parent = name
        assert (await api.stat(name)).parent == (ODD_KEYS[i - 1] + f"/committed-{i - 1}" if i else "")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not Path("/escape").exists() and not (tmp_path.parent / "escape").exists()
    assert all(name.isdigit() for name in os.listdir(harness.snapshots_dir))
    await api.cleanup()
    assert_consistent(harness, exact=True)


# --- restart and cleanup ------------------------------------------------------------------------


async def test_restart_sees_identical_state(harness: DirectHarness) -> None:
    api = harness.api
    await base_snapshots(api)
    await api.update(Info(name="c2", labels={"x": "y"}), ["labels.x"])
    [upper] = await api.mounts("a1")
    (Path(options_dict(upper)["upperdir"]) / "f").write_text("data")
    state = await api.walk()
    mounts = {key: await api.mounts(key) for key in ("a1", "a2", "v1", "v2")}
    usages = {i.name: await api.usage(i.name) for i in state}

    await harness.restart()
    api = harness.api
    assert await api.walk() == state
    assert {key: await api.mounts(key) for key in mounts} == mounts
    assert {i.name: await api.usage(i.name) for i in state} == usages

    [fresh] = await api.prepare("after-restart", "")
    assert snapshot_dir(harness, fresh.source).name not in {m[0].source for m in mounts.values()}
    assert len(set(harness.ids())) == len(state) + 1  # ids keep counting, no reuse
    await api.cleanup()
    assert_consistent(harness, exact=True)


async def test_cleanup_removes_only_unreferenced(harness: DirectHarness) -> None:
    api = harness.api
    await base_snapshots(api)
    live = sorted(os.listdir(harness.snapshots_dir))
    (harness.snapshots_dir / "new-abandoned" / "fs").mkdir(parents=True)
    (harness.snapshots_dir / "9999" / "fs" / "deep").mkdir(parents=True)
    (harness.snapshots_dir / "rm-5.deadbeef").mkdir()
    (harness.snapshots_dir / "stray-file").write_text("x")
    os.symlink("/etc", harness.snapshots_dir / "stray-link")
    await api.cleanup()
    assert sorted(os.listdir(harness.snapshots_dir)) == live
    assert Path("/etc/passwd").exists()  # a symlink is unlinked, never followed
    await api.cleanup()  # idempotent
    assert_consistent(harness, exact=True)


async def test_concurrent_prepares_and_cleanups(harness: DirectHarness) -> None:
    api = harness.api
    await api.prepare("base-a", "")
    await api.commit("base", "base-a")
    work = [api.prepare(f"k{i}", "base") for i in range(24)] + [api.cleanup() for _ in range(6)]
    results = await asyncio.gather(*work)
    uppers = {options_dict(r[0])["upperdir"] for r in results[:24]}
    assert len(uppers) == 24 and all(Path(u).is_dir() for u in uppers)
    assert_consistent(harness, exact=True)


# --- a real overlay mount -----------------------------------------------------------------------


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
async def test_real_mounts(harness: DirectHarness, tmp_path: Path) -> None:
    api = harness.api
    target = tmp_path / "mnt"
    target.mkdir()
    [bind] = await api.prepare("layer1", "")
    run("mount", "-o", ",".join(bind.options), bind.source, str(target))
    try:
        (target / "from-parent").write_text("parent data")
    finally:
        run("umount", str(target))
    await api.commit("committed1", "layer1")

    [overlay] = await api.prepare("container", "committed1")
    run("mount", "-t", overlay.type, overlay.source, "-o", ",".join(overlay.options), str(target))
    try:
        assert (target / "from-parent").read_text() == "parent data"
        (target / "from-child").write_text("child data")
        (target / "from-parent").unlink()  # a whiteout in the upper dir, parent untouched
    finally:
        run("umount", str(target))
    upper = Path(options_dict(overlay)["upperdir"])
    assert (upper / "from-child").read_text() == "child data"
    assert (Path(bind.source) / "from-parent").read_text() == "parent data"

    await api.commit("committed2", "container")
    [view] = await api.view("ro", "committed2")
    run("mount", "-t", view.type, view.source, "-o", ",".join(view.options), str(target))
    try:
        assert sorted(os.listdir(target)) == ["from-child"]
        with pytest.raises(OSError):
            (target / "nope").write_text("read-only")
    finally:
        run("umount", str(target))


# --- crash safety (the object itself; see the module docstring) ---------------------------------


class SimulatedCrash(BaseException):
    """Not an Exception: no cleanup handler runs, as if the process died here."""


def crash(*args: object, **kwargs: object) -> None:
    raise SimulatedCrash()


def crash_after(real: Callable[..., None]) -> Callable[..., None]:
    def step(*args: object, **kwargs: object) -> None:
        real(*args, **kwargs)
        raise SimulatedCrash()

    return step


@pytest.mark.parametrize(
    ("step", "wrap"),
    [
        pytest.param("_make_temp_dir", crash_after, id="after-temp-dir"),
        pytest.param("_rename", lambda real: crash, id="before-rename"),
        pytest.param("_rename", crash_after, id="after-rename-before-commit"),
        pytest.param("_sync_dir", crash_after, id="after-fsync-before-commit"),
    ],
)
async def test_crash_while_creating(
    direct: DirectHarness,
    monkeypatch: pytest.MonkeyPatch,
    step: str,
    wrap: Callable[[Callable[..., None]], Callable[..., None]],
) -> None:
    api = direct.api
    await api.prepare("survivor", "")
    monkeypatch.setattr(snapshots_module, step, wrap(getattr(snapshots_module, step)))
    with pytest.raises(SimulatedCrash):
        await api.prepare("victim", "")
    monkeypatch.undo()
    await direct.restart()
    api = direct.api

    with pytest.raises(errors.NotFound):
        await api.stat("victim")
    assert_consistent(direct, exact=False)  # no record without its directory
    assert len(os.listdir(direct.snapshots_dir)) == 2  # the leftover is there to find...
    await api.cleanup()
    assert_consistent(direct, exact=True)  # ...and cleanup found it
    [again] = await api.prepare("victim", "")
    assert Path(again.source).is_dir() and os.listdir(again.source) == []


async def test_stale_directory_at_a_reissued_id_is_replaced(
    direct: DirectHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash after the rename leaves `<id>` with no record; the id is handed out again."""
    monkeypatch.setattr(snapshots_module, "_sync_dir", crash_after(snapshots_module._sync_dir))
    with pytest.raises(SimulatedCrash):
        await direct.api.prepare("victim", "")
    monkeypatch.undo()
    await direct.restart()
    [stale] = os.listdir(direct.snapshots_dir)
    (direct.snapshots_dir / stale / "fs" / "garbage").write_text("from the crashed attempt")

    [mount] = await direct.api.prepare("next", "")  # no cleanup in between
    assert snapshot_dir(direct, mount.source).name == stale
    assert os.listdir(mount.source) == []
    assert_consistent(direct, exact=True)


async def test_failed_metadata_commit_leaves_nothing(
    direct: DirectHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ordinary error after the rename (the process lives) is undone at once, no cleanup needed."""

    def fail(*paths: Path) -> None:
        raise OSError("disk trouble")

    await direct.api.prepare("survivor", "")
    for step in ("_sync_dir", "_rename"):  # after the rename, then before it
        monkeypatch.setattr(snapshots_module, step, fail)
        with pytest.raises(OSError, match="disk trouble"):
            await direct.api.prepare("victim", "")
        assert_consistent(direct, exact=True)
    assert [i.name for i in await direct.api.walk()] == ["survivor"]


async def test_crash_during_remove_after_metadata_commit(
    direct: DirectHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    [mount] = await direct.api.prepare("victim", "")
    monkeypatch.setattr(snapshots_module, "_remove_tree", crash)
    with pytest.raises(SimulatedCrash):
        await direct.api.remove("victim")
    monkeypatch.undo()
    await direct.restart()
    with pytest.raises(errors.NotFound):
        await direct.api.stat("victim")
    assert Path(mount.source).is_dir()
    await direct.api.cleanup()
    assert os.listdir(direct.snapshots_dir) == []


async def test_crash_during_cleanup_after_claiming(
    direct: DirectHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    await direct.api.prepare("live", "")
    (direct.snapshots_dir / "new-orphan").mkdir()
    monkeypatch.setattr(snapshots_module, "_remove_tree", crash)
    with pytest.raises(SimulatedCrash):
        await direct.api.cleanup()
    monkeypatch.undo()
    await direct.restart()
    assert any(name.startswith("rm-new-orphan.") for name in os.listdir(direct.snapshots_dir))
    await direct.api.cleanup()
    assert_consistent(direct, exact=True)
    assert (await direct.api.stat("live")).kind is Kind.ACTIVE


async def test_crash_during_commit_keeps_the_active_snapshot(
    direct: DirectHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    [mount] = await direct.api.prepare("a", "")
    monkeypatch.setattr(storage, "commit_active", crash_after(storage.commit_active))
    with pytest.raises(SimulatedCrash):
        await direct.api.commit("c", "a")
    monkeypatch.undo()
    await direct.restart()
    assert (await direct.api.stat("a")).kind is Kind.ACTIVE
    with pytest.raises(errors.NotFound):
        await direct.api.stat("c")
    await direct.api.commit("c", "a")
    assert (await direct.api.stat("c")).kind is Kind.COMMITTED
    assert Path(mount.source).is_dir()
    assert_consistent(direct, exact=True)
