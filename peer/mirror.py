"""The registry mirror containerd's `hosts.toml` (or Docker's `registry-mirrors`) points at.

OCI distribution API, read-only, on a loopback address:

    GET|HEAD /v2/                               API version check
    GET|HEAD /v2/<name>/manifests/<reference>   tags are resolved at the origin every time (after a
                                                few seconds' cache: a moved tag is never served
                                                stale for longer); digests come from the store
    GET|HEAD /v2/<name>/blobs/<digest>          from the store, or streamed as chunks arrive from
                                                peers and the origin; Range requests honoured

containerd appends `?ns=<registry>` to mirror requests; without it the configured default registry
is assumed. Every manifest served is recorded in the catalog (layers, config, child manifests)
so the content store can answer for those blobs lazily and the engine knows where to fetch them,
and, if it is an image manifest, noted in the chain index (`kernel.store.chains`), so a layer can
later be recognised by the chain ID alone when containerd prepares its snapshot.

Sizes. A blob's size comes from the manifest that names it (the catalog) or from the store's own
record of it, never from the origin's word: a HEAD of a blob no manifest we served names is
answered with the origin's HEAD and a GET of it is relayed from the origin as it comes, neither
stored nor claimed (no partial file is made of a size nobody verified; the client checks the
digest, as registry clients do). A registry that declares a blob larger than its manifest is
refused (`OriginClient.read_blob`), and a download that cannot fit the cache budget is refused
with 507 Insufficient Storage, saying why (`peer.cache`).

Everything the mirror stores is cache-only (`kernel.store.ownership`): blobs fetched for it in
mirror-only mode (containerd keeps its own copy) and manifests fetched by tag alike; containerd
takes what it wants through the content store in full mode. A GET from offset 0 or of a manifest
counts as a request of the blob (its popularity); a blob is protected from eviction while it is
being served.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from http import HTTPStatus

import structlog
from aiohttp import web

from kernel import errors
from kernel.store.chains import ChainIndex
from kernel.store.chunkstore import ChunkStore
from peer.catalog import Catalog, Source
from peer.engine import Engine
from peer.origin import OriginClient

log = structlog.get_logger(__name__)

DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")
_STATUS = {
    errors.NotFound: 404,
    errors.InvalidArgument: 400,
    errors.FailedPrecondition: 403,
    errors.OutOfRange: 416,
    errors.Unavailable: 503,
    errors.Unimplemented: 501,
    errors.ResourceExhausted: 507,
}


class Mirror:
    """Request handlers; state shared with the engine through the store and the catalog."""

    def __init__(
        self,
        store: ChunkStore,
        catalog: Catalog,
        origin: OriginClient,
        engine: Engine,
        default_registry: str = "docker.io",
        tag_ttl: float = 2.0,
        chains: ChainIndex | None = None,
    ) -> None:
        self.store, self.catalog, self.origin, self.engine = store, catalog, origin, engine
        self.chains = chains
        self.default_registry = default_registry
        self.tag_ttl = tag_ttl
        self._tags: dict[tuple[str, str, str], tuple[float, str]] = {}

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v2/", self.version, allow_head=True),
            web.get(r"/v2/{name:.+}/manifests/{reference}", self.manifest, allow_head=True),
            web.get(r"/v2/{name:.+}/blobs/{digest}", self.blob, allow_head=True),
        ]

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({}, headers={"Docker-Distribution-API-Version": "registry/2.0"})

    # -- manifests ---------------------------------------------------------------------------

    async def manifest(self, request: web.Request) -> web.Response:
        registry, repo = self._where(request)
        ref = request.match_info["reference"]
        try:
            body, media_type, digest = await self._manifest(registry, repo, ref)
        except errors.PeerSyncError as exc:
            return _error(exc, "MANIFEST_UNKNOWN")
        headers = {
            "Docker-Content-Digest": digest,
            "Content-Type": media_type,
            "Content-Length": str(len(body)),
        }
        if request.method == "HEAD":
            return web.Response(headers=headers)
        return web.Response(body=body, headers=headers)

    async def _manifest(self, registry: str, repo: str, ref: str) -> tuple[bytes, str, str]:
        digest = ref if DIGEST.match(ref) else self._cached_tag(registry, repo, ref)
        local = None
        if digest:
            with self.store.owners.busy(digest), contextlib.suppress(errors.NotFound):
                rec = self.store.record(digest)
                local = self.store.read(digest, 0, rec.size), rec.media_type
        if digest and local is not None:
            body = local[0]
            media_type = local[1] or json.loads(body).get("mediaType", "")
        else:
            m = await self.origin.resolve(registry, repo, ref)
            body, media_type, digest = m.body, m.media_type, m.digest
            self._keep(digest, body, media_type, registry, repo)
            if not DIGEST.match(ref):  # only an answer from the origin starts a tag's TTL, not a hit
                self._tags[(registry, repo, ref)] = (time.monotonic(), digest)
        self.engine.cache.used(digest, request=True)
        self._catalog_children(body, registry, repo)
        if self.chains is not None:
            self.chains.note_manifest(digest, body)
        return body, media_type, digest

    def _cached_tag(self, registry: str, repo: str, tag: str) -> str | None:
        hit = self._tags.get((registry, repo, tag))
        if hit and time.monotonic() - hit[0] < self.tag_ttl:
            return hit[1]
        return None

    def _keep(self, digest: str, body: bytes, media_type: str, registry: str, repo: str) -> None:
        """Store a manifest fetched from the origin, so it is served from here next time. It is
        cache-only: kept while the budget allows, like any blob nothing claims."""
        if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            return  # resolve() verifies digests it was asked for; a tag's answer is checked here
        self.catalog.record([Source(digest, len(body), media_type, registry, repo)])
        try:
            writer = self.store.ingests.open(f"mirror-{digest}", total=len(body), expected=digest)
        except (errors.AlreadyExists, errors.Unavailable):
            return  # stored already, or being stored by a concurrent request
        try:
            writer.write_at(0, body)
            writer.commit(len(body), digest)
        except errors.AlreadyExists:
            pass
        finally:
            writer.close()

    def _catalog_children(self, body: bytes, registry: str, repo: str) -> None:
        try:
            doc = json.loads(body)
        except ValueError:
            return
        descs = [doc.get("config")] if isinstance(doc.get("config"), dict) else []
        descs += [d for key in ("layers", "manifests") for d in doc.get(key) or [] if isinstance(d, dict)]
        sources = [
            Source(d["digest"], int(d["size"]), d.get("mediaType", ""), registry, repo)
            for d in descs
            if isinstance(d.get("digest"), str)
            and DIGEST.match(d["digest"])
            and isinstance(d.get("size"), int)
        ]
        if sources:
            self.catalog.record(sources)

    # -- blobs -------------------------------------------------------------------------------

    async def blob(self, request: web.Request) -> web.StreamResponse:
        registry, repo = self._where(request)
        digest = request.match_info["digest"]
        try:
            if not DIGEST.match(digest):
                raise errors.InvalidArgument(f"unsupported digest {digest!r}")
            size = self.engine.known_size(digest)  # the store's record or a manifest's, never a HEAD
        except errors.PeerSyncError as exc:
            return _error(exc, "BLOB_UNKNOWN")
        if size is None:
            return await self._relay(request, registry, repo, digest)
        with self.store.owners.busy(digest):
            return await self._serve(request, digest, size)

    async def _serve(self, request: web.Request, digest: str, size: int) -> web.StreamResponse:
        """A blob we hold or can fetch: from its file, or streamed as its chunks arrive (while
        `busy`, so the cache manager does not evict it under the client)."""
        headers = _blob_headers(digest)
        if self.store.exists(digest) and request.method == "GET":
            asked = request.headers.get("Range", "")
            self.engine.cache.used(digest, request=not asked or asked.startswith("bytes=0-"))
            file = web.FileResponse(self.store.blob_path(digest), headers=headers)
            await file.prepare(request)  # here, inside `busy`: the file is sent before we return
            await file.write_eof()  # done already when a file was sent; not for a 416 or a 304
            return file
        ranged = _range(request, size, headers)
        if isinstance(ranged, web.Response):
            return ranged
        start, end, status = ranged
        if request.method == "HEAD":
            return web.Response(status=status, headers=headers)
        try:
            self.engine.ensure(digest)
        except errors.PeerSyncError as exc:
            return _error(exc, "BLOB_UNKNOWN")
        self.engine.cache.used(digest, request=start == 0)
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        try:
            async for piece in self.engine.stream(digest, start, end - start):
                await resp.write(piece)
        except errors.PeerSyncError as exc:
            log.warning("blob stream cut", digest=digest, error=str(exc))
            raise  # the client sees a short body and retries
        await resp.write_eof()
        return resp

    async def _relay(self, request: web.Request, registry: str, repo: str, digest: str) -> web.StreamResponse:
        """A blob no manifest we served names (and not in the store): relayed from the origin,
        never stored, so the origin's word on its size never becomes a partial file here. The
        origin's HEAD answers a HEAD, and says where an open-ended range ends; a whole blob is
        relayed chunked, as long as the origin's body is."""
        headers = _blob_headers(digest)
        m = _RANGE.match(request.headers.get("Range", ""))
        start, length, status = 0, None, 200
        try:
            if request.method == "HEAD" or (m and not m.group(2)):
                size = await self.origin.blob_size(registry, repo, digest)
                ranged = _range(request, size, headers)
                if isinstance(ranged, web.Response):
                    return ranged
                start, end, status = ranged
                if request.method == "HEAD":
                    return web.Response(status=status, headers=headers)
                length = end - start
            elif m:
                start, last = int(m.group(1)), int(m.group(2))
                if last < start:
                    return web.Response(status=416, headers={"Content-Range": "bytes */*"})
                length, status = last - start + 1, 206
                headers["Content-Range"] = f"bytes {start}-{last}/*"
                headers["Content-Length"] = str(length)
        except errors.PeerSyncError as exc:
            return _error(exc, "BLOB_UNKNOWN")
        pieces = self.origin.read_blob(registry, repo, digest, start, length)
        resp: web.StreamResponse | None = None
        try:
            async with contextlib.aclosing(pieces):
                async for piece in pieces:
                    if resp is None:
                        resp = web.StreamResponse(status=status, headers=headers)
                        await resp.prepare(request)
                    await resp.write(piece)
        except errors.PeerSyncError as exc:
            if resp is None:
                return _error(exc, "BLOB_UNKNOWN")
            log.warning("relayed blob stream cut", digest=digest, error=str(exc))
            raise
        if resp is None:  # an empty blob: nothing came
            resp = web.StreamResponse(status=status, headers=headers)
            await resp.prepare(request)
        await resp.write_eof()
        return resp

    def _where(self, request: web.Request) -> tuple[str, str]:
        return request.query.get("ns") or self.default_registry, request.match_info["name"]


