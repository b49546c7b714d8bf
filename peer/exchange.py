"""The peer exchange protocol: how nodes of a site ask each other for blob chunks.

HTTP/1.1 on the node's LAN address (`peer.listen`), all under `/peersync/v1`:

    GET  /blobs/{digest}        {"digest", "size", "chunk_size", "complete", "have"}: which chunks
                                this node holds (`have` is the presence bitmap, base64, bit i LSB
                                first in byte i // 8). 404 if it has none of the blob.
    POST /have                  body {"digests": [...]}: the same for many blobs in one round trip
                                (absent blobs are omitted); what the download engine polls.
    GET  /blobs/{digest}/table  the blob's verified chunk hash table (32-byte SHA-256 per chunk,
                                concatenated); only served for complete blobs, whose whole digest
                                this node has verified.
    GET  /blobs/{digest}/data   bytes of the blob; needs `Range: bytes=a-b` covering whole chunks
                                that are present; answered from the file with sendfile (zero
                                copy) for a complete blob, streamed from an fd for a partial one
                                (whose file is renamed when it is promoted). `X-Chunk-Sha256`
                                carries the server's hash of the range when it is exactly one
                                chunk.

A node serves a chunk only once it is on disk and checked (complete blobs: whole digest verified;
partial blobs: against the table, or hashed as received from the origin), so announcing while
downloading never spreads bytes the announcer has not itself received in full. The receiver
always re-checks (see `peer.engine`).
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import aiohttp
import structlog
from aiohttp import web

from kernel.errors import InvalidArgument, NotFound, OutOfRange, PeerSyncError, Unavailable
from kernel.store.chunkstore import ChunkStore
from kernel.store.fsutil import HASH_LEN
from peer.policy.holdings import BlobView

log = structlog.get_logger(__name__)

PREFIX = "/peersync/v1"
DIGEST_RE = r"sha256:[0-9a-f]{64}"
_RANGE = re.compile(r"bytes=(\d+)-(\d+)$")
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
        body = await request.json()
        digests = body.get("digests") if isinstance(body, dict) else None
        if not isinstance(digests, list) or len(digests) > 1024:
            raise web.HTTPBadRequest(text='body must be {"digests": [...]} (at most 1024)')
        views = [
            v
            for d in digests
            if isinstance(d, str) and re.fullmatch(DIGEST_RE, d) and (v := _view(store, d, fetching))
        ]
        return web.json_response({"blobs": views})

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
        m = _RANGE.match(request.headers.get("Range", ""))
        if m is None:
            raise web.HTTPBadRequest(text="a single Range: bytes=a-b header is required")
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
    """Asks other nodes for views, tables and chunk bytes."""

    def __init__(self, session: aiohttp.ClientSession, timeout: float = 10.0) -> None:
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=2.0)

    async def have(self, peer: str, digests: list[str]) -> dict[str, BlobView]:
        body = await self._request(
            "POST", f"{peer}{PREFIX}/have", body={"digests": digests}, timeout=HAVE_TIMEOUT
        )
        return {v["digest"]: BlobView.from_json(v) for v in json.loads(body)["blobs"]}

    async def table(self, peer: str, digest: str, chunks: int) -> list[bytes]:
        raw = await self._request("GET", f"{peer}{PREFIX}/blobs/{digest}/table")
        if len(raw) != chunks * HASH_LEN:
            raise PeerError(f"{peer}: table of {digest} has {len(raw)} bytes, expected {chunks * HASH_LEN}")
        return [raw[i : i + HASH_LEN] for i in range(0, len(raw), HASH_LEN)]

    async def chunk(self, peer: str, digest: str, offset: int, length: int) -> ChunkReply:
        """One chunk: its bytes, the peer's claimed SHA-256 of them, when the headers came."""
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        url = f"{peer}{PREFIX}/blobs/{digest}/data"
        try:
            async with self._session.get(url, headers=headers, timeout=self._timeout) as resp:
                headers_at = time.monotonic()
                if resp.status not in (200, 206):
                    why = (await resp.text())[:200]
                    raise PeerError(f"{peer}: {resp.status} for chunk at {offset} of {digest}: {why}")
                data = await resp.read()
                claim = resp.headers.get("X-Chunk-Sha256")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise PeerError(f"{peer}: {type(exc).__name__}: {exc}") from exc
        if len(data) != length:
            raise PeerError(f"{peer}: {len(data)} bytes for a {length}-byte chunk of {digest}")
        return ChunkReply(data, bytes.fromhex(claim) if claim else None, headers_at)

    async def _request(self, method: str, url: str, timeout: float | None = None, body: Any = None) -> bytes:
        """The response body of a 200 (`body`, if any, is sent as JSON)."""
        t = aiohttp.ClientTimeout(total=timeout, sock_connect=2.0) if timeout else self._timeout
        try:
            async with self._session.request(method, url, timeout=t, json=body) as resp:
                if resp.status == 404:
                    raise NotFound(f"{url}: not found")
                if resp.status != 200:
                    raise PeerError(f"{url}: HTTP {resp.status}")
                return await resp.read()
        except PeerSyncError:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise PeerError(f"{url}: {type(exc).__name__}: {exc}") from exc
