"""Conformance suite for the content store, in the spirit of containerd's content testsuite.

Every case in the first part runs twice: against `ContentStore` directly and over the gRPC wire
to our own `ContentServicer` on a unix socket, through a small client that maps status codes back
to kernel.errors (as containerd's `errdefs.FromGRPC` does). The second part drives the raw
Write/Read protocol over the wire, message by message, the way containerd's proxy client does."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from kernel import errors
from kernel.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    Unavailable,
)
from kernel.store.chunkstore import ChunkStore
from kernel.store.meta import Meta
from snapshotter.api import content_pb2, content_pb2_grpc
from snapshotter.content import READ_PIECE, ContentStore, Info, Status
from snapshotter.grpc_content import ContentServicer
from snapshotter.grpcerrors import CODES
from snapshotter.server import new_server

CHUNK = 64 * 1024
ERRORS = {code: cls for cls, code in CODES.items()}


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def maybe(value: Any) -> Any:
    """The direct Writer answers some calls synchronously, the wire one always asynchronously."""
    return await value if inspect.isawaitable(value) else value


def _error(exc: grpc.aio.AioRpcError) -> errors.PeerSyncError:
    return ERRORS.get(exc.code(), errors.PeerSyncError)(exc.details())


def _ns(ts: Any) -> int:
    return ts.seconds * 1_000_000_000 + ts.nanos


def _info(pb: content_pb2.Info) -> Info:
    return Info(pb.digest, pb.size, _ns(pb.created_at), _ns(pb.updated_at), dict(pb.labels))


def _status(pb: content_pb2.Status) -> Status:
    return Status(pb.ref, pb.offset, pb.total, pb.expected, _ns(pb.started_at), _ns(pb.updated_at))


class WireWriter:
    """containerd's remoteWriter: one STAT to open, then lockstep WRITE/COMMIT."""

    def __init__(self, call: Any, ref: str) -> None:
        self._call = call
        self.ref = ref
        self.offset = 0

    async def send(self, **fields: Any) -> content_pb2.WriteContentResponse:
        try:
            await self._call.write(content_pb2.WriteContentRequest(**fields))
            resp = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None
        if resp is grpc.aio.EOF:
            raise errors.PeerSyncError("write stream ended without a response")
        self.offset = resp.offset
        return resp

    async def status(self) -> Status:
        resp = await self.send(action=content_pb2.STAT)
        return Status(self.ref, resp.offset, resp.total, "", _ns(resp.started_at), _ns(resp.updated_at))

    async def write_at(self, offset: int, data: bytes) -> int:
        return (await self.send(action=content_pb2.WRITE, offset=offset, data=data)).offset

    async def commit(self, size: int = 0, expected: str = "", labels: Mapping[str, str] | None = None) -> str:
        resp = await self.send(
            action=content_pb2.COMMIT, total=size, offset=self.offset, expected=expected, labels=labels or {}
        )
        return resp.digest

    async def close(self) -> None:
        self._call.cancel()


class WireContent:
    """The ContentStore API spoken over gRPC."""

    def __init__(self, stub: content_pb2_grpc.ContentStub) -> None:
        self.stub = stub

    async def _unary(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self.stub, method)(request)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None

    async def info(self, digest: str) -> Info:
        return _info((await self._unary("Info", content_pb2.InfoRequest(digest=digest))).info)

    async def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        request = content_pb2.UpdateRequest(
            info=content_pb2.Info(digest=info.digest, labels=dict(info.labels)),
            update_mask=field_mask_pb2.FieldMask(paths=list(fieldpaths)),
        )
        return _info((await self._unary("Update", request)).info)

    async def walk(self, filters: Sequence[str] = ()) -> AsyncIterator[Info]:
        try:
            async for resp in self.stub.List(content_pb2.ListContentRequest(filters=list(filters))):
                for pb in resp.info:
                    yield _info(pb)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None

    async def delete(self, digest: str) -> None:
        await self._unary("Delete", content_pb2.DeleteContentRequest(digest=digest))

    async def read(self, digest: str, offset: int = 0, size: int = 0) -> AsyncIterator[tuple[int, bytes]]:
        try:
            async for resp in self.stub.Read(
                content_pb2.ReadContentRequest(digest=digest, offset=offset, size=size)
            ):
                yield resp.offset, resp.data
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None

    async def status(self, ref: str) -> Status:
        return _status((await self._unary("Status", content_pb2.StatusRequest(ref=ref))).status)

    async def list_statuses(self, filters: Sequence[str] = ()) -> list[Status]:
        resp = await self._unary("ListStatuses", content_pb2.ListStatusesRequest(filters=list(filters)))
        return [_status(pb) for pb in resp.statuses]

    async def abort(self, ref: str) -> None:
        await self._unary("Abort", content_pb2.AbortRequest(ref=ref))

    async def writer(self, ref: str, total: int = 0, expected: str = "") -> WireWriter:
        writer = WireWriter(self.stub.Write(), ref)
        await writer.send(action=content_pb2.STAT, ref=ref, total=total, expected=expected)
        return writer


