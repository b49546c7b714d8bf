"""One gRPC call on our HTTP/2 server: its state, the `ServicerContext` handlers see, the iterator of
streamed requests, and the coroutines that run a handler inside an `asyncio.Task`.

Handlers always run inside a real Task, so `asyncio.current_task()`, `asyncio.timeout()` and
`asyncio.wait_for()` work anywhere in them (the daemon's Read path reaches `asyncio.wait_for` in
kernel/store/partial.py, which 3.12+ refuses outside a Task). On Python 3.12+ the Task starts
eagerly (`eager_start=True`): its first step runs at once, inside the protocol callback that
completed the request, so a handler that finishes without suspending costs about what calling it
inline did, and its whole response leaves in that callback's one write. Python 3.11 has no eager
start and no public way to make a Task current without scheduling it, so there the Task runs one
loop iteration later (`loop.create_task`) and writes its response itself when it ends or first
suspends: still one write per response.

Output a handler Task queues is written when the Task's step ends (its `finally`) or just before
it suspends: the Task bodies step a handler's response generator by hand (`_Resume`) to see
whether it suspended, and the waits of our own (`drain`, the request iterator) write first. So a
response that completes without suspending leaves in one write with no extra loop callback, and
one that suspends never leaves bytes sitting in the buffer meanwhile.

The protocol (`snapshotter.h2conn.H2Protocol`) owns everything on the wire; a call only asks it to
send a message, finish with a status, hand received bytes back to the peer's window (`consumed`)
or wait for room (`drain`, `admit`).
"""

from __future__ import annotations

import asyncio
import base64
import sys
from collections import deque
from collections.abc import Callable, Coroutine, Generator, Sequence
from types import AsyncGeneratorType
from typing import Any, Protocol

import grpc
import structlog

from snapshotter.h2wire import MSG_PREFIX, PENDING_LIMIT


class Connection(Protocol):
    """What a call needs of its connection (`snapshotter.h2conn.H2Protocol`); a Protocol, so this
    module does not import the one above it."""

    loop: asyncio.AbstractEventLoop
    peer: str
    paused: bool
    pending_bytes: int

    def send_message(self, call: Call, data: bytes) -> None: ...
    def finish(
        self, call: Call, code: grpc.StatusCode, details: str | None = None, trailing: tuple[Any, ...] = ()
    ) -> None: ...
    def flush(self) -> None: ...
    def consumed(self, call: Call, n: int) -> None: ...
    async def drain(self, call: Call) -> None: ...
    async def admit(self) -> None: ...


__all__ = ["AbortError", "Call", "Method", "RequestIterator", "RpcStatus", "ServicerContext", "start_handler"]

log = structlog.get_logger(__name__)

OK = grpc.StatusCode.OK

# What a method takes and returns: unary/streamed request x unary/streamed response; or unknown.
K_UU, K_US, K_SU, K_SS, K_NOT_FOUND = 0, 1, 2, 3, 4


class AbortError(grpc.aio.AbortError):
    """Raised by `ServicerContext.abort`; code that special-cases grpc.aio.AbortError sees it as one."""


