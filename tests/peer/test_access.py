"""peer.access: the mirror's gate against a loopback registry that counts what it is asked."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from kernel.errors import NotFound
from peer.access import ClientAccess, Object, basic_credentials
from peer.origin import BasicCredentials, HostSettings, OriginClient

GOOD = BasicCredentials("carol", "right")
PUBLIC, PRIVATE = "open/repo", "closed/repo"
DIGEST = "sha256:" + "b" * 64


@dataclass
class Clock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def registry() -> AsyncIterator[tuple[str, list[str]]]:
    """A registry where PUBLIC is anonymous and PRIVATE needs GOOD (basic auth); every request's
    Authorization (or "-") is recorded."""
    seen: list[str] = []

    async def head(request: web.Request) -> web.Response:
        await asyncio.sleep(0.01)  # long enough for concurrent checks to overlap
        seen.append(request.headers.get("Authorization", "-"))
        if request.match_info["repo"] == PRIVATE and request.headers.get("Authorization") != GOOD.header():
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        if request.match_info["digest"] != DIGEST:
            return web.Response(status=404)
        return web.Response(status=200)

    app = web.Application()
    app.router.add_route("HEAD", "/v2/{repo:.+}/blobs/{digest}", head)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"127.0.0.1:{server.port}", seen
    finally:
        await server.close()


def gate(http: aiohttp.ClientSession, address: str, clock: Clock, **kw: int) -> ClientAccess:
    origin = OriginClient(http, hosts={address: HostSettings(plain_http=True)})
    return ClientAccess(origin, 30.0, clock=clock, **kw)


def test_basic_credentials_from_headers() -> None:
    assert basic_credentials(GOOD.header()) == GOOD
    for header in (None, "", "Bearer abc", "Basic !!!", "Basic " + base64.b64encode(b"nocolon").decode()):
        assert basic_credentials(header) is None, header


async def test_a_private_object_needs_good_credentials_and_answers_are_cached(
    http: aiohttp.ClientSession, registry: tuple[str, list[str]]
) -> None:
    address, seen = registry
    clock = Clock()
    access = gate(http, address, clock)
    private = Object(address, PRIVATE, "blobs", DIGEST)
    assert not await access.allows(private, None)
    assert not await access.allows(private, BasicCredentials("carol", "wrong").header())
    assert await access.allows(private, GOOD.header())
    asked = len(seen)
    assert await access.allows(private, GOOD.header())  # cached
    assert not await access.allows(private, None)  # a refusal is cached too
    assert len(seen) == asked
    # The node's own state is not what answered: the client's header went to the registry.
    assert GOOD.header() in seen and seen.count("-") >= 2
    clock.now += 31
    assert await access.allows(private, GOOD.header())
    assert len(seen) > asked


async def test_concurrent_checks_share_one_request_and_public_grants_cover_everyone(
    http: aiohttp.ClientSession, registry: tuple[str, list[str]]
) -> None:
    address, seen = registry
    access = gate(http, address, Clock())
    public = Object(address, PUBLIC, "blobs", DIGEST)
    assert all(await asyncio.gather(*(access.allows(public, None) for _ in range(20))))
    assert access.checks == 1 and seen == ["-"]
    assert await access.allows(public, GOOD.header())  # the anonymous grant: no new request
    assert access.checks == 1


async def test_an_object_the_registry_does_not_have_is_not_found(
    http: aiohttp.ClientSession, registry: tuple[str, list[str]]
) -> None:
    address, _ = registry
    access = gate(http, address, Clock())
    with pytest.raises(NotFound):
        await access.allows(Object(address, PUBLIC, "blobs", "sha256:" + "c" * 64), None)


async def test_the_cache_stays_within_its_bound(
    http: aiohttp.ClientSession, registry: tuple[str, list[str]]
) -> None:
    address, _ = registry
    access = gate(http, address, Clock(), max_entries=8)
    for i in range(30):
        assert not await access.allows(Object(address, PRIVATE, "blobs", DIGEST), BasicCredentials("u", str(i)).header())
    assert 0 < len(access) <= 8
