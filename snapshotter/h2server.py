"""A minimal gRPC-over-HTTP/2 server on asyncio, tuned for many small sequential RPCs.

containerd 1.6 unpacks a layer through the content proxy with one server-streaming `Read` RPC per
32 KiB ReadAt, strictly one after another. grpcio (sync or asyncio) and grpclib spend ~0.7 ms of server
CPU on each such RPC; this server does the same work in a fraction of that by speaking just the part of
HTTP/2 (RFC 9113) that gRPC clients use, over a unix socket with prior knowledge (cleartext h2, which is
what grpc-go uses there), directly on an `asyncio.Protocol`.

Drop-in for `grpc.aio.server()` as far as PeerSync needs:

    server = H2Server(options=[("grpc.max_receive_message_length", 16 << 20)])
    content_pb2_grpc.add_ContentServicer_to_server(servicer, server)   # generated code works unchanged
    server.add_insecure_port("unix:/run/peersync.sock")
    await server.start(); ...; await server.stop(grace=5)

Handlers follow the grpc.aio conventions: `async def` for unary responses, async generators for
streamed responses, and an async iterator of requests for streamed requests; `context` is a
`ServicerContext` offering the grpc.aio methods servicers use (`abort` raises a subclass of
`grpc.aio.AbortError`).

Performance notes:
- HPACK decoding uses the `hpack` library, but decoded header blocks are cached per connection. A
  block is cached only when it leaves the decoder's dynamic table untouched (indexed fields and
  literals without indexing); the cache key is the block's bytes, valid for one "table generation",
  which advances whenever a block that could touch the table (incremental indexing, size update) is
  decoded. Indexed lookups in `hpack` are pure reads, so an identical block under an unchanged table
  decodes to the same header list. grpc-go indexes every header it sends, so from the second RPC on a
  method onwards its request header blocks are all-indexed and hit the cache.
- Our own header blocks are constant bytes built from static-table indices and literals without
  indexing, so the peer's dynamic table (and its SETTINGS_HEADER_TABLE_SIZE) never matters.
- Unary-request handlers run their first step inline in `data_received` (inside a copied
  `contextvars` context, like a Task would); only when the handler actually suspends is the rest
  handed to an `asyncio.Task`. A response stream that yields its messages and ends without suspending
  is written as HEADERS+DATA+trailers in one `transport.write`. Consequence: code that runs before a
  handler's first real suspension sees `asyncio.current_task() is None` (so e.g. `asyncio.timeout()`
  must not be entered before the first await); pass `inline_handlers=False` to always use a Task.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import logging
import os
import re
import socket
import stat
import struct
import types
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc
import hpack

__all__ = ["AbortError", "H2Server", "ServicerContext", "server"]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# HTTP/2 constants

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

T_DATA, T_HEADERS, T_PRIORITY, T_RST_STREAM, T_SETTINGS = 0, 1, 2, 3, 4
T_PUSH_PROMISE, T_PING, T_GOAWAY, T_WINDOW_UPDATE, T_CONTINUATION = 5, 6, 7, 8, 9

F_END_STREAM = 0x1
F_ACK = 0x1
F_END_HEADERS = 0x4
F_PADDED = 0x8
F_PRIORITY = 0x20

E_NO_ERROR, E_PROTOCOL, E_INTERNAL, E_FLOW_CONTROL = 0x0, 0x1, 0x2, 0x3
E_STREAM_CLOSED, E_FRAME_SIZE, E_REFUSED_STREAM, E_CANCEL, E_COMPRESSION = 0x5, 0x6, 0x7, 0x8, 0x9

S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME = 16384
OUR_MAX_FRAME = 2**24 - 1  # the largest frame a peer may send us (SETTINGS_MAX_FRAME_SIZE)
DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024

_FH = struct.Struct(">IBI")  # frame header: (length << 8 | type), flags, stream id
_DH = struct.Struct(">IBIBI")  # DATA frame header + gRPC message prefix, one pack
_MSGH = struct.Struct(">BI")  # gRPC message prefix: compressed flag, length
_U32 = struct.Struct(">I")
_U32x2 = struct.Struct(">II")
_SETTING = struct.Struct(">HI")

# --------------------------------------------------------------------------------------------------
# HPACK encoding of our (constant) headers: static-table indices and literals without indexing only


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """Literal header field without indexing, new name, no Huffman coding."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


def _literal_indexed_name(index: int, value: bytes) -> bytes:
    """Literal header field without indexing, name from the static table."""
    return _hpack_int(index, 4) + _hpack_int(len(value), 7) + value


# ":status: 200" is static index 8; "content-type" is static index 31.
RESPONSE_HEADERS = b"\x88" + _literal_indexed_name(31, b"application/grpc")
TRAILERS_OK = _literal(b"grpc-status", b"0")
_STATUS_415 = _literal_indexed_name(8, b"415")  # ":status" (static name 8), value 415

_PCT_RE = re.compile(rb"[^\x20-\x24\x26-\x7e]")


def percent_encode(message: str) -> bytes:
    """grpc-message encoding (gRPC HTTP/2 spec): UTF-8, then %XX for bytes outside 0x20-0x7E and '%'."""
    raw = message.encode("utf-8", "replace")
    return _PCT_RE.sub(lambda m: b"%%%02X" % m.group()[0], raw)


_MAX_GRPC_MESSAGE = 8192


def _status_block(code: int, details: str | None, trailing: Sequence[tuple[str, Any]] = ()) -> bytes:
    block = _literal(b"grpc-status", str(code).encode())
    if details:
        encoded = percent_encode(details)
        if len(encoded) > _MAX_GRPC_MESSAGE:  # keep trailers inside one modest header block
            encoded = encoded[:_MAX_GRPC_MESSAGE]
            cut = encoded.rfind(b"%", len(encoded) - 2)
            if cut >= 0:
                encoded = encoded[:cut]
        block += _literal(b"grpc-message", encoded)
    for key, value in trailing:
        block += _metadata_field(key, value)
    return block


def _metadata_field(key: str, value: Any) -> bytes:
    k = key.lower()
    if k.endswith("-bin"):
        raw = value if isinstance(value, bytes | bytearray) else str(value).encode()
        v = base64.b64encode(raw).rstrip(b"=")
    else:
        v = value.encode() if isinstance(value, str) else bytes(value)
    return _literal(k.encode(), v)