class RpcStatus(Exception):
    """Finish the call with this status: a protocol-level outcome (bad request, limits), not a
    handler error, so it is not logged as one."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class Method:
    """A registered method, resolved once from a `grpc.RpcMethodHandler` (or unknown: UNIMPLEMENTED,
    answered once the client has sent something, see `H2Protocol`)."""

    __slots__ = ("kind", "fn", "deserialize", "serialize", "path")

    def __init__(self, path: str, h: grpc.RpcMethodHandler[Any, Any] | None) -> None:
        self.path = path
        self.fn: Callable[..., Any] | None
        self.deserialize: Callable[[bytes], Any] | None
        self.serialize: Callable[[Any], bytes] | None
        if h is None:
            self.kind, self.fn, self.deserialize, self.serialize = K_NOT_FOUND, None, None, None
            return
        if h.request_streaming:
            self.kind, self.fn = (K_SS, h.stream_stream) if h.response_streaming else (K_SU, h.stream_unary)
        else:
            self.kind, self.fn = (K_US, h.unary_stream) if h.response_streaming else (K_UU, h.unary_unary)
        self.deserialize = h.request_deserializer
        self.serialize = h.response_serializer


class Call:
    """The server's state for one stream. Plain slots: there is one of these per RPC.

    Receive side: `recv_window` is what the peer may still send on this stream; bytes received sit
    in `body` (unary request, gathered whole) or `rbuf`/`queue` (streamed request) until the
    handler takes them, and only then are they handed back to the peer's windows. Send side:
    `send_window` is the peer's window for us; a message it cannot take waits in `pending`
    (with the trailers, `pending_trailer`, behind it)."""

    __slots__ = (
        "sid", "conn", "method", "meta", "ctx", "send_window", "recv_window", "recv_credit", "pending",
        "pending_trailer", "headers_sent", "remote_closed", "closed", "cancelled", "expired", "started",
        "task", "timer", "deadline", "body", "rbuf", "queue", "waiter", "drain", "done_cbs",
    )  # fmt: skip

    def __init__(
        self,
        conn: Connection,
        sid: int,
        method: Method,
        meta: tuple[tuple[str, str], ...],
        send_window: int,
        recv_window: int,
    ) -> None:
        self.sid = sid
        self.conn = conn
        self.method = method
        self.meta = meta
        self.ctx: ServicerContext | None = ServicerContext(self)
        self.send_window = send_window
        self.recv_window = recv_window
        self.recv_credit = 0  # consumed bytes not yet handed back with a stream WINDOW_UPDATE
        self.pending: deque[bytes | memoryview] | None = None  # response bytes waiting for send window
        self.pending_trailer: bytes | None = None  # trailer frames to send once `pending` is out
        self.headers_sent = False
        self.remote_closed = False
        self.closed = False
        self.cancelled = False
        self.expired = False
        self.started = False
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.deadline: float | None = None
        self.body: bytes | bytearray | None = None  # unary request: the DATA received so far
        self.rbuf: bytearray | None = None  # streamed request: bytes of an incomplete message
        self.queue: deque[bytes] | None = None  # streamed request: complete messages not yet taken
        self.waiter: asyncio.Future[None] | None = None
        self.drain: asyncio.Future[None] | None = None
        self.done_cbs: list[Callable[[ServicerContext], Any]] | None = None

    def held(self) -> int:
        """Flow-controlled bytes received on this stream that no handler has taken yet."""
        n = len(self.body or b"") + len(self.rbuf or b"")
        if self.queue:
            n += sum(len(m) + 5 for m in self.queue)
        return n


class ServicerContext:
    """The part of `grpc.aio.ServicerContext` that servicers use, with grpc.aio's semantics (so
    servicers run unchanged on either server): a code set and details are sent as the status when
    the handler returns; `abort` ends the call at once; `cancelled()` is true once the client reset
    the stream or the deadline passed."""

    __slots__ = ("_call", "_code", "_details", "_trailing", "_aborted")

    def __init__(self, call: Call) -> None:
        self._call = call
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._trailing: tuple[tuple[str, Any], ...] = ()
        self._aborted = False

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence[tuple[str, Any]] = ()
    ) -> None:
        """End the call with `code` (never OK), as grpc.aio does: by raising AbortError."""
        if code is OK:
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

    def set_trailing_metadata(self, trailing_metadata: Sequence[tuple[str, Any]]) -> None:
        self._trailing = tuple(trailing_metadata)

    def trailing_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._trailing

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """The request's custom metadata; `-bin` values decoded from base64, as grpcio gives them."""
        out: list[tuple[str, str | bytes]] = []
        for k, v in self._call.meta:
            if k.endswith("-bin"):
                out.append((k, base64.b64decode(v + "=" * (-len(v) % 4))))
            else:
                out.append((k, v))
        return tuple(out)

    def time_remaining(self) -> float | None:
        dl = self._call.deadline
        if dl is None:
            return None
        return max(0.0, dl - self._call.conn.loop.time())

    def cancelled(self) -> bool:
        return self._call.cancelled or self._call.expired

    def done(self) -> bool:
        return self._call.closed

    def peer(self) -> str:
        return self._call.conn.peer

    def add_done_callback(self, callback: Callable[[ServicerContext], Any]) -> None:
        call = self._call
        if call.closed:
            callback(self)
            return
        if call.done_cbs is None:
            call.done_cbs = []
        call.done_cbs.append(callback)

    def send_initial_metadata(self, initial_metadata: Sequence[tuple[str, Any]]) -> None:
        raise NotImplementedError("initial metadata is not supported by h2server")

    def disable_next_message_compression(self) -> None:
        """Messages are never compressed here."""

    def set_compression(self, compression: Any) -> None:
        """Messages are never compressed here."""