@pytest.fixture
def chunks(tmp_path: Path) -> Any:
    meta = Meta(tmp_path)
    store = ChunkStore(tmp_path, meta, CHUNK)
    store.recover()
    yield store
    store.close()
    meta.close()


@contextlib.asynccontextmanager
async def serve(
    chunks: ChunkStore, tmp_path: Path, implementation: str
) -> AsyncIterator[content_pb2_grpc.ContentStub]:
    """A ContentServicer on a unix socket over the given gRPC server implementation."""
    socket = tmp_path / f"content-{implementation}.sock"
    server = new_server([("grpc.max_send_message_length", READ_PIECE + 64 * 1024)], implementation)
    content_pb2_grpc.add_ContentServicer_to_server(ContentServicer(ContentStore(chunks)), server)
    server.add_insecure_port(f"unix:{socket}")
    await server.start()
    channel = grpc.aio.insecure_channel(f"unix:{socket}")
    try:
        yield content_pb2_grpc.ContentStub(channel)
    finally:
        await channel.close()
        await server.stop(None)


@pytest.fixture(params=["h2", "grpcio"])
async def stub(request: pytest.FixtureRequest, chunks: ChunkStore, tmp_path: Path) -> AsyncIterator[Any]:
    """A raw stub, over each gRPC server implementation (snapshotter.server.new_server)."""
    async with serve(chunks, tmp_path, request.param) as s:
        yield s


@pytest.fixture(params=["direct", "wire-h2", "wire-grpcio"])
async def store(request: pytest.FixtureRequest, chunks: ChunkStore, tmp_path: Path) -> AsyncIterator[Any]:
    if request.param == "direct":
        yield ContentStore(chunks)
        return
    async with serve(chunks, tmp_path, request.param.removeprefix("wire-")) as s:
        yield WireContent(s)


async def ingest(store: Any, ref: str, data: bytes, piece: int = 100_000, **labels: str) -> str:
    writer = await store.writer(ref, len(data))
    offset = 0
    for i in range(0, len(data), piece):
        offset = await writer.write_at(offset, data[i : i + piece])
    return await writer.commit(len(data), sha(data), labels)


async def read_all(store: Any, digest: str, offset: int = 0, size: int = 0) -> bytes:
    return b"".join([data async for _, data in store.read(digest, offset, size)])


@pytest.fixture(scope="module")
def blob() -> bytes:
    return os.urandom(2 * 1024 * 1024 + 4321)


# -- conformance: blobs --------------------------------------------------------------------


async def test_write_commit_info_read(store: Any, chunks: ChunkStore, blob: bytes) -> None:
    digest = await ingest(store, "default/1/layer", blob)
    assert digest == sha(blob)
    info = await store.info(digest)
    assert (info.digest, info.size) == (digest, len(blob))
    assert 0 < info.created_ns <= info.updated_ns
    assert await read_all(store, digest) == blob
    assert chunks.chunk_hashes(digest) == [
        hashlib.sha256(blob[i : i + CHUNK]).digest() for i in range(0, len(blob), CHUNK)
    ]
    with pytest.raises(NotFound):
        await store.status("default/1/layer")


async def test_empty_blob(store: Any) -> None:
    digest = await ingest(store, "empty", b"")
    assert (await store.info(digest)).size == 0
    assert await read_all(store, digest) == b""


@pytest.mark.parametrize(
    "offset,size,want",
    [
        (0, 0, slice(None)),
        (0, -1, slice(None)),
        (-5, 10, slice(0, 10)),
        (10, 0, slice(10, None)),
        (4, 4, slice(4, 8)),
        (512, 508, slice(512, 1020)),
        ("end-3", 100, slice(-3, None)),
        ("end", 0, slice(0, 0)),
    ],
)
async def test_read_ranges(store: Any, blob: bytes, offset: Any, size: int, want: slice) -> None:
    digest = await ingest(store, "r", blob)
    offset = {"end": len(blob), "end-3": len(blob) - 3}.get(offset, offset)
    assert await read_all(store, digest, offset, size) == blob[want]


