"""`peer.connections.ConnectionCount` on a real aiohttp server on loopback: it counts the
connections a session opens, not the requests it sends over warm ones."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from peer.connections import ConnectionCount
from testbed.procs import free_port


@pytest.fixture
async def server() -> AsyncIterator[str]:
    async def ok(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/"
    await runner.cleanup()


async def get_n(url: str, n: int, count: ConnectionCount, force_close: bool) -> None:
    connector = aiohttp.TCPConnector(force_close=force_close)
    async with aiohttp.ClientSession(connector=connector, trace_configs=[count.trace()]) as session:
        for _ in range(n):
            async with session.get(url) as resp:
                assert await resp.text() == "ok"


async def test_requests_on_a_kept_alive_connection_count_once(server: str) -> None:
    count = ConnectionCount()
    await get_n(server, 3, count, force_close=False)
    assert count.opened == 1


async def test_every_new_connection_counts(server: str) -> None:
    count = ConnectionCount()
    await get_n(server, 3, count, force_close=True)
    assert count.opened == 3
    await get_n(server, 2, count, force_close=False)  # one count can follow several sessions
    assert count.opened == 4


async def test_a_connection_that_fails_is_not_counted() -> None:
    count = ConnectionCount()
    with pytest.raises(aiohttp.ClientConnectionError):
        await get_n(f"http://127.0.0.1:{free_port()}/", 1, count, force_close=False)  # nobody listens
    assert count.opened == 0
