"""Security issue 10, finding 5: label, ref and key sizes on both gRPC APIs are bounded as
containerd bounds them, and no record, however large, breaks a listing of the whole store.

Found by trying it: one 2 MiB label made content List fail for the whole store, an 8 MiB ingest
ref broke ListStatuses, a 12 MiB label made Info fail. The server here is the daemon's own
(`snapshotter.server.build_server` with the default `[grpc]` config, over both implementations),
and the client speaks with containerd's proxy client's message limits (16 MiB each way).

containerd's numbers are written out here rather than imported, so the test states them on its
own: 4096 bytes per label, key and value together (containerd `labels/validate.go`), and refs up
to bbolt's 32768-byte key plus containerd's `<namespace>/<sequence>/` prefix.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from kernel.config import GrpcConfig
from kernel.store.chunkstore import ChunkStore
from kernel.store.meta import Meta, dumps, loads
from snapshotter.api import content_pb2, content_pb2_grpc, snapshots_pb2, snapshots_pb2_grpc
from snapshotter.content import ContentStore
from snapshotter.server import build_server
from snapshotter.snapshots import Snapshotter

CONTAINERD_LABEL_MAX = 4096
CONTAINERD_REF_MAX = 76 + 1 + 20 + 1 + 32768
CONTAINERD_MESSAGE_MAX = 16 << 20  # defaults.DefaultMaxRecvMsgSize / DefaultMaxSendMsgSize
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Daemon:
    """The daemon's gRPC server over a fresh store, and stubs speaking to it as containerd does."""

    chunks: ChunkStore
    meta: Meta
    content: content_pb2_grpc.ContentStub
    snapshots: snapshots_pb2_grpc.SnapshotsStub


@pytest.fixture(params=["h2", "grpcio"])
async def daemon(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Daemon]:
    meta = Meta(tmp_path)
    chunks = ChunkStore(tmp_path, meta, 64 * 1024)
    chunks.recover()
    socket = tmp_path / "grpc.sock"
    snapshotter = Snapshotter(tmp_path, meta, index_off=False)
    server = build_server(socket, snapshotter, ContentStore(chunks), GrpcConfig(implementation=request.param))
    await server.start()
    options = [
        ("grpc.max_receive_message_length", CONTAINERD_MESSAGE_MAX),
        ("grpc.max_send_message_length", CONTAINERD_MESSAGE_MAX),
    ]
    channel = grpc.aio.insecure_channel(f"unix:{socket}", options=options)
    try:
        yield Daemon(
            chunks, meta, content_pb2_grpc.ContentStub(channel), snapshots_pb2_grpc.SnapshotsStub(channel)
        )
    finally:
        await channel.close()
        await server.stop(None)
        chunks.close()
        meta.close()


async def write_blob(
    stub: content_pb2_grpc.ContentStub, ref: str, data: bytes, labels: dict[str, str] | None = None
) -> str:
    """containerd's remote writer: STAT to open, then WRITE and COMMIT with the labels."""
    call = stub.Write()
    await call.write(content_pb2.WriteContentRequest(action=content_pb2.STAT, ref=ref, total=len(data)))
    await call.read()
    await call.write(content_pb2.WriteContentRequest(action=content_pb2.WRITE, offset=0, data=data))
    await call.read()
    await call.write(
        content_pb2.WriteContentRequest(
            action=content_pb2.COMMIT,
            offset=len(data),
            total=len(data),
            expected=sha(data),
            labels=labels or {},
        )
    )
    resp = await call.read()
    await call.done_writing()
    assert resp is not grpc.aio.EOF, await call.details()
    digest: str = resp.digest
    return digest


def _code(exc: grpc.aio.AioRpcError) -> grpc.StatusCode | str:
    """The code of a failed RPC, or a note if its message quotes the oversized input back (a
    status of megabytes breaks the client's header limits)."""
    details = exc.details() or ""
    return exc.code() if len(details) < 2048 else f"{exc.code()} with a {len(details)}-character message"