def _table_neutral(block: bytes) -> bool:
    """True when decoding `block` cannot change the HPACK dynamic table.

    That holds for blocks made only of indexed fields (RFC 7541 6.1) and literals without indexing /
    never indexed (6.2.2, 6.2.3); a literal with incremental indexing (6.2.1) or a dynamic table size
    update (6.3) disqualifies the block. Malformed input returns False (the decoder reports it)."""
    i, n = 0, len(block)
    try:
        while i < n:
            b = block[i]
            if b & 0x80:  # indexed field, 7-bit prefix integer
                i += 1
                if b & 0x7F == 0x7F:
                    while block[i] & 0x80:
                        i += 1
                    i += 1
                continue
            if b & 0xE0:  # 0x40: incremental indexing; 0x20: size update
                return False
            i += 1  # literal without indexing / never indexed, 4-bit name index
            if b & 0x0F == 0x0F:
                while block[i] & 0x80:
                    i += 1
                i += 1
            strings = 1 if b & 0x0F else 2
            for _ in range(strings):
                ln = block[i] & 0x7F
                i += 1
                if ln == 0x7F:
                    shift = 0
                    while True:
                        c = block[i]
                        i += 1
                        ln += (c & 0x7F) << shift
                        shift += 7
                        if not c & 0x80:
                            break
                i += ln
        return i == n
    except IndexError:
        return False


_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def _parse_timeout(value: str) -> float | None:
    unit = _TIMEOUT_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not digits.isdigit() or len(digits) > 8:
        return None
    return int(digits) * unit


