"""Security issue 10, finding 4: the node's HTTP servers (peer exchange, registry mirror) and the
peer client bound what one caller can make them hold, wait for or compute, and bad input is a
clear 4xx, never a 500.

Found by trying it: `/have` naming one partial blob 1024 times returned 179 MB and blocked the
event loop for 14.7 s; 20 silent connections stayed open 104 s; a 5000-digit Range header and some
malformed `/have` bodies gave 500 with a traceback; a peer answering `/have` with 400 MB took the
asking node from 67 to 887 MB.

The servers are the daemon's own: a `PeerNode` started on loopback ports over a real store, as
`peersync.service` starts it. Every request goes to loopback. Nothing here is timed: "closed" and
"answered" are waited for with generous deadlines, and the loop's share of the work is measured by
what was computed and sent.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from kernel.config import Config, DiscoveryConfig, MirrorConfig, OriginConfig, PeerConfig, TlsConfig
from kernel.store.chunkstore import ChunkStore
from kernel.store.meta import Meta
from peer import httpbounds
from peer.exchange import PeerClient, PeerError, routes
from peer.node import PeerNode
from testbed.procs import free_port

CHUNK = 4096
PARTIAL_SIZE = 1 << 30  # 262144 chunks of 4 KiB: a 43 KB view
DEADLINE = 60.0  # generous: what must happen within a bound of seconds is waited for this long
HAVE = "/peersync/v1/have"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Node:
    store: ChunkStore
    exchange: str  # http://127.0.0.1:port
    mirror: str
    partial: str  # digest of a partial blob (no chunk present yet)
    blob: str  # digest of a complete blob
    blob_size: int
    registry: str  # host:port of a loopback registry the mirror serves; it lets anyone HEAD any blob


async def anyone_may(request: web.Request) -> web.Response:
    return web.Response()


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    meta = Meta(tmp_path)
    store = ChunkStore(tmp_path, meta, CHUNK)
    store.recover()
    partial = sha(b"a partial blob")
    store.partials.claim(partial, PARTIAL_SIZE)
    data = bytes(range(256)) * 64  # 16 KiB: four chunks
    writer = store.ingests.open("blob", len(data), sha(data))
    writer.write_at(0, data)
    blob = writer.commit(len(data), sha(data))
    ports = free_port(), free_port()
    public = web.Application()  # the mirror asks the origin whether an anonymous client may read
    public.router.add_route("HEAD", "/v2/{name:.+}/blobs/{digest}", anyone_may)
    registry = TestServer(public, host="127.0.0.1")
    await registry.start_server()
    address = f"127.0.0.1:{registry.port}"
    config = Config(
        root=tmp_path,  # the node id is kept under the root: never the machine's /var/lib/peersync
        peer=PeerConfig(listen=f"127.0.0.1:{ports[0]}", peers=[]),
        mirror=MirrorConfig(listen=f"127.0.0.1:{ports[1]}", default_registry=address),
        origin=OriginConfig(plain_http=[address]),
        discovery=DiscoveryConfig(mdns=False),
        tls=TlsConfig(insecure=True),  # plain HTTP: the bounds are the subject (TLS: test_tls.py)
    )
    peer = PeerNode(config, store, meta)
    await peer.start()
    try:
        yield Node(
            store,
            f"http://127.0.0.1:{ports[0]}",
            f"http://127.0.0.1:{ports[1]}",
            partial,
            blob,
            len(data),
            address,
        )
    finally:
        await peer.stop()
        await registry.close()
        store.close()
        meta.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(http: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, bytes]:
    async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
        return resp.status, await resp.read()


# -- the peer exchange: /have ------------------------------------------------------------------------


async def test_have_naming_one_blob_1024_times_answers_it_once(
    node: Node, http: aiohttp.ClientSession
) -> None:
    one_status, one = await post(http, node.exchange + HAVE, json.dumps({"digests": [node.partial]}).encode())
    body = json.dumps({"digests": [node.partial] * 1024}).encode()
    status, answer = await post(http, node.exchange + HAVE, body)
    assert (one_status, status) == (200, 200)
    views = json.loads(answer)["blobs"]
    assert [v["digest"] for v in views] == [node.partial]
    assert len(answer) < 2 * len(one), f"{len(answer)} bytes for one blob named 1024 times"


async def test_have_answers_stay_within_the_response_bound(tmp_path: Path) -> None:
    """64 distinct partial blobs with 175 KB views: 11 MB if nothing bounded the answer. It is
    cut at 4 MiB and says so, and no view is computed past the one that did not fit (counted by
    the route's `fetching` calls, one per partial blob's view). Served as `peer.node` serves it."""
    meta = Meta(tmp_path)
    store = ChunkStore(tmp_path, meta, CHUNK)
    store.recover()
    digests = [sha(f"partial {i}".encode()) for i in range(64)]
    for d in digests:
        store.partials.claim(d, 4 * PARTIAL_SIZE)
    asked: list[str] = []

    def fetching(digest: str) -> list[int]:
        asked.append(digest)
        return []

    app = httpbounds.application(httpbounds.EXCHANGE)
    app.add_routes(routes(store, fetching))
    runner = httpbounds.runner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as http:
            status, answer = await post(
                http, f"http://127.0.0.1:{port}{HAVE}", json.dumps({"digests": digests}).encode()
            )
    finally:
        await runner.cleanup()
        store.close()
        meta.close()
    assert status == 200
    parsed = json.loads(answer)
    assert parsed.get("truncated") is True
    assert len(answer) <= 4 << 20
    assert len(asked) == len(parsed["blobs"]) + 1  # views computed: those sent and the one that did not fit


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"{not json", id="not-json"),
        pytest.param(b"\xff\xfe\x00garbage", id="not-utf8"),
        pytest.param(b"[]", id="a-list"),
        pytest.param(b'{"digests": 5}', id="digests-not-a-list"),
        pytest.param(b'{"digests": [1, 2]}', id="digests-not-strings"),
        pytest.param(b'{"digests": ["sha256:zz"]}', id="bad-digest"),
        pytest.param(b'{"digests": [{"a": [[]]}]}', id="nested-junk"),
        pytest.param(b'{"digests": [' + b"9" * 5000 + b"]}", id="5000-digit-number"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="nested-100000-deep"),
        pytest.param(json.dumps({"digests": ["sha256:" + "0" * 64] * 1025}).encode(), id="1025-digests"),
        pytest.param(b'{"digests": []}' + b" " * (200 << 10), id="200KiB-body"),
        pytest.param(b" " * (3 << 20), id="3MiB-body"),
    ],
)
async def test_malformed_have_bodies_are_a_clear_4xx(
    node: Node, http: aiohttp.ClientSession, body: bytes
) -> None:
    status, answer = await post(http, node.exchange + HAVE, body)
    assert 400 <= status < 500, (status, answer[:300])
    assert len(answer) < 1024 and b"Traceback" not in answer


async def test_chunked_have_bodies_are_bounded_too(node: Node, http: aiohttp.ClientSession) -> None:
    """A body sent without a length (chunked) is counted as it arrives."""

    async def pieces(body: bytes) -> AsyncIterator[bytes]:
        for i in range(0, len(body), 16 << 10):
            yield body[i : i + (16 << 10)]

    small = json.dumps({"digests": [node.blob]}).encode()
    large = json.dumps({"digests": [node.blob]}).encode() + b" " * (200 << 10)
    statuses = []
    for body in (small, large):
        async with http.post(node.exchange + HAVE, data=pieces(body)) as resp:
            statuses.append(resp.status)
    assert statuses == [200, 413]


@pytest.mark.parametrize(
    "value",
    [
        "bytes=" + "9" * 5000 + "-" + "9" * 5000,
        "bytes=0-" + "9" * 5000,
        "bytes=0-4095,4096-8191",
        "bytes=-5",
        "bytes=5-1",
        "bytes=0-",
        "chunks=0-1",
        "bytes=" + "0" * 20 + "-4095",
        "",
    ],
)
async def test_bad_ranges_on_data_are_a_clear_4xx(
    node: Node, http: aiohttp.ClientSession, value: str
) -> None:
    url = f"{node.exchange}/peersync/v1/blobs/{node.blob}/data"
    async with http.get(url, headers={"Range": value} if value else {}) as resp:
        assert 400 <= resp.status < 500, (resp.status, await resp.text())
    async with http.get(url, headers={"Range": "bytes=0-4095"}) as resp:  # a good one still works
        assert resp.status in (200, 206) and len(await resp.read()) == CHUNK


async def test_bad_digests_in_paths_are_a_4xx(node: Node, http: aiohttp.ClientSession) -> None:
    for path in ("sha256:zz", "sha256:" + "A" * 64, "md5:abc", "sha256:" + "0" * 64, "%00", "x" * 5000):
        for tail in ("", "/table", "/data"):
            async with http.get(f"{node.exchange}/peersync/v1/blobs/{path}{tail}") as resp:
                assert 400 <= resp.status < 500, (path[:20], tail, resp.status)


# -- connections: heads, idle and silent connections, concurrency ------------------------------------


async def test_silent_and_trickling_connections_are_closed(node: Node) -> None:
    """20 connections that never send a byte and 4 that trickle a request head one byte at a time
    are all closed by the server (at its idle bound, 15 s; waited for with a generous deadline)."""

    async def silent(url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            assert await reader.read() == b""  # EOF: the server closed it
        finally:
            writer.close()

    async def trickle(url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        head = b"GET /peersync/v1/stats HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 100_000
        try:
            for byte in head:
                writer.write(bytes([byte]))
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    if await asyncio.wait_for(reader.read(), 0.5) == b"":
                        return
            raise AssertionError("the whole head went through")
        except ConnectionError:
            return  # closed while we wrote
        finally:
            writer.close()

    jobs = [silent(url) for url in (node.exchange, node.mirror) for _ in range(10)]
    jobs += [trickle(url) for url in (node.exchange, node.mirror) for _ in range(2)]
    await asyncio.wait_for(asyncio.gather(*jobs), DEADLINE)


async def test_oversized_heads_are_refused(node: Node, http: aiohttp.ClientSession) -> None:
    for url in (node.exchange + "/peersync/v1/stats", node.mirror + "/v2/"):
        many = {f"X-H{i}": "v" for i in range(100)}
        async with http.get(url, headers=many) as resp:
            assert resp.status in (400, 431), (url, "100 header fields", resp.status)
        async with http.get(url, headers={"X-Big": "v" * 9000}) as resp:
            assert resp.status in (400, 431), (url, "a 9000-byte field", resp.status)
        async with http.get(url) as resp:
            assert resp.status == 200


async def test_a_malformed_request_is_logged_in_one_line(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """Any client can send garbage: each refused request is one line at info, not a traceback."""
    bad = b"GET /peersync/v1/stats HTTP/1.1\r\nHost: x\r\nX-Bad: \x01\x02\r\n\r\n"
    with caplog.at_level(logging.DEBUG):
        for url in (node.exchange, node.mirror):
            reader, writer = await raw_request(url, bad)
            assert await status_of(reader) == 400
            writer.close()
    refused = [r for r in caplog.records if "Error handling request" in r.getMessage()]
    assert len(refused) == 2
    assert all(r.exc_info is None and r.levelno == logging.INFO for r in refused), [
        (r.name, r.levelname, bool(r.exc_info)) for r in refused
    ]


async def raw_request(
    url: str, head: bytes, local: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port), local_addr=(local, 0))
    writer.write(head)
    await writer.drain()
    return reader, writer


async def status_of(reader: asyncio.StreamReader) -> int:
    line = await reader.readline()
    return int(line.split()[1]) if line else 0


async def test_one_client_with_many_requests_is_refused_others_are_served(node: Node) -> None:
    """136 requests from one address, each a /have head whose body never comes: 128 are taken
    (and end 408 once the body timeout passes), 8 are answered 429 at once; meanwhile another
    address is served as usual and the crowded one is still refused."""
    head = f"POST {HAVE} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n".encode()
    conns = [await raw_request(node.exchange, head) for _ in range(136)]
    pending = {asyncio.ensure_future(status_of(reader)) for reader, _ in conns}
    statuses: collections.Counter[int] = collections.Counter()
    try:
        async with asyncio.timeout(DEADLINE):
            while statuses[429] < 8:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                statuses.update(t.result() for t in done)
            assert statuses == {429: 8}, statuses  # the 128 others are still held

            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
            ) as other:
                status, _ = await post(
                    other, node.exchange + HAVE, json.dumps({"digests": [node.blob]}).encode()
                )
                assert status == 200
            reader, writer = await raw_request(node.exchange, head)
            assert await status_of(reader) == 429
            writer.close()

            done, _ = await asyncio.wait(pending)
            statuses.update(t.result() for t in done)
    finally:
        for _, writer in conns:
            writer.close()
    assert statuses == {429: 8, 408: 128}


# -- the mirror ----------------------------------------------------------------------------------------


async def test_mirror_bad_ranges_are_a_clear_4xx(node: Node, http: aiohttp.ClientSession) -> None:
    url = f"{node.mirror}/v2/library/x/blobs/{node.blob}?ns={node.registry}"
    for method in ("HEAD", "GET"):
        for value in ("bytes=" + "9" * 5000 + "-", "bytes=0-" + "9" * 5000, "bytes=99999999999999999999-"):
            async with http.request(method, url, headers={"Range": value}) as resp:
                assert 400 <= resp.status < 500, (method, value[:30], resp.status)
        async with http.request(method, url, headers={"Range": "bytes=0-9"}) as resp:
            assert resp.status == 206


async def test_mirror_bodies_are_bounded(node: Node, http: aiohttp.ClientSession) -> None:
    """The mirror takes no bodies: one sent anyway is never read into memory and the connection
    is still answered."""
    async with http.get(node.mirror + "/v2/", data=b"x" * (4 << 20)) as resp:
        assert resp.status < 500


# -- the peer client ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def hostile_peer(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@pytest.mark.parametrize("declared", [False, True], ids=["chunked", "content-length"])
async def test_a_peer_answering_have_with_hundreds_of_megabytes_is_cut_off(
    http: aiohttp.ClientSession, declared: bool
) -> None:
    """A peer streams 256 MiB of valid JSON as its /have answer (announcing its length or not):
    the client gives up past its bound; what the peer managed to send (into the client and the
    sockets' buffers) stays far below what it tried to."""
    sent = 0

    async def flood(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        if declared:
            resp.content_length = len(b'{"blobs": [], "pad": ""}') + (256 << 20)
        await resp.prepare(request)
        piece = b" " * (1 << 20)
        with contextlib.suppress(ConnectionError):
            await resp.write(b'{"blobs": [], "pad": "')
            for _ in range(256):
                await resp.write(piece)
                sent += len(piece)
            await resp.write(b'"}')
        return resp

    async with hostile_peer(flood) as peer:
        with pytest.raises(PeerError):
            await asyncio.wait_for(PeerClient(http).have(peer, [sha(b"x")]), DEADLINE)
    assert sent < 64 << 20, f"the peer sent {sent >> 20} MiB"


@pytest.mark.parametrize(
    "answer",
    [
        b"[]",
        b'{"blobs": 5}',
        b'{"blobs": [{"digest": 1}]}',
        b'{"blobs": [7]}',
        b"not json",
        b"[" * 100_000,
        b'{"blobs": [{"digest": "d", "size": "x", "chunk_size": 1, "complete": 0, "have": ""}]}',
    ],
)
async def test_a_peer_answer_of_the_wrong_shape_is_a_peer_error(
    http: aiohttp.ClientSession, answer: bytes
) -> None:
    async def reply(request: web.Request) -> web.Response:
        return web.Response(body=answer, content_type="application/json")

    async with hostile_peer(reply) as peer:
        with pytest.raises(PeerError):
            await PeerClient(http).have(peer, [sha(b"x")])


async def test_tables_and_chunks_longer_than_asked_are_cut_off(http: aiohttp.ClientSession) -> None:
    sent = 0

    async def flood(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        resp = web.StreamResponse(status=206 if request.path.endswith("/data") else 200)
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            for _ in range(128):
                await resp.write(b"\0" * (1 << 20))
                sent += 1 << 20
        return resp

    async with hostile_peer(flood) as peer:
        client = PeerClient(http)
        with pytest.raises(PeerError):
            await asyncio.wait_for(client.table(peer, sha(b"x"), 2), DEADLINE)
        with pytest.raises(PeerError):
            await asyncio.wait_for(client.chunk(peer, sha(b"x"), 0, CHUNK), DEADLINE)
    assert sent < 64 << 20, f"the peer sent {sent >> 20} MiB"


async def test_every_peer_call_has_a_timeout(http: aiohttp.ClientSession) -> None:
    async def never(request: web.Request) -> web.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async with hostile_peer(never) as peer:
        client = PeerClient(http, timeout=0.5, have_timeout=0.5)
        calls = [
            client.have(peer, [sha(b"x")]),
            client.table(peer, sha(b"x"), 1),
            client.chunk(peer, sha(b"x"), 0, 1),
        ]
        for call in calls:
            with pytest.raises(PeerError):
                await asyncio.wait_for(call, DEADLINE)
