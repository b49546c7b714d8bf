"""How the node's HTTP servers bound what one client can make them hold, wait for or compute.

Both servers of the node (the peer exchange on the LAN, the registry mirror on loopback) are built
here, so that every route of either gets the same bounds without each handler remembering them:

- request bodies: at most `max_body` bytes over the whole app (aiohttp's `client_max_size`, 413
  past it); a route reading a body does it through `read_body` / `read_json`, which also bound the
  time the body may take (408) and turn bodies that are not JSON into a 400;
- request heads: the request line, each header field and the number of fields (aiohttp's parser,
  400 or 431 past them);
- idle connections: a connection that has not sent a whole request head `idle_timeout` seconds
  after it opened or after its last answer is closed (aiohttp's keep-alive timer, which also runs
  before the first request), so silent or trickling connections do not stay open;
- unwanted bodies: after answering a request whose body it did not read, the server drops what
  still comes for at most `linger` seconds, then closes;
- logs: a request the parser refuses is one line, not a traceback (`_one_line_for_malformed`);
- concurrency: at most `per_client` requests of one client address in progress at once; more are
  answered 429 at once (an honest node keeps far fewer in flight), and other clients are served.

The numbers are `kernel.limits`'s; `docs/limits.md` lists them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import http_exceptions, web
from aiohttp.typedefs import Middleware

from kernel import limits

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class ServerBounds:
    """The bounds of one HTTP server (see the module docstring for what each one does)."""

    max_body: int
    idle_timeout: float = limits.IDLE_TIMEOUT
    body_timeout: float = limits.BODY_TIMEOUT
    linger: float = limits.LINGER_TIMEOUT
    per_client: int = limits.MAX_REQUESTS_PER_CLIENT
    max_request_line: int = limits.MAX_REQUEST_LINE
    max_header_field: int = limits.MAX_HEADER_FIELD
    max_headers: int = limits.MAX_HEADERS


EXCHANGE = ServerBounds(max_body=limits.EXCHANGE_MAX_BODY)
MIRROR = ServerBounds(max_body=limits.MIRROR_MAX_BODY)

BOUNDS_KEY = web.AppKey("bounds", ServerBounds)


def _one_line_for_malformed(record: logging.LogRecord) -> bool:
    """A request aiohttp's parser refused (400/413/431, answered already) is logged as one
    line at info, without its traceback: any client can send garbage, and a traceback per
    request would let it fill the node's logs. Errors in handlers keep their traceback."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, http_exceptions.HttpProcessingError):
        record.msg = f"{record.getMessage()}: refused: {limits.short(' '.join(str(exc).split()), 200)}"
        record.args = ()
        record.exc_info = None
        record.exc_text = None
        record.levelno, record.levelname = logging.INFO, "INFO"
    return True


SERVER_LOG = logging.getLogger("peer.http")
SERVER_LOG.addFilter(_one_line_for_malformed)


def application(bounds: ServerBounds, middlewares: Sequence[Middleware] = ()) -> web.Application:
    """An empty app whose routes all run under `bounds` (serve it with `runner`); `middlewares`
    run inside the per-client bound (a refused request never reaches them)."""
    app = web.Application(
        client_max_size=bounds.max_body, middlewares=[_per_client(bounds.per_client), *middlewares]
    )
    app[BOUNDS_KEY] = bounds
    return app


def runner(app: web.Application) -> web.AppRunner:
    """The runner that applies the connection-level bounds of `app` (made by `application`):
    request heads and idle connections."""
    bounds = app[BOUNDS_KEY]
    return web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        logger=SERVER_LOG,
        keepalive_timeout=bounds.idle_timeout,
        max_line_size=bounds.max_request_line,
        max_field_size=bounds.max_header_field,
        max_headers=bounds.max_headers,
        lingering_time=bounds.linger,
    )


def _per_client(limit: int) -> Middleware:
    """The middleware that answers 429 to a client address with `limit` requests in progress.

    Refused at once rather than queued: a queue is memory the client decides the size of."""
    active: dict[str, int] = {}

    @web.middleware
    async def per_client(request: web.Request, handler: Handler) -> web.StreamResponse:
        client = request.remote or ""
        count = active.get(client, 0)
        if count >= limit:
            return web.Response(
                status=429,
                text=f"too many requests in progress from this address (at most {limit})\n",
                headers={"Retry-After": "1"},
            )
        active[client] = count + 1
        try:
            return await handler(request)
        finally:
            left = active[client] - 1
            if left:
                active[client] = left
            else:
                del active[client]

    return per_client


async def read_body(request: web.Request, limit: int | None = None) -> bytes:
    """The request body: at most `limit` bytes (default: the app's bound, 413 past it), arrived
    within the app's body timeout (408 otherwise), so a client cannot hold a handler open by
    sending a head and no body."""
    bounds = request.app.get(BOUNDS_KEY) or EXCHANGE
    cap = min(limit if limit is not None else bounds.max_body, bounds.max_body)
    declared = request.content_length
    if declared is not None and declared > cap:
        raise web.HTTPRequestEntityTooLarge(max_size=cap, actual_size=declared)
    body = bytearray()
    try:
        async with asyncio.timeout(bounds.body_timeout):
            if declared is not None:  # the framing ends the body at the declared length
                return await request.read()
            async for piece in request.content.iter_any():
                body += piece
                if len(body) > cap:
                    raise web.HTTPRequestEntityTooLarge(max_size=cap, actual_size=len(body))
    except TimeoutError:
        why = f"request body not received within {bounds.body_timeout:g} s\n"
        raise web.HTTPRequestTimeout(text=why) from None
    except web.RequestPayloadError as exc:
        raise web.HTTPBadRequest(text=f"malformed request body: {limits.short(str(exc), 200)}\n") from None
    return bytes(body)


async def read_json(request: web.Request, limit: int | None = None) -> Any:
    """The request body parsed as JSON (see `read_body`); 400 naming why for anything else:
    not UTF-8, not JSON, numbers past Python's digit limit, nesting past the recursion limit."""
    body = await read_body(request, limit)
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise web.HTTPBadRequest(text=f"body is not JSON: {limits.short(str(exc), 200)}\n") from None


__all__ = ["EXCHANGE", "MIRROR", "ServerBounds", "application", "read_body", "read_json", "runner"]
