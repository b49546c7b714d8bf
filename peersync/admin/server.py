"""The admin endpoint: what the `peersync` CLI asks a running daemon, and what Prometheus scrapes.

Two listeners, one small aiohttp app each:

- the **admin socket** (`[admin] socket`, default `<root>/admin.sock`): a unix socket of mode
  0600 in a directory only root may enter, so only root (the daemon's user) talks to it; JSON
  answers, the same keys as `--json` prints (docs/cli.md is their reference):

      GET  /v1/version               {"version"}
      GET  /v1/status                this node: id, role, tracker and epoch, members, cache, transfers
      GET  /v1/peers                 every peer measured: throughput, latency, queue, failures, score
      GET  /v1/cache                 the cache manager's `cache_status()`
      POST /v1/cache/{pin,unpin,evict}  {"digest"} -> {"digest", "changed" | "freed"}
      POST /v1/cache/gc              {"forgotten", "evicted", "freed"}
      POST /v1/prefetch              {"images": [...]} -> NDJSON progress lines, one per image
                                     every ~0.25 s, then {"image", "done": true, "error"?}
      GET  /v1/seed?image=..         the seed tar of the images (`peersync.seed`), streamed
      GET  /metrics                  as on the TCP listener

- the **metrics listener** (`[admin] listen`, default 127.0.0.1:5382): `GET /metrics` only,
  from the daemon's own registry (`peersync.admin.metrics`). Loopback by default: Prometheus
  reaches it through a node-local agent or, in Kubernetes, through the pod's host network.

Errors are JSON `{"error": message}` with the status of their class (404 NotFound, 400
InvalidArgument, 409 FailedPrecondition, 503 Unavailable, 507 ResourceExhausted), counted in
`peersync_errors_total{where="admin"}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kernel import errors
from kernel.config import Config, hostport
from kernel.logging import bind_transfer
from peer.images import Blob, Image, parse_ref, walk
from peer.node import PeerNode
from peersync import __version__, seed
from peersync.admin.metrics import DaemonMetrics

log = structlog.get_logger(__name__)

_STATUS = {
    errors.NotFound: 404,
    errors.InvalidArgument: 400,
    errors.FailedPrecondition: 409,
    errors.AlreadyExists: 409,
    errors.Unavailable: 503,
    errors.ResourceExhausted: 507,
}
PROGRESS_EVERY = 0.25


class AdminServer:
    """The two listeners over one node. Lifecycle: `await start()`, then `await stop()`."""

    def __init__(self, config: Config, node: PeerNode, unpacks: Callable[[], int]) -> None:
        self.config = config
        self.node = node
        self.metrics = DaemonMetrics(node, unpacks)
        self.socket = config.admin_socket
        self._runners: list[web.AppRunner] = []

    async def start(self) -> None:
        """Listen; the socket's path must be free (`peersync.service.prepare_socket` makes it
        so: a stale socket is removed, a live one or another file refused)."""
        if self.node.engine is not None:
            self.node.engine.on_chunk = self.metrics.observe_chunk
        app = web.Application(middlewares=[_errors])
        app.add_routes(self.routes())
        self.socket.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        old = os.umask(0o177)  # the socket is born 0600: no moment where others could connect
        try:
            await web.UnixSite(runner, str(self.socket)).start()
        finally:
            os.umask(old)
        os.chmod(self.socket, 0o600)
        self._runners.append(runner)
        if self.config.admin.listen:
            metrics = web.Application()
            metrics.router.add_get("/metrics", self.scrape)
            mrunner = web.AppRunner(metrics, access_log=None, handle_signals=False)
            await mrunner.setup()
            host, port = hostport(self.config.admin.listen)
            try:
                await web.TCPSite(mrunner, host, port, reuse_address=True).start()
            except OSError as exc:
                await mrunner.cleanup()
                reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
                raise errors.FailedPrecondition(
                    f"metrics: cannot listen on {self.config.admin.listen}: {reason} "
                    "(another daemon on this host? [admin] listen in the config)"
                ) from exc
            self._runners.append(mrunner)
        log.info("admin endpoint up", socket=str(self.socket), metrics=self.config.admin.listen or None)

    async def stop(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        self.socket.unlink(missing_ok=True)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/version", self.version),
            web.get("/v1/status", self.status),
            web.get("/v1/peers", self.peers),
            web.get("/v1/cache", self.cache),
            web.post("/v1/cache/{action:pin|unpin|evict}", self.cache_action),
            web.post("/v1/cache/gc", self.cache_gc),
            web.post("/v1/prefetch", self.prefetch),
            web.get("/v1/seed", self.seed),
            web.get("/metrics", self.scrape),
        ]

    # -- read-only -----------------------------------------------------------------------------

    async def scrape(self, _request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def version(self, _request: web.Request) -> web.Response:
        return web.json_response({"version": __version__})

    async def status(self, _request: web.Request) -> web.Response:
        node, engine = self.node, self._engine()
        cache = node.cache.cache_status()
        body: dict[str, Any] = {
            "version": __version__,
            "root": str(self.config.root),
            "url": node.self_url,
            "control": node.control.status() if node.control is not None else None,
            "cache": {"budget": cache["budget"], "used": cache["usage"]["total"],
                      "evictions": cache["evictions"]["count"], "pins": len(cache["pins"])},
            "transfers": {
                "downloads": sorted(d for d, dl in engine.downloads.items() if not dl.task.done()),
                "bytes": {
                    "peer_in": engine.counters["peer_bytes"],
                    "origin_in": engine.counters["origin_bytes"],
                    "peer_out": node.served["peer"],
                    "local_out": node.served["local"],
                },
            },
        }
        return web.json_response(body)

    async def peers(self, _request: web.Request) -> web.Response:
        """Each peer the engine knows, with what it measured of it (`Engine.peers()`: the figures
        of `peer.policy.peerstats.PeerFigures`, the same as `GET /peersync/v1/peers`)."""
        engine = self._engine()
        rows = [{"url": url, **figures} for url, figures in sorted(engine.peers().items())]
        return web.json_response({"chunk_size": engine.store.chunk_size, "peers": rows})

    async def cache(self, _request: web.Request) -> web.Response:
        return web.json_response(self.node.cache.cache_status())

    # -- actions --------------------------------------------------------------------------------

    async def cache_action(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        digest = _field(await _json(request), "digest", str)
        cache = self.node.cache
        if action == "pin":
            return web.json_response({"digest": digest, "changed": cache.pin(digest)})
        if action == "unpin":
            return web.json_response({"digest": digest, "changed": cache.unpin(digest)})
        return web.json_response({"digest": digest, "freed": cache.evict(digest)})

    async def cache_gc(self, _request: web.Request) -> web.Response:
        return web.json_response(self.node.cache.gc())

    async def prefetch(self, request: web.Request) -> web.StreamResponse:
        """Fetch every blob of each image into this node's store (peers first, as a pull does),
        streaming progress; one image's failure is reported and the others go on."""
        refs = _field(await _json(request), "images", list)
        if not refs or not all(isinstance(r, str) for r in refs):
            raise errors.InvalidArgument('want {"images": ["ref", ...]}')
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        lines: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        tasks = [asyncio.create_task(self._prefetch_one(ref, lines.put_nowait)) for ref in refs]
        finished = 0
        while finished < len(tasks):
            line = await lines.get()
            if line is None:
                finished += 1
                continue
            await resp.write(json.dumps(line).encode() + b"\n")
        await resp.write_eof()
        return resp

    async def _prefetch_one(self, text: str, emit: Callable[[dict[str, Any] | None], None]) -> None:
        with bind_transfer(prefetch=text):
            try:
                image = await walk(self._resolver(), parse_ref(text, self.config.mirror.default_registry))
                total = image.size
                for blob in image.blobs:
                    self._engine().ensure(blob.digest)
                waiting = asyncio.gather(*(self._engine().wait_complete(b.digest) for b in image.blobs))
                line = {"image": text, "digest": image.digest, "total": total}
                while True:
                    emit({**line, "done_bytes": self._held(image)})
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(asyncio.shield(waiting), PROGRESS_EVERY)
                    if waiting.done():
                        await waiting
                        break
                log.info("prefetched", image=text, bytes=total)
                emit({**line, "done_bytes": total, "done": True})
            except Exception as exc:  # one image's failure is its line; the others go on
                errors.reported.note("admin", exc)
                log.warning("prefetch failed", image=text, error=str(exc))
                emit({"image": text, "done": True, "error": str(exc)})
            finally:
                emit(None)

    def _held(self, image: Image) -> int:
        """Bytes of `image` in the store now (manifests, complete blobs, chunks of partial ones)."""
        store = self.node.store
        total = sum(b.size for b, _ in image.manifests)
        for blob in image.blobs:
            if store.exists(blob.digest):
                total += blob.size
                continue
            with contextlib.suppress(errors.PeerSyncError):
                missing = len(store.partials.missing(blob.digest))
                total += max(0, blob.size - missing * store.chunk_size)
        return total

    async def seed(self, request: web.Request) -> web.StreamResponse:
        refs = request.query.getall("image", [])
        if not refs:
            raise errors.InvalidArgument("name images: /v1/seed?image=REF&image=REF")
        images = await seed.walk_all(self._resolver(), list(refs), self.config.mirror.default_registry)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-tar"})
        await resp.prepare(request)

        async def read(_image: Image, blob: Blob) -> AsyncIterator[bytes]:
            self._engine().ensure(blob.digest)
            async for piece in self._engine().stream(blob.digest):
                yield piece

        with bind_transfer(seed=",".join(refs)):
            count = await seed.export(images, read, resp.write)
        await resp.write_eof()
        log.info("seed exported", images=list(refs), blobs=count)
        return resp

    # -- helpers --------------------------------------------------------------------------------

    def _engine(self) -> Any:
        if self.node.engine is None:
            raise errors.Unavailable("the daemon is starting")
        return self.node.engine

    def _resolver(self) -> Callable[[str, str, str], Awaitable[tuple[bytes, str, str]]]:
        if self.node.mirror is None:
            raise errors.FailedPrecondition("the registry mirror is disabled ([mirror] listen)")
        return self.node.mirror.resolve


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        resp: web.StreamResponse = await handler(request)
        return resp
    except errors.PeerSyncError as exc:
        errors.reported.note("admin", exc)
        status = next((s for cls, s in _STATUS.items() if isinstance(exc, cls)), 500)  # type: ignore[redundant-expr]
        return web.json_response({"error": str(exc)}, status=status)


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise errors.InvalidArgument("the request body must be JSON") from exc
    if not isinstance(body, dict):
        raise errors.InvalidArgument("the request body must be a JSON object")
    return body


def _field(body: dict[str, Any], key: str, kind: type) -> Any:
    value = body.get(key)
    if not isinstance(value, kind):
        raise errors.InvalidArgument(f"the request needs {key!r} ({kind.__name__})")
    return value
