"""A gRPC-over-HTTP/2 server on asyncio, tuned for many small sequential RPCs.

containerd 1.6 unpacks a layer through the content proxy with one server-streaming `Read` RPC per
32 KiB ReadAt, strictly one after another. grpcio (sync or asyncio) and grpclib spend ~0.7 ms of server
CPU on each such RPC; this server does the same work in a fraction of that by speaking just the part of
HTTP/2 (RFC 9113) that gRPC clients use, over a unix socket with prior knowledge (cleartext h2, which is
what grpc-go uses there), directly on an `asyncio.Protocol`. (A rebuild on the `h2` library's state
machine cost ~2.9x the CPU per Read; bench/RESULTS.md has the figures and why.)

Drop-in for `grpc.aio.server()` as far as PeerSync needs:

    server = H2Server(options=[("grpc.max_receive_message_length", 16 << 20)])
    content_pb2_grpc.add_ContentServicer_to_server(servicer, server)   # generated code works unchanged
    server.add_insecure_port("unix:/run/peersync.sock")   # or add_socket(listener) (systemd)
    await server.start(); ...; await server.stop(grace=5)

Handlers follow the grpc.aio conventions: `async def` for unary responses, async generators for
streamed responses, and an async iterator of requests for streamed requests; `context` is a
`ServicerContext` offering the grpc.aio methods servicers use (`abort` raises a subclass of
`grpc.aio.AbortError`). Every handler runs inside its own `asyncio.Task`, started eagerly on
Python 3.12+ (`snapshotter.h2call`), so `asyncio.timeout`/`wait_for` work anywhere in it.

Modules, by concept:
- `snapshotter.h2server` (this one): the server's lifecycle and its method table.
- `snapshotter.h2conn`: one connection: frames in, stream states, both directions of flow
  control, write back-pressure, connection and stream errors.
- `snapshotter.h2call`: one call, its `ServicerContext`, and the Tasks running handlers.
- `snapshotter.h2wire`: frame constants and builders, the limits on what a client sends, HPACK
  both ways, gRPC's header values.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import stat
from collections.abc import Iterable, Sequence
from typing import Any

import grpc

from snapshotter.h2call import AbortError, Method, ServicerContext
from snapshotter.h2conn import H2Protocol
from snapshotter.h2wire import MAX_WINDOW, percent_encode

__all__ = ["AbortError", "H2Server", "ServicerContext", "percent_encode", "server"]

DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024
_GENERIC_CACHE = 256


class _HandlerCallDetails(grpc.HandlerCallDetails):
    """What `grpc.GenericRpcHandler.service` is given: the method path and the request metadata."""

    __slots__ = ("method", "invocation_metadata")

    def __init__(self, method: str, metadata: tuple[tuple[str, str], ...]) -> None:
        self.method = method
        self.invocation_metadata = metadata


class H2Server:
    """A grpc.aio.Server look-alike serving gRPC over HTTP/2 on unix sockets.

    Receive windows: a stream's window holds the largest request message (a unary body is
    gathered whole), the connection's at least one stream's; both are handed back only as data
    is consumed (`snapshotter.h2conn`), so they bound what a client can make us buffer.
    `inline_handlers=False` starts every handler Task lazily (on the next loop iteration) even
    where eager start is available."""

    def __init__(
        self,
        options: Sequence[tuple[str, Any]] | None = None,
        *,
        handlers: Sequence[grpc.GenericRpcHandler[Any, Any]] | None = None,
        max_receive_message_length: int = DEFAULT_MAX_MESSAGE,
        max_send_message_length: int = DEFAULT_MAX_MESSAGE,
        max_concurrent_streams: int = 1024,
        stream_window: int = 16 * 1024 * 1024,
        connection_window: int = 32 * 1024 * 1024,
        inline_handlers: bool = True,
    ) -> None:
        for key, value in options or ():
            if key == "grpc.max_receive_message_length":
                max_receive_message_length = value if value >= 0 else MAX_WINDOW
            elif key == "grpc.max_send_message_length":
                max_send_message_length = value if value >= 0 else MAX_WINDOW
            elif key == "grpc.max_concurrent_streams":
                max_concurrent_streams = value
        self._max_recv = max_receive_message_length
        self._max_send = max_send_message_length
        self._max_concurrent_streams = max_concurrent_streams
        # A unary request body is gathered whole: the stream window must hold the largest message.
        self._stream_window = min(MAX_WINDOW, max(stream_window, max_receive_message_length + 65536))
        self._conn_window = min(MAX_WINDOW, max(connection_window, self._stream_window))
        self._eager = inline_handlers
        self._methods: dict[str, Method] = {}
        self._generic: list[grpc.GenericRpcHandler[Any, Any]] = []
        self._from_generic: dict[int, tuple[grpc.RpcMethodHandler[Any, Any], Method]] = {}
        self._paths: list[str] = []
        self._sockets: list[socket.socket] = []  # inherited listening sockets (systemd activation)
        self._listeners: list[asyncio.AbstractServer] = []
        self._connections: set[H2Protocol] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = "new"
        self._terminated: asyncio.Future[None] | None = None
        self._idle: asyncio.Event | None = None
        if handlers:
            self.add_generic_rpc_handlers(handlers)

    # ---- registration (what the generated *_pb2_grpc.add_*Servicer_to_server call)

    def add_generic_rpc_handlers(
        self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler[Any, Any]]
    ) -> None:
        """Keep the handlers; for a method not registered by name, each is asked through its public
        `service(handler_call_details)` on every call, in order, as grpcio's server does. (Generated
        code also registers every method by name, below, and that table is consulted first.)"""
        self._generic.extend(generic_rpc_handlers)

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        """The per-method table generated code passes (grpcio >= 1.62): our fast path, one dict lookup."""
        for name, mh in method_handlers.items():
            path = f"/{service_name}/{name}"
            self._methods[path] = Method(path, mh)

    def _lookup(self, path: str, meta: tuple[tuple[str, str], ...]) -> Method:
        m = self._methods.get(path)
        if m is not None:
            return m
        if self._generic:
            details = _HandlerCallDetails(path, meta)
            for h in self._generic:
                mh = h.service(details)
                if mh is not None:
                    hit = self._from_generic.get(id(mh))
                    if hit is None or hit[0] is not mh:
                        if len(self._from_generic) >= _GENERIC_CACHE:  # a handler that builds one per call
                            self._from_generic.clear()
                        hit = (mh, Method(path, mh))
                        self._from_generic[id(mh)] = hit  # keeps mh alive, so the id stays its own
                    return hit[1]
        return Method(path, None)

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

    def add_secure_port(self, address: str, server_credentials: Any) -> int:
        raise NotImplementedError("h2server serves cleartext unix sockets only")

    async def start(self) -> None:
        if self._state != "new":
            raise RuntimeError("server already started")
        loop = self._loop = asyncio.get_running_loop()
        self._terminated = loop.create_future()
        for path in self._paths:
            try:
                if stat.S_ISSOCK(os.stat(path).st_mode):
                    os.unlink(path)
            except FileNotFoundError:
                pass
            srv = await loop.create_unix_server(lambda: H2Protocol(self), path)
            self._listeners.append(srv)
        keep = _keep_socket_file(loop)
        for sock in self._sockets:
            srv = await loop.create_unix_server(lambda: H2Protocol(self), sock=sock, **keep)
            self._listeners.append(srv)
        self._state = "started"

    def _conn_idle(self) -> None:
        if self._idle is not None and all(not c.calls for c in self._connections):
            self._idle.set()

    async def stop(self, grace: float | None) -> None:
        """Stop accepting; let in-flight RPCs finish for up to `grace` seconds; then cancel them and close."""
        if self._state == "new":
            self._state = "stopped"
            return
        terminated = self._terminated
        if terminated is None:  # stopped before it ever started
            return
        if self._state != "started":
            await asyncio.shield(terminated)
            return
        self._state = "stopping"
        for srv in self._listeners:
            srv.close()
        for conn in list(self._connections):
            conn.goaway()
        if grace and any(c.calls for c in self._connections):
            self._idle = asyncio.Event()
            self._conn_idle()
            try:
                await asyncio.wait_for(self._idle.wait(), grace)
            except TimeoutError:
                pass
        tasks = []
        for conn in list(self._connections):
            for call in list(conn.calls.values()):
                if call.task is not None:
                    tasks.append(call.task)
                    call.task.cancel()
                else:
                    conn.finish(call, grpc.StatusCode.UNAVAILABLE, "server shutting down")
            conn.flush()
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
        if not terminated.done():
            terminated.set_result(None)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        if self._terminated is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self._terminated), timeout)
        except TimeoutError:
            return False
        return True


def _keep_socket_file(loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
    """Keyword arguments that keep an inherited socket's file when its server closes. From Python
    3.13 (and in uvloop) `create_unix_server(sock=...)` unlinks the socket's path on close by
    default (`cleanup_socket`); a socket systemd owns must outlive the daemon, so that the next
    daemon finds the clients that queued in its backlog meanwhile."""
    try:
        params = inspect.signature(loop.create_unix_server).parameters
    except (TypeError, ValueError):  # no signature to read: the loop predates the option
        return {}
    return {"cleanup_socket": False} if "cleanup_socket" in params else {}


def server(options: Sequence[tuple[str, Any]] | None = None, **kwargs: Any) -> H2Server:
    """Counterpart of `grpc.aio.server(options=...)`."""
    return H2Server(options, **kwargs)