async def test_read_past_end_is_out_of_range(store: Any) -> None:
    digest = await ingest(store, "r", b"0123456789")
    with pytest.raises(OutOfRange):
        await read_all(store, digest, 11, 1)


async def test_large_read_is_pieced(store: Any, blob: bytes) -> None:
    digest = await ingest(store, "r", blob)
    pieces = [piece async for piece in store.read(digest, 7, 0)]
    assert [off for off, _ in pieces] == [7 + i * READ_PIECE for i in range(len(pieces))]
    assert all(len(data) <= READ_PIECE for _, data in pieces) and len(pieces) == 3
    assert b"".join(data for _, data in pieces) == blob[7:]


async def test_missing_blob_is_not_found(store: Any) -> None:
    missing = sha(b"missing")
    with pytest.raises(NotFound):
        await store.info(missing)
    with pytest.raises(NotFound):
        await read_all(store, missing)
    with pytest.raises(NotFound):
        await store.delete(missing)
    with pytest.raises(NotFound):
        await store.update(Info(missing, labels={"a": "b"}), ["labels"])


@pytest.mark.parametrize("bad", ["", "sha256:xyz", "sha256:" + "0" * 63, "nodigest"])
async def test_malformed_digest_is_invalid(store: Any, bad: str) -> None:
    with pytest.raises(InvalidArgument):
        await store.info(bad)
    with pytest.raises(InvalidArgument):
        await read_all(store, bad)
    with pytest.raises(InvalidArgument):
        await store.delete(bad)


async def test_delete(store: Any) -> None:
    digest = await ingest(store, "r", b"short-lived")
    await store.delete(digest)
    with pytest.raises(NotFound):
        await store.info(digest)
    with pytest.raises(NotFound):
        await read_all(store, digest)
    assert [i async for i in store.walk()] == []
    await ingest(store, "r", b"short-lived")  # and it can come back


async def test_labels_on_commit_and_update(store: Any) -> None:
    digest = await ingest(store, "r", b"labelled", **{"containerd.io/gc.root": "x", "keep": "1"})
    assert (await store.info(digest)).labels == {"containerd.io/gc.root": "x", "keep": "1"}
    info = await store.update(Info(digest, labels={"keep": "", "new": "2"}), ["labels.keep", "labels.new"])
    assert info.labels == {"containerd.io/gc.root": "x", "new": "2"}
    info = await store.update(Info(digest, labels={"only": "this"}), ["labels"])
    assert info.labels == {"only": "this"}
    info = await store.update(Info(digest, labels={"empty": "mask"}), [])
    assert info.labels == {"empty": "mask"}
    assert (await store.info(digest)).labels == {"empty": "mask"}
    with pytest.raises(InvalidArgument):
        await store.update(Info(digest, size=3), ["size"])


async def test_walk_filters(store: Any) -> None:
    a = await ingest(store, "a", b"blob a", tier="base")
    b = await ingest(store, "b", b"blob bb", tier="app")
    assert {i.digest async for i in store.walk()} == {a, b}
    assert [i.digest async for i in store.walk(["labels.tier==app"])] == [b]
    assert [i.digest async for i in store.walk([f"digest=={a}"])] == [a]
    assert {i.digest async for i in store.walk(["labels.tier==base", "size==7"])} == {a, b}
    assert [i.digest async for i in store.walk(["labels.nope"])] == []
    with pytest.raises(InvalidArgument):
        [i async for i in store.walk(["labels.tier=="])]


# -- conformance: ingests ------------------------------------------------------------------


async def test_resume_at_stored_offset(store: Any, blob: bytes) -> None:
    writer = await store.writer("r", len(blob))
    await writer.write_at(0, blob[:300_000])
    await maybe(writer.close())
    st = await store.status("r")
    assert (st.ref, st.offset, st.total) == ("r", 300_000, len(blob))
    writer = await wait_writer(store, "r", len(blob))
    assert (await maybe(writer.status())).offset == 300_000
    await writer.write_at(300_000, blob[300_000:])
    assert await writer.commit(len(blob), sha(blob)) == sha(blob)
    assert await read_all(store, sha(blob), 299_990, 20) == blob[299_990:300_010]