async def code_of(call: Any) -> grpc.StatusCode | str:
    """The status code a unary RPC ends with (OK if it succeeds)."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return _code(exc)
    return grpc.StatusCode.OK


async def write_code(
    stub: content_pb2_grpc.ContentStub, ref: str, data: bytes, labels: dict[str, str]
) -> grpc.StatusCode | str:
    try:
        await write_blob(stub, ref, data, labels)
    except grpc.aio.AioRpcError as exc:
        return _code(exc)
    return grpc.StatusCode.OK


async def list_content(stub: content_pb2_grpc.ContentStub) -> dict[str, list[str]] | str:
    """Every blob List reports, with its label keys (or how List failed)."""
    try:
        return {
            info.digest: sorted(info.labels)
            async for resp in stub.List(content_pb2.ListContentRequest())
            for info in resp.info
        }
    except grpc.aio.AioRpcError as exc:
        return f"List failed: {exc.code()}: {(exc.details() or '')[:200]}"


async def list_snapshots(stub: snapshots_pb2_grpc.SnapshotsStub) -> dict[str, list[str]] | str:
    """Every snapshot List reports, with its label keys (or how List failed)."""
    try:
        return {
            info.name: sorted(info.labels)
            async for resp in stub.List(snapshots_pb2.ListSnapshotsRequest())
            for info in resp.info
        }
    except grpc.aio.AioRpcError as exc:
        return f"List failed: {exc.code()}: {(exc.details() or '')[:200]}"


async def info_of(stub: content_pb2_grpc.ContentStub, digest: str) -> tuple[str, list[str]] | str:
    """(digest, label keys) that Info reports, or how it failed."""
    try:
        info = (await stub.Info(content_pb2.InfoRequest(digest=digest))).info
    except grpc.aio.AioRpcError as exc:
        return f"Info failed: {exc.code()}: {(exc.details() or '')[:200]}"
    return info.digest, sorted(info.labels)


async def list_statuses(stub: content_pb2_grpc.ContentStub) -> list[str] | str:
    """The refs ListStatuses reports (cut to 20 characters), or how it failed."""
    try:
        statuses = (await stub.ListStatuses(content_pb2.ListStatusesRequest())).statuses
    except grpc.aio.AioRpcError as exc:
        return f"ListStatuses failed: {exc.code()}: {(exc.details() or '')[:200]}"
    return [st.ref[:20] for st in statuses]


def label_of(total: int, key: str = "k") -> dict[str, str]:
    """One label whose key and value take `total` bytes together."""
    return {key: "v" * (total - len(key))}


# -- content ---------------------------------------------------------------------------------------


async def test_content_labels_are_bounded_as_containerd_bounds_them(daemon: Daemon) -> None:
    stub = daemon.content
    at_limit = await write_code(stub, "ok", b"at the limit", label_of(CONTAINERD_LABEL_MAX))
    over = await write_code(stub, "over", b"one byte over", label_of(CONTAINERD_LABEL_MAX + 1))
    # the refused commit leaves its ingest, ready to be committed again with good labels
    again = await write_code(stub, "over", b"one byte over", {"fine": "yes"})
    assert (at_limit, over, again) == (grpc.StatusCode.OK, INVALID, grpc.StatusCode.OK)

    digest = sha(b"at the limit")
    update = content_pb2.UpdateRequest(
        info=content_pb2.Info(digest=digest, labels=label_of(CONTAINERD_LABEL_MAX + 1, "other")),
        update_mask=field_mask_pb2.FieldMask(paths=["labels.other"]),
    )
    code = await code_of(stub.Update(update))
    assert code == INVALID
    assert await info_of(stub, digest) == (digest, ["k"]), "a refused update changed nothing"


async def test_a_2mib_label_never_breaks_content_list(daemon: Daemon) -> None:
    stub = daemon.content
    good = await write_blob(stub, "good", b"good blob")
    code = await write_code(stub, "big", b"big label", {"big": "x" * (2 << 20)})
    listed = await list_content(stub)
    assert (code, listed) == (INVALID, {good: []})


async def test_a_12mib_label_never_breaks_info(daemon: Daemon) -> None:
    stub = daemon.content
    digest = await write_blob(stub, "blob", b"some blob")
    update = content_pb2.UpdateRequest(
        info=content_pb2.Info(digest=digest, labels={"huge": "x" * (12 << 20)}),
        update_mask=field_mask_pb2.FieldMask(paths=["labels.huge"]),
    )
    code = await code_of(stub.Update(update))
    info = await info_of(stub, digest)
    assert (code, info) == (INVALID, (digest, []))


async def test_labels_cannot_grow_past_the_bound_one_merge_at_a_time(daemon: Daemon) -> None:
    """Each label within containerd's size, but a blob's labels cannot grow without end by merges:
    otherwise its Info would outgrow any message, and List with it."""
    stub = daemon.content
    digest = await write_blob(stub, "blob", b"merged into")
    codes = []
    for i in range(40):  # 40 x 4 KiB = 160 KiB of labels if nothing stopped them
        update = content_pb2.UpdateRequest(
            info=content_pb2.Info(digest=digest, labels=label_of(4000, f"k{i:02}")),
            update_mask=field_mask_pb2.FieldMask(paths=[f"labels.k{i:02}"]),
        )
        codes.append(await code_of(stub.Update(update)))
    assert codes[0] == grpc.StatusCode.OK and codes[-1] == INVALID
    info = await info_of(stub, digest)
    assert isinstance(info, tuple) and 0 < len(info[1]) < 40, info
    listed = await list_content(stub)
    assert listed == {digest: info[1]}


async def test_many_blobs_with_the_most_labels_list_in_small_messages(daemon: Daemon) -> None:
    """100 blobs with all the labels allowed: one List message of them all would be megabytes."""
    stub = daemon.content
    labels = {f"k{i:02}": "v" * 3900 for i in range(15)}
    digests = {await write_blob(stub, f"r{i}", f"blob {i}".encode(), labels) for i in range(100)}
    listed = await list_content(stub)
    assert isinstance(listed, dict) and set(listed) == digests, listed
    sizes = [resp.ByteSize() async for resp in stub.List(content_pb2.ListContentRequest())]
    assert sum(sizes) > 5 << 20 and max(sizes) <= 256 << 10


async def test_ingest_refs_are_bounded_and_an_8mib_ref_never_breaks_list_statuses(daemon: Daemon) -> None:
    stub = daemon.content
    call = stub.Write()
    await call.write(content_pb2.WriteContentRequest(action=content_pb2.STAT, ref="open", total=10))
    await call.read()  # an ingest in progress, for ListStatuses to find
    for ref in ("r" * (8 << 20), "r" * (CONTAINERD_REF_MAX + 1)):
        big = stub.Write()
        try:
            await big.write(content_pb2.WriteContentRequest(action=content_pb2.STAT, ref=ref, total=3))
            await big.read()
        except grpc.aio.AioRpcError:
            pass
        write = await big.code()
        message = len(await big.details())
        status = await code_of(stub.Status(content_pb2.StatusRequest(ref=ref)))
        abort = await code_of(stub.Abort(content_pb2.AbortRequest(ref=ref)))
        assert (write, message < 2048, status, abort) == (INVALID, True, INVALID, INVALID)
    statuses = await list_statuses(stub)
    assert statuses == ["open"]
    # the longest ref containerd can send is taken
    longest = await write_code(stub, "r" * CONTAINERD_REF_MAX, b"long ref", {})
    assert longest == grpc.StatusCode.OK
    call.cancel()


# -- snapshots -------------------------------------------------------------------------------------


async def test_snapshot_labels_are_bounded_on_every_rpc_that_takes_them(daemon: Daemon) -> None:
    stub = daemon.snapshots
    ok, over = label_of(CONTAINERD_LABEL_MAX), label_of(CONTAINERD_LABEL_MAX + 1)
    huge = {"huge": "x" * (2 << 20)}
    codes = []
    for labels in (over, huge):
        prepare = snapshots_pb2.PrepareSnapshotRequest(key="a", labels=labels)
        codes.append(await code_of(stub.Prepare(prepare)))
        codes.append(await code_of(stub.View(snapshots_pb2.ViewSnapshotRequest(key="v", labels=labels))))
    await stub.Prepare(snapshots_pb2.PrepareSnapshotRequest(key="a", labels=ok))
    for labels in (over, huge):
        commit = snapshots_pb2.CommitSnapshotRequest(name="c", key="a", labels=labels)
        codes.append(await code_of(stub.Commit(commit)))
    await stub.Commit(snapshots_pb2.CommitSnapshotRequest(name="c", key="a", labels=ok))
    update = snapshots_pb2.UpdateSnapshotRequest(
        info=snapshots_pb2.Info(name="c", labels=huge),
        update_mask=field_mask_pb2.FieldMask(paths=["labels.huge"]),
    )
    codes.append(await code_of(stub.Update(update)))
    assert codes == [INVALID] * 7
    listed = await list_snapshots(stub)
    assert listed == {"c": ["k"]}
    info = (await stub.Stat(snapshots_pb2.StatSnapshotRequest(key="c"))).info
    assert dict(info.labels) == ok


async def test_snapshot_keys_longer_than_containerd_sends_are_invalid(daemon: Daemon) -> None:
    stub = daemon.snapshots
    key = "k" * (8 << 20)
    codes = [
        await code_of(stub.Prepare(snapshots_pb2.PrepareSnapshotRequest(key=key))),
        await code_of(stub.Stat(snapshots_pb2.StatSnapshotRequest(key=key))),
        await code_of(stub.Remove(snapshots_pb2.RemoveSnapshotRequest(key=key))),
        await code_of(stub.Prepare(snapshots_pb2.PrepareSnapshotRequest(key="b", parent=key))),
    ]
    assert codes == [INVALID] * 4
    listed = await list_snapshots(stub)
    assert listed == {}


# -- records an older version stored without bounds -------------------------------------------------


async def test_records_stored_beyond_the_bounds_never_break_listings(daemon: Daemon) -> None:
    """As an older version could have left the store: a blob with a 2 MiB label, another with a
    12 MiB one, an ingest under an 8 MiB ref, a snapshot with a 2 MiB label. Listings still list
    every object; the oversized labels and the unreachable ingest are left out of the answers."""
    stub = daemon.content
    good = await write_blob(stub, "good", b"good", {"keep": "me"})
    big = await write_blob(stub, "big", b"big", {"keep": "me"})
    huge = await write_blob(stub, "huge", b"huge")
    daemon.chunks.update_labels(big, {"big": "x" * (2 << 20)}, replace_all=False)
    daemon.chunks.update_labels(huge, {"huge": "x" * (12 << 20)}, replace_all=False)
    daemon.chunks.ingests.open("r" * (8 << 20), 3).close()
    daemon.chunks.ingests.open("ordinary", 3).close()

    await daemon.snapshots.Prepare(snapshots_pb2.PrepareSnapshotRequest(key="s", labels={"keep": "me"}))
    with daemon.meta.txn(write=True) as txn:
        db = daemon.meta.db("snapshots")
        record = loads(bytes(txn.get(b"s", db=db)))
        record["labels"]["big"] = "x" * (2 << 20)
        txn.put(b"s", dumps(record), db=db)

    listed = await list_content(stub)
    assert listed == {good: ["keep"], big: ["keep"], huge: []}
    infos = [await info_of(stub, digest) for digest in (big, huge)]
    assert infos == [(big, ["keep"]), (huge, [])]
    statuses = await list_statuses(stub)
    assert statuses == ["ordinary"]
    snapshots = await list_snapshots(daemon.snapshots)
    assert snapshots == {"s": ["keep"]}
    stat = await daemon.snapshots.Stat(snapshots_pb2.StatSnapshotRequest(key="s"))
    assert sorted(stat.info.labels) == ["keep"]