_SKIP_METADATA = frozenset(("content-type", "te", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding"))

# --------------------------------------------------------------------------------------------------
# Status codes

_OK = grpc.StatusCode.OK
_CODE_NUM = {c: c.value[0] for c in grpc.StatusCode}


class AbortError(grpc.aio.AbortError):
    """Raised by `ServicerContext.abort`; code that special-cases grpc.aio.AbortError sees it as one."""


class _RpcStatus(Exception):
    """Internal: finish the RPC with this status (not a handler error)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _HandlerCallDetails:
    __slots__ = ("method", "invocation_metadata")

    def __init__(self, method: str, metadata: tuple) -> None:
        self.method = method
        self.invocation_metadata = metadata


# --------------------------------------------------------------------------------------------------
# Method table

K_UU, K_US, K_SU, K_SS, K_NOT_FOUND = 0, 1, 2, 3, 4


class _Method:
    __slots__ = ("kind", "fn", "deserialize", "serialize", "path")

    def __init__(self, path: str, h: grpc.RpcMethodHandler | None) -> None:
        self.path = path
        if h is None:  # unknown method: answered UNIMPLEMENTED once the client has sent something
            self.kind, self.fn, self.deserialize, self.serialize = K_NOT_FOUND, None, None, None
            return
        if h.request_streaming:
            self.kind, self.fn = (K_SS, h.stream_stream) if h.response_streaming else (K_SU, h.stream_unary)
        else:
            self.kind, self.fn = (K_US, h.unary_stream) if h.response_streaming else (K_UU, h.unary_unary)
        self.deserialize = h.request_deserializer
        self.serialize = h.response_serializer


# --------------------------------------------------------------------------------------------------
# Per-RPC state


class _Stream:
    __slots__ = (
        "sid", "conn", "method", "meta", "ctx", "send_window", "pending", "pending_trailer",
        "headers_sent", "remote_closed", "closed", "cancelled", "expired", "task", "timer", "deadline",
        "body", "rbuf", "queue", "waiter", "recv_credit", "drain", "done_cbs",
    )  # fmt: skip

    def __init__(self, conn: _Connection, sid: int, method: _Method, meta: tuple, send_window: int) -> None:
        self.sid = sid
        self.conn = conn
        self.method = method
        self.meta = meta
        self.ctx: ServicerContext | None = None
        self.send_window = send_window
        self.pending: deque | None = None  # gRPC-framed bytes waiting for flow-control credit
        self.pending_trailer: bytes | None = None
        self.headers_sent = False
        self.remote_closed = False
        self.closed = False
        self.cancelled = False
        self.expired = False
        self.task: asyncio.Task | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.deadline: float | None = None
        self.body: Any = None  # unary request: the DATA received so far
        self.rbuf: bytearray | None = None  # streaming request: undelivered bytes
        self.queue: deque | None = None  # streaming request: complete messages not yet consumed
        self.waiter: asyncio.Future | None = None
        self.recv_credit = 0
        self.drain: asyncio.Future | None = None
        self.done_cbs: list | None = None


class ServicerContext:
    """The part of `grpc.aio.ServicerContext` that servicers use."""

    __slots__ = ("_st", "_code", "_details", "_trailing", "_aborted")

    def __init__(self, st: _Stream) -> None:
        self._st = st
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._trailing: tuple = ()
        self._aborted = False

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence = ()) -> None:
        if code is _OK:
            raise ValueError("abort() needs a non-OK status code")
        self._code = code
        self._details = details
        if trailing_metadata:
            self._trailing = tuple(trailing_metadata)
        self._aborted = True
        raise AbortError()

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str | None:
        return self._details

    def set_trailing_metadata(self, trailing_metadata: Sequence) -> None:
        self._trailing = tuple(trailing_metadata)

    def trailing_metadata(self) -> tuple:
        return self._trailing

    def invocation_metadata(self) -> tuple:
        out = []
        for k, v in self._st.meta:
            if k.endswith("-bin"):
                v = base64.b64decode(v + "=" * (-len(v) % 4))
            out.append((k, v))
        return tuple(out)

    def time_remaining(self) -> float | None:
        dl = self._st.deadline
        if dl is None:
            return None
        return max(0.0, dl - self._st.conn.loop.time())

    def cancelled(self) -> bool:
        return self._st.cancelled or self._st.expired

    def done(self) -> bool:
        return self._st.closed

    def peer(self) -> str:
        return self._st.conn.peer

    def add_done_callback(self, callback: Callable[[ServicerContext], Any]) -> None:
        st = self._st
        if st.closed:
            callback(self)
            return
        if st.done_cbs is None:
            st.done_cbs = []
        st.done_cbs.append(callback)

    def send_initial_metadata(self, initial_metadata: Sequence) -> None:  # noqa: ARG002
        raise NotImplementedError("initial metadata is not supported by h2server")

    def disable_next_message_compression(self) -> None:
        pass

    def set_compression(self, compression: Any) -> None:  # noqa: ARG002
        pass


class _RequestIterator:
    """The async iterator of request messages handed to request-streaming handlers."""

    __slots__ = ("_st", "_deserialize")

    def __init__(self, st: _Stream) -> None:
        self._st = st
        self._deserialize = st.method.deserialize

    def __aiter__(self) -> _RequestIterator:
        return self

    async def __anext__(self) -> Any:
        st = self._st
        while not st.queue:
            if st.remote_closed or st.closed:
                raise StopAsyncIteration
            st.waiter = st.conn.loop.create_future()
            try:
                await st.waiter
            finally:
                st.waiter = None
        data = st.queue.popleft()
        st.conn._credit_stream(st, len(data) + 5)
        if self._deserialize is None:
            return data
        try:
            return self._deserialize(data)
        except Exception as exc:
            raise _RpcStatus(grpc.StatusCode.INTERNAL, f"failed to deserialize request: {exc}") from exc

    async def read(self) -> Any:
        try:
            return await self.__anext__()
        except StopAsyncIteration:
            return grpc.aio.EOF


class _Resume:
    """Awaitable that continues a coroutine (or async-generator step) whose first step ran inline and
    suspended on `first` (the object it yielded to the event loop). Awaited from inside a Task it behaves
    exactly as if the Task had driven the coroutine from the start: the yielded future is handed to the
    Task, and values / exceptions (including cancellation) are forwarded."""

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Any, first: Any) -> None:
        self._coro = coro
        self._first = first

    def __await__(self):  # noqa: ANN204
        coro = self._coro
        y = self._first
        self._first = None
        while True:
            try:
                v = yield y
            except BaseException as exc:  # noqa: BLE001 - forwarded to the coroutine
                try:
                    y = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    y = coro.send(v)
                except StopIteration as stop:
                    return stop.value


# --------------------------------------------------------------------------------------------------
# Connection


class H2ConnectionError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


_CoroutineType = types.CoroutineType
_AsyncGeneratorType = types.AsyncGeneratorType


_RECV_BUFFER = 256 * 1024


class _Connection(asyncio.BufferedProtocol):
    """One client connection. A BufferedProtocol: the transport `recv_into`s a reused buffer, which
    spares asyncio's default 256 KiB bytes allocation (an mmap/munmap pair) on every read."""

    def __init__(self, server: H2Server) -> None:
        self.server = server
        self.rbuf = bytearray(_RECV_BUFFER)
        self.rview = memoryview(self.rbuf)
        self.loop = server._loop
        self.transport: asyncio.Transport | None = None
        self.peer = "unix:"
        self.streams: dict[int, _Stream] = {}
        self.last_sid = 0
        self.preface_ok = False
        self.inbuf: bytearray | None = None
        self.need = 0
        self.wbuf: list = []
        self.batching = False
        self.closed = False
        self.draining = False
        self.paused = False
        # HPACK
        self.decoder = hpack.Decoder()
        self.hcache: dict[bytes, tuple[int, tuple]] = {}
        self.hgen = 0
        self.cont: tuple[int, int, list] | None = None  # (sid, flags, fragments) while in CONTINUATION
        # flow control, send side
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = DEFAULT_MAX_FRAME
        self.send_window = DEFAULT_WINDOW
        self.blocked: dict[int, _Stream] = {}  # streams with pending DATA, in order
        # flow control, receive side
        self.recv_unacked = 0
        self.conn_update_at = server._conn_window // 4
        self.stream_update_at = min(server._stream_window // 4, 1 << 20)

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        srv = self.server
        srv._connections.add(self)
        try:
            name = transport.get_extra_info("sockname")
            if name:
                self.peer = f"unix:{name}"
        except Exception:  # noqa: BLE001 - cosmetic only
            pass
        settings = b"".join(
            _SETTING.pack(k, v)
            for k, v in (
                (S_ENABLE_PUSH, 0),
                (S_MAX_CONCURRENT_STREAMS, srv._max_concurrent_streams),
                (S_INITIAL_WINDOW_SIZE, srv._stream_window),
                (S_MAX_FRAME_SIZE, OUR_MAX_FRAME),
                (S_MAX_HEADER_LIST_SIZE, self.decoder.max_header_list_size),
            )
        )
        out = _FH.pack(len(settings) << 8 | T_SETTINGS, 0, 0) + settings
        if srv._conn_window > DEFAULT_WINDOW:
            out += _FH.pack(4 << 8 | T_WINDOW_UPDATE, 0, 0) + _U32.pack(srv._conn_window - DEFAULT_WINDOW)
        transport.write(out)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server._connections.discard(self)
        streams = list(self.streams.values())
        self.streams.clear()
        self.blocked.clear()
        for st in streams:
            st.cancelled = True
            self._release(st)
            if st.task is not None:
                st.task.cancel()
        self.server._conn_idle(self)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        for st in list(self.streams.values()):
            if st.drain is not None and not st.pending:
                self._wake_drain(st)

    def eof_received(self) -> bool:
        return False

    def get_buffer(self, sizehint: int) -> memoryview:  # noqa: ARG002
        return self.rview

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.rview[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        if self.inbuf is not None:
            self.inbuf += data
            if len(self.inbuf) < self.need:
                return
            data = bytes(self.inbuf)
            self.inbuf = None
        buf = data
        pos = 0
        n = len(buf)
        if not self.preface_ok:
            if n < 24:
                if PREFACE[:n] != buf:
                    self._fatal(E_PROTOCOL, "bad connection preface")
                    return
                self.inbuf = bytearray(buf)
                self.need = 24
                return
            if buf[:24] != PREFACE:
                self._fatal(E_PROTOCOL, "bad connection preface")
                return
            self.preface_ok = True
            pos = 24
        self.batching = True
        unpack = _FH.unpack_from
        try:
            while n - pos >= 9:
                lt, flags, sid = unpack(buf, pos)
                ln = lt >> 8
                end = pos + 9 + ln
                if end > n:
                    if ln > OUR_MAX_FRAME:
                        raise H2ConnectionError(E_FRAME_SIZE, "frame too large")
                    break
                ftype = lt & 0xFF
                sid &= 0x7FFFFFFF
                if self.cont is not None and ftype != T_CONTINUATION:
                    raise H2ConnectionError(E_PROTOCOL, "expected CONTINUATION")
                if ftype == T_DATA:
                    self._on_data(buf, pos + 9, end, flags, sid)
                elif ftype == T_HEADERS:
                    self._on_headers(buf, pos + 9, end, flags, sid)
                elif ftype == T_WINDOW_UPDATE:
                    self._on_window_update(buf, pos + 9, ln, sid)
                elif ftype == T_PING:
                    if ln != 8 or sid:
                        raise H2ConnectionError(E_FRAME_SIZE if ln != 8 else E_PROTOCOL, "bad PING")
                    if not flags & F_ACK:
                        self.wbuf.append(_FH.pack(8 << 8 | T_PING, F_ACK, 0) + buf[pos + 9 : end])
                elif ftype == T_SETTINGS:
                    self._on_settings(buf, pos + 9, ln, flags, sid)
                elif ftype == T_RST_STREAM:
                    if ln != 4 or not sid:
                        raise H2ConnectionError(E_PROTOCOL, "bad RST_STREAM")
                    self._on_rst(sid)
                elif ftype == T_CONTINUATION:
                    self._on_continuation(buf, pos + 9, end, flags, sid)
                elif ftype == T_GOAWAY:
                    pass  # the client stops opening streams; it closes the connection itself
                elif ftype == T_PRIORITY:
                    if ln != 5:
                        raise H2ConnectionError(E_FRAME_SIZE, "bad PRIORITY")
                elif ftype == T_PUSH_PROMISE:
                    raise H2ConnectionError(E_PROTOCOL, "PUSH_PROMISE from client")
                # unknown frame types are ignored (RFC 9113 5.5)
                pos = end
        except H2ConnectionError as exc:
            self.batching = False
            self._fatal(exc.code, str(exc))
            return
        except hpack.HPACKError as exc:
            self.batching = False
            self._fatal(E_COMPRESSION, f"hpack: {exc}")
            return
        finally:
            self.batching = False
        if pos < n:
            self.inbuf = bytearray(buf[pos:])
            if n - pos >= 9:
                self.need = 9 + (_U32.unpack_from(buf, pos)[0] >> 8)
            else:
                self.need = 9
        self._flush()

    # ---- output

    def _flush(self) -> None:
        wbuf = self.wbuf
        if wbuf and not self.batching and not self.closed:
            data = wbuf[0] if len(wbuf) == 1 else b"".join(wbuf)
            wbuf.clear()
            self.transport.write(data)  # type: ignore[union-attr]

    def _fatal(self, code: int, message: str) -> None:
        log.warning("h2server: connection error %d: %s", code, message)
        self.wbuf.append(_FH.pack(8 << 8 | T_GOAWAY, 0, 0) + _U32x2.pack(self.last_sid, code))
        self._flush()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def goaway(self) -> None:
        """Announce shutdown: no new streams beyond the ones seen so far."""
        if self.draining or self.closed:
            return
        self.draining = True
        self.wbuf.append(_FH.pack(8 << 8 | T_GOAWAY, 0, 0) + _U32x2.pack(self.last_sid, E_NO_ERROR))
        self._flush()

    def close(self) -> None:
        if self.closed or self.transport is None:
            return
        self.goaway()
        self.transport.close()

    # ---- inbound frames

    def _on_settings(self, buf: bytes, start: int, ln: int, flags: int, sid: int) -> None:
        if sid:
            raise H2ConnectionError(E_PROTOCOL, "SETTINGS on a stream")
        if flags & F_ACK:
            if ln:
                raise H2ConnectionError(E_FRAME_SIZE, "SETTINGS ack with payload")
            return
        if ln % 6:
            raise H2ConnectionError(E_FRAME_SIZE, "bad SETTINGS length")
        grow = False
        for off in range(start, start + ln, 6):
            key, value = _SETTING.unpack_from(buf, off)
            if key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise H2ConnectionError(E_FLOW_CONTROL, "initial window too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for st in self.streams.values():
                    st.send_window += delta
                    if st.send_window > MAX_WINDOW:
                        raise H2ConnectionError(E_FLOW_CONTROL, "stream window overflow")
                grow = grow or delta > 0
            elif key == S_MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME <= value <= OUR_MAX_FRAME:
                    raise H2ConnectionError(E_PROTOCOL, "bad max frame size")
                self.peer_max_frame = value
            elif key == S_ENABLE_PUSH and value > 1:
                raise H2ConnectionError(E_PROTOCOL, "bad ENABLE_PUSH")
            # HEADER_TABLE_SIZE: we never insert into the peer's decoder table, so any size is fine.
            # MAX_CONCURRENT_STREAMS limits streams we open (none); MAX_HEADER_LIST_SIZE: ours are tiny.
        self.wbuf.append(_FH.pack(T_SETTINGS, F_ACK, 0))
        if grow and self.blocked:
            self._flush_blocked()

    def _on_window_update(self, buf: bytes, start: int, ln: int, sid: int) -> None:
        if ln != 4:
            raise H2ConnectionError(E_FRAME_SIZE, "bad WINDOW_UPDATE")
        inc = _U32.unpack_from(buf, start)[0] & 0x7FFFFFFF
        if sid == 0:
            if inc == 0:
                raise H2ConnectionError(E_PROTOCOL, "zero WINDOW_UPDATE")
            self.send_window += inc
            if self.send_window > MAX_WINDOW:
                raise H2ConnectionError(E_FLOW_CONTROL, "connection window overflow")
            if self.blocked:
                self._flush_blocked()
            return
        st = self.streams.get(sid)
        if st is None:
            return
        if inc == 0 or st.send_window + inc > MAX_WINDOW:
            self._reset(st, E_PROTOCOL if inc == 0 else E_FLOW_CONTROL)
            return
        st.send_window += inc
        if st.pending:
            self._flush_stream(st)

    def _on_rst(self, sid: int) -> None:
        st = self.streams.pop(sid, None)
        if st is None:
            return
        st.cancelled = True
        st.remote_closed = True
        self.blocked.pop(sid, None)
        self._release(st)
        if st.task is not None:
            st.task.cancel()
        if self.draining and not self.streams:
            self.server._conn_idle(self)

    def _on_data(self, buf: bytes, start: int, end: int, flags: int, sid: int) -> None:
        if sid == 0:
            raise H2ConnectionError(E_PROTOCOL, "DATA on stream 0")
        ln = end - start
        if ln:
            self.recv_unacked += ln
            if self.recv_unacked >= self.conn_update_at:
                self.wbuf.append(_FH.pack(4 << 8 | T_WINDOW_UPDATE, 0, 0) + _U32.pack(self.recv_unacked))
                self.recv_unacked = 0
        if flags & F_PADDED:
            if not ln:
                raise H2ConnectionError(E_PROTOCOL, "bad padding")
            pad = buf[start]
            start += 1
            end -= pad
            if end < start:
                raise H2ConnectionError(E_PROTOCOL, "bad padding")
        st = self.streams.get(sid)
        if st is None or st.remote_closed:
            if sid > self.last_sid:
                raise H2ConnectionError(E_PROTOCOL, "DATA on idle stream")
            return  # closed / reset stream: connection window already credited above
        if st.method.kind == K_NOT_FOUND:
            self._finish(st, grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {st.method.path}")
            return
        if end > start:
            kind = st.method.kind
            if kind <= K_US:  # unary request: gather the body, dispatch at END_STREAM
                body = st.body
                if body is None:
                    st.body = body = buf[start:end]
                else:
                    if type(body) is not bytearray:
                        st.body = body = bytearray(body)
                    body += memoryview(buf)[start:end]
                if len(body) >= 5 and _MSGH.unpack_from(body, 0)[1] > self.server._max_recv:
                    self._finish(st, grpc.StatusCode.RESOURCE_EXHAUSTED, self._too_large(body))
                    return
                if not st.remote_closed:
                    st.recv_credit += end - start
                    if st.recv_credit >= self.stream_update_at and not flags & F_END_STREAM:
                        self.wbuf.append(
                            _FH.pack(4 << 8 | T_WINDOW_UPDATE, 0, sid) + _U32.pack(st.recv_credit)
                        )
                        st.recv_credit = 0
            else:
                self._on_stream_data(st, buf, start, end)
                if st.closed:
                    return
        if flags & F_END_STREAM:
            self._on_remote_end(st)

    def _too_large(self, body: Any) -> str:
        return (
            f"grpc: received message larger than max ({_MSGH.unpack_from(body, 0)[1]} vs. "
            f"{self.server._max_recv})"
        )

    def _on_stream_data(self, st: _Stream, buf: bytes, start: int, end: int) -> None:
        rbuf = st.rbuf
        if rbuf is None:
            st.rbuf = rbuf = bytearray()
        rbuf += memoryview(buf)[start:end]
        got = False
        pos = 0
        n = len(rbuf)
        max_recv = self.server._max_recv
        while n - pos >= 5:
            flag, mlen = _MSGH.unpack_from(rbuf, pos)
            if mlen > max_recv:
                self._finish(st, grpc.StatusCode.RESOURCE_EXHAUSTED, self._too_large(rbuf[pos : pos + 5]))
                return
            if flag:
                self._finish(st, grpc.StatusCode.UNIMPLEMENTED, "grpc: compressed messages are not supported")
                return
            if n - pos - 5 < mlen:
                break
            st.queue.append(bytes(rbuf[pos + 5 : pos + 5 + mlen]))  # type: ignore[union-attr]
            pos += 5 + mlen
            got = True
        if pos:
            del rbuf[:pos]
        if got and st.waiter is not None and not st.waiter.done():
            st.waiter.set_result(None)

    def _on_headers(self, buf: bytes, start: int, end: int, flags: int, sid: int) -> None:
        if sid == 0:
            raise H2ConnectionError(E_PROTOCOL, "HEADERS on stream 0")
        if flags & F_PADDED:
            pad = buf[start]
            start += 1
            end -= pad
            if end < start:
                raise H2ConnectionError(E_PROTOCOL, "bad padding")
        if flags & F_PRIORITY:
            start += 5
            if end < start:
                raise H2ConnectionError(E_FRAME_SIZE, "bad PRIORITY fields")
        fragment = buf[start:end]
        if not flags & F_END_HEADERS:
            self.cont = (sid, flags, [fragment])
            return
        self._on_header_block(sid, flags, fragment)

    def _on_continuation(self, buf: bytes, start: int, end: int, flags: int, sid: int) -> None:
        cont = self.cont
        if cont is None or cont[0] != sid:
            raise H2ConnectionError(E_PROTOCOL, "unexpected CONTINUATION")
        cont[2].append(buf[start:end])
        if sum(map(len, cont[2])) > 1 << 20:
            raise H2ConnectionError(E_PROTOCOL, "header block too large")
        if flags & F_END_HEADERS:
            self.cont = None
            self._on_header_block(sid, cont[1], b"".join(cont[2]))

    def _decode(self, block: bytes) -> tuple:
        """(path, timeout, content_type_ok, metadata) for a header block; cached, see module notes."""
        hit = self.hcache.get(block)
        if hit is not None and hit[0] == self.hgen:
            return hit[1]
        headers = self.decoder.decode(block)
        neutral = _table_neutral(block)
        if not neutral:
            self.hgen += 1
        path = ""
        timeout = None
        ctype_ok = False
        method_ok = False
        meta = []
        for name, value in headers:
            if name[:1] == ":":
                if name == ":path":
                    path = value
                elif name == ":method":
                    method_ok = value == "POST"
            elif name == "content-type":
                ctype_ok = value.startswith("application/grpc")
            elif name == "grpc-timeout":
                timeout = _parse_timeout(value)
            elif name not in _SKIP_METADATA:
                meta.append((name, value))
        parsed = (path, timeout, ctype_ok and method_ok, tuple(meta))
        if neutral:
            if len(self.hcache) >= 256:
                self.hcache.clear()
            self.hcache[block] = (self.hgen, parsed)
        return parsed

    def _on_header_block(self, sid: int, flags: int, block: bytes) -> None:
        path, timeout, ok, meta = self._decode(block)  # always decode: keeps the HPACK state in sync
        st = self.streams.get(sid)
        if st is not None:  # trailers from the client
            if not flags & F_END_STREAM:
                self._reset(st, E_PROTOCOL)
            elif not st.remote_closed:
                self._on_remote_end(st)
            return
        if sid <= self.last_sid or not sid & 1:
            if not sid & 1:
                raise H2ConnectionError(E_PROTOCOL, "even stream id from client")
            self.wbuf.append(_FH.pack(4 << 8 | T_RST_STREAM, 0, sid) + _U32.pack(E_STREAM_CLOSED))
            return
        self.last_sid = sid
        srv = self.server
        if self.draining or len(self.streams) >= srv._max_concurrent_streams:
            self.wbuf.append(_FH.pack(4 << 8 | T_RST_STREAM, 0, sid) + _U32.pack(E_REFUSED_STREAM))
            return
        if not ok:
            block = _STATUS_415 + _literal(b"grpc-status", b"13") + _literal(b"grpc-message", b"bad request")
            self._write_headers(sid, block, True)
            return
        method = srv._lookup(path, meta)
        if method is None:
            # Answer when the first DATA or END_STREAM arrives, not right now: grpcio's core fails a
            # client write issued after the status is in as INTERNAL, hiding the UNIMPLEMENTED.
            method = _Method(path, None)
        st = _Stream(self, sid, method, meta, self.peer_initial_window)
        st.ctx = ServicerContext(st)
        self.streams[sid] = st
        if timeout is not None:
            st.deadline = self.loop.time() + timeout
            st.timer = self.loop.call_at(st.deadline, self._on_deadline, st)
        if K_SU <= method.kind <= K_SS:
            st.queue = deque()
            cv = contextvars.copy_context()
            st.task = self.loop.create_task(self._run_request_streaming(st), context=cv)
        if flags & F_END_STREAM:
            self._on_remote_end(st)

    def _on_remote_end(self, st: _Stream) -> None:
        st.remote_closed = True
        if st.method.kind == K_NOT_FOUND:
            self._finish(st, grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {st.method.path}")
        elif st.method.kind <= K_US:
            if not st.closed and st.task is None:
                self._dispatch_unary_request(st)
        elif st.waiter is not None and not st.waiter.done():
            st.waiter.set_result(None)

    def _on_deadline(self, st: _Stream) -> None:
        st.timer = None
        if st.closed:
            return
        st.expired = True
        if st.pending:  # the status goes out now, not after data the client is not taking
            st.pending = None
            self.blocked.pop(st.sid, None)
        self._finish(st, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        if st.task is not None:
            st.task.cancel()
        self._flush()

    def _reset(self, st: _Stream, code: int) -> None:
        self.wbuf.append(_FH.pack(4 << 8 | T_RST_STREAM, 0, st.sid) + _U32.pack(code))
        st.remote_closed = True  # no NO_ERROR reset on top
        st.cancelled = True
        self._close(st)
        if st.task is not None:
            st.task.cancel()
        self._flush()

    # ---- flow control, receive side

    def _credit_stream(self, st: _Stream, n: int) -> None:
        """A streaming-request message of n bytes was consumed: let the client send more."""
        if st.remote_closed or st.closed:
            return
        st.recv_credit += n
        if st.recv_credit >= self.stream_update_at:
            self.wbuf.append(_FH.pack(4 << 8 | T_WINDOW_UPDATE, 0, st.sid) + _U32.pack(st.recv_credit))
            st.recv_credit = 0
            self._flush()

    # ---- output: headers, messages, trailers

    def _write_headers(self, sid: int, block: bytes, end_stream: bool) -> None:
        maxf = self.peer_max_frame
        flags = F_END_STREAM if end_stream else 0
        if len(block) <= maxf:
            self.wbuf.append(_FH.pack(len(block) << 8 | T_HEADERS, flags | F_END_HEADERS, sid) + block)
            return
        first, rest = block[:maxf], block[maxf:]
        self.wbuf.append(_FH.pack(len(first) << 8 | T_HEADERS, flags, sid) + first)
        while rest:
            chunk, rest = rest[:maxf], rest[maxf:]
            self.wbuf.append(
                _FH.pack(len(chunk) << 8 | T_CONTINUATION, 0 if rest else F_END_HEADERS, sid) + chunk
            )

    def _send_message(self, st: _Stream, data: bytes) -> None:
        """Queue one serialized response message (flow control permitting; the rest waits)."""
        n = len(data)
        if n > self.server._max_send:
            raise _RpcStatus(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"grpc: trying to send message larger than max ({n} vs. {self.server._max_send})",
            )
        sid = st.sid
        wbuf = self.wbuf
        if not st.headers_sent:
            st.headers_sent = True
            wbuf.append(
                _FH.pack(len(RESPONSE_HEADERS) << 8 | T_HEADERS, F_END_HEADERS, sid) + RESPONSE_HEADERS
            )
        m = n + 5
        if st.pending is None and m <= self.send_window and m <= st.send_window and m <= self.peer_max_frame:
            self.send_window -= m
            st.send_window -= m
            wbuf.append(_DH.pack(m << 8, 0, sid, 0, n))
            wbuf.append(data)
            return
        framed = memoryview(_MSGH.pack(0, n) + data)
        if st.pending is None:
            st.pending = deque()
        st.pending.append(framed)
        self._flush_stream(st)

    def _flush_stream(self, st: _Stream) -> None:
        pending = st.pending
        wbuf = self.wbuf
        sid = st.sid
        maxf = self.peer_max_frame
        while pending:
            allowed = min(self.send_window, st.send_window, maxf)
            if allowed <= 0:
                break
            data = pending[0]
            if len(data) <= allowed:
                pending.popleft()
                chunk = data
            else:
                chunk = data[:allowed]
                pending[0] = data[allowed:]
            k = len(chunk)
            self.send_window -= k
            st.send_window -= k
            wbuf.append(_FH.pack(k << 8 | T_DATA, 0, sid))
            wbuf.append(chunk)
        if pending:
            self.blocked[sid] = st
            return
        st.pending = None
        self.blocked.pop(sid, None)
        if st.pending_trailer is not None:
            wbuf.append(st.pending_trailer)
            st.pending_trailer = None
            self._close(st)
        if st.drain is not None and not self.paused:
            self._wake_drain(st)

    def _flush_blocked(self) -> None:
        for st in list(self.blocked.values()):
            if self.send_window <= 0:
                break
            self._flush_stream(st)
        self._flush()

    def _finish(
        self, st: _Stream, code: grpc.StatusCode, details: str | None = None, trailing: tuple = ()
    ) -> None:
        """Send the status (trailers, or a trailers-only response) and close the stream."""
        if st.closed or st.pending_trailer is not None:
            return
        if code is _OK and not details and not trailing:
            block = TRAILERS_OK
        else:
            block = _status_block(_CODE_NUM[code], details, trailing)
        if not st.headers_sent:
            st.headers_sent = True
            block = RESPONSE_HEADERS + block
        if st.pending:
            start = len(self.wbuf)
            self._write_headers(st.sid, block, True)
            st.pending_trailer = b"".join(self.wbuf[start:])
            del self.wbuf[start:]
            return
        self._write_headers(st.sid, block, True)
        self._close(st)

    def _close(self, st: _Stream) -> None:
        if st.closed:
            return
        st.closed = True
        # A client still sending (we answered early: error, unknown method) gets no RST_STREAM(NO_ERROR)
        # from us: gRPC clients stop and reset the stream themselves once they see the status, and
        # grpcio's core reports a reset that races its own in-flight write as INTERNAL. DATA that still
        # arrives for the forgotten stream only counts toward the connection window.
        self.streams.pop(st.sid, None)
        self.blocked.pop(st.sid, None)
        self._release(st)
        if self.draining and not self.streams:
            self.server._conn_idle(self)

    def _release(self, st: _Stream) -> None:
        st.closed = True
        if st.timer is not None:
            st.timer.cancel()
            st.timer = None
        st.pending = None
        if st.waiter is not None and not st.waiter.done():
            st.waiter.set_result(None)
        self._wake_drain(st)
        if st.done_cbs:
            cbs, st.done_cbs = st.done_cbs, None
            for cb in cbs:
                try:
                    cb(st.ctx)
                except Exception:  # noqa: BLE001 - a callback must not break the connection
                    log.exception("h2server: done callback failed")
        st.ctx = None  # break the stream <-> context cycle: both go by refcount, no GC passes

    def _wake_drain(self, st: _Stream) -> None:
        fut = st.drain
        if fut is not None:
            st.drain = None
            if not fut.done():
                fut.set_result(None)

    async def _drain(self, st: _Stream) -> None:
        while (st.pending or self.paused) and not st.closed:
            st.drain = self.loop.create_future()
            await st.drain

    # ---- running handlers

    def _status_for(
        self, st: _Stream, exc: BaseException | None
    ) -> tuple[grpc.StatusCode, str | None, tuple]:
        ctx = st.ctx
        if isinstance(exc, _RpcStatus):
            return exc.code, exc.details, ()
        if ctx._aborted or exc is None:
            code = ctx._code or _OK
            return code, ctx._details, ctx._trailing
        if ctx._code is not None and ctx._code is not _OK:
            return ctx._code, ctx._details, ctx._trailing
        if not isinstance(exc, AbortError | grpc.aio.AbortError):
            log.error("h2server: unhandled exception in %s", st.method.path, exc_info=exc)
        return grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc)}: {exc}", ctx._trailing

    def _fail(self, st: _Stream, exc: BaseException) -> None:
        if st.closed:
            return
        code, details, trailing = self._status_for(st, exc)
        if code is _OK:
            code, details = grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc)}: {exc}"
        self._finish(st, code, details, trailing)

    def _complete(self, st: _Stream) -> None:
        """The handler returned normally (all messages sent): send the final status."""
        if st.closed:
            return
        code, details, trailing = self._status_for(st, None)
        self._finish(st, code, details, trailing)

    def _dispatch_unary_request(self, st: _Stream) -> None:
        body = st.body
        st.body = None
        m = st.method
        try:
            if body is None or len(body) < 5:
                raise _RpcStatus(grpc.StatusCode.INTERNAL, "grpc: expected one request message, got none")
            flag, mlen = _MSGH.unpack_from(body, 0)
            if flag:
                raise _RpcStatus(grpc.StatusCode.UNIMPLEMENTED, "grpc: compressed messages are not supported")
            if mlen + 5 != len(body):
                raise _RpcStatus(grpc.StatusCode.INTERNAL, "grpc: expected exactly one request message")
            payload = body[5:]
            if m.deserialize is None:
                req = bytes(payload)
            else:
                try:
                    req = m.deserialize(payload)
                except Exception as exc:
                    raise _RpcStatus(
                        grpc.StatusCode.INTERNAL, f"failed to deserialize request: {exc}"
                    ) from exc
        except _RpcStatus as exc:
            self._finish(st, exc.code, exc.details)
            return
        cv = contextvars.copy_context()
        if not self.server._inline:
            coro = (
                self._run_unary_unary(st, req, None)
                if m.kind == K_UU
                else self._run_unary_stream(st, None, req, None)
            )
            st.task = self.loop.create_task(coro, context=cv)
            return
        if m.kind == K_UU:
            self._inline_unary_unary(st, req, cv)
        else:
            self._inline_unary_stream(st, req, cv)

    def _inline_unary_unary(self, st: _Stream, req: Any, cv: contextvars.Context) -> None:
        try:
            res = cv.run(st.method.fn, req, st.ctx)
            if type(res) is _CoroutineType:
                try:
                    y = cv.run(res.send, None)
                except StopIteration as stop:
                    res = stop.value
                else:
                    st.task = self.loop.create_task(
                        self._run_unary_unary(st, None, _Resume(res, y)), context=cv
                    )
                    return
            elif hasattr(res, "__await__"):
                st.task = self.loop.create_task(self._run_unary_unary(st, None, res), context=cv)
                return
            self._respond_unary(st, res)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - becomes the RPC's status
            self._fail(st, exc)

    def _respond_unary(self, st: _Stream, res: Any) -> None:
        ctx = st.ctx
        if ctx._code is not None and ctx._code is not _OK:  # set_code(error) + return: status only
            self._complete(st)
            return
        ser = st.method.serialize
        data = res if ser is None else ser(res)
        self._send_message(st, data)
        self._complete(st)

    def _inline_unary_stream(self, st: _Stream, req: Any, cv: contextvars.Context) -> None:
        try:
            gen = cv.run(st.method.fn, req, st.ctx)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001
            self._fail(st, exc)
            return
        if type(gen) is not _AsyncGeneratorType:
            if hasattr(gen, "__anext__") or hasattr(gen, "__await__"):
                st.task = self.loop.create_task(self._run_unary_stream(st, None, None, gen), context=cv)
                return
            self._sync_iterate(st, gen, cv)
            return
        ser = st.method.serialize
        anext = gen.__anext__
        try:
            while True:
                step = anext()
                try:
                    y = cv.run(step.send, None)
                except StopIteration as stop:
                    msg = stop.value
                else:
                    st.task = self.loop.create_task(
                        self._run_unary_stream(st, _Resume(step, y), None, gen), context=cv
                    )
                    return
                self._send_message(st, msg if ser is None else ser(msg))
                if st.pending:  # out of flow-control credit: continue where we can wait
                    st.task = self.loop.create_task(self._run_unary_stream(st, None, None, gen), context=cv)
                    return
        except StopAsyncIteration:
            self._complete(st)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001
            self._fail(st, exc)
            if gen.ag_frame is not None:  # failed outside the generator (serializer): close it
                self.loop.create_task(gen.aclose(), context=cv)

    def _sync_iterate(self, st: _Stream, it: Iterable, cv: contextvars.Context) -> None:
        """Plain (non-async) handler returning an iterable, e.g. the generated 'unimplemented' stubs."""
        ser = st.method.serialize
        try:
            for msg in cv.run(iter, it):
                self._send_message(st, msg if ser is None else ser(msg))
            self._complete(st)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001
            self._fail(st, exc)

    async def _run_unary_unary(self, st: _Stream, req: Any, resumed: Any) -> None:
        try:
            if resumed is None:
                res = st.method.fn(req, st.ctx)
                if hasattr(res, "__await__"):
                    res = await res
            else:
                res = await resumed
            if not st.closed:
                self._respond_unary(st, res)
        except asyncio.CancelledError:
            if not st.closed:
                self._finish(st, grpc.StatusCode.CANCELLED, "Cancelled")
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001
            self._fail(st, exc)
        finally:
            st.task = None
            self._flush()

    async def _run_unary_stream(self, st: _Stream, resumed: Any, req: Any, gen: Any) -> None:
        ser = st.method.serialize
        try:
            if gen is None:
                gen = st.method.fn(req, st.ctx)
            if hasattr(gen, "__await__") and not hasattr(gen, "__anext__"):
                gen = await gen  # a coroutine returning an iterable
            if resumed is not None:  # only ever set for an async generator
                msg = await resumed
                self._send_message(st, msg if ser is None else ser(msg))
                await self._pace(st)
            await self._send_all(st, gen)
            self._complete(st)
        except StopAsyncIteration:
            self._complete(st)
        except asyncio.CancelledError:
            if not st.closed:
                self._finish(st, grpc.StatusCode.CANCELLED, "Cancelled")
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001
            self._fail(st, exc)
        finally:
            st.task = None
            self._flush()
            await _aclose(gen)

    async def _send_all(self, st: _Stream, gen: Any) -> None:
        """Send a handler's response messages, from an async generator (until the stream closes)
        or a plain iterable, writing each and waiting while flow control holds it back."""
        ser = st.method.serialize
        if hasattr(gen, "__anext__"):
            anext = gen.__anext__
            while not st.closed:
                try:
                    msg = await anext()
                except StopAsyncIteration:
                    return
                self._send_message(st, msg if ser is None else ser(msg))
                await self._pace(st)
            return
        for msg in gen:
            self._send_message(st, msg if ser is None else ser(msg))
            await self._pace(st)

    async def _pace(self, st: _Stream) -> None:
        """After queueing a message from a Task: write it, then wait while flow control holds it back."""
        self._flush()
        if st.pending or self.paused:
            await self._drain(st)

    async def _run_request_streaming(self, st: _Stream) -> None:
        m = st.method
        it = _RequestIterator(st)
        gen = None
        try:
            if m.kind == K_SU:
                res = m.fn(it, st.ctx)
                if hasattr(res, "__await__"):
                    res = await res
                if not st.closed:
                    self._respond_unary(st, res)
            else:
                gen = m.fn(it, st.ctx)
                if hasattr(gen, "__await__") and not hasattr(gen, "__anext__"):
                    gen = await gen  # a coroutine returning an iterable (or None: no messages)
                await self._send_all(st, gen if hasattr(gen, "__anext__") else gen or ())
                self._complete(st)
        except asyncio.CancelledError:
            if not st.closed:
                self._finish(st, grpc.StatusCode.CANCELLED, "Cancelled")
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001
            self._fail(st, exc)
        finally:
            st.task = None
            self._flush()
            await _aclose(gen)


# --------------------------------------------------------------------------------------------------
# Server


class H2Server:
    """A grpc.aio.Server look-alike serving gRPC over HTTP/2 on unix sockets."""

    def __init__(
        self,
        options: Sequence[tuple[str, Any]] | None = None,
        *,
        handlers: Sequence[grpc.GenericRpcHandler] | None = None,
        max_receive_message_length: int = DEFAULT_MAX_MESSAGE,
        max_send_message_length: int = DEFAULT_MAX_MESSAGE,
        max_concurrent_streams: int = 1024,
        stream_window: int = 16 * 1024 * 1024,
        connection_window: int = 32 * 1024 * 1024,
        inline_handlers: bool = True,
    ) -> None:
        for key, value in options or ():
            if key == "grpc.max_receive_message_length":
                max_receive_message_length = value if value >= 0 else 2**31 - 1
            elif key == "grpc.max_send_message_length":
                max_send_message_length = value if value >= 0 else 2**31 - 1
            elif key == "grpc.max_concurrent_streams":
                max_concurrent_streams = value
        self._max_recv = max_receive_message_length
        self._max_send = max_send_message_length
        self._max_concurrent_streams = max_concurrent_streams
        # A unary request body is gathered whole: the stream window must hold the largest message.
        self._stream_window = min(MAX_WINDOW, max(stream_window, max_receive_message_length + 65536))
        self._conn_window = min(MAX_WINDOW, max(connection_window, self._stream_window))
        self._inline = inline_handlers
        self._methods: dict[str, _Method] = {}
        self._generic: list[grpc.GenericRpcHandler] = []
        self._paths: list[str] = []
        self._sockets: list[socket.socket] = []  # inherited listening sockets (systemd activation)
        self._listeners: list[asyncio.AbstractServer] = []
        self._connections: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = "new"
        self._terminated: asyncio.Future | None = None
        self._idle: asyncio.Event | None = None
        if handlers:
            self.add_generic_rpc_handlers(handlers)

    # ---- registration (what the generated *_pb2_grpc.add_*Servicer_to_server call)

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        for h in generic_rpc_handlers:
            table = getattr(h, "_method_handlers", None)
            if isinstance(table, dict):
                for path, mh in table.items():
                    self._methods.setdefault(path, _Method(path, mh))
            else:
                self._generic.append(h)

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        for name, mh in method_handlers.items():
            path = f"/{service_name}/{name}"
            self._methods[path] = _Method(path, mh)  # registered handlers take precedence

    def _lookup(self, path: str, meta: tuple) -> _Method | None:
        m = self._methods.get(path)
        if m is not None or not self._generic:
            return m
        details = _HandlerCallDetails(path, meta)
        for h in self._generic:
            mh = h.service(details)
            if mh is not None:
                return _Method(path, mh)
        return None

    # ---- lifecycle

    def add_insecure_port(self, address: str) -> int:
        if not address.startswith("unix:"):
            raise ValueError(f"h2server serves unix sockets only, not {address!r}")
        path = address[5:]
        if path.startswith("//"):
            path = path[2:]
        self._paths.append(path)
        return 1

    def add_socket(self, sock: socket.socket) -> None:
        """Serve an already bound, listening unix socket (e.g. passed by systemd). It is never
        unlinked: whoever created it owns its path, and connections queue in its backlog while
        no server runs, so a restart refuses nobody."""
        if sock.family != socket.AF_UNIX:
            raise ValueError("h2server serves unix sockets only")
        self._sockets.append(sock)

    def add_secure_port(self, address: str, server_credentials: Any) -> int:  # noqa: ARG002
        raise NotImplementedError("h2server serves cleartext unix sockets only")

    async def start(self) -> None:
        if self._state != "new":
            raise RuntimeError("server already started")
        self._loop = asyncio.get_running_loop()
        self._terminated = self._loop.create_future()
        for path in self._paths:
            try:
                if stat.S_ISSOCK(os.stat(path).st_mode):
                    os.unlink(path)
            except FileNotFoundError:
                pass
            srv = await self._loop.create_unix_server(lambda: _Connection(self), path)
            self._listeners.append(srv)
        for sock in self._sockets:
            srv = await self._loop.create_unix_server(lambda: _Connection(self), sock=sock)
            self._listeners.append(srv)
        self._state = "started"

    def _conn_idle(self, conn: _Connection | None) -> None:
        if self._idle is not None and all(not c.streams for c in self._connections):
            self._idle.set()

    async def stop(self, grace: float | None) -> None:
        """Stop accepting; let in-flight RPCs finish for up to `grace` seconds; then cancel them and close."""
        if self._state == "new":
            self._state = "stopped"
            return
        if self._state != "started":
            await asyncio.shield(self._terminated)  # type: ignore[arg-type]
            return
        self._state = "stopping"
        for srv in self._listeners:
            srv.close()
        for conn in list(self._connections):
            conn.goaway()
        if grace and any(c.streams for c in self._connections):
            self._idle = asyncio.Event()
            self._conn_idle(None)
            try:
                await asyncio.wait_for(self._idle.wait(), grace)
            except TimeoutError:
                pass
        tasks = []
        for conn in list(self._connections):
            for st in list(conn.streams.values()):
                if st.task is not None:
                    tasks.append(st.task)
                    st.task.cancel()
                else:
                    conn._finish(st, grpc.StatusCode.UNAVAILABLE, "server shutting down")
            conn._flush()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        for conn in list(self._connections):
            conn.close()
        for srv in self._listeners:
            try:
                await asyncio.wait_for(srv.wait_closed(), 1.0)
            except TimeoutError:
                pass
        self._state = "stopped"
        if not self._terminated.done():  # type: ignore[union-attr]
            self._terminated.set_result(None)  # type: ignore[union-attr]

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        if self._terminated is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self._terminated), timeout)
        except TimeoutError:
            return False
        return True


async def _aclose(gen: Any) -> None:
    """Close a response generator a stream abandoned mid-way (best effort: the stream is over)."""
    if gen is not None and getattr(gen, "ag_frame", None) is not None and hasattr(gen, "aclose"):
        try:
            await gen.aclose()
        except BaseException:  # noqa: BLE001
            pass


def server(options: Sequence[tuple[str, Any]] | None = None, **kwargs: Any) -> H2Server:
    """Counterpart of `grpc.aio.server(options=...)`."""
    return H2Server(options, **kwargs)