async def test_resumed_ingest_keeps_its_last_update_time(store: Any) -> None:
    """containerd's content suite, case Resume: a reopened ingest reports the update time its
    last writer reported, never an earlier one (the data file's mtime alone is stamped from the
    kernel's coarse clock, which runs up to a tick behind the clock the writer read)."""
    writer = await store.writer("r", 10)
    await writer.write_at(0, b"12345")
    last = (await maybe(writer.status())).updated_ns
    assert (await store.status("r")).updated_ns == last  # seen from outside while it is open
    await maybe(writer.close())
    assert (await store.status("r")).updated_ns == last
    resumed = await wait_writer(store, "r", 10)
    assert (await maybe(resumed.status())).updated_ns == last
    await resumed.write_at(5, b"67890")
    assert (await maybe(resumed.status())).updated_ns >= last


async def test_truncate_at_zero_restarts(store: Any) -> None:
    writer = await store.writer("r")
    assert await writer.write_at(0, b"garbage garbage") == 15
    assert await writer.write_at(0, b"clean") == 5
    assert await writer.commit(5, sha(b"clean")) == sha(b"clean")


async def test_write_at_wrong_offset_is_out_of_range(store: Any) -> None:
    writer = await store.writer("r")
    await writer.write_at(0, b"12345")
    with pytest.raises(OutOfRange):
        await writer.write_at(3, b"x")
    await maybe(writer.close())
    assert (await store.status("r")).offset == 5  # nothing lost


async def test_busy_ref_is_unavailable(store: Any) -> None:
    writer = await store.writer("r")
    with pytest.raises(Unavailable, match="locked for"):
        await store.writer("r")
    with pytest.raises(Unavailable):
        await store.abort("r")
    await maybe(writer.close())
    await maybe((await wait_writer(store, "r")).close())


async def test_commit_size_mismatch(store: Any) -> None:
    writer = await store.writer("r")
    await writer.write_at(0, b"abc")
    with pytest.raises(FailedPrecondition):
        await writer.commit(4, sha(b"abc"))
    assert (await store.status("r")).offset == 3  # kept for a retry


async def test_commit_bad_digest(store: Any) -> None:
    writer = await store.writer("r")
    await writer.write_at(0, b"abc")
    with pytest.raises(FailedPrecondition):
        await writer.commit(3, sha(b"abd"))
    with pytest.raises(NotFound):
        await store.info(sha(b"abc"))


async def test_commit_existing_blob_already_exists(store: Any) -> None:
    await ingest(store, "first", b"twice")
    with pytest.raises(AlreadyExists):
        await ingest(store, "second", b"twice")
    with pytest.raises(NotFound):
        await store.status("second")
    with pytest.raises(AlreadyExists):  # an expected digest that is present refuses the writer
        await store.writer("third", 5, sha(b"twice"))


async def test_status_list_abort(store: Any) -> None:
    for ref in ["default/1/a", "default/2/b"]:
        writer = await store.writer(ref, 10)
        await writer.write_at(0, b"12")
        await maybe(writer.close())
    assert sorted(s.ref for s in await store.list_statuses()) == ["default/1/a", "default/2/b"]
    assert [s.ref for s in await store.list_statuses(["ref==default/2/b"])] == ["default/2/b"]
    st = await store.status("default/1/a")
    assert (st.offset, st.total) == (2, 10) and 0 < st.started_ns <= st.updated_ns
    await wait_abort(store, "default/1/a")
    with pytest.raises(NotFound):
        await store.status("default/1/a")
    with pytest.raises(NotFound):
        await store.abort("default/1/a")
    with pytest.raises(InvalidArgument):
        await store.list_statuses(["ref=="])


# Over the wire, closing a writer cancels its stream and the server releases the ref a moment
# later; containerd's client retries on UNAVAILABLE, and so do these helpers, briefly.


async def _retry(fn: Any, *args: Any) -> Any:
    for _ in range(100):
        try:
            return await fn(*args)
        except Unavailable:
            await asyncio.sleep(0.01)
    return await fn(*args)


async def wait_writer(store: Any, ref: str, total: int = 0) -> Any:
    return await _retry(store.writer, ref, total)


async def wait_abort(store: Any, ref: str) -> None:
    await _retry(store.abort, ref)


# -- BlobSource seam (direct only: the source sits behind the store) -----------------------


class FakeSource:
    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.reads: list[tuple[int, int]] = []

    async def stat(self, digest: str) -> int | None:
        return len(self.blobs[digest]) if digest in self.blobs else None

    async def read(self, digest: str, offset: int, size: int) -> bytes:
        self.reads.append((offset, size))
        return self.blobs[digest][offset : offset + size]


