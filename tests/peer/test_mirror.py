"""The registry mirror facing hostile local clients (issue 10, items 2 and 3): `?ns=` only names
registries the mirror serves, nothing a repository needing credentials holds reaches a client
that has not shown its own credentials good at the origin (under no other repository name
either), credentials are re-checked after the TTL, and a tag lookup never stores what is not a
manifest. Each test runs a real mirror (`peer.httpbounds`' app, the store, the engine) on
loopback; registries are real `docker-registry` processes or loopback aiohttp servers, and the
"outside" host is a second loopback server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from kernel.store.chunkstore import ChunkStore
from kernel.store.meta import Meta
from peer import httpbounds
from peer.access import ClientAccess
from peer.catalog import Catalog
from peer.engine import Engine
from peer.exchange import PeerClient
from peer.mirror import Mirror
from peer.origin import MANIFEST_ACCEPT, CredentialStore, HostSettings, OriginClient
from peer.peers import StaticPeers
from testbed.images import TEST_IMAGE_REPO, BuiltImage
from testbed.registry import Credentials, Registry
from testbed.tokenserver import TokenServer

integration = pytest.mark.integration


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Site:
    """A mirror on loopback over its own store; `url(path, ns)` names one of its routes."""

    server: TestServer
    store: ChunkStore
    access: ClientAccess

    def url(self, path: str, ns: str | None = None) -> str:
        return str(self.server.make_url(path)) + (f"?ns={ns}" if ns else "")


def basic(creds: Credentials) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(creds.colon.encode()).decode()}


@contextlib.asynccontextmanager
async def mirror_site(
    root: Path,
    http: aiohttp.ClientSession,
    registries: list[str],
    node_creds: dict[str, Credentials] | None = None,
    clock: Clock | None = None,
) -> AsyncIterator[Site]:
    """A mirror serving `registries` (all plain HTTP; the first is the default), holding
    `node_creds` as the node's own [origin.auth]."""
    meta = Meta(root)
    store = ChunkStore(root, meta, 1 << 20)
    store.recover()
    catalog = Catalog(meta)
    table = {r: {"username": c.username, "password": c.password} for r, c in (node_creds or {}).items()}
    origin = OriginClient(
        http, CredentialStore.from_mapping(table), hosts={r: HostSettings(plain_http=True) for r in registries}
    )
    engine = Engine(store, catalog, origin, StaticPeers([]), PeerClient(http), "")
    access = ClientAccess(origin, 30.0, clock=clock or Clock())
    mirror = Mirror(store, catalog, origin, engine, registries[0], registries=registries, access=access)
    app = httpbounds.application(httpbounds.MIRROR)
    app.add_routes(mirror.routes())
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield Site(server, store, access)
    finally:
        await server.close()
        await engine.close()
        store.close()
        meta.close()


async def get(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes, str]:
    async with http.get(url, headers={"Accept": MANIFEST_ACCEPT, **(headers or {})}) as resp:
        return resp.status, await resp.read(), resp.reason or ""


# -- ?ns= names only registries the mirror serves -----------------------------------------------


