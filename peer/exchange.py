"""The peer exchange protocol: how nodes of a site ask each other for blob chunks.

HTTP/1.1 on the node's LAN address (`peer.listen`), over mutual TLS with the site's certificates
(`peer.tls`: a client without one is refused in the handshake, before any route here runs), all
under `/peersync/v1`:

    GET  /blobs/{digest}        {"digest", "size", "chunk_size", "complete", "have"}: which chunks
                                this node holds (`have` is the presence bitmap, base64, bit i LSB
                                first in byte i // 8). 404 if it has none of the blob.
    POST /have                  body {"digests": [...]}: the same for many blobs in one round trip
                                (absent blobs are omitted); what the download engine polls. At
                                most 1024 digests, each named once however often it is asked
                                for; the answer stops adding views past 4 MiB and then carries
                                "truncated": true (the views left out read as not held).
    GET  /blobs/{digest}/table  the blob's verified chunk hash table (32-byte SHA-256 per chunk,
                                concatenated); only served for complete blobs, whose whole digest
                                this node has verified.
    GET  /blobs/{digest}/data   bytes of the blob; needs `Range: bytes=a-b` covering whole chunks
                                that are present; answered from the file for a complete blob
                                (`FileResponse`: read in 256 KiB pieces in the executor and
                                written; no zero-copy sendfile, which neither uvloop nor TLS
                                offers, bench/RESULTS.md), streamed from an fd for a partial one
                                (whose file is renamed when it is promoted). `X-Chunk-Sha256`
                                carries the server's hash of the range when it is exactly one
                                chunk.

Bad input is a 4xx with a short text saying why, never a 500: a body that is not JSON or not of
the documented shape, a digest that is not `sha256:<64 hex>`, a Range that is not `bytes=a-b` with
numbers of at most 19 digits. The server-wide bounds (bodies, heads, idle connections, requests in
progress per client) are `peer.httpbounds`'s; the numbers are `kernel.limits`'s.

A node serves a chunk only once it is on disk and checked (complete blobs: whole digest verified;
partial blobs: against the table, or hashed as received from the origin), so announcing while
downloading never spreads bytes the announcer has not itself received in full. The receiver
always re-checks (see `peer.engine`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import ssl as sslmod
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import aiohttp
import structlog
from aiohttp import web

from kernel import limits
from kernel.errors import InvalidArgument, NotFound, OutOfRange, PeerSyncError, Unavailable
from kernel.store.chunkstore import ChunkStore
from kernel.store.fsutil import HASH_LEN
from peer.httpbounds import read_json
from peer.policy.holdings import BlobView

log = structlog.get_logger(__name__)

PREFIX = "/peersync/v1"
DIGEST_RE = r"sha256:[0-9a-f]{64}"
_DIGEST = re.compile(DIGEST_RE)
# 19 digits hold any offset below 2**63; longer numbers are refused before int() parses them.
_RANGE = re.compile(r"bytes=(\d{1,19})-(\d{1,19})")
SEND_PIECE = 256 << 10  # a partial blob's range is streamed in pieces of this size


# -- server --------------------------------------------------------------------------------------


Fetching = Callable[[str], list[int]]


def _view(store: ChunkStore, digest: str, fetching: Fetching | None = None) -> dict[str, Any] | None:
    """The JSON view of `digest`, or None if this node holds none of it."""
    try:
        rec = store.partials.record(digest)
        complete = False
    except NotFound:
        if not store.exists(digest):
            return None
        rec = store.record(digest)
        complete = True
    have = b"" if complete else store.partials.have(digest)
    return {
        "digest": digest,
        "size": rec.size,
        "chunk_size": rec.chunk_size,
        "complete": complete,
        "have": base64.b64encode(have).decode(),
        "fetching": [] if complete or fetching is None else fetching(digest),
    }


def routes(store: ChunkStore, fetching: Fetching | None = None) -> web.RouteTableDef:
    """The peer exchange routes over `store` (mounted by `peer.node`); `fetching(digest)` names
    the chunks this node is fetching from the origin, announced so other nodes do not."""
    r = web.RouteTableDef()

    @r.get(PREFIX + "/blobs/{digest:" + DIGEST_RE + "}")
    async def blob(request: web.Request) -> web.Response:
        view = _view(store, request.match_info["digest"], fetching)
        if view is None:
            raise web.HTTPNotFound(text="blob not held here")
        return web.json_response(view)

    @r.post(PREFIX + "/have")
    async def have(request: web.Request) -> web.Response:
        body = await read_json(request, limits.HAVE_MAX_BODY)
        return web.Response(text=await _have_answer(store, _have_digests(body), fetching),
                            content_type="application/json")

    @r.get(PREFIX + "/blobs/{digest:" + DIGEST_RE + "}/table")
    async def table(request: web.Request) -> web.Response:
        digest = request.match_info["digest"]
        if not store.exists(digest):
            raise web.HTTPNotFound(text="no verified table: blob not complete here")
        return web.Response(
            body=b"".join(store.chunk_hashes(digest)), content_type="application/octet-stream"
        )

    @r.get(PREFIX + "/blobs/{digest:" + DIGEST_RE + "}/data")
    async def data(request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        m = _RANGE.fullmatch(request.headers.get("Range", ""))
        if m is None:
            raise web.HTTPBadRequest(
                text="a single Range: bytes=a-b header (at most 19 digits each) is required"
            )
        start, end = int(m.group(1)), int(m.group(2))
        try:
            path, sha = _servable(store, digest, start, end)
        except NotFound as exc:
            raise web.HTTPNotFound(text=str(exc)) from exc
        except (Unavailable, OutOfRange, InvalidArgument) as exc:
            raise web.HTTPRequestRangeNotSatisfiable(text=str(exc)) from exc
        headers = {"X-Chunk-Sha256": sha.hex()} if sha else {}
        if path.startswith(str(store.blob_dir)):
            return web.FileResponse(path, headers=headers)
        # A partial blob's file is renamed into blobs/ when it is promoted, which can happen
        # between here and the moment a FileResponse opens it (in a worker thread): stream the
        # range from an fd opened now instead, in pieces (bounded memory, with back-pressure).
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return web.FileResponse(store.blob_path(digest), headers=headers)
        try:
            headers["Content-Range"] = f"bytes {start}-{end}/{os.fstat(fd).st_size}"
            resp = web.StreamResponse(status=206, headers=headers)
            resp.content_type = "application/octet-stream"
            resp.content_length = end - start + 1
            await resp.prepare(request)
            pos = start
            while pos <= end:
                piece = os.pread(fd, min(SEND_PIECE, end + 1 - pos), pos)  # page cache: just written
                if not piece:
                    raise ConnectionResetError(f"{path} ended at {pos}")  # cannot happen: sized file
                await resp.write(piece)
                pos += len(piece)
            await resp.write_eof()
            return resp
        finally:
            os.close(fd)

    return r


def _have_digests(body: Any) -> list[str]:
    """The distinct digests a /have body names, in order; 400 saying why for any other body."""
    digests = body.get("digests") if isinstance(body, dict) else None
    if not isinstance(digests, list):
        raise web.HTTPBadRequest(text='body must be {"digests": [...]}\n')
    if len(digests) > limits.HAVE_MAX_DIGESTS:
        raise web.HTTPBadRequest(
            text=f"at most {limits.HAVE_MAX_DIGESTS} digests per request, got {len(digests)}\n"
        )
    for i, d in enumerate(digests):
        if not isinstance(d, str) or not _DIGEST.fullmatch(d):
            shown = limits.short(repr(d), 80)
            raise web.HTTPBadRequest(text=f"digests[{i}] is not a sha256:<64 hex> digest: {shown}\n")
    return list(dict.fromkeys(digests))  # the same blob asked for twice is answered once


async def _have_answer(store: ChunkStore, digests: list[str], fetching: Fetching | None) -> str:
    """The JSON text of a /have answer: a view per held blob, while the answer stays within
    HAVE_MAX_RESPONSE (the first view always goes in), yielding to the event loop every
    HAVE_VIEWS_PER_YIELD digests so that one request never holds the loop for long."""
    parts: list[str] = []
    size = 0
    truncated = False
    for i, digest in enumerate(digests):
        if i and i % limits.HAVE_VIEWS_PER_YIELD == 0:
            await asyncio.sleep(0)
        view = _view(store, digest, fetching)
        if view is None:
            continue
        text = json.dumps(view)
        if parts and size + len(text) > limits.HAVE_MAX_RESPONSE:
            truncated = True
            break
        parts.append(text)
        size += len(text) + 2
    tail = ', "truncated": true' if truncated else ""
    return '{"blobs": [' + ", ".join(parts) + "]" + tail + "}"


def _servable(store: ChunkStore, digest: str, start: int, end: int) -> tuple[str, bytes | None]:
    """The file to serve [start, end] from and the hash of that range if it is one chunk.

    Raises NotFound (blob unknown), Unavailable (a chunk of the range is not present yet),
    InvalidArgument (range not chunk-aligned), OutOfRange. A partial blob being promoted while we
    look (its partial state retired, its file renamed into blobs/) is served as the complete blob
    it just became: peers ask a node for chunks most while it finishes a blob, and answering
    404 there made them drop it as a peer."""
    try:
        return _servable_from(store, digest, start, end, partial=True)
    except NotFound:
        return _servable_from(store, digest, start, end, partial=False)


def _servable_from(
    store: ChunkStore, digest: str, start: int, end: int, partial: bool
) -> tuple[str, bytes | None]:
    rec = store.partials.record(digest) if partial else store.record(digest)
    if end < start or end >= rec.size:
        raise OutOfRange(f"range {start}-{end} outside {digest} ({rec.size} bytes)")
    first, last = start // rec.chunk_size, end // rec.chunk_size
    if start % rec.chunk_size or (end + 1 != rec.size and (end + 1) % rec.chunk_size):
        raise InvalidArgument("range must cover whole chunks")
    sha = None
    if first == last:
        with (store.partials if partial else store).open_chunk(digest, first) as chunk:
            sha = chunk.sha256
    elif partial:
        have = store.partials.have(digest)
        if any(not (have[i // 8] >> (i % 8) & 1) for i in range(first, last + 1)):
            raise Unavailable(f"chunks {first}-{last} of {digest} not all present")
    path = store.partials.path(digest) if partial else store.blob_path(digest)
    if partial and not path.exists():
        # promoted meanwhile: renamed into blobs/ (the same bytes), its record flips next
        path = store.blob_path(digest)
        if not path.exists():
            raise NotFound(f"content {digest}: not found")
    return str(path), sha


# -- client --------------------------------------------------------------------------------------


# A node unpacking layers on a small, shared CPU can take seconds to answer; a slow answer is not
# a dead peer (two failures in a row suspend it, see Engine._ask).
HAVE_TIMEOUT = 5.0
# A TCP connect needs only the peer's kernel: 2 s without an answer means the host is gone. A TLS
# handshake needs the peer's event loop too, several turns of it on both sides; a peer busy
# unpacking and serving a burst shakes hands slowly but is alive (a stopped daemon still refuses
# at once). So under TLS the connect phase is bounded by the request's own timeout: measured on
# the 8-node burst, a 2 s bound dropped busy peers as unreachable and sent their chunks to the
# origin (bench/RESULTS.md, "Mutual TLS between nodes").
TCP_CONNECT_TIMEOUT = 2.0


class PeerError(Unavailable):
    """A peer could not answer (connection, timeout, HTTP error)."""


class ChunkReply(NamedTuple):
    """One chunk as a peer sent it: the bytes, the peer's claimed SHA-256 of them (None if it sent
    none), and when its response headers arrived (`time.monotonic()`): the engine's first-byte
    time, the round trip plus the peer's and its link's queueing."""

    data: bytes
    claim: bytes | None
    headers_at: float


class PeerClient:
    """Asks other nodes for views, tables and chunk bytes.

    `ssl` is the client context of `peer.tls` when the site speaks mutual TLS: given per request,
    so the session it shares with the origin client keeps the system's CAs for registries (aiohttp
    pools connections per context, so peer connections are still reused).

    Every call has a total timeout (`timeout`; `have_timeout` for /have) and reads at most the
    bytes its answer can honestly take (a view list within `limits.PEER_HAVE_MAX_RESPONSE`, a
    table of exactly the chunks asked for, a chunk of its length): a peer answering more is cut
    off as soon as it passes that, before the excess is held, and the call fails with PeerError,
    as does an answer that is not of the protocol's shape."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        timeout: float = 10.0,
        ssl: sslmod.SSLContext | None = None,
        have_timeout: float = HAVE_TIMEOUT,
    ) -> None:
        self._session = session
        self._ssl: sslmod.SSLContext | bool = ssl if ssl is not None else True
        self._connect = TCP_CONNECT_TIMEOUT if ssl is None else None
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=self._connect)
        self._have_timeout = have_timeout

    async def have(self, peer: str, digests: list[str]) -> dict[str, BlobView]:
        url = f"{peer}{PREFIX}/have"
        body = await self._request(
            "POST", url, body={"digests": digests}, timeout=self._have_timeout,
            limit=limits.PEER_HAVE_MAX_RESPONSE,
        )
        try:
            return {v["digest"]: BlobView.from_json(v) for v in json.loads(body)["blobs"]}
        except (ValueError, RecursionError, LookupError, TypeError, AttributeError) as exc:
            why = f"{type(exc).__name__}: {limits.short(str(exc), 200)}"
            raise PeerError(f"{url}: not a /have answer: {why}") from exc

    async def table(self, peer: str, digest: str, chunks: int) -> list[bytes]:
        raw = await self._request("GET", f"{peer}{PREFIX}/blobs/{digest}/table", limit=chunks * HASH_LEN)
        if len(raw) != chunks * HASH_LEN:
            raise PeerError(f"{peer}: table of {digest} has {len(raw)} bytes, expected {chunks * HASH_LEN}")
        return [raw[i : i + HASH_LEN] for i in range(0, len(raw), HASH_LEN)]

    async def chunk(self, peer: str, digest: str, offset: int, length: int) -> ChunkReply:
        """One chunk: its bytes, the peer's claimed SHA-256 of them, when the headers came."""
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        url = f"{peer}{PREFIX}/blobs/{digest}/data"
        try:
            async with self._session.get(url, headers=headers, timeout=self._timeout, ssl=self._ssl) as resp:
                headers_at = time.monotonic()
                if resp.status not in (200, 206):
                    # Only the start of the refusal: a peer's error page is no reason to read megabytes.
                    why = (await resp.content.read(200)).decode("utf-8", "replace")
                    raise PeerError(f"{peer}: {resp.status} for chunk at {offset} of {digest}: {why}")
                data = await _read_capped(resp, length, url)
                claim = resp.headers.get("X-Chunk-Sha256")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise PeerError(f"{peer}: {type(exc).__name__}: {exc}") from exc
        if len(data) != length:
            raise PeerError(f"{peer}: {len(data)} bytes for a {length}-byte chunk of {digest}")
        return ChunkReply(data, bytes.fromhex(claim) if claim else None, headers_at)

    async def _request(
        self, method: str, url: str, timeout: float | None = None, body: Any = None,
        limit: int = limits.PEER_JSON_MAX_RESPONSE,
    ) -> bytes:
        """The response body of a 200, at most `limit` bytes (`body`, if any, is sent as JSON)."""
        t = aiohttp.ClientTimeout(total=timeout, sock_connect=self._connect) if timeout else self._timeout
        try:
            async with self._session.request(method, url, timeout=t, json=body, ssl=self._ssl) as resp:
                if resp.status == 404:
                    raise NotFound(f"{url}: not found")
                if resp.status != 200:
                    raise PeerError(f"{url}: HTTP {resp.status}")
                return await _read_capped(resp, limit, url)
        except PeerSyncError:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise PeerError(f"{url}: {type(exc).__name__}: {exc}") from exc


async def _read_capped(resp: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    """The body of `resp`, streamed and given up as soon as it passes `limit` bytes (PeerError):
    a peer cannot make this node hold more than the answer can honestly take."""
    declared = resp.content_length
    if declared is not None:
        if declared > limit:
            raise PeerError(f"{what}: answer of {declared} bytes, more than the {limit} expected")
        return await resp.read()  # the framing ends the body at the declared length: one copy
    body = bytearray()
    async for piece in resp.content.iter_any():
        body += piece
        if len(body) > limit:
            raise PeerError(f"{what}: answer longer than the {limit} bytes expected")
    return bytes(body)