class RequestIterator:
    """The async iterator of request messages handed to request-streaming handlers. Taking a
    message hands its bytes back to the peer's windows: that is the stream's flow control, so a
    handler that does not read holds the client to one stream window of data."""

    __slots__ = ("_call", "_deserialize")

    def __init__(self, call: Call) -> None:
        self._call = call
        self._deserialize = call.method.deserialize

    def __aiter__(self) -> RequestIterator:
        return self

    async def __anext__(self) -> Any:
        call = self._call
        while not call.queue:
            if call.remote_closed or call.closed:
                raise StopAsyncIteration
            call.conn.flush()  # this Task suspends: what it queued goes now (module docstring)
            call.waiter = call.conn.loop.create_future()
            try:
                await call.waiter
            finally:
                call.waiter = None
        data = call.queue.popleft()
        call.conn.consumed(call, len(data) + 5)
        if self._deserialize is None:
            return data
        try:
            return self._deserialize(data)
        except Exception as exc:
            raise RpcStatus(grpc.StatusCode.INTERNAL, f"failed to deserialize request: {exc}") from exc

    async def read(self) -> Any:
        """grpc.aio's `read()`: the next message, or `grpc.aio.EOF` after the last."""
        try:
            return await self.__anext__()
        except StopAsyncIteration:
            return _EOF


_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]  # grpc-stubs do not declare it


# ------------------------------------------------------------------------------------------ tasks

if sys.version_info >= (3, 12):

    def start_handler(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None], eager: bool
    ) -> asyncio.Task[None]:
        """A Task for the handler; eager: its first step runs now (see the module docstring)."""
        return asyncio.Task(coro, loop=loop, eager_start=eager)

else:

    def start_handler(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None], eager: bool
    ) -> asyncio.Task[None]:
        """A Task for the handler (3.11 has no eager start: it runs on the next loop iteration).
        `asyncio.Task` itself rather than `loop.create_task`, as on 3.12+: a little cheaper, and
        the same Task whichever task factory the loop has."""
        return asyncio.Task(coro, loop=loop)


def _status_for(call: Call, exc: BaseException | None) -> tuple[grpc.StatusCode, str | None, tuple[Any, ...]]:
    """The status a handler's outcome stands for, as grpc.aio maps it."""
    ctx = call.ctx
    if isinstance(exc, RpcStatus):
        return exc.code, exc.details, ()
    if ctx is None:  # the call was released under the handler (reset, deadline, shutdown)
        return grpc.StatusCode.CANCELLED, "Cancelled", ()
    if ctx._aborted or exc is None:
        return ctx._code or OK, ctx._details, ctx._trailing
    if ctx._code is not None and ctx._code is not OK:
        return ctx._code, ctx._details, ctx._trailing
    if not isinstance(exc, grpc.aio.AbortError):
        log.error("h2server.handler_failed", method=call.method.path, exc_info=exc)
    return grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc)}: {exc}", ctx._trailing


def complete(call: Call) -> None:
    """The handler returned normally (all messages queued): send the status it set, or OK."""
    if not call.closed:
        ctx = call.ctx
        if ctx is not None and ctx._code is None and ctx._details is None and not ctx._trailing:
            call.conn.finish(call, OK)  # the common case, without the general mapping
            return
        code, details, trailing = _status_for(call, None)
        call.conn.finish(call, code, details, trailing)


def fail(call: Call, exc: BaseException) -> None:
    """The handler raised: map the exception to a status (never OK) and send it."""
    if call.closed:
        return
    code, details, trailing = _status_for(call, exc)
    if code is OK:
        code, details = grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc)}: {exc}"
    call.conn.finish(call, code, details, trailing)


def respond_unary(call: Call, res: Any) -> None:
    """Send a unary handler's response message (unless it set an error code) and the status."""
    ctx = call.ctx
    if ctx is not None and ctx._code is not None and ctx._code is not OK:  # set_code(error) + return
        complete(call)
        return
    ser = call.method.serialize
    call.conn.send_message(call, res if ser is None else ser(res))
    complete(call)