async def test_blob_source_serves_missing_blobs(chunks: ChunkStore, blob: bytes) -> None:
    source = FakeSource({sha(blob): blob})
    store = ContentStore(chunks, source=source)
    info = await store.info(sha(blob))
    assert (info.digest, info.size) == (sha(blob), len(blob))
    assert await read_all(store, sha(blob), 100, 0) == blob[100:]
    assert all(size <= READ_PIECE for _, size in source.reads)
    assert await read_all(store, sha(blob), -1, 4) == blob[:4]
    with pytest.raises(OutOfRange):
        await read_all(store, sha(blob), len(blob) + 1)
    with pytest.raises(NotFound):
        await store.info(sha(b"unknown"))
    with pytest.raises(NotFound):
        await ContentStore(chunks).info(sha(blob))
    assert [i async for i in store.walk()] == []  # walk lists local blobs only


# -- the raw Write/Read protocol over the wire ---------------------------------------------


async def lockstep(
    stub: content_pb2_grpc.ContentStub, requests: list[content_pb2.WriteContentRequest]
) -> list[content_pb2.WriteContentResponse]:
    """Send each request and wait for its one response, as containerd's remoteWriter does."""
    call = stub.Write()
    responses = []
    for request in requests:
        await call.write(request)
        responses.append(await call.read())
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF  # nothing beyond one response per request
    return responses


def req(action: int, **fields: Any) -> content_pb2.WriteContentRequest:
    return content_pb2.WriteContentRequest(action=action, **fields)


STAT, WRITE, COMMIT = content_pb2.STAT, content_pb2.WRITE, content_pb2.COMMIT