async def test_ns_naming_another_host_is_refused_without_any_connection(
    http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    seen: list[str] = []

    async def anything(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.Response(status=200, body=b"{}")

    outside_app = web.Application()
    outside_app.router.add_route("*", "/{tail:.*}", anything)
    outside = TestServer(outside_app, host="127.0.0.1")
    await outside.start_server()
    try:
        async with mirror_site(tmp_path, http, ["127.0.0.1:1"]) as site:
            elsewhere = f"127.0.0.1:{outside.port}"
            digest = "sha256:" + "a" * 64
            for path in ("/v2/some/repo/manifests/latest", f"/v2/some/repo/blobs/{digest}"):
                status, body, reason = await get(http, site.url(path, elsewhere))
                assert status == 403, (status, body)
                assert b"not one this mirror serves" in body
                assert "refused" not in reason.lower() and "connect" not in reason.lower()
    finally:
        await outside.close()
    assert seen == [], "the mirror connected to a host no config names"


# -- content of a repository needing credentials ------------------------------------------------


@pytest.fixture
async def site(
    http: aiohttp.ClientSession, tmp_path: Path, basic_registry: Registry, basic_user: Credentials
) -> AsyncIterator[Site]:
    """A mirror for the basic-auth registry, the node holding good credentials for it."""
    address = basic_registry.address
    async with mirror_site(tmp_path, http, [address], {address: basic_user}) as site:
        yield site


@integration
async def test_private_content_needs_the_clients_own_credentials(
    http: aiohttp.ClientSession, site: Site, basic_user: Credentials, test_image: BuiltImage
) -> None:
    layer = test_image.layers[0].descriptor.digest
    manifest = f"/v2/{TEST_IMAGE_REPO}/manifests/{test_image.tag}"
    blob = f"/v2/{TEST_IMAGE_REPO}/blobs/{layer}"
    for path in (manifest, blob):  # nothing for a client without credentials, or with bad ones
        for headers in ({}, basic(Credentials(basic_user.username, "wrong"))):
            status, body, _ = await get(http, site.url(path), headers)
            assert status == 401, (path, status, body)
    status, body, _ = await get(http, site.url(manifest), basic(basic_user))
    assert status == 200
    assert hashlib.sha256(body).hexdigest() == test_image.manifest.digest.removeprefix("sha256:")
    status, body, _ = await get(http, site.url(blob), basic(basic_user))
    assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == layer
    # Fetched by the node now; still nothing for an anonymous client.
    status, _, _ = await get(http, site.url(blob))
    assert status == 401


@integration
async def test_a_stored_private_blob_is_not_served_under_another_repository(
    http: aiohttp.ClientSession, site: Site, basic_user: Credentials, test_image: BuiltImage
) -> None:
    layer = test_image.layers[0].descriptor.digest
    for path in (f"manifests/{test_image.tag}", f"blobs/{layer}"):  # a pull with credentials
        status, _, _ = await get(http, site.url(f"/v2/{TEST_IMAGE_REPO}/{path}"), basic(basic_user))
        assert status == 200
    for _ in range(300):  # the download completes in the background after the answer
        if site.store.exists(layer):
            break
        await asyncio.sleep(0.1)
    assert site.store.exists(layer)
    # The registry has no such repository: unauthorized without credentials, unknown with them.
    for headers, refused in (({}, 401), (basic(basic_user), 404)):
        status, body, _ = await get(http, site.url(f"/v2/someone/else/blobs/{layer}"), headers)
        assert status == refused and not body.startswith(b"\x1f\x8b"), (status, body[:100])


@integration
async def test_a_clients_credentials_are_checked_again_after_the_ttl(
    http: aiohttp.ClientSession,
    tmp_path: Path,
    token_registry: Registry,
    token_server: TokenServer,
    token_user: Credentials,
    test_image: BuiltImage,
) -> None:
    address = token_registry.address
    manifest = f"/v2/{TEST_IMAGE_REPO}/manifests/{test_image.manifest.digest}"
    clock = Clock()
    async with mirror_site(tmp_path, http, [address], {address: token_user}, clock) as site:
        status, _, _ = await get(http, site.url(manifest), basic(token_user))
        assert status == 200
        checks = site.access.checks
        saved = dict(token_server.users)
        token_server.users.pop(token_user.username)  # the client's credentials are revoked
        try:
            clock.now += 29  # within the TTL: the answer is reused, the origin not asked
            status, _, _ = await get(http, site.url(manifest), basic(token_user))
            assert status == 200 and site.access.checks == checks
            clock.now += 2  # past it: asked again, and refused
            status, _, _ = await get(http, site.url(manifest), basic(token_user))
            assert status == 401 and site.access.checks == checks + 1
        finally:
            token_server.users.clear()
            token_server.users.update(saved)


@integration
async def test_public_content_is_served_to_anonymous_clients(
    http: aiohttp.ClientSession, tmp_path: Path, registry: Registry, test_image_ref: str, test_image: BuiltImage
) -> None:
    async with mirror_site(tmp_path, http, [registry.address]) as site:
        path = f"/v2/{TEST_IMAGE_REPO}/manifests/{test_image.tag}"
        status, body, _ = await get(http, site.url(path))
        assert status == 200
        assert "sha256:" + hashlib.sha256(body).hexdigest() == test_image.manifest.digest


# -- a tag lookup stores nothing but a manifest -------------------------------------------------


async def test_a_redirected_tag_lookup_stores_no_internal_page(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    page = b'{"internal": "admin console", "token": "s3cr3t"}'

    async def internal(request: web.Request) -> web.Response:
        return web.Response(body=page, content_type="application/json")

    internal_app = web.Application()
    internal_app.router.add_route("*", "/{tail:.*}", internal)
    inside = TestServer(internal_app, host="127.0.0.1")
    await inside.start_server()

    async def manifest(request: web.Request) -> web.StreamResponse:
        raise web.HTTPTemporaryRedirect(str(inside.make_url("/internal/status")))

    registry_app = web.Application()
    registry_app.router.add_get("/v2/evil/repo/manifests/{reference}", manifest)  # and HEAD
    registry = TestServer(registry_app, host="127.0.0.1")
    await registry.start_server()
    try:
        address = f"127.0.0.1:{registry.port}"
        async with mirror_site(tmp_path, http, [address]) as site:
            status, body, _ = await get(http, site.url("/v2/evil/repo/manifests/latest"))
            assert 400 <= status < 500, (status, body)
            assert b"s3cr3t" not in body
            assert not site.store.exists("sha256:" + hashlib.sha256(page).hexdigest())
    finally:
        await registry.close()
        await inside.close()
