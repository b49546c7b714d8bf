"""Random and adversarial requests at a running node's peer exchange and registry mirror: whatever
arrives, the answer is never a 500 (security issue 10, "never a 500 or a traceback for bad input").

The requests are written byte by byte over raw loopback sockets, so the method, the path, the
headers and the body can be anything, not only what an HTTP client library agrees to send. The
node is the daemon's own `PeerNode` over a real store holding a complete and a partial blob, so
valid digests reach the handlers too. The mirror is only ever pointed at a closed loopback port
(`?ns=`), so no request leaves this machine; a manifest asked by tag then fails as an unreachable
origin does (503), which is not bad input.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel.config import Config, DiscoveryConfig, MirrorConfig, PeerConfig, TlsConfig
from kernel.store.chunkstore import ChunkStore
from kernel.store.meta import Meta
from peer.node import PeerNode
from testbed.procs import free_port

CHUNK = 4096
FUZZ = settings(max_examples=250, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Running:
    loop: asyncio.AbstractEventLoop
    exchange: int
    mirror: int
    closed: int  # a loopback port nothing listens on: the mirror's only origin
    digests: list[str]  # held here: one complete, one partial


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    """A node on its own event loop (hypothesis drives examples from plain functions)."""
    loop = asyncio.new_event_loop()
    meta = Meta(tmp_path)
    store = ChunkStore(tmp_path, meta, CHUNK)
    store.recover()
    data = bytes(range(256)) * 40
    writer = store.ingests.open("blob", len(data), sha(data))
    writer.write_at(0, data)
    blob = writer.commit(len(data), sha(data))
    partial = sha(b"partial")
    store.partials.claim(partial, 1 << 24)
    ports = free_port(), free_port()
    config = Config(
        root=tmp_path,  # the node id is kept under the root: never the machine's /var/lib/peersync
        peer=PeerConfig(listen=f"127.0.0.1:{ports[0]}", peers=[]),
        mirror=MirrorConfig(listen=f"127.0.0.1:{ports[1]}"),
        discovery=DiscoveryConfig(mdns=False),
        tls=TlsConfig(insecure=True),  # plain HTTP: the bounds are the subject (TLS: test_tls.py)
    )
    node = PeerNode(config, store, meta)
    loop.run_until_complete(node.start())
    try:
        yield Running(loop, ports[0], ports[1], free_port(), [blob, partial])
    finally:
        loop.run_until_complete(node.stop())
        loop.run_until_complete(cancel_leftovers())
        loop.close()
        store.close()
        meta.close()


async def cancel_leftovers() -> None:
    """End what the node left running (connections the fuzz cut mid-answer) before the loop closes."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def exchange(port: int, raw: bytes) -> int:
    """Send `raw` and return the status of the answer (0 if the server closed without one)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 60)
    except ConnectionError:
        return 0
    finally:
        writer.close()
    parts = line.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def request(method: bytes, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    head = [method + b" " + path + b" HTTP/1.1", b"Host: peer", b"Connection: close"]
    head += [k + b": " + v for k, v in headers]
    head.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(head) + b"\r\n\r\n" + body


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)
header_bytes = st.binary(max_size=60).filter(lambda b: b"\r" not in b and b"\n" not in b)
range_values = st.one_of(
    st.from_regex(rb"\Abytes=[0-9]{0,25}-[0-9]{0,25}\Z"),
    st.from_regex(rb"\Abytes=[0-9]{1,6}-[0-9]{1,6}(,[0-9]{0,6}-[0-9]{0,6}){0,3}\Z"),
    st.text(alphabet="bytes=-0123456789, *", max_size=40).map(str.encode),
    header_bytes,
)


@st.composite
def have_bodies(draw: Any, digests: list[str]) -> bytes:
    kind = draw(st.sampled_from(["raw", "json", "digests"]))
    if kind == "raw":
        body: bytes = draw(st.binary(max_size=300))
        return body
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    entries = st.one_of(st.sampled_from(digests), st.text(max_size=80), json_values)
    return json.dumps({"digests": draw(st.lists(entries, max_size=40))}).encode()


def test_the_exchange_never_answers_500(running: Running) -> None:
    digests = running.digests
    paths = st.one_of(
        st.sampled_from([f"/peersync/v1/blobs/{d}{t}" for d in digests for t in ("", "/table", "/data")]),
        st.builds(
            lambda d, t: f"/peersync/v1/blobs/{d}{t}",
            st.text(max_size=80),
            st.sampled_from(["", "/table", "/data"]),
        ),
        st.just("/peersync/v1/have"),
        st.text(max_size=60).map(lambda t: "/peersync/v1/" + t),
    ).map(lambda p: urllib.parse.quote(p, safe="/:%").encode())

    @FUZZ
    @given(
        method=st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"BREW"]),
        path=paths,
        rng=st.none() | range_values,
        extra=st.lists(st.tuples(st.from_regex(rb"\AX-[A-Za-z]{1,8}\Z"), header_bytes), max_size=4),
        body=have_bodies(digests),
    )
    def check(
        method: bytes, path: bytes, rng: bytes | None, extra: list[tuple[bytes, bytes]], body: bytes
    ) -> None:
        headers = [(b"Content-Type", b"application/json"), *extra]
        if rng is not None:
            headers.append((b"Range", rng))
        status = running.loop.run_until_complete(
            exchange(running.exchange, request(method, path, headers, body))
        )
        assert status != 500 and status < 500, (status, method, path, rng, body[:200])

    check()


def test_the_mirror_never_answers_500(running: Running) -> None:
    ns = f"127.0.0.1:{running.closed}"
    names = st.one_of(st.just("library/busybox"), st.text(max_size=40))
    # The complete blob only: a partial one asked for here is streamed as its download fills it,
    # and with no reachable origin that stream waits until the node stops.
    refs = st.one_of(
        st.just(running.digests[0]), st.text(max_size=80), st.from_regex(r"\Asha256:[0-9a-f]{0,70}\Z")
    )

    @FUZZ
    @given(
        method=st.sampled_from([b"GET", b"HEAD", b"POST"]),
        kind=st.sampled_from(["blobs", "manifests", "tags/list", ""]),
        name=names,
        ref=refs,
        rng=st.none() | range_values,
        body=st.binary(max_size=200),
    )
    def check(method: bytes, kind: str, name: str, ref: str, rng: bytes | None, body: bytes) -> None:
        path = urllib.parse.quote(f"/v2/{name}/{kind}/{ref}" if kind else f"/v2/{name}", safe="/:")
        target = f"{path}?{urllib.parse.urlencode({'ns': ns})}".encode()
        headers = [(b"Range", rng)] if rng is not None else []
        status = running.loop.run_until_complete(
            exchange(running.mirror, request(method, target, headers, body))
        )
        assert status != 500, (status, method, target, rng)

    check()
