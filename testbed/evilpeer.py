"""A misbehaving peer for tests: speaks the peer exchange protocol, serves corrupted chunks.

    python -m testbed.evilpeer --listen 127.0.0.1:PORT --upstream https://127.0.0.1:HONEST --mode flip \
        [--ca CA --cert CERT --key KEY]

It relays an honest node's answers (so it looks like a peer holding every chunk the honest one
holds) but flips bytes in every chunk it serves:
- `flip`: the `X-Chunk-Sha256` header still carries the honest hash (a bad disk, a buggy peer);
- `liar`: the header is the hash of the corrupted bytes (a malicious peer covering its tracks).
It counts what it served in `GET /evil/served`.

With `--ca/--cert/--key` (a node certificate of the site) it speaks mutual TLS on both sides, as
a site member gone bad does: the certificate makes it a member, and only chunk verification
stands between it and the other nodes' images.
"""

from __future__ import annotations

import argparse
import hashlib
import ssl
from pathlib import Path

import aiohttp
from aiohttp import web

from kernel.config import TlsConfig
from peer.tls import client_context, server_context


def build(upstream: str, mode: str, tls: ssl.SSLContext | None = None) -> web.Application:
    app = web.Application()
    served = {"chunks": 0}

    async def relay(request: web.Request) -> web.Response:
        async with aiohttp.ClientSession() as session:
            async with session.request(
                request.method,
                upstream + request.path_qs,
                data=await request.read(),
                headers=_fwd(request),
                ssl=tls if tls is not None else True,
            ) as resp:
                body = await resp.read()
                headers = {
                    k: v for k, v in resp.headers.items() if k.lower() in ("content-type", "x-chunk-sha256")
                }
        if request.path.endswith("/data") and resp.status in (200, 206):
            corrupted = bytes([body[0] ^ 0xFF]) + body[1:] if body else body
            served["chunks"] += 1
            if mode == "liar":
                headers["X-Chunk-Sha256"] = hashlib.sha256(corrupted).hexdigest()
            body = corrupted
        return web.Response(status=resp.status, body=body, headers=headers)

    async def count(_request: web.Request) -> web.Response:
        return web.json_response(served)

    app.router.add_get("/evil/served", count)
    app.router.add_route("*", "/peersync/{tail:.*}", relay)
    return app


def _fwd(request: web.Request) -> dict[str, str]:
    return {k: v for k, v in request.headers.items() if k.lower() in ("range", "content-type")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", required=True)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--mode", choices=("flip", "liar"), default="flip")
    ap.add_argument("--ca", type=Path, help="the site CA certificate (with --cert, --key: mutual TLS)")
    ap.add_argument("--cert", type=Path)
    ap.add_argument("--key", type=Path)
    args = ap.parse_args()
    host, port = args.listen.rsplit(":", 1)
    server = client = None
    if args.ca:
        files = TlsConfig(ca=args.ca, cert=args.cert, key=args.key)
        server, client = server_context(files), client_context(files)
    app = build(args.upstream.rstrip("/"), args.mode, client)
    web.run_app(app, host=host, port=int(port), print=None, ssl_context=server)


if __name__ == "__main__":
    main()