async def run_unary_unary(call: Call, req: Any) -> None:
    """Task body of a unary-unary call."""
    conn = call.conn
    try:
        if conn.paused or conn.pending_bytes > PENDING_LIMIT:
            await conn.admit()
            if call.closed:  # deadline, reset or shutdown while it waited
                return
        res = call.method.fn(req, call.ctx)  # type: ignore[misc]
        if hasattr(res, "__await__"):
            res = await res
        if not call.closed:
            respond_unary(call, res)
    except asyncio.CancelledError:
        if not call.closed:
            conn.finish(call, grpc.StatusCode.CANCELLED, "Cancelled")
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # becomes the call's status
        fail(call, exc)
    finally:
        call.task = None
        conn.flush()


async def run_unary_stream(call: Call, req: Any) -> None:
    """Task body of a unary-request, streamed-response call. An async generator handler (what
    servicers write, and containerd's Read) is driven here directly: this is the hot path."""
    conn = call.conn
    gen: Any = None
    try:
        if conn.paused or conn.pending_bytes > PENDING_LIMIT:
            await conn.admit()
            if call.closed:
                return
        gen = call.method.fn(req, call.ctx)  # type: ignore[misc]
        if type(gen) is AsyncGeneratorType:
            ser = call.method.serialize
            anext = gen.__anext__
            while not call.closed:
                step = anext()
                try:
                    msg = step.send(None)
                except StopIteration as stop:  # the generator yielded without suspending
                    msg = stop.value
                except StopAsyncIteration:
                    break
                else:  # it suspends: write what is queued, then let the Task wait
                    conn.flush()
                    try:
                        msg = await _Resume(step, msg)
                    except StopAsyncIteration:
                        break
                conn.send_message(call, msg if ser is None else ser(msg))
                if call.pending or conn.paused:
                    del msg  # wait holding only the bytes in `pending`
                    await conn.drain(call)
        else:
            if hasattr(gen, "__await__") and not hasattr(gen, "__anext__"):
                gen = await gen  # a coroutine returning an iterable
            await _send_all(call, gen)
        complete(call)
    except asyncio.CancelledError:
        if not call.closed:
            conn.finish(call, grpc.StatusCode.CANCELLED, "Cancelled")
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        fail(call, exc)
    finally:
        call.task = None
        conn.flush()
        if getattr(gen, "ag_frame", None) is not None:
            await _aclose(gen)


async def run_request_streaming(call: Call) -> None:
    """Task body of a streamed-request call (unary or streamed response)."""
    conn = call.conn
    m = call.method
    it = RequestIterator(call)
    gen: Any = None
    try:
        if conn.paused or conn.pending_bytes > PENDING_LIMIT:
            await conn.admit()
            if call.closed:
                return
        if m.kind == K_SU:
            res = m.fn(it, call.ctx)  # type: ignore[misc]
            if hasattr(res, "__await__"):
                res = await res
            if not call.closed:
                respond_unary(call, res)
        else:
            gen = m.fn(it, call.ctx)  # type: ignore[misc]
            if hasattr(gen, "__await__") and not hasattr(gen, "__anext__"):
                gen = await gen  # a coroutine returning an iterable (or None: no messages)
            await _send_all(call, gen if hasattr(gen, "__anext__") else gen or ())
            complete(call)
    except asyncio.CancelledError:
        if not call.closed:
            conn.finish(call, grpc.StatusCode.CANCELLED, "Cancelled")
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        fail(call, exc)
    finally:
        call.task = None
        conn.flush()
        if getattr(gen, "ag_frame", None) is not None:
            await _aclose(gen)


async def _send_all(call: Call, gen: Any) -> None:
    """Send a handler's response messages, from an async generator or a plain iterable, and wait
    whenever the stream's send window or the connection's write buffer holds them back: a
    handler whose client does not read is suspended here, holding at most one message (the one
    waiting in `Call.pending`; the message object itself is dropped before waiting)."""
    conn = call.conn
    ser = call.method.serialize
    if hasattr(gen, "__anext__"):
        anext = gen.__anext__
        while not call.closed:
            step = anext()
            if not hasattr(step, "send"):  # an awaitable that is not a coroutine: await it plainly
                conn.flush()
                try:
                    msg = await step
                except StopAsyncIteration:
                    return
            else:
                try:
                    msg = step.send(None)
                except StopIteration as stop:  # no suspension: the message is here
                    msg = stop.value
                except StopAsyncIteration:
                    return
                else:  # it suspends: write what is queued, then let the Task wait
                    conn.flush()
                    try:
                        msg = await _Resume(step, msg)
                    except StopAsyncIteration:
                        return
            conn.send_message(call, msg if ser is None else ser(msg))
            if call.pending or conn.paused:
                del msg
                await conn.drain(call)
        return
    for msg in gen:
        if call.closed:
            return
        conn.send_message(call, msg if ser is None else ser(msg))
        if call.pending or conn.paused:
            del msg
            await conn.drain(call)


