"""One client connection of our gRPC server: the asyncio protocol that reads HTTP/2 frames, keeps
the stream states and both directions of flow control, and turns requests into calls
(`snapshotter.h2call`).

Receive windows are enforced and handed back only as data is consumed. A DATA frame beyond the
connection's or the stream's window is a connection error FLOW_CONTROL_ERROR (RFC 9113 6.9.1;
5.4.1 lets a stream's violation end the connection, as the `h2` library does too). Bytes come back
to the peer when a handler takes them: a unary request's body when its handler starts, a streamed
request's message when the handler takes it from its iterator, and at once for padding and for
data nobody will read (closed streams, calls already answered). So what one connection makes us
hold is never more than the connection window we advertised, and one stream never more than its
stream window, however slow the handlers are.

Write back-pressure. The transport tells us when its buffer passes its high-water mark
(`pause_writing`); we then stop reading from the socket (`pause_reading`), start no new handler
(calls whose request is complete wait in `_ready`), and running handlers suspend at their next
message (`drain`) until `resume_writing`. A message the peer's send windows cannot take waits in
its call (`Call.pending`: one message per call, since its handler is suspended meanwhile); while
more than `PENDING_LIMIT` bytes wait so on a connection, no new handler starts either. Inside one
batch of input, output is handed to the transport as soon as `FLUSH_AT` bytes are queued, so that
the transport can push back before the next request of the batch starts. A peer that never reads
therefore holds a bounded amount of our memory, however many requests it sends.

Header blocks are bounded: at most `MAX_HEADER_BLOCK` encoded bytes in at most `MAX_CONTINUATIONS`
CONTINUATION frames, counted as they arrive (no quadratic re-summing); past either the connection
ends with ENHANCE_YOUR_CALM before anything is decoded.

Errors. Malformed frames are connection errors: GOAWAY with the code RFC 9113 names (PROTOCOL_ERROR,
FRAME_SIZE_ERROR, FLOW_CONTROL_ERROR, COMPRESSION_ERROR), this connection closed, the server and its
other connections untouched. A malformed request (bad pseudo-headers, connection-specific fields,
RFC 9113 8.1.1) is a stream error: RST_STREAM(PROTOCOL_ERROR), the connection goes on. Any other
exception while handling input is our bug: GOAWAY(INTERNAL_ERROR), logged, this connection only.
Nothing escapes to the event loop. Exceptions in handlers never get here: they become the call's
status (`snapshotter.h2call`).

Fast paths: a BufferedProtocol reading into one reused buffer; request heads parsed once per
distinct header block (`snapshotter.h2wire.HeaderDecoder`); response headers and OK trailers are
constant bytes; all output of one `data_received` (or of one handler Task step) leaves in a
single `transport.write`. Who writes: a batch of input (or a timer, `_batch`) writes at its end;
output a handler Task queues is written by that Task when its step ends or before it suspends
(`snapshotter.h2call`), so sending a message or a status schedules no callback of its own.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import grpc
import structlog

from snapshotter import h2call
from snapshotter.h2call import K_NOT_FOUND, K_SS, K_SU, K_US, OK, Call, Method, RpcStatus
from snapshotter.h2wire import (
    BAD_REQUEST,
    DATA_MSG,
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    E_ENHANCE_YOUR_CALM,
    E_FLOW_CONTROL,
    E_FRAME_SIZE,
    E_INTERNAL,
    E_NO_ERROR,
    E_PROTOCOL,
    E_REFUSED_STREAM,
    E_STREAM_CLOSED,
    F_ACK,
    F_END_HEADERS,
    F_END_STREAM,
    F_PADDED,
    F_PRIORITY,
    FH,
    MAX_CONTINUATIONS,
    MAX_CONTROL_FRAME,
    MAX_HEADER_BLOCK,
    MAX_WINDOW,
    MSG_PREFIX,
    OUR_MAX_FRAME,
    PENDING_LIMIT,
    PREFACE,
    PRIORITY_FIELDS,
    RESPONSE_HEADERS,
    S_ENABLE_PUSH,
    S_INITIAL_WINDOW_SIZE,
    S_MAX_CONCURRENT_STREAMS,
    S_MAX_FRAME_SIZE,
    S_MAX_HEADER_LIST_SIZE,
    SETTING,
    SETTINGS_ACK,
    T_CONTINUATION,
    T_DATA,
    T_GOAWAY,
    T_HEADERS,
    T_PING,
    T_PRIORITY,
    T_PUSH_PROMISE,
    T_RST_STREAM,
    T_SETTINGS,
    T_WINDOW_UPDATE,
    TRAILERS_OK,
    U32,
    H2ConnectionError,
    HeaderDecoder,
    goaway,
    header_frames,
    rst_stream,
    settings,
    status_block,
    window_update,
)


class Server(Protocol):
    """What a connection needs of its server (`snapshotter.h2server.H2Server`): its limits, windows
    and method table, and the set of connections; a Protocol, so this module does not import the
    one above it."""

    _loop: asyncio.AbstractEventLoop | None
    _connections: set[H2Protocol]
    _max_recv: int
    _max_send: int
    _max_concurrent_streams: int
    _stream_window: int
    _conn_window: int
    _eager: bool

    def _lookup(self, path: str, meta: tuple[tuple[str, str], ...]) -> Method: ...
    def _conn_idle(self) -> None: ...


__all__ = ["FLUSH_AT", "PENDING_LIMIT", "H2Protocol"]

log = structlog.get_logger(__name__)

_RECV_BUFFER = 256 * 1024
FLUSH_AT = 256 * 1024  # inside one batch, hand output to the transport once this much is queued
_FIXED_LENGTH = {T_PING: 8, T_PRIORITY: 5, T_RST_STREAM: 4, T_WINDOW_UPDATE: 4}


class _HeaderBlock:
    """A header block being gathered from HEADERS + CONTINUATION frames."""

    __slots__ = ("sid", "flags", "fragments", "size", "continuations")

    def __init__(self, sid: int, flags: int, fragment: bytes) -> None:
        self.sid = sid
        self.flags = flags
        self.fragments = [fragment]
        self.size = len(fragment)
        self.continuations = 0


class H2Protocol(asyncio.BufferedProtocol):
    """One client connection. A BufferedProtocol: the transport `recv_into`s a reused buffer, which
    spares asyncio's default 256 KiB bytes allocation (an mmap/munmap pair) on every read."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop: asyncio.AbstractEventLoop = server._loop  # type: ignore[assignment]
        self._rbuf = bytearray(_RECV_BUFFER)
        self._rview = memoryview(self._rbuf)
        self.transport: asyncio.Transport | None = None
        self.peer = "unix:"
        self.calls: dict[int, Call] = {}
        self.last_sid = 0
        self.preface_ok = False
        self.inbuf: bytearray | None = None  # an incomplete frame (or preface), and its size
        self.need = 0
        self.skip = 0  # bytes of an oversized unknown frame still to drop as they arrive
        self.wbuf: list[bytes | memoryview] = []
        self.wbytes = 0  # DATA queued in wbuf since the last write
        self.batching = False  # inside an input batch: output is written once at its end
        self.closed = False
        self.draining = False
        self.paused = False  # the transport's buffer is over its high-water mark
        self._flush_handle: asyncio.Handle | None = None
        self.decoder = HeaderDecoder(MAX_HEADER_BLOCK)
        self.cont: _HeaderBlock | None = None  # while a header block continues
        # send side: the peer's windows for us, and data waiting for them
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = DEFAULT_MAX_FRAME
        self.send_window = DEFAULT_WINDOW
        self.blocked: dict[int, Call] = {}  # calls with pending DATA, in order
        self.pending_bytes = 0
        # receive side: what the peer may still send us, and what was consumed but not handed back
        self.recv_window = server._conn_window
        self.recv_credit = 0
        self.conn_update_at = max(1, server._conn_window // 4)
        self.stream_update_at = max(1, min(server._stream_window // 4, 1 << 20))
        # starting handlers under back-pressure
        self._ready: deque[Call] = deque()
        self._starting = False
        self._admit_waiters: list[asyncio.Future[None]] = []

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        srv = self.server
        srv._connections.add(self)
        try:
            name = transport.get_extra_info("sockname")
            if name:
                self.peer = f"unix:{name}"
        except Exception:  # cosmetic only
            pass
        out = settings(
            (
                (S_ENABLE_PUSH, 0),
                (S_MAX_CONCURRENT_STREAMS, srv._max_concurrent_streams),
                (S_INITIAL_WINDOW_SIZE, srv._stream_window),
                (S_MAX_FRAME_SIZE, OUR_MAX_FRAME),
                (S_MAX_HEADER_LIST_SIZE, self.decoder.max_header_list_size),
            )
        )
        if srv._conn_window > DEFAULT_WINDOW:
            out += window_update(0, srv._conn_window - DEFAULT_WINDOW)
        transport.write(out)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self._teardown()

    def _teardown(self) -> None:
        """The connection is over (lost, or ended by us): cancel every call, release everything."""
        self.closed = True
        self.server._connections.discard(self)
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        calls = list(self.calls.values())
        self.calls.clear()
        self.blocked.clear()
        self._ready.clear()
        self.wbuf.clear()
        self.pending_bytes = 0
        self._wake_admitted()
        for call in calls:
            call.cancelled = True
            self._release(call)
            if call.task is not None:
                call.task.cancel()
        self.server._conn_idle()

    def pause_writing(self) -> None:
        self.paused = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.closed:
            return
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        self._batch(self._unblock)

    def eof_received(self) -> bool:
        return False

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._rview

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._rview[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        """Parse and act on every complete frame; all output of this batch leaves in one write."""
        if self.closed:
            return
        if self.skip:
            dropped = min(self.skip, len(data))
            self.skip -= dropped
            data = data[dropped:]
            if not data:
                return
        if self.inbuf is not None:
            self.inbuf += data
            if len(self.inbuf) < self.need:
                return
            data = bytes(self.inbuf)
            self.inbuf = None
        self.batching = True
        try:
            self._frames(data)
        except H2ConnectionError as exc:
            self._fatal(exc.code, str(exc))
            return
        except Exception as exc:  # our bug: only this connection pays for it
            log.error("h2server.internal_error", exc_info=exc)
            self._fatal(E_INTERNAL, "internal error", quiet=True)
            return
        finally:
            self.batching = False
        self.flush()

    def _frames(self, buf: bytes) -> None:
        pos = 0
        n = len(buf)
        if not self.preface_ok:
            if n < 24:
                if PREFACE[:n] != buf:
                    raise H2ConnectionError(E_PROTOCOL, "bad connection preface")
                self.inbuf = bytearray(buf)
                self.need = 24
                return
            if buf[:24] != PREFACE:
                raise H2ConnectionError(E_PROTOCOL, "bad connection preface")
            self.preface_ok = True
            pos = 24
        unpack = FH.unpack_from
        while n - pos >= 9 and not self.closed:
            lt, flags, sid = unpack(buf, pos)
            ln = lt >> 8
            ftype = lt & 0xFF
            sid &= 0x7FFFFFFF
            end = pos + 9 + ln
            if self.cont is not None and ftype != T_CONTINUATION:
                raise H2ConnectionError(E_PROTOCOL, "expected CONTINUATION")
            if end > n:
                if self._incomplete(ftype, ln, sid):  # an unknown frame too large to gather: drop it
                    self.skip = end - n
                    return
                break
            start = pos + 9
            if ftype == T_DATA:
                self._on_data(buf, start, end, flags, sid)
            elif ftype == T_HEADERS:
                self._on_headers(buf, start, end, flags, sid)
            elif ftype == T_WINDOW_UPDATE:
                self._on_window_update(buf, start, ln, sid)
            elif ftype == T_PING:
                if ln != 8:
                    raise H2ConnectionError(E_FRAME_SIZE, "bad PING length")
                if sid:
                    raise H2ConnectionError(E_PROTOCOL, "PING on a stream")
                if not flags & F_ACK:
                    self.wbuf.append(FH.pack(8 << 8 | T_PING, F_ACK, 0) + buf[start:end])
            elif ftype == T_SETTINGS:
                self._on_settings(buf, start, ln, flags, sid)
            elif ftype == T_RST_STREAM:
                self._on_rst(ln, sid)
            elif ftype == T_CONTINUATION:
                self._on_continuation(buf, start, end, flags, sid)
            elif ftype == T_GOAWAY:
                if sid:
                    raise H2ConnectionError(E_PROTOCOL, "GOAWAY on a stream")
                if ln < 8:
                    raise H2ConnectionError(E_FRAME_SIZE, "bad GOAWAY length")
                # the client opens no more streams and closes the connection itself
            elif ftype == T_PRIORITY:
                if not sid:
                    raise H2ConnectionError(E_PROTOCOL, "PRIORITY on stream 0")
                if ln != 5:
                    raise H2ConnectionError(E_FRAME_SIZE, "bad PRIORITY length")
            elif ftype == T_PUSH_PROMISE:
                raise H2ConnectionError(E_PROTOCOL, "PUSH_PROMISE from a client")
            # unknown frame types are ignored (RFC 9113 5.5)
            pos = end
        if pos < n and not self.closed:
            self.inbuf = bytearray(buf[pos:])
            self.need = 9 + (U32.unpack_from(buf, pos)[0] >> 8) if n - pos >= 9 else 9

    def _incomplete(self, ftype: int, ln: int, sid: int) -> bool:
        """A frame whose header is in but not all its payload: refuse at once what we would refuse
        once it is whole, rather than gather it first. True: an unknown frame to skip unread."""
        if ftype == T_DATA:
            call = self.calls.get(sid)
            if ln > self.recv_window or (
                call is not None and not call.remote_closed and ln > call.recv_window
            ):
                raise H2ConnectionError(E_FLOW_CONTROL, "DATA beyond the receive window")
        elif ftype == T_HEADERS or ftype == T_CONTINUATION:
            held = self.cont.size if self.cont is not None else 0
            if held + ln > MAX_HEADER_BLOCK + 1 + 255 + PRIORITY_FIELDS:  # with padding and priority
                raise H2ConnectionError(E_ENHANCE_YOUR_CALM, "header block too large")
        elif ftype in _FIXED_LENGTH:
            if ln != _FIXED_LENGTH[ftype]:
                raise H2ConnectionError(E_FRAME_SIZE, f"bad length for frame type {ftype}")
        elif ftype == T_PUSH_PROMISE:
            raise H2ConnectionError(E_PROTOCOL, "PUSH_PROMISE from a client")
        elif ln > MAX_CONTROL_FRAME:
            if ftype == T_SETTINGS or ftype == T_GOAWAY:
                raise H2ConnectionError(E_ENHANCE_YOUR_CALM, f"frame type {ftype} of {ln} bytes")
            return True
        return False

    def _batch(self, fn: Callable[[], None]) -> None:
        """Run `fn` as one output batch (as `data_received` does), with the same error boundary."""
        if self.closed:
            return
        outer = self.batching
        self.batching = True
        try:
            fn()
        except H2ConnectionError as exc:
            self.batching = outer
            self._fatal(exc.code, str(exc))
            return
        except Exception as exc:
            self.batching = outer
            log.error("h2server.internal_error", exc_info=exc)
            self._fatal(E_INTERNAL, "internal error", quiet=True)
            return
        self.batching = outer
        self.flush()

    # ---- output

    def flush(self) -> None:
        """Write what is queued, unless an input batch is running (it writes once at its end)."""
        if self.batching:
            return
        handle = self._flush_handle
        if handle is not None:
            self._flush_handle = None
            handle.cancel()
        self._write_out()

    def _write_out(self) -> None:
        wbuf = self.wbuf
        self.wbytes = 0
        if wbuf and not self.closed:
            data = wbuf[0] if len(wbuf) == 1 else b"".join(wbuf)
            wbuf.clear()
            self.transport.write(data)  # type: ignore[union-attr]

    def flush_soon(self) -> None:
        """Write at the end of this loop iteration (for output queued where nobody flushes after,
        e.g. a window update from a handler's request iterator); a `flush` before then writes it
        sooner and cancels this."""
        if self._flush_handle is None and not self.batching and not self.closed:
            self._flush_handle = self.loop.call_soon(self._flush_cb)

    def _flush_cb(self) -> None:
        self._flush_handle = None
        self.flush()

    def _fatal(self, code: int, message: str, quiet: bool = False) -> None:
        """End this connection with GOAWAY(code); its calls are cancelled at once."""
        if self.closed:
            return
        if not quiet:
            log.warning("h2server.connection_error", code=code, error=message)
        self.wbuf.append(goaway(self.last_sid, code))
        self._write_out()
        transport = self.transport
        self._teardown()
        if transport is not None:
            transport.close()

    def goaway(self) -> None:
        """Announce shutdown: no new streams beyond the ones seen so far; those may finish."""
        if self.draining or self.closed:
            return
        self.draining = True
        self.wbuf.append(goaway(self.last_sid, E_NO_ERROR))
        self.flush()

    def close(self) -> None:
        if self.closed or self.transport is None:
            return
        self.goaway()
        self.closed = True
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
            key, value = SETTING.unpack_from(buf, off)
            if key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise H2ConnectionError(E_FLOW_CONTROL, "initial window too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for call in self.calls.values():
                    call.send_window += delta
                    if call.send_window > MAX_WINDOW:
                        raise H2ConnectionError(E_FLOW_CONTROL, "stream window overflow")
                grow = grow or delta > 0
            elif key == S_MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME <= value <= OUR_MAX_FRAME:
                    raise H2ConnectionError(E_PROTOCOL, "bad max frame size")
                grow = grow or value > self.peer_max_frame
                self.peer_max_frame = value
            elif key == S_ENABLE_PUSH and value > 1:
                raise H2ConnectionError(E_PROTOCOL, "bad ENABLE_PUSH")
            # HEADER_TABLE_SIZE: we never insert into the peer's decoder table, so any size is fine.
            # MAX_CONCURRENT_STREAMS limits streams we open (none); MAX_HEADER_LIST_SIZE: ours are tiny.
        self.wbuf.append(SETTINGS_ACK)
        if grow and self.blocked and not self.paused:
            self._flush_blocked()

    def _on_window_update(self, buf: bytes, start: int, ln: int, sid: int) -> None:
        if ln != 4:
            raise H2ConnectionError(E_FRAME_SIZE, "bad WINDOW_UPDATE length")
        inc = U32.unpack_from(buf, start)[0] & 0x7FFFFFFF
        if sid == 0:
            if inc == 0:
                raise H2ConnectionError(E_PROTOCOL, "zero WINDOW_UPDATE")
            self.send_window += inc
            if self.send_window > MAX_WINDOW:
                raise H2ConnectionError(E_FLOW_CONTROL, "connection window overflow")
            if self.blocked and not self.paused:
                self._flush_blocked()
            return
        call = self.calls.get(sid)
        if call is None:
            if sid > self.last_sid:
                raise H2ConnectionError(E_PROTOCOL, "WINDOW_UPDATE on an idle stream")
            return  # a closed stream: allowed, and nothing to do
        if inc == 0 or call.send_window + inc > MAX_WINDOW:
            self._reset(call, E_PROTOCOL if inc == 0 else E_FLOW_CONTROL)
            return
        call.send_window += inc
        if call.pending and not self.paused:
            self._flush_call(call)
            if self._ready:
                self._start_ready()

    def _on_rst(self, ln: int, sid: int) -> None:
        if ln != 4:
            raise H2ConnectionError(E_FRAME_SIZE, "bad RST_STREAM length")
        if not sid:
            raise H2ConnectionError(E_PROTOCOL, "RST_STREAM on stream 0")
        call = self.calls.get(sid)
        if call is None:
            if sid > self.last_sid:
                raise H2ConnectionError(E_PROTOCOL, "RST_STREAM on an idle stream")
            return
        call.cancelled = True
        call.remote_closed = True
        self._close(call)
        if call.task is not None:
            call.task.cancel()

    def _on_data(self, buf: bytes, start: int, end: int, flags: int, sid: int) -> None:
        if sid == 0:
            raise H2ConnectionError(E_PROTOCOL, "DATA on stream 0")
        ln = end - start  # the flow-controlled length: the whole payload, padding included
        if ln > self.recv_window:
            raise H2ConnectionError(E_FLOW_CONTROL, "DATA beyond the connection window")
        self.recv_window -= ln
        if flags & F_PADDED:
            if not ln:
                raise H2ConnectionError(E_FRAME_SIZE, "padded DATA without a pad length")
            start += 1
            end -= buf[start - 1]
            if end < start:
                raise H2ConnectionError(E_PROTOCOL, "padding longer than the frame")
        call = self.calls.get(sid)
        if call is None or call.remote_closed:
            if sid > self.last_sid:
                raise H2ConnectionError(E_PROTOCOL, "DATA on an idle stream")
            self._credit(ln)  # nobody will read it: hand it straight back
            if call is not None:  # half-closed (remote): RFC 9113 5.1
                self._reset(call, E_STREAM_CLOSED)
            return
        if ln > call.recv_window:
            raise H2ConnectionError(E_FLOW_CONTROL, "DATA beyond the stream window")
        call.recv_window -= ln
        if ln != end - start:  # padding is consumed on arrival
            self.consumed(call, ln - (end - start))
        kind = call.method.kind
        if kind == K_NOT_FOUND:
            self._credit(end - start)
            self.finish(call, grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {call.method.path}")
            return
        if end > start:
            if kind <= K_US:  # unary request: gather the body; handed back when its handler starts
                body = call.body
                if body is None:
                    call.body = body = buf[start:end]
                else:
                    if type(body) is not bytearray:
                        call.body = body = bytearray(body)
                    body += memoryview(buf)[start:end]
                if len(body) >= 5:
                    mlen = MSG_PREFIX.unpack_from(body, 0)[1]
                    if mlen > self.server._max_recv:
                        self.finish(
                            call,
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            h2call.too_large(mlen, self.server._max_recv),
                        )
                        return
            else:
                self._on_stream_data(call, buf, start, end)
                if call.closed:
                    return
        if flags & F_END_STREAM:
            self._on_remote_end(call)

    def _on_stream_data(self, call: Call, buf: bytes, start: int, end: int) -> None:
        """A streamed request's bytes: complete messages queue for the handler's iterator."""
        rbuf = call.rbuf
        if rbuf is None:
            call.rbuf = rbuf = bytearray(memoryview(buf)[start:end])
        else:
            rbuf += memoryview(buf)[start:end]
        got = h2call.split_messages(rbuf, self.server._max_recv)
        if isinstance(got, RpcStatus):
            self.finish(call, got.code, got.details)
            return
        if got:
            call.queue.extend(got)  # type: ignore[union-attr]
            self._wake(call)

    def _on_headers(self, buf: bytes, start: int, end: int, flags: int, sid: int) -> None:
        if sid == 0:
            raise H2ConnectionError(E_PROTOCOL, "HEADERS on stream 0")
        if flags & F_PADDED:
            if end <= start:
                raise H2ConnectionError(E_FRAME_SIZE, "padded HEADERS without a pad length")
            start += 1
            end -= buf[start - 1]
            if end < start:
                raise H2ConnectionError(E_PROTOCOL, "padding longer than the frame")
        if flags & F_PRIORITY:
            start += PRIORITY_FIELDS
            if end < start:
                raise H2ConnectionError(E_FRAME_SIZE, "HEADERS too short for its priority fields")
        if end - start > MAX_HEADER_BLOCK:
            raise H2ConnectionError(E_ENHANCE_YOUR_CALM, "header block too large")
        fragment = buf[start:end]
        if not flags & F_END_HEADERS:
            self.cont = _HeaderBlock(sid, flags, fragment)
            return
        self._on_header_block(sid, flags, fragment)

    def _on_continuation(self, buf: bytes, start: int, end: int, flags: int, sid: int) -> None:
        cont = self.cont
        if cont is None or cont.sid != sid:
            raise H2ConnectionError(E_PROTOCOL, "unexpected CONTINUATION")
        cont.continuations += 1
        cont.size += end - start
        if cont.continuations > MAX_CONTINUATIONS:
            raise H2ConnectionError(E_ENHANCE_YOUR_CALM, "too many CONTINUATION frames")
        if cont.size > MAX_HEADER_BLOCK:
            raise H2ConnectionError(E_ENHANCE_YOUR_CALM, "header block too large")
        if end > start:
            cont.fragments.append(buf[start:end])
        if flags & F_END_HEADERS:
            self.cont = None
            self._on_header_block(sid, cont.flags, b"".join(cont.fragments))

    def _on_header_block(self, sid: int, flags: int, block: bytes) -> None:
        head = self.decoder.head(block)  # always decode: keeps the HPACK state in step
        call = self.calls.get(sid)
        if call is not None:  # trailers from the client
            if not flags & F_END_STREAM:
                self._reset(call, E_PROTOCOL)
            elif call.remote_closed:
                self._reset(call, E_STREAM_CLOSED)
            else:
                self._on_remote_end(call)
            return
        if not sid & 1:
            raise H2ConnectionError(E_PROTOCOL, "even stream id from a client")
        if sid <= self.last_sid:  # a stream already closed
            self.wbuf.append(rst_stream(sid, E_STREAM_CLOSED))
            return
        self.last_sid = sid
        srv = self.server
        if self.draining or len(self.calls) >= srv._max_concurrent_streams:
            self.wbuf.append(rst_stream(sid, E_REFUSED_STREAM))
            return
        if head.malformed:  # RFC 9113 8.1.1: a stream error of type PROTOCOL_ERROR
            self.wbuf.append(rst_stream(sid, E_PROTOCOL))
            return
        if not head.ok:
            self.wbuf.extend(header_frames(sid, BAD_REQUEST, True, self.peer_max_frame))
            return
        method = srv._lookup(head.path, head.metadata)
        call = Call(self, sid, method, head.metadata, self.peer_initial_window, srv._stream_window)
        self.calls[sid] = call
        if head.timeout is not None:
            call.deadline = self.loop.time() + head.timeout
            call.timer = self.loop.call_at(call.deadline, self._on_deadline, call)
        if method.kind == K_SU or method.kind == K_SS:
            call.queue = deque()
            self._submit(call)
        if flags & F_END_STREAM and not call.closed:
            self._on_remote_end(call)

    def _on_remote_end(self, call: Call) -> None:
        call.remote_closed = True
        kind = call.method.kind
        if kind == K_NOT_FOUND:
            self.finish(call, grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {call.method.path}")
        elif kind <= K_US:
            if not call.closed and not call.started:
                self._submit(call)
        else:
            self._wake(call)

    def _on_deadline(self, call: Call) -> None:
        call.timer = None
        if call.closed:
            return
        call.expired = True

        def expire() -> None:
            self._drop_pending(call)  # the status goes out now, not after data the client is not taking
            self.finish(call, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

        self._batch(expire)
        if call.task is not None:
            call.task.cancel()

    def _reset(self, call: Call, code: int) -> None:
        """A stream error: RST_STREAM(code), the call cancelled."""
        self.wbuf.append(rst_stream(call.sid, code))
        call.remote_closed = True
        call.cancelled = True
        self._close(call)
        if call.task is not None and call.task is not asyncio.current_task():
            call.task.cancel()
        self.flush()

    # ---- receive windows

    def _credit(self, n: int) -> None:
        """`n` received bytes are consumed: hand them back to the connection window (in batches of
        `conn_update_at`, so small RPCs do not each cost a WINDOW_UPDATE)."""
        self.recv_credit += n
        if self.recv_credit >= self.conn_update_at:
            credit, self.recv_credit = self.recv_credit, 0
            self.recv_window += credit
            self.wbuf.append(window_update(0, credit))

    def consumed(self, call: Call, n: int) -> None:
        """`n` bytes of `call`'s request were taken (or were padding): hand them back to both windows."""
        if self.closed:
            return
        self._credit(n)
        if not call.remote_closed and not call.closed:
            call.recv_credit += n
            if call.recv_credit >= self.stream_update_at:
                credit, call.recv_credit = call.recv_credit, 0
                call.recv_window += credit
                self.wbuf.append(window_update(call.sid, credit))
        if self.wbuf and not self.batching:
            self.flush_soon()

    def _wake(self, call: Call) -> None:
        w = call.waiter
        if w is not None and not w.done():
            w.set_result(None)

    # ---- starting handlers

    def congested(self) -> bool:
        """Back-pressure holds: the transport is full, or too much waits for the peer's windows."""
        return self.paused or self.pending_bytes > PENDING_LIMIT

    def _submit(self, call: Call) -> None:
        """Start the call's handler now, or queue it while back-pressure holds."""
        if self._ready or self.congested():
            self._ready.append(call)
            return
        self._start(call)

    async def admit(self) -> None:
        """Hold a handler Task that is about to begin while the connection is congested. (Calls are
        also queued before their Task exists, `_submit`; this covers Tasks created before the
        congestion began that have not run yet, as on 3.11 where Tasks start a loop turn later.)"""
        while self.congested() and not self.closed:
            fut = self.loop.create_future()
            self._admit_waiters.append(fut)
            await fut

    def _wake_admitted(self) -> None:
        waiters, self._admit_waiters = self._admit_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _start_ready(self) -> None:
        """Start queued calls while back-pressure allows. Not re-entered: a queued call that starts
        eagerly and finishes at once lands back here, and the outer loop goes on instead."""
        if self._admit_waiters and not self.congested():
            self._wake_admitted()
        if self._starting:
            return
        self._starting = True
        try:
            ready = self._ready
            while ready and not self.congested() and not self.closed:
                call = ready.popleft()
                if not call.closed:
                    self._start(call)
        finally:
            self._starting = False

    def _start(self, call: Call) -> None:
        call.started = True
        if call.body is not None:  # a unary request is consumed when its handler starts
            self._credit(len(call.body))
        try:
            coro = h2call.handler_coroutine(call)
        except RpcStatus as exc:
            self.finish(call, exc.code, exc.details)
            return
        task = h2call.start_handler(self.loop, coro, self.server._eager)
        if not task.done():  # an eager Task that already finished has nothing left to cancel
            call.task = task

    # ---- output: headers, messages, trailers

    def send_message(self, call: Call, data: bytes) -> None:
        """Queue one serialized response message; what the send windows do not take waits in the call."""
        n = len(data)
        max_send = self.server._max_send
        if n > max_send:
            raise RpcStatus(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"grpc: trying to send message larger than max ({n} vs. {max_send})",
            )
        if call.closed:
            return
        sid = call.sid
        wbuf = self.wbuf
        if not call.headers_sent:
            call.headers_sent = True
            wbuf.append(
                FH.pack(len(RESPONSE_HEADERS) << 8 | T_HEADERS, F_END_HEADERS, sid) + RESPONSE_HEADERS
            )
        m = n + 5
        if call.pending is None and m <= self.send_window and m <= call.send_window:
            self.send_window -= m
            call.send_window -= m
            self.wbytes += m
            maxf = self.peer_max_frame
            if m <= maxf:  # one DATA frame: grpcio's clients (4 MiB frames)
                wbuf.append(DATA_MSG.pack(m << 8, 0, sid, 0, n))
                wbuf.append(data)
            else:  # several: grpc-go (containerd) reads 16 KiB frames, a 32 KiB Read is three
                view = memoryview(data)
                pos = maxf - 5
                wbuf.append(DATA_MSG.pack(maxf << 8, 0, sid, 0, n))
                wbuf.append(view[:pos])
                while pos < n:
                    k = min(maxf, n - pos)
                    wbuf.append(FH.pack(k << 8 | T_DATA, 0, sid))
                    wbuf.append(view[pos : pos + k])
                    pos += k
        else:
            if call.pending is None:
                call.pending = deque()
            call.pending.append(MSG_PREFIX.pack(0, n))
            call.pending.append(memoryview(data))
            self.pending_bytes += m
            self._flush_call(call)
        if self.wbytes >= FLUSH_AT:  # let the transport see it now (and push back: pause_writing)
            self._write_out()

    def _flush_call(self, call: Call) -> None:
        """Send what the windows now allow of a blocked call's pending data (and then its trailers)."""
        pending = call.pending
        wbuf = self.wbuf
        sid = call.sid
        maxf = self.peer_max_frame
        while pending:
            allowed = min(self.send_window, call.send_window, maxf)
            if allowed <= 0:
                break
            parts: list[bytes | memoryview] = []
            take = 0
            while pending and take < allowed:
                seg = pending[0]
                room = allowed - take
                if len(seg) <= room:
                    pending.popleft()
                    parts.append(seg)
                    take += len(seg)
                else:
                    parts.append(seg[:room])
                    pending[0] = memoryview(seg)[room:]
                    take = allowed
            self.send_window -= take
            call.send_window -= take
            self.pending_bytes -= take
            self.wbytes += take
            wbuf.append(FH.pack(take << 8 | T_DATA, 0, sid))
            wbuf.extend(parts)
        if pending:
            self.blocked[sid] = call
            return
        call.pending = None
        self.blocked.pop(sid, None)
        if call.pending_trailer is not None:
            wbuf.append(call.pending_trailer)
            call.pending_trailer = None
            self._close(call)
        elif call.drain is not None and not self.paused:
            self._wake_drain(call)

    def _flush_blocked(self) -> None:
        for call in list(self.blocked.values()):
            if self.send_window <= 0:
                break
            self._flush_call(call)
        if self._ready:
            self._start_ready()

    def _unblock(self) -> None:
        """Writing may go on (resume_writing): blocked data, suspended handlers, queued calls."""
        if self.blocked:
            self._flush_blocked()
        for call in list(self.calls.values()):
            if call.drain is not None and not call.pending:
                self._wake_drain(call)
        self._start_ready()

    def finish(
        self, call: Call, code: grpc.StatusCode, details: str | None = None, trailing: tuple[Any, ...] = ()
    ) -> None:
        """Send the status (trailers, or a trailers-only response) and close the call."""
        if call.closed or call.pending_trailer is not None:
            return
        block = (
            TRAILERS_OK
            if code is OK and not details and not trailing
            else status_block(code, details, trailing)
        )
        if not call.headers_sent:
            call.headers_sent = True
            block = RESPONSE_HEADERS + block
        if len(block) <= self.peer_max_frame:
            frame = FH.pack(len(block) << 8 | T_HEADERS, F_END_STREAM | F_END_HEADERS, call.sid) + block
        else:
            frame = b"".join(header_frames(call.sid, block, True, self.peer_max_frame))
        if call.pending:
            call.pending_trailer = frame
            return
        self.wbuf.append(frame)
        self._close(call)

    def _drop_pending(self, call: Call) -> None:
        if call.pending:
            self.pending_bytes -= sum(len(p) for p in call.pending)
        call.pending = None
        call.pending_trailer = None
        self.blocked.pop(call.sid, None)

    def _close(self, call: Call) -> None:
        if call.closed:
            return
        # A client still sending (we answered early: error, unknown method) gets no RST_STREAM(NO_ERROR)
        # from us: gRPC clients stop and reset the stream themselves once they see the status, and
        # grpcio's core reports a reset that races its own in-flight write as INTERNAL. DATA that still
        # arrives for the forgotten stream is handed straight back to the connection window.
        self.calls.pop(call.sid, None)
        self._drop_pending(call)
        self._release(call)
        if self._ready or self._admit_waiters:
            self._start_ready()
        if self.draining and not self.calls:
            self.server._conn_idle()

    def _release(self, call: Call) -> None:
        call.closed = True
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None
        held = call.held()
        if held and not self.closed:
            self._credit(held)  # what the handler never took
        call.body = None
        call.rbuf = None
        call.queue = None
        self._wake(call)
        self._wake_drain(call)
        if call.done_cbs:
            cbs, call.done_cbs = call.done_cbs, None
            for cb in cbs:
                try:
                    cb(call.ctx)  # type: ignore[arg-type]
                except Exception:  # a callback must not break the connection
                    log.exception("h2server.done_callback_failed")
        call.ctx = None  # break the call <-> context cycle: both go by refcount, no GC passes

    def _wake_drain(self, call: Call) -> None:
        fut = call.drain
        if fut is not None:
            call.drain = None
            if not fut.done():
                fut.set_result(None)

    async def drain(self, call: Call) -> None:
        """Suspend a handler while its message waits for send window or the transport is full."""
        self.flush()
        while (call.pending or self.paused) and not call.closed:
            call.drain = self.loop.create_future()
            await call.drain

    def buffered(self) -> dict[str, int]:
        """What this connection holds in memory for its peer, in bytes (for tests and diagnostics):
        the transport's write buffer, response data waiting for send window, request data received
        and not yet taken by a handler."""
        transport = self.transport.get_write_buffer_size() if self.transport is not None else 0
        inbound = sum(call.held() for call in self.calls.values())
        return {"transport": transport, "pending": self.pending_bytes, "inbound": inbound}
