"""snapshotter.h2server against real grpcio clients (grpc.aio and sync) and a raw HTTP/2 client.

The test servicer is built from the real generated content stubs and keeps blobs in a dict.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import struct
import time
from pathlib import Path

import grpc
import hpack
import pytest
import structlog

from snapshotter import h2call, h2server, h2wire
from snapshotter.api import content_pb2, content_pb2_grpc

W = content_pb2.WriteAction


class MemContent(content_pb2_grpc.ContentServicer):
    """In-memory content store plus a few knobs for error paths (driven through Status refs)."""

    def __init__(self, chunk: int = 1 << 20) -> None:
        self.blobs: dict[str, bytes] = {}
        self.chunk = chunk
        self.read_cleanups = 0
        self.read_started = asyncio.Event()
        self.cancelled: list[str] = []

    async def Info(self, request, context):
        blob = self.blobs.get(request.digest)
        if blob is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"content {request.digest}: not found")
        return content_pb2.InfoResponse(info=content_pb2.Info(digest=request.digest, size=len(blob)))

    async def Read(self, request, context):
        if request.digest == "late-end":  # one message, then a suspension before the stream ends
            yield content_pb2.ReadContentResponse(offset=0, data=b"first")
            await asyncio.sleep(0.01)
            return
        if request.digest == "late-empty":  # suspends, then ends without a message
            await asyncio.sleep(0.01)
            return
        blob = self.blobs.get(request.digest)
        if blob is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "not found")
        offset = max(request.offset, 0)
        if offset > len(blob):
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, "offset past end")
        end = len(blob) if request.size <= 0 else min(len(blob), offset + request.size)
        try:
            while offset < end:
                n = min(self.chunk, end - offset)
                if request.digest.startswith("slow"):
                    self.read_started.set()
                    await asyncio.sleep(0.01)
                yield content_pb2.ReadContentResponse(offset=offset, data=blob[offset : offset + n])
                offset += n
        finally:
            self.read_cleanups += 1

    async def Status(self, request, context):
        ref = request.ref
        if ref.startswith("sleep:"):
            try:
                await asyncio.sleep(float(ref[6:]))
            except asyncio.CancelledError:
                self.cancelled.append(ref)
                raise
        elif ref == "boom":
            raise ValueError("kaboom")
        elif ref.startswith("abort:"):
            try:
                raise KeyError(ref)
            except KeyError:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, ref[6:])
        elif ref == "metadata":
            md = dict(context.invocation_metadata())
            return content_pb2.StatusResponse(status=content_pb2.Status(ref=md.get("x-echo", "")))
        elif ref == "deadline":
            remaining = context.time_remaining()
            return content_pb2.StatusResponse(status=content_pb2.Status(ref=f"{remaining:.3f}"))
        elif ref == "set_code":
            context.set_code(grpc.StatusCode.ALREADY_EXISTS)
            context.set_details("exists")
            return content_pb2.StatusResponse()
        return content_pb2.StatusResponse(status=content_pb2.Status(ref=ref, offset=len(ref)))

    async def List(self, request, context):
        for digest in sorted(self.blobs):
            yield content_pb2.ListContentResponse(info=[content_pb2.Info(digest=digest)])

    async def Write(self, request_iterator, context):
        ref = None
        data = bytearray()
        async for req in request_iterator:
            if req.action == W.STAT:
                if ref is None and not req.ref:  # only the first message names the ref
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "ref required")
                ref = ref or req.ref
                yield content_pb2.WriteContentResponse(action=W.STAT, offset=len(data), total=req.total)
            elif req.action == W.WRITE:
                if req.offset != len(data):
                    await context.abort(grpc.StatusCode.OUT_OF_RANGE, f"offset {req.offset} != {len(data)}")
                data += req.data
                yield content_pb2.WriteContentResponse(action=W.WRITE, offset=len(data))
            elif req.action == W.COMMIT:
                digest = "sha256:" + hashlib.sha256(data).hexdigest()
                if req.expected and req.expected != digest:
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "digest mismatch")
                self.blobs[digest] = bytes(data)
                yield content_pb2.WriteContentResponse(action=W.COMMIT, offset=len(data), digest=digest)
                return
        assert ref is not None


@pytest.fixture
def sock(tmp_path: Path) -> str:
    return str(tmp_path / "h2.sock")


@pytest.fixture
async def served(sock: str):
    servicer = MemContent()
    server = h2server.server([("grpc.max_receive_message_length", 4 << 20)])
    content_pb2_grpc.add_ContentServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix:{sock}")
    await server.start()
    yield server, servicer
    await server.stop(None)


@pytest.fixture
async def stub(served, sock: str):
    async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
        yield content_pb2_grpc.ContentStub(channel)


def blob_of(n: int, seed: int = 1) -> bytes:
    return (hashlib.sha256(str(seed).encode()).digest() * (n // 32 + 1))[:n]


# ------------------------------------------------------------------------------------------- grpc.aio


async def test_unary_and_not_found(served, stub) -> None:
    _, svc = served
    svc.blobs["sha256:a"] = b"hello"
    resp = await stub.Info(content_pb2.InfoRequest(digest="sha256:a"))
    assert resp.info.size == 5
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Info(content_pb2.InfoRequest(digest="sha256:nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "content sha256:nope: not found"


async def test_server_streaming_large(served, stub) -> None:
    _, svc = served
    blob = blob_of(9 * (1 << 20) + 123)
    svc.blobs["big"] = blob
    got = bytearray()
    async for msg in stub.Read(content_pb2.ReadContentRequest(digest="big")):
        assert msg.offset == len(got)
        got += msg.data
    assert bytes(got) == blob
    # partial range, size larger than the rest
    parts = [
        m.data async for m in stub.Read(content_pb2.ReadContentRequest(digest="big", offset=5, size=1 << 30))
    ]
    assert b"".join(parts) == blob[5:]


async def test_streaming_error_after_messages_and_before(served, stub) -> None:
    _, svc = served
    svc.blobs["x"] = b"abc"
    call = stub.Read(content_pb2.ReadContentRequest(digest="x", offset=10))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in call:
            pass
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert [m.data async for m in stub.Read(content_pb2.ReadContentRequest(digest="x", size=0))] == [b"abc"]


async def test_bidi_write_lockstep_1mib(served, stub) -> None:
    _, svc = served
    blob = blob_of(6 * (1 << 20) + 7, seed=2)
    call = stub.Write()
    await call.write(content_pb2.WriteContentRequest(action=W.STAT, ref="r1", total=len(blob)))
    resp = await call.read()
    assert resp.action == W.STAT and resp.offset == 0 and resp.total == len(blob)
    for off in range(0, len(blob), 1 << 20):
        await call.write(
            content_pb2.WriteContentRequest(action=W.WRITE, offset=off, data=blob[off : off + (1 << 20)])
        )
        resp = await call.read()  # strict lockstep: one response per request before the next
        assert resp.offset == min(len(blob), off + (1 << 20))
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    await call.write(content_pb2.WriteContentRequest(action=W.COMMIT, expected=digest))
    resp = await call.read()
    assert resp.digest == digest
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK
    assert svc.blobs[digest] == blob


async def test_bidi_abort_midstream(served, stub) -> None:
    call = stub.Write()
    await call.write(content_pb2.WriteContentRequest(action=W.STAT, ref="r2"))
    await call.read()
    await call.write(content_pb2.WriteContentRequest(action=W.WRITE, offset=99, data=b"x"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert err.value.details() == "offset 99 != 0"


async def test_request_too_large(served, stub) -> None:
    call = stub.Write()
    await call.write(content_pb2.WriteContentRequest(action=W.STAT, ref="r3"))
    await call.read()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.write(content_pb2.WriteContentRequest(action=W.WRITE, data=b"y" * (5 << 20)))
        await call.read()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # the connection is still fine
    assert (await stub.Status(content_pb2.StatusRequest(ref="ok"))).status.ref == "ok"


async def test_client_cancel_midstream(served, stub) -> None:
    _, svc = served
    svc.blobs["slow"] = blob_of(200 * 4096)
    svc.chunk = 4096
    call = stub.Read(content_pb2.ReadContentRequest(digest="slow"))
    n = 0
    async for _ in call:
        n += 1
        if n == 3:
            break
    call.cancel()
    for _ in range(100):
        if svc.read_cleanups:
            break
        await asyncio.sleep(0.01)
    assert svc.read_cleanups == 1  # the handler's finally ran: the generator was closed/cancelled
    assert (await stub.Status(content_pb2.StatusRequest(ref="after"))).status.ref == "after"


@pytest.mark.parametrize(
    "message",
    ["plain", "100% done", "naïve – ünïcödé ✓ 日本", "tab\tnewline\nend", "x" * 3000],
)
async def test_abort_codes_and_messages(served, stub, message: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Status(content_pb2.StatusRequest(ref="abort:" + message))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details() == message


async def test_unhandled_exception_is_unknown(served, stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Status(content_pb2.StatusRequest(ref="boom"))
    assert err.value.code() == grpc.StatusCode.UNKNOWN
    assert "kaboom" in err.value.details()


async def test_set_code_without_abort(served, stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Status(content_pb2.StatusRequest(ref="set_code"))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert err.value.details() == "exists"


async def test_unimplemented(served, stub, sock: str) -> None:
    # servicer method not overridden: the generated base class sets UNIMPLEMENTED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Delete(content_pb2.DeleteContentRequest(digest="x"))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # unknown method path
    async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
        call = channel.unary_unary("/no.such.Service/Nope")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(b"\x01\x02")
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        call = channel.stream_stream("/containerd.services.content.v1.Content/Nope")()
        await call.write(b"a")
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.UNIMPLEMENTED
        assert await call.details() == "Method not found: /containerd.services.content.v1.Content/Nope"


async def test_deadline_exceeded(served, stub) -> None:
    _, svc = served
    t0 = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Status(content_pb2.StatusRequest(ref="sleep:5"), timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 2
    for _ in range(100):
        if svc.cancelled:
            break
        await asyncio.sleep(0.01)
    assert svc.cancelled == ["sleep:5"]  # the server cancelled the handler at its deadline
    resp = await stub.Status(content_pb2.StatusRequest(ref="deadline"), timeout=30)
    assert 25 < float(resp.status.ref) <= 31  # grpc core rounds the timeout it sends up


async def test_metadata_varies_per_call(served, stub) -> None:
    # exercises the header-block cache: same method, different (dynamically indexed) values
    for i in range(50):
        value = f"v{i % 7}-{'y' * (i % 3)}"
        resp = await stub.Status(content_pb2.StatusRequest(ref="metadata"), metadata=(("x-echo", value),))
        assert resp.status.ref == value


async def test_concurrent_rpcs_one_connection(served, stub) -> None:
    _, svc = served
    svc.blobs["c"] = blob_of(300_000)

    async def read(i: int) -> bytes:
        return b"".join(
            [m.data async for m in stub.Read(content_pb2.ReadContentRequest(digest="c", offset=i))]
        )

    async def status(i: int) -> str:
        return (await stub.Status(content_pb2.StatusRequest(ref=f"sleep:0.0{i % 5}"))).status.ref

    results = await asyncio.gather(*(read(i) for i in range(40)), *(status(i) for i in range(40)))
    for i in range(40):
        assert results[i] == svc.blobs["c"][i:]
        assert results[40 + i] == f"sleep:0.0{i % 5}"


async def test_concurrent_rpcs_several_connections(served, sock: str) -> None:
    _, svc = served
    svc.blobs["m"] = blob_of(100_000)
    channels = [
        grpc.aio.insecure_channel(f"unix:{sock}", options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(4)
    ]
    try:
        stubs = [content_pb2_grpc.ContentStub(c) for c in channels]

        async def work(s, i: int) -> None:
            for j in range(10):
                parts = [m.data async for m in s.Read(content_pb2.ReadContentRequest(digest="m", offset=j))]
                assert b"".join(parts) == svc.blobs["m"][j:]
                assert (await s.Status(content_pb2.StatusRequest(ref=f"{i}-{j}"))).status.ref == f"{i}-{j}"

        await asyncio.gather(*(work(s, i) for i, s in enumerate(stubs) for _ in range(3)))
    finally:
        for c in channels:
            await c.close()
    server, _ = served
    assert len(server._connections) >= 2


async def test_graceful_stop_lets_inflight_finish(sock: str) -> None:
    server = h2server.server()
    content_pb2_grpc.add_ContentServicer_to_server(MemContent(), server)
    server.add_insecure_port(f"unix:{sock}")
    await server.start()
    async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
        stub = content_pb2_grpc.ContentStub(channel)
        await stub.Status(content_pb2.StatusRequest(ref="warm"))
        inflight = asyncio.ensure_future(stub.Status(content_pb2.StatusRequest(ref="sleep:0.5")))
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        await server.stop(5)
        assert 0.2 < time.monotonic() - t0 < 4
        assert (await inflight).status.ref == "sleep:0.5"
        assert await server.wait_for_termination(0.1)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Status(content_pb2.StatusRequest(ref="late"), timeout=2)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


async def test_stop_grace_expires_cancels_handler(sock: str) -> None:
    server = h2server.server()
    svc = MemContent()
    content_pb2_grpc.add_ContentServicer_to_server(svc, server)
    server.add_insecure_port(f"unix:{sock}")
    await server.start()
    async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
        stub = content_pb2_grpc.ContentStub(channel)
        inflight = asyncio.ensure_future(stub.Status(content_pb2.StatusRequest(ref="sleep:30")))
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        await server.stop(0.3)
        assert time.monotonic() - t0 < 3
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await inflight
        assert err.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        assert svc.cancelled == ["sleep:30"]


async def test_inline_disabled_same_behaviour(sock: str) -> None:
    server = h2server.server(inline_handlers=False)
    svc = MemContent()
    svc.blobs["d"] = blob_of(3 << 20)
    content_pb2_grpc.add_ContentServicer_to_server(svc, server)
    server.add_insecure_port(f"unix:{sock}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
            stub = content_pb2_grpc.ContentStub(channel)
            parts = [m.data async for m in stub.Read(content_pb2.ReadContentRequest(digest="d"))]
            assert b"".join(parts) == svc.blobs["d"]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Info(content_pb2.InfoRequest(digest="missing"))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await server.stop(None)


# ------------------------------------------------------------------------------------------- sync grpc


async def test_sync_client_many_sequential_small_rpcs(served, sock: str) -> None:
    _, svc = served
    blob = blob_of(1 << 20, seed=3)
    svc.blobs["s"] = blob

    def run() -> None:
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            stub = content_pb2_grpc.ContentStub(channel)
            for i in range(2000):
                off = (i * 4099) % (len(blob) - 600)
                size = (4, 508, 512, 32768)[i % 4]
                msgs = list(stub.Read(content_pb2.ReadContentRequest(digest="s", offset=off, size=size)))
                assert len(msgs) == 1 and msgs[0].offset == off
                assert msgs[0].data == blob[off : off + size]
                if i % 100 == 0:
                    assert stub.Info(content_pb2.InfoRequest(digest="s")).info.size == len(blob)

    await asyncio.to_thread(run)


async def test_sync_client_bidi_and_errors(served, sock: str) -> None:
    _, svc = served
    blob = blob_of(3 << 20, seed=4)

    def run() -> str:
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            stub = content_pb2_grpc.ContentStub(channel)
            reqs = [content_pb2.WriteContentRequest(action=W.STAT, ref="s1", total=len(blob))]
            reqs += [
                content_pb2.WriteContentRequest(action=W.WRITE, offset=o, data=blob[o : o + (1 << 20)])
                for o in range(0, len(blob), 1 << 20)
            ]
            reqs.append(content_pb2.WriteContentRequest(action=W.COMMIT))
            resps = list(stub.Write(iter(reqs)))
            assert len(resps) == len(reqs)
            with pytest.raises(grpc.RpcError) as err:
                stub.Status(content_pb2.StatusRequest(ref="abort:nöpe"))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert err.value.details() == "nöpe"
            return resps[-1].digest

    digest = await asyncio.to_thread(run)
    assert svc.blobs[digest] == blob


# ------------------------------------------------------------------------------------------- raw HTTP/2


def _frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return struct.pack(">IBI", len(payload) << 8 | ftype, flags, sid) + payload


class RawClient:
    """Just enough of an HTTP/2 client to poke at framing details grpcio never produces."""

    def __init__(self, path: str, settings: dict[int, int] | None = None) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(5)
        self.s.connect(path)
        self.enc = hpack.Encoder()
        self.dec = hpack.Decoder()
        self.buf = b""
        payload = b"".join(struct.pack(">HI", k, v) for k, v in (settings or {}).items())
        self.s.sendall(h2wire.PREFACE + _frame(4, 0, 0, payload))

    def send(self, data: bytes) -> None:
        self.s.sendall(data)

    def frame(self) -> tuple[int, int, int, bytes]:
        while True:
            if len(self.buf) >= 9:
                lt, flags, sid = struct.unpack_from(">IBI", self.buf)
                end = 9 + (lt >> 8)
                if len(self.buf) >= end:
                    payload, self.buf = self.buf[9:end], self.buf[end:]
                    return lt & 0xFF, flags, sid & 0x7FFFFFFF, payload
            chunk = self.s.recv(1 << 16)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk

    def headers_block(self, path: str, extra: tuple = ()) -> bytes:
        return self.enc.encode(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", "localhost"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                *extra,
            ]
        )

    def collect(self, sid: int, on_data=None) -> tuple[bytes, dict]:
        """DATA payload and trailers of stream `sid` (answers PINGs, ignores other streams)."""
        data = b""
        headers: dict = {}
        while True:
            ftype, flags, fsid, payload = self.frame()
            if ftype == 6 and not flags & 1:
                self.send(_frame(6, 1, 0, payload))
            if fsid != sid:
                continue
            if ftype == 0:
                data += payload
                if on_data:
                    on_data(len(payload))
            elif ftype == 1:
                headers.update(dict(self.dec.decode(payload)))
            elif ftype == 3:
                raise AssertionError(f"RST_STREAM {payload.hex()}")
            if flags & 1 and ftype in (0, 1):
                return data, headers

    def close(self) -> None:
        self.s.close()


def _grpc_msg(msg) -> bytes:
    body = msg.SerializeToString()
    return struct.pack(">BI", 0, len(body)) + body


def _parse_msgs(data: bytes, cls) -> list:
    out, i = [], 0
    while i < len(data):
        _, n = struct.unpack_from(">BI", data, i)
        out.append(cls.FromString(data[i + 5 : i + 5 + n]))
        i += 5 + n
    return out


async def test_raw_continuation_padding_priority_ping(served, sock: str) -> None:
    _, svc = served
    svc.blobs["r"] = blob_of(1000)

    # The PING in the middle of a header block is a protocol error: check the server says so.
    def run_bad() -> None:
        c = RawClient(sock)
        block = c.headers_block("/containerd.services.content.v1.Content/Read")
        c.send(_frame(1, 0, 1, block[:5]))
        c.send(_frame(6, 0, 0, b"pingpong"))
        while True:
            ftype, _, _, payload = c.frame()
            if ftype == 7:  # GOAWAY
                assert struct.unpack(">II", payload[:8])[1] == 1  # PROTOCOL_ERROR
                break
        c.close()

    def run_ping() -> None:
        c = RawClient(sock)
        c.send(_frame(6, 0, 0, b"12345678"))
        while True:
            ftype, flags, _, payload = c.frame()
            if ftype == 6:
                assert flags & 1 and payload == b"12345678"
                break
        c.close()

    await asyncio.to_thread(run_bad)
    await asyncio.to_thread(run_ping)
    await asyncio.to_thread(_raw_good_path, sock, svc)


def _raw_good_path(sock: str, svc: MemContent) -> None:
    c = RawClient(sock)
    block = c.headers_block("/containerd.services.content.v1.Content/Read", extra=(("x-pad", "p" * 300),))
    a, b, rest = block[:10], block[10:50], block[50:]
    c.send(_frame(1, 0x8 | 0x20, 1, bytes([3]) + struct.pack(">IB", 0, 15) + a + b"\0\0\0"))
    c.send(_frame(9, 0, 1, b))
    c.send(_frame(9, 0x4, 1, rest))
    msg = _grpc_msg(content_pb2.ReadContentRequest(digest="r", offset=10, size=100))
    c.send(_frame(0, 0x1 | 0x8, 1, bytes([4]) + msg + b"\0\0\0\0"))
    data, trailers = c.collect(1)
    assert trailers["grpc-status"] == "0"
    [resp] = _parse_msgs(data, content_pb2.ReadContentResponse)
    assert resp.data == svc.blobs["r"][10:110]
    # second RPC on the connection reuses the (now indexed) header block: cache path
    block = c.headers_block("/containerd.services.content.v1.Content/Read", extra=(("x-pad", "p" * 300),))
    c.send(_frame(1, 0x4, 3, block) + _frame(0, 0x1, 3, msg))
    data, trailers = c.collect(3)
    assert _parse_msgs(data, content_pb2.ReadContentResponse)[0].data == svc.blobs["r"][10:110]
    c.close()


async def test_raw_flow_control_small_windows(served, sock: str) -> None:
    """Peer with a 1000-byte stream window and 16 KiB frames: the server must never overrun either."""
    _, svc = served
    blob = blob_of(200_000, seed=5)
    svc.blobs["f"] = blob
    svc.chunk = 70_000

    def run() -> None:
        c = RawClient(sock, settings={0x4: 1000})  # INITIAL_WINDOW_SIZE
        # wait for the server's SETTINGS ack so the small window is in force
        while True:
            ftype, flags, _, _ = c.frame()
            if ftype == 4 and flags & 1:
                break
        block = c.headers_block("/containerd.services.content.v1.Content/Read")
        msg = _grpc_msg(content_pb2.ReadContentRequest(digest="f"))
        c.send(_frame(1, 0x4, 1, block) + _frame(0, 0x1, 1, msg))
        window = {"stream": 1000, "conn": 65535}

        def on_data(n: int) -> None:
            assert n <= 16384
            window["stream"] -= n
            window["conn"] -= n
            assert window["stream"] >= 0 and window["conn"] >= 0, window
            if window["stream"] < 500:  # top both windows up by a little
                c.send(_frame(8, 0, 1, struct.pack(">I", 1500)) + _frame(8, 0, 0, struct.pack(">I", 1500)))
                window["stream"] += 1500
                window["conn"] += 1500

        data, trailers = c.collect(1, on_data)
        assert trailers["grpc-status"] == "0"
        msgs = _parse_msgs(data, content_pb2.ReadContentResponse)
        assert b"".join(m.data for m in msgs) == blob
        # raising INITIAL_WINDOW_SIZE mid-stream releases blocked data (RFC 9113 6.9.2)
        c.send(_frame(1, 0x4, 3, c.headers_block("/containerd.services.content.v1.Content/Read")))
        c.send(_frame(0, 0x1, 3, msg) + _frame(8, 0, 0, struct.pack(">I", 1 << 20)))
        time.sleep(0.05)
        c.send(_frame(4, 0, 0, struct.pack(">HI", 0x4, 1 << 20)))
        data, trailers = c.collect(3)
        assert b"".join(m.data for m in _parse_msgs(data, content_pb2.ReadContentResponse)) == blob
        c.close()

    await asyncio.to_thread(run)


async def test_raw_rst_stream_cancels_handler(served, sock: str) -> None:
    _, svc = served

    def run() -> None:
        c = RawClient(sock)
        block = c.headers_block("/containerd.services.content.v1.Content/Status")
        msg = _grpc_msg(content_pb2.StatusRequest(ref="sleep:30"))
        c.send(_frame(1, 0x4, 1, block) + _frame(0, 0x1, 1, msg))
        time.sleep(0.2)
        c.send(_frame(3, 0, 1, struct.pack(">I", 0x8)))  # RST_STREAM CANCEL
        time.sleep(0.2)
        # the connection keeps working; no trailers arrive for stream 1
        block = c.headers_block("/containerd.services.content.v1.Content/Status")
        c.send(_frame(1, 0x4, 3, block) + _frame(0, 0x1, 3, _grpc_msg(content_pb2.StatusRequest(ref="ok"))))
        data, trailers = c.collect(3)
        assert trailers["grpc-status"] == "0"
        c.close()

    await asyncio.to_thread(run)
    assert svc.cancelled == ["sleep:30"]


def test_percent_encode() -> None:
    assert h2server.percent_encode("a b%c") == b"a b%25c"
    assert h2server.percent_encode("ü\n") == b"%C3%BC%0A"


def test_table_neutral() -> None:
    enc = hpack.Encoder()
    first = enc.encode([(":method", "POST"), (":path", "/a/b"), ("x", "y")])
    again = enc.encode([(":method", "POST"), (":path", "/a/b"), ("x", "y")])
    assert not h2wire.table_neutral(first)  # literal with incremental indexing
    assert h2wire.table_neutral(again)  # all indexed
    lit = enc.encode([("x-never", "v")], huffman=False)
    assert not h2wire.table_neutral(lit)
    no_index = h2wire.literal(b"x-lit", b"v" * 200) + b"\x82"
    assert h2wire.table_neutral(no_index)
    assert not h2wire.table_neutral(b"\x3f\xe1\x1f")  # dynamic table size update


def test_abort_error_is_grpc_aio_abort_error() -> None:
    assert issubclass(h2server.AbortError, grpc.aio.AbortError)


async def test_handlers_registered_like_grpc(sock: str) -> None:
    server = h2server.server()
    content_pb2_grpc.add_ContentServicer_to_server(MemContent(), server)
    assert "/containerd.services.content.v1.Content/Read" in server._methods
    assert server._methods["/containerd.services.content.v1.Content/Write"].kind == h2call.K_SS
    await server.stop(None)


class _OnlyGeneric(grpc.GenericRpcHandler):
    """A hand-written generic handler (no per-method table): reached only through service()."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        self.asked.append(handler_call_details.method)
        md = dict(handler_call_details.invocation_metadata)
        if handler_call_details.method != "/x.Echo/Say":
            return None

        async def say(request: bytes, context: h2server.ServicerContext) -> bytes:
            return md.get("x-prefix", "").encode() + request

        return grpc.unary_unary_rpc_method_handler(say)