def _blob_headers(digest: str) -> dict[str, str]:
    return {
        "Docker-Content-Digest": digest,
        "Content-Type": "application/octet-stream",
        "Accept-Ranges": "bytes",
    }


def _range(request: web.Request, size: int, headers: dict[str, str]) -> tuple[int, int, int] | web.Response:
    """(start, end, status) of a blob request over `size` bytes, setting Content-Range and
    Content-Length in `headers`; or the 416 answer to a range outside the blob."""
    start, end, status = 0, size, 200
    m = _RANGE.match(request.headers.get("Range", ""))
    if m:
        start = int(m.group(1))
        end = min(size, int(m.group(2)) + 1) if m.group(2) else size
        if start >= size or end <= start:
            return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    headers["Content-Length"] = str(end - start)
    return start, end, status


def _error(exc: errors.PeerSyncError, code: str) -> web.Response:
    # mypy reads isinstance(exc, cls) as always true, cls being a type[PeerSyncError]: a false positive.
    status = next((s for cls, s in _STATUS.items() if isinstance(exc, cls)), 500)  # type: ignore[redundant-expr]
    if status != 404:
        codes = {400: "UNSUPPORTED", 403: "DENIED", 416: "RANGE_INVALID", 507: "DENIED"}
        code = codes.get(status, "UNAVAILABLE")
    # containerd reports only the status line of a failed resolve, never the body: carry the why there too.
    why = " ".join(str(exc).split())[:300].encode("ascii", "replace").decode()
    reason = f"{HTTPStatus(status).phrase} ({why})"
    return web.json_response({"errors": [{"code": code, "message": str(exc)}]}, status=status, reason=reason)