async def expect_code(
    code: grpc.StatusCode, stub: content_pb2_grpc.ContentStub, requests: list[content_pb2.WriteContentRequest]
) -> int:
    """Run requests until the stream fails with `code`; returns how many responses came first."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        call = stub.Write()
        answered = 0
        for request in requests:
            await call.write(request)
            await call.read()
            answered += 1
    assert caught.value.code() == code, caught.value.details()
    return answered


async def test_wire_lockstep_session(stub: content_pb2_grpc.ContentStub) -> None:
    data = b"x" * 5000
    responses = await lockstep(
        stub,
        [
            req(STAT, ref="r", total=5000),
            req(WRITE, offset=0, data=data[:2000]),
            req(WRITE, offset=2000, data=data[2000:]),
            req(STAT),
            req(COMMIT, offset=5000, total=5000, expected=sha(data), labels={"k": "v"}),
        ],
    )
    assert [r.action for r in responses] == [STAT, WRITE, WRITE, STAT, COMMIT]
    assert [r.offset for r in responses] == [0, 2000, 5000, 5000, 5000]
    first = responses[0]
    assert first.total == 5000 and _ns(first.started_at) > 0 and _ns(first.updated_at) > 0
    assert responses[-1].digest == sha(data)
    info = (await stub.Info(content_pb2.InfoRequest(digest=sha(data)))).info
    assert (info.size, dict(info.labels)) == (5000, {"k": "v"})


async def test_wire_first_message_needs_ref(stub: content_pb2_grpc.ContentStub) -> None:
    assert await expect_code(grpc.StatusCode.INVALID_ARGUMENT, stub, [req(STAT, total=3)]) == 0


async def test_wire_resume_truncate_and_out_of_range(stub: content_pb2_grpc.ContentStub) -> None:
    await lockstep(stub, [req(STAT, ref="r", total=6), req(WRITE, offset=0, data=b"abc")])
    resumed = await lockstep(stub, [req(STAT, ref="r", total=6)])
    assert resumed[0].offset == 3 and resumed[0].total == 6
    answered = await expect_code(
        grpc.StatusCode.OUT_OF_RANGE, stub, [req(STAT, ref="r"), req(WRITE, offset=2, data=b"x")]
    )
    assert answered == 1
    responses = await lockstep(
        stub,
        [
            req(STAT, ref="r"),
            req(WRITE, offset=0, data=b"fresh!"),
            req(COMMIT, offset=6, total=6, expected=sha(b"fresh!")),
        ],
    )
    assert [r.offset for r in responses] == [3, 6, 6]
    assert responses[-1].digest == sha(b"fresh!")


async def test_wire_busy_ref(stub: content_pb2_grpc.ContentStub) -> None:
    holder = stub.Write()
    await holder.write(req(STAT, ref="r"))
    await holder.read()
    await expect_code(grpc.StatusCode.UNAVAILABLE, stub, [req(STAT, ref="r")])
    await holder.done_writing()
    assert await holder.read() is grpc.aio.EOF
    assert len(await lockstep(stub, [req(STAT, ref="r")])) == 1  # released at end of stream


async def test_wire_client_going_away_releases_ref(stub: content_pb2_grpc.ContentStub) -> None:
    holder = stub.Write()
    await holder.write(req(STAT, ref="r"))
    await holder.read()
    holder.cancel()
    for _ in range(200):
        try:
            await lockstep(stub, [req(STAT, ref="r")])
            return
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
            await asyncio.sleep(0.01)
    pytest.fail("ref still locked after the client went away")


@pytest.mark.parametrize(
    "commit,code",
    [
        (req(COMMIT, offset=3, total=4, expected=sha(b"abc")), grpc.StatusCode.FAILED_PRECONDITION),
        (req(COMMIT, offset=3, total=3, expected=sha(b"abd")), grpc.StatusCode.FAILED_PRECONDITION),
        (req(COMMIT, offset=3, total=3, expected="sha256:bogus"), grpc.StatusCode.INVALID_ARGUMENT),
        (req(COMMIT, offset=3, total=3, expected=sha(b"present")), grpc.StatusCode.ALREADY_EXISTS),
    ],
)
async def test_wire_commit_failures(
    stub: content_pb2_grpc.ContentStub, commit: Any, code: grpc.StatusCode
) -> None:
    await lockstep(
        stub,
        [
            req(STAT, ref="p"),
            req(WRITE, data=b"present"),
            req(COMMIT, offset=7, total=7, expected=sha(b"present")),
        ],
    )
    await expect_code(code, stub, [req(STAT, ref="r", total=3), req(WRITE, data=b"abc"), commit])


async def test_wire_expected_on_open_of_present_blob(stub: content_pb2_grpc.ContentStub) -> None:
    await lockstep(stub, [req(STAT, ref="p"), req(WRITE, data=b"here"), req(COMMIT, offset=4)])
    await expect_code(grpc.StatusCode.ALREADY_EXISTS, stub, [req(STAT, ref="q", expected=sha(b"here"))])


async def test_wire_reads(stub: content_pb2_grpc.ContentStub, blob: bytes) -> None:
    await lockstep(
        stub,
        [
            req(STAT, ref="r", total=len(blob)),
            req(WRITE, data=blob),
            req(COMMIT, offset=len(blob), expected=sha(blob)),
        ],
    )

    async def read(offset: int, size: int) -> list[content_pb2.ReadContentResponse]:
        return [
            r
            async for r in stub.Read(
                content_pb2.ReadContentRequest(digest=sha(blob), offset=offset, size=size)
            )
        ]

    tiny = await read(512, 4)
    assert [(r.offset, r.data) for r in tiny] == [(512, blob[512:516])]
    whole = await read(0, 0)
    assert [len(r.data) for r in whole] == [READ_PIECE, READ_PIECE, len(blob) - 2 * READ_PIECE]
    assert b"".join(r.data for r in whole) == blob
    assert [(r.offset, r.data) for r in await read(-10, 3)] == [(0, blob[:3])]
    assert b"".join(r.data for r in await read(len(blob) - 5, -1)) == blob[-5:]
    assert await read(len(blob), 0) == []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read(len(blob) + 1, 1)
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE


async def test_wire_list_batches(stub: content_pb2_grpc.ContentStub) -> None:
    for i in range(150):
        data = f"blob {i}".encode()
        await lockstep(
            stub,
            [
                req(STAT, ref=f"r{i}"),
                req(WRITE, data=data),
                req(COMMIT, offset=len(data), expected=sha(data)),
            ],
        )
    batches = [r async for r in stub.List(content_pb2.ListContentRequest())]
    assert [len(b.info) for b in batches] == [100, 50]


async def test_small_read_fast_path_matches_general_path(store: Any, chunks: ChunkStore) -> None:
    """The one-pread fast path (cached fd) answers exactly like the general path, and never
    serves a deleted blob from a stale fd."""
    data = bytes(range(256)) * 1000
    digest = await ingest(store, "fast-path", data)
    assert await read_all(store, digest, 0, 10) == data[:10]  # opens and caches the fd
    for offset, size in [(0, 4), (512, 508), (1000, 32 << 10), (len(data) - 3, 100)]:
        assert await read_all(store, digest, offset, size) == data[offset : offset + size]
    await store.delete(digest)
    with pytest.raises(NotFound):
        await read_all(store, digest, 0, 4)