class _Resume:
    """Awaitable that continues a coroutine (or async-generator step) whose first step already ran
    and suspended on `first` (what it yielded to the Task). Awaited from the Task it behaves
    exactly as if the Task had driven it from the start: `first` goes to the Task, and values and
    exceptions (cancellation included) are forwarded. It lets a Task body see whether a handler's
    step suspended, so what the step queued is written then, or with the rest of the response
    when it did not."""

    __slots__ = ("_step", "_first")

    def __init__(self, step: Any, first: Any) -> None:
        self._step = step
        self._first = first

    def __await__(self) -> Generator[Any, Any, Any]:
        step = self._step
        y = self._first
        self._first = None
        while True:
            try:
                v = yield y
            except BaseException as exc:  # forwarded into the step (cancellation, GeneratorExit)
                try:
                    y = step.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    y = step.send(v)
                except StopIteration as stop:
                    return stop.value


async def _aclose(gen: Any) -> None:
    """Close a response generator a stream abandoned mid-way (its `finally` runs; the stream is over)."""
    if hasattr(gen, "aclose"):
        try:
            await gen.aclose()
        except BaseException:  # best effort: nobody is left to tell
            pass


def request_of(call: Call) -> Any:
    """The one request message of a unary-request call, deserialized; RpcStatus if it is not one."""
    body = call.body
    call.body = None
    if body is None or len(body) < 5:
        raise RpcStatus(grpc.StatusCode.INTERNAL, "grpc: expected one request message, got none")
    flag, mlen = MSG_PREFIX.unpack_from(body, 0)
    if flag:
        raise RpcStatus(grpc.StatusCode.UNIMPLEMENTED, "grpc: compressed messages are not supported")
    if mlen + 5 != len(body):
        raise RpcStatus(grpc.StatusCode.INTERNAL, "grpc: expected exactly one request message")
    payload = body[5:] if isinstance(body, bytes) else bytes(memoryview(body)[5:])
    deserialize = call.method.deserialize
    if deserialize is None:
        return payload
    try:
        return deserialize(payload)
    except Exception as exc:
        raise RpcStatus(grpc.StatusCode.INTERNAL, f"failed to deserialize request: {exc}") from exc


def handler_coroutine(call: Call) -> Coroutine[Any, Any, None]:
    """The Task body for a call whose request side is ready (raises RpcStatus for a bad request)."""
    kind = call.method.kind
    if kind == K_UU:
        return run_unary_unary(call, request_of(call))
    if kind == K_US:
        return run_unary_stream(call, request_of(call))
    return run_request_streaming(call)


def split_messages(buf: bytearray, max_len: int) -> list[bytes] | RpcStatus:
    """Complete gRPC messages at the front of `buf` (removed from it), or the status that ends
    the call when a prefix announces a compressed or oversized message."""
    out: list[bytes] = []
    pos = 0
    n = len(buf)
    while n - pos >= 5:
        flag, mlen = MSG_PREFIX.unpack_from(buf, pos)
        if mlen > max_len:
            return RpcStatus(grpc.StatusCode.RESOURCE_EXHAUSTED, too_large(mlen, max_len))
        if flag:
            return RpcStatus(grpc.StatusCode.UNIMPLEMENTED, "grpc: compressed messages are not supported")
        if n - pos - 5 < mlen:
            break
        out.append(bytes(buf[pos + 5 : pos + 5 + mlen]))
        pos += 5 + mlen
    if pos:
        del buf[:pos]
    return out


def too_large(mlen: int, max_len: int) -> str:
    """grpc-go's wording for a request over the receive limit."""
    return f"grpc: received message larger than max ({mlen} vs. {max_len})"