async def test_generic_handlers_through_public_service(sock: str) -> None:
    """Handlers registered only as generic handlers are found through their public `service()`,
    once per call, with the call's method and metadata (no grpcio private attributes)."""
    generic = _OnlyGeneric()
    server = h2server.server(handlers=[generic])
    server.add_insecure_port(f"unix:{sock}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
            say = channel.unary_unary("/x.Echo/Say")
            assert await say(b"one", metadata=(("x-prefix", "a:"),)) == b"a:one"
            assert await say(b"two", metadata=(("x-prefix", "b:"),)) == b"b:two"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channel.unary_unary("/x.Echo/Other")(b"?")
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert generic.asked == ["/x.Echo/Say", "/x.Echo/Say", "/x.Echo/Other"]
    finally:
        await server.stop(None)


async def test_handler_errors_are_logged_through_structlog(served, sock: str) -> None:
    """A handler's unexpected exception is logged once, as a structlog event naming the method
    (stdlib logging is not used), and the client gets UNKNOWN with the exception in the details."""
    with structlog.testing.capture_logs() as logs:
        async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
            stub = content_pb2_grpc.ContentStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Status(content_pb2.StatusRequest(ref="boom"))
    assert err.value.code() == grpc.StatusCode.UNKNOWN and "kaboom" in err.value.details()
    failed = [e for e in logs if e["event"] == "h2server.handler_failed"]
    assert len(failed) == 1 and failed[0]["log_level"] == "error"
    assert failed[0]["method"] == "/containerd.services.content.v1.Content/Status"


async def test_inherited_socket_outlives_the_server(tmp_path: Path) -> None:
    """A listening socket passed in (systemd) keeps its file when the server stops, on every
    Python (3.13's create_unix_server would unlink it by default), and clients that connect
    meanwhile wait in its backlog for the next server."""
    path = str(tmp_path / "inherited.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    try:
        for ref in ("first", "second"):
            server = h2server.server()
            content_pb2_grpc.add_ContentServicer_to_server(MemContent(), server)
            server.add_socket(listener.dup())  # as each daemon gets its own fd from systemd
            await server.start()
            # A channel of its own subchannel pool: by default grpc shares one connection per target
            # across channels, and the second channel could be handed the first server's, closed by
            # its stop ("sendmsg: Broken pipe"), before grpc notices and reconnects.
            local = [("grpc.use_local_subchannel_pool", 1)]
            async with grpc.aio.insecure_channel(f"unix:{path}", options=local) as channel:
                resp = await content_pb2_grpc.ContentStub(channel).Status(content_pb2.StatusRequest(ref=ref))
                assert resp.status.ref == ref
            await server.stop(None)
            assert Path(path).is_socket()
    finally:
        listener.close()


def _error_after(frames: bytes, sock: str) -> tuple[list[int], list[int]]:
    """GOAWAY codes and RST_STREAM codes the server answers `frames` with (until it closes, or
    until a PING sent after them comes back)."""
    c = RawClient(sock)
    c.send(frames + _frame(6, 0, 0, b"probe123"))
    goaways, resets = [], []
    try:
        while True:
            ftype, flags, _, payload = c.frame()
            if ftype == 7:
                goaways.append(struct.unpack(">II", payload[:8])[1])
            elif ftype == 3:
                resets.append(struct.unpack(">I", payload)[0])
            elif ftype == 6 and flags & 1 and payload == b"probe123":
                break
    except (ConnectionError, OSError):
        pass
    c.close()
    return goaways, resets


@pytest.mark.parametrize(
    ("frames", "goaway", "reset"),
    [
        (_frame(3, 0, 7, b"\0\0\0\x08"), [0x1], []),  # RST_STREAM on an idle stream: PROTOCOL_ERROR
        (_frame(3, 0, 1, b"\0"), [0x6], []),  # RST_STREAM of the wrong length: FRAME_SIZE_ERROR
        (_frame(8, 0, 5, b"\0\0\0\x01"), [0x1], []),  # WINDOW_UPDATE on an idle stream
        (_frame(7, 0, 0, b"\0"), [0x6], []),  # GOAWAY shorter than 8 bytes
        (_frame(1, 0x8 | 0x4, 1, b""), [0x6], []),  # PADDED HEADERS without a pad length
        (_frame(0, 0, 1, b"x"), [0x1], []),  # DATA on an idle stream
        (_frame(0x42, 0, 0, b"z" * 100), [], []),  # unknown frame type: ignored
    ],
    ids=["rst-idle", "rst-length", "window-idle", "goaway-short", "headers-no-pad", "data-idle", "unknown"],
)
async def test_malformed_frames_get_the_rfc_error_code(served, sock: str, frames, goaway, reset) -> None:
    """RFC 9113's error for each malformed frame; the connection ends only on a connection error."""
    assert await asyncio.to_thread(_error_after, frames, sock) == (goaway, reset)


async def test_unknown_frame_larger_than_the_control_limit_is_skipped_unread(served, sock: str) -> None:
    """An extension frame of 1 MiB is dropped as it streams in (never gathered), and the
    connection goes on serving."""
    _, svc = served
    svc.blobs["u"] = blob_of(100)

    def run() -> bytes:
        c = RawClient(sock)
        c.send(struct.pack(">IBI", (1 << 20) << 8 | 0x42, 0, 0))
        for _ in range(16):
            c.send(b"\0" * (1 << 16))
        c.send(_frame(1, 0x4, 1, c.headers_block("/containerd.services.content.v1.Content/Read")))
        c.send(_frame(0, 0x1, 1, _grpc_msg(content_pb2.ReadContentRequest(digest="u"))))
        data, trailers = c.collect(1)
        assert trailers["grpc-status"] == "0"
        c.close()
        return _parse_msgs(data, content_pb2.ReadContentResponse)[0].data

    assert await asyncio.to_thread(run) == svc.blobs["u"]


async def test_stream_that_suspends_before_it_ends(served, sock: str) -> None:
    """A response stream whose handler suspends after its last message (or before any) and then
    returns ends with OK: the end of the generator after a suspension is not an error."""
    async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
        stub = content_pb2_grpc.ContentStub(channel)
        got = [m.data async for m in stub.Read(content_pb2.ReadContentRequest(digest="late-end"))]
        assert got == [b"first"]
        assert [m async for m in stub.Read(content_pb2.ReadContentRequest(digest="late-empty"))] == []


async def test_raw_messages_split_into_the_peers_frames(served, sock: str) -> None:
    """A peer that keeps the default 16 KiB max frame size (grpc-go does) with wide windows gets
    each message in frames no larger than that, in order, whole."""
    _, svc = served
    blob = blob_of(300_000, seed=6)
    svc.blobs["g"] = blob
    svc.chunk = 40_000  # a message spans three frames

    def run() -> None:
        c = RawClient(sock, settings={0x4: 1 << 24})
        c.send(_frame(8, 0, 0, struct.pack(">I", 1 << 24)))
        block = c.headers_block("/containerd.services.content.v1.Content/Read")
        msg = _grpc_msg(content_pb2.ReadContentRequest(digest="g"))
        c.send(_frame(1, 0x4, 1, block) + _frame(0, 0x1, 1, msg))
        sizes: list[int] = []
        data, trailers = c.collect(1, sizes.append)
        assert trailers["grpc-status"] == "0"
        assert max(sizes) == 16384 and len(sizes) > 300_000 // 16384
        assert b"".join(m.data for m in _parse_msgs(data, content_pb2.ReadContentResponse)) == blob
        c.close()

    await asyncio.to_thread(run)
