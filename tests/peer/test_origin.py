"""The origin registry client against real registries (anonymous, basic auth, bearer tokens) and small
in-process aiohttp apps for what a real registry will not do (redirects, ignoring Range, lying)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kernel.errors import FailedPrecondition, InvalidArgument, NotFound, OutOfRange, Unavailable
from peer.origin import (
    MEDIA_OCI_MANIFEST,
    READ_CHUNK,
    BasicCredentials,
    CredentialStore,
    Descriptor,
    HostSettings,
    OriginClient,
    parse_challenges,
    registry_host,
)
from testbed.images import TEST_IMAGE_REPO, BuiltImage
from testbed.procs import free_port
from testbed.registry import Credentials, Registry
from testbed.tokenserver import TokenServer

integration = pytest.mark.integration
REPO = TEST_IMAGE_REPO
SECOND_REPO = "peersync/second"  # conftest's token_registry holds the image there too
MISSING_DIGEST = "sha256:" + "0" * 64


def blob_path(image: BuiltImage, digest: str) -> Path:
    return image.layout / "blobs" / "sha256" / digest.split(":", 1)[1]


def biggest_layer(image: BuiltImage) -> Descriptor:
    layer = max(image.layers, key=lambda layer: layer.descriptor.size)
    return Descriptor(layer.descriptor.media_type, layer.descriptor.digest, layer.descriptor.size)


def client_for(
    session: aiohttp.ClientSession, reg: Registry, credentials: CredentialStore | None = None, **kw: object
) -> OriginClient:
    return OriginClient(session, credentials, hosts={reg.address: HostSettings(plain_http=True)}, **kw)  # type: ignore[arg-type]


def creds(reg: Registry, username: str, password: str) -> CredentialStore:
    return CredentialStore.from_mapping({reg.address: {"username": username, "password": password}})


async def collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


# ---------------------------------------------------------------------------------------------------
# Anonymous registry
# ---------------------------------------------------------------------------------------------------


@integration
async def test_resolve_by_tag_and_by_digest(
    http: aiohttp.ClientSession, registry: Registry, test_image: BuiltImage, test_image_ref: str
) -> None:
    origin = client_for(http, registry)
    by_tag = await origin.resolve(registry.address, REPO, test_image.tag)
    assert by_tag.media_type == MEDIA_OCI_MANIFEST
    assert by_tag.digest == test_image.manifest.digest
    assert by_tag.size == len(by_tag.body) == test_image.manifest.size
    assert by_tag.body == blob_path(test_image, by_tag.digest).read_bytes()
    assert by_tag.json()["config"]["digest"] == test_image.config_digest

    by_digest = await origin.resolve(registry.address, REPO, by_tag.digest)
    assert by_digest == by_tag

    head = await origin.head_manifest(registry.address, REPO, test_image.tag)
    assert head == Descriptor(by_tag.media_type, by_tag.digest, by_tag.size)


@integration
async def test_blob_size(
    http: aiohttp.ClientSession, registry: Registry, test_image: BuiltImage, test_image_ref: str
) -> None:
    origin = client_for(http, registry)
    for layer in test_image.layers:
        assert (
            await origin.blob_size(registry.address, REPO, layer.descriptor.digest) == layer.descriptor.size
        )
    config = blob_path(test_image, test_image.config_digest).stat().st_size
    assert await origin.blob_size(registry.address, REPO, test_image.config_digest) == config


@integration
async def test_full_read_hashes_to_digest_in_bounded_chunks(
    http: aiohttp.ClientSession, registry: Registry, test_image: BuiltImage, test_image_ref: str
) -> None:
    origin = client_for(http, registry)
    layer = biggest_layer(test_image)
    assert layer.size > 2 * READ_CHUNK  # the stream really is chunked
    digest = hashlib.sha256()
    total = 0
    async for chunk in origin.read_blob(registry.address, REPO, layer.digest):
        assert 0 < len(chunk) <= READ_CHUNK
        digest.update(chunk)
        total += len(chunk)
    assert total == layer.size
    assert f"sha256:{digest.hexdigest()}" == layer.digest


@integration
@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, 1),
        (0, 100),
        (1, 1),
        (12345, 54321),
        (READ_CHUNK - 1, 2),  # across a chunk boundary of the stream
        (READ_CHUNK, READ_CHUNK * 2 + 17),
        (-10, 10),  # the last 10 bytes (offset counted from the end by the test)
        (-1, 1),
        (0, None),
        (777, None),
        (-5, None),
    ],
)
async def test_ranged_reads(
    http: aiohttp.ClientSession,
    registry: Registry,
    test_image: BuiltImage,
    test_image_ref: str,
    offset: int,
    length: int | None,
) -> None:
    origin = client_for(http, registry)
    layer = biggest_layer(test_image)
    expected_all = blob_path(test_image, layer.digest).read_bytes()
    if offset < 0:
        offset += layer.size
    got = await collect(origin.read_blob(registry.address, REPO, layer.digest, offset, length))
    expected = expected_all[offset:] if length is None else expected_all[offset : offset + length]
    assert len(got) == len(expected)
    assert got == expected


@integration
@pytest.mark.parametrize(
    ("offset", "length"),
    [(-5, 6), (-1, 100), (0, 1 << 40), ("size", 1), ("size", None), (1 << 40, 1)],
)
async def test_reads_past_the_end_are_out_of_range(
    http: aiohttp.ClientSession,
    registry: Registry,
    test_image: BuiltImage,
    test_image_ref: str,
    offset: int | str,
    length: int | None,
) -> None:
    origin = client_for(http, registry)
    layer = biggest_layer(test_image)
    start = layer.size if offset == "size" else int(offset)
    if start < 0:
        start += layer.size
    with pytest.raises(OutOfRange):
        await collect(origin.read_blob(registry.address, REPO, layer.digest, start, length))
    # The client (and its connection pool) is fine afterwards.
    assert (
        await collect(origin.read_blob(registry.address, REPO, layer.digest, 0, 3))
        == (blob_path(test_image, layer.digest).read_bytes()[:3])
    )


@integration
async def test_empty_and_negative_reads(
    http: aiohttp.ClientSession, registry: Registry, test_image: BuiltImage, test_image_ref: str
) -> None:
    origin = client_for(http, registry)
    layer = biggest_layer(test_image)
    assert await collect(origin.read_blob(registry.address, REPO, layer.digest, 5, 0)) == b""
    with pytest.raises(InvalidArgument):
        await collect(origin.read_blob(registry.address, REPO, layer.digest, -1, 5))
    with pytest.raises(InvalidArgument):
        await collect(origin.read_blob(registry.address, REPO, layer.digest, 0, -5))


@integration
async def test_abandoned_stream_leaves_the_client_usable(
    http: aiohttp.ClientSession, registry: Registry, test_image: BuiltImage, test_image_ref: str
) -> None:
    origin = client_for(http, registry)
    layer = biggest_layer(test_image)
    for _ in range(3):
        async with contextlib.aclosing(origin.read_blob(registry.address, REPO, layer.digest)) as chunks:
            async for _chunk in chunks:
                break  # stop after the first chunk of a multi-MB blob
    expected = blob_path(test_image, layer.digest).read_bytes()
    assert await collect(origin.read_blob(registry.address, REPO, layer.digest)) == expected


@integration
async def test_unknown_names_are_not_found(
    http: aiohttp.ClientSession, registry: Registry, test_image: BuiltImage, test_image_ref: str
) -> None:
    origin = client_for(http, registry)
    layer = test_image.layers[0].descriptor.digest
    with pytest.raises(NotFound, match="MANIFEST_UNKNOWN"):
        await origin.resolve(registry.address, "peersync/no-such-repo", "v1")
    with pytest.raises(NotFound, match="MANIFEST_UNKNOWN"):
        await origin.resolve(registry.address, REPO, "no-such-tag")
    with pytest.raises(NotFound):
        await origin.resolve(registry.address, REPO, MISSING_DIGEST)
    with pytest.raises(NotFound):
        await origin.head_manifest(registry.address, REPO, "no-such-tag")
    with pytest.raises(NotFound):
        await origin.blob_size(registry.address, REPO, MISSING_DIGEST)
    with pytest.raises(NotFound):
        await origin.blob_size(registry.address, "peersync/no-such-repo", layer)
    with pytest.raises(NotFound, match="BLOB_UNKNOWN"):
        await collect(origin.read_blob(registry.address, REPO, MISSING_DIGEST, 0, 10))


async def test_bad_names_are_invalid_arguments(http: aiohttp.ClientSession) -> None:
    origin = OriginClient(http)
    with pytest.raises(InvalidArgument):
        await origin.resolve("127.0.0.1:1", "Upper/Case", "v1")
    with pytest.raises(InvalidArgument):
        await origin.resolve("127.0.0.1:1", "repo", "bad tag")
    with pytest.raises(InvalidArgument):
        await origin.resolve("http://127.0.0.1:1", "repo", "v1")
    with pytest.raises(InvalidArgument):
        await origin.blob_size("127.0.0.1:1", "repo", "sha256:abc")
    with pytest.raises(InvalidArgument):
        await collect(origin.read_blob("127.0.0.1:1", "repo", "md5:zz", 0, 1))


async def test_unreachable_registry_is_unavailable(http: aiohttp.ClientSession) -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    origin = OriginClient(http, hosts={address: HostSettings(plain_http=True)})
    with pytest.raises(Unavailable):
        await origin.resolve(address, "repo", "v1")
    with pytest.raises(Unavailable):
        await collect(origin.read_blob(address, "repo", MISSING_DIGEST, 0, 10))


def test_host_naming_and_credentials_lookup() -> None:
    assert registry_host("docker.io") == "registry-1.docker.io"
    assert registry_host("registry.example:5000") == "registry.example:5000"
    store = CredentialStore.from_mapping({"docker.io": {"username": "u", "password": "p"}})
    assert store.get("docker.io") == BasicCredentials("u", "p")
    assert store.get("registry-1.docker.io") is None  # keys are reference registries
    store.set("registry-1.docker.io", "v", "q")
    assert store.get("registry-1.docker.io") == BasicCredentials("v", "q")
    assert CredentialStore({"registry-1.docker.io": BasicCredentials("w", "r")}).get("docker.io") == (
        BasicCredentials("w", "r")
    )  # the API host works as a key too
    assert "p" not in repr(store)
    with pytest.raises(InvalidArgument):
        CredentialStore.from_mapping({"x": {"username": "u"}})


def test_parse_challenges() -> None:
    [bearer] = parse_challenges(
        ['Bearer realm="https://auth.example/token",service="registry.example",'
         'scope="repository:a/b:pull,push",error="insufficient_scope"']
    )  # fmt: skip
    assert bearer.scheme == "bearer"
    assert bearer.params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:a/b:pull,push",
        "error": "insufficient_scope",
    }
    basic, other = parse_challenges(['Basic realm="a \\"quoted\\" realm", Newauth realm=x, title=y'])
    assert (basic.scheme, basic.params) == ("basic", {"realm": 'a "quoted" realm'})
    assert (other.scheme, other.params) == ("newauth", {"realm": "x", "title": "y"})


# ---------------------------------------------------------------------------------------------------
# htpasswd basic auth
# ---------------------------------------------------------------------------------------------------


@integration
async def test_basic_auth(
    http: aiohttp.ClientSession, basic_registry: Registry, test_image: BuiltImage, basic_user: Credentials
) -> None:
    reg = basic_registry
    origin = client_for(http, reg, creds(reg, basic_user.username, basic_user.password))
    manifest = await origin.resolve(reg.address, REPO, test_image.tag)
    assert manifest.digest == test_image.manifest.digest
    layer = biggest_layer(test_image)
    assert await origin.blob_size(reg.address, REPO, layer.digest) == layer.size
    got = await collect(origin.read_blob(reg.address, REPO, layer.digest, 100, 1000))
    assert got == blob_path(test_image, layer.digest).read_bytes()[100:1100]


@integration
async def test_basic_auth_refused(
    http: aiohttp.ClientSession, basic_registry: Registry, test_image: BuiltImage, basic_user: Credentials
) -> None:
    reg = basic_registry
    anonymous = client_for(http, reg)
    with pytest.raises(FailedPrecondition, match="unauthorized.*no credentials"):
        await anonymous.resolve(reg.address, REPO, test_image.tag)
    wrong = client_for(http, reg, creds(reg, basic_user.username, "wrong"))
    with pytest.raises(FailedPrecondition, match="unauthorized.*UNAUTHORIZED: authentication required"):
        await wrong.resolve(reg.address, REPO, test_image.tag)
    with pytest.raises(FailedPrecondition, match="unauthorized"):
        await wrong.blob_size(reg.address, REPO, test_image.layers[0].descriptor.digest)


# ---------------------------------------------------------------------------------------------------
# Bearer tokens
# ---------------------------------------------------------------------------------------------------


@integration
async def test_token_auth_fetches_one_token_per_scope(
    http: aiohttp.ClientSession,
    token_registry: Registry,
    token_server: TokenServer,
    test_image: BuiltImage,
    token_user: Credentials,
) -> None:
    reg = token_registry
    origin = client_for(http, reg, creds(reg, token_user.username, token_user.password))
    before = token_server.count()
    layer = biggest_layer(test_image)
    expected = blob_path(test_image, layer.digest).read_bytes()

    manifest = await origin.resolve(reg.address, REPO, test_image.tag)
    assert manifest.digest == test_image.manifest.digest
    assert await origin.blob_size(reg.address, REPO, layer.digest) == layer.size
    for offset in (0, 1000, layer.size - 10):
        got = await collect(origin.read_blob(reg.address, REPO, layer.digest, offset, 10))
        assert got == expected[offset : offset + 10]
    assert token_server.count() - before == 1
    assert origin.token_fetches == 1
    assert token_server.requests[-1].user == token_user.username
    assert token_server.requests[-1].scopes == (f"repository:{REPO}:pull",)

    # Another repository is another scope: one more token, then cached as well.
    await origin.resolve(reg.address, SECOND_REPO, test_image.tag)
    await origin.blob_size(reg.address, SECOND_REPO, layer.digest)
    assert token_server.count() - before == 2
    assert token_server.requests[-1].scopes == (f"repository:{SECOND_REPO}:pull",)
    # The harness helper speaks token auth too.
    assert reg.manifest_digest(REPO, test_image.tag) == test_image.manifest.digest


@integration
async def test_concurrent_cold_requests_share_one_token(
    http: aiohttp.ClientSession,
    token_registry: Registry,
    token_server: TokenServer,
    test_image: BuiltImage,
    token_user: Credentials,
) -> None:
    reg = token_registry
    origin = client_for(http, reg, creds(reg, token_user.username, token_user.password))
    # Learn the host's challenge first (a cold client cannot know a host wants tokens).
    await origin.blob_size(reg.address, REPO, test_image.layers[0].descriptor.digest)
    await origin.blob_size(reg.address, SECOND_REPO, test_image.layers[0].descriptor.digest)
    before = token_server.count()
    fresh = client_for(http, reg, creds(reg, token_user.username, token_user.password))
    layer = biggest_layer(test_image)
    results = await asyncio.gather(
        *(collect(fresh.read_blob(reg.address, REPO, layer.digest, i * 100, 100)) for i in range(8))
    )
    expected = blob_path(test_image, layer.digest).read_bytes()
    assert results == [expected[i * 100 : i * 100 + 100] for i in range(8)]
    assert fresh.token_fetches == 1  # eight 401s, one token fetch
    assert token_server.count() - before == 1


@integration
async def test_token_expiry_refreshes(
    http: aiohttp.ClientSession,
    token_registry: Registry,
    token_server: TokenServer,
    test_image: BuiltImage,
    token_user: Credentials,
) -> None:
    reg = token_registry
    now = [1000.0]
    origin = client_for(http, reg, creds(reg, token_user.username, token_user.password), clock=lambda: now[0])
    digest = test_image.layers[0].descriptor.digest
    token_server.expires_in = 60
    try:
        await origin.blob_size(reg.address, REPO, digest)
        assert origin.token_fetches == 1
        now[0] += 30
        await origin.blob_size(reg.address, REPO, digest)
        assert origin.token_fetches == 1  # still fresh
        now[0] += 31  # past expires_in (and the renewal margin)
        await origin.blob_size(reg.address, REPO, digest)
        assert origin.token_fetches == 2
        await origin.blob_size(reg.address, REPO, digest)
        assert origin.token_fetches == 2
    finally:
        token_server.expires_in = 300


@integration
async def test_rejected_token_is_replaced_once(
    http: aiohttp.ClientSession,
    token_registry: Registry,
    token_server: TokenServer,
    test_image: BuiltImage,
    token_user: Credentials,
) -> None:
    reg = token_registry
    origin = client_for(http, reg, creds(reg, token_user.username, token_user.password))
    digest = test_image.layers[0].descriptor.digest
    await origin.blob_size(reg.address, REPO, digest)  # learn the challenge
    token_server.untrusted = 1  # the next token is signed by a key the registry does not trust
    assert await origin.blob_size(reg.address, SECOND_REPO, digest) > 0
    assert origin.token_fetches == 3  # first repo, the bad token, its replacement

    token_server.untrusted = 2  # a replacement that is bad too: give up after one retry
    try:
        with pytest.raises(FailedPrecondition, match="unauthorized"):
            await origin.blob_size(reg.address, "peersync/third", digest)
    finally:
        token_server.untrusted = 0


@integration
async def test_token_auth_refused_and_anonymous(
    http: aiohttp.ClientSession,
    token_registry: Registry,
    token_server: TokenServer,
    test_image: BuiltImage,
    token_user: Credentials,
) -> None:
    reg = token_registry
    wrong = client_for(http, reg, creds(reg, token_user.username, "wrong"))
    with pytest.raises(FailedPrecondition, match="unauthorized.*invalid username or password"):
        await wrong.resolve(reg.address, REPO, test_image.tag)

    anonymous = client_for(http, reg)
    with pytest.raises(FailedPrecondition, match="unauthorized"):
        await anonymous.resolve(reg.address, REPO, test_image.tag)
    token_server.allow_anonymous = True
    try:
        before = len(token_server.requests)
        manifest = await client_for(http, reg).resolve(reg.address, REPO, test_image.tag)
        assert manifest.digest == test_image.manifest.digest
        assert [r.user for r in token_server.requests[before:]] == [None]
    finally:
        token_server.allow_anonymous = False


# ---------------------------------------------------------------------------------------------------
# In-process fakes: redirects to storage, registries that ignore Range, lying registries
# ---------------------------------------------------------------------------------------------------

FAKE_USER = ("carol", "fake-secret")
FAKE_BLOB = bytes(range(256)) * 4099  # ~1 MiB, not a multiple of the read chunk
FAKE_DIGEST = "sha256:" + hashlib.sha256(FAKE_BLOB).hexdigest()
FAKE_MANIFEST = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'


def basic_header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@contextlib.asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[TestServer]:
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


def storage_app(seen: list[dict[str, str]], honour_range: bool) -> web.Application:
    """A storage backend: serves FAKE_BLOB, records request headers, maybe ignores Range."""

    async def blob(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        if honour_range and "Range" in request.headers:
            start, _, end = request.headers["Range"].removeprefix("bytes=").partition("-")
            first, last = int(start), min(int(end or len(FAKE_BLOB) - 1), len(FAKE_BLOB) - 1)
            return web.Response(
                status=206,
                body=FAKE_BLOB[first : last + 1],
                headers={"Content-Range": f"bytes {first}-{last}/{len(FAKE_BLOB)}"},
            )
        return web.Response(body=FAKE_BLOB)

    app = web.Application()
    app.router.add_route("GET", "/storage/blob", blob)
    app.router.add_route("HEAD", "/storage/blob", blob)
    return app


def registry_app(seen: list[dict[str, str]], storage_url: Callable[[], str]) -> web.Application:
    """A registry needing basic auth that redirects blob requests to `storage_url()`."""

    @web.middleware
    async def require_auth(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        seen.append(dict(request.headers))
        if request.headers.get("Authorization") != basic_header(*FAKE_USER):
            body = b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'
            return web.Response(status=401, body=body, headers={"WWW-Authenticate": 'Basic realm="fake"'})
        return await handler(request)

    async def blob(request: web.Request) -> web.StreamResponse:
        if request.match_info["digest"] != FAKE_DIGEST:
            body = b'{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry"}]}'
            return web.Response(status=404, body=body)
        raise web.HTTPTemporaryRedirect(storage_url())

    async def loop(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(str(request.url))

    async def manifest(request: web.Request) -> web.StreamResponse:
        reference = request.match_info["reference"]
        if reference == "overloaded":
            body = b'{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}'
            return web.Response(status=429, body=body, headers={"Retry-After": "7"})
        if reference == "broken":
            return web.Response(status=500, body=b'{"errors":[{"code":"UNKNOWN","message":"disk on fire"}]}')
        if reference == "denied":
            body = b'{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}'
            return web.Response(status=403, body=body)
        # A lying registry: the digest header does not match the body.
        return web.Response(
            body=FAKE_MANIFEST,
            headers={"Content-Type": MEDIA_OCI_MANIFEST, "Docker-Content-Digest": MISSING_DIGEST},
        )

    app = web.Application(middlewares=[require_auth])
    app.router.add_route("GET", "/v2/fake/loop/blobs/{digest}", loop)
    app.router.add_route("GET", "/v2/fake/repo/blobs/{digest}", blob)
    app.router.add_route("HEAD", "/v2/fake/repo/blobs/{digest}", blob)
    app.router.add_route("GET", "/v2/fake/repo/manifests/{reference}", manifest)
    return app


@pytest.mark.parametrize("honour_range", [True, False], ids=["storage-206", "storage-ignores-range"])
async def test_redirect_to_storage_drops_authorization(
    http: aiohttp.ClientSession, honour_range: bool
) -> None:
    registry_seen: list[dict[str, str]] = []
    storage_seen: list[dict[str, str]] = []
    async with serve(storage_app(storage_seen, honour_range)) as storage:
        storage_url = str(storage.make_url("/storage/blob?signature=abc"))
        async with serve(registry_app(registry_seen, lambda: storage_url)) as fake:
            address = f"127.0.0.1:{fake.port}"
            store = CredentialStore.from_mapping(
                {address: {"username": FAKE_USER[0], "password": FAKE_USER[1]}}
            )
            origin = OriginClient(http, store, hosts={address: HostSettings(plain_http=True)})

            assert await origin.blob_size(address, "fake/repo", FAKE_DIGEST) == len(FAKE_BLOB)
            for offset, length in [(0, 10), (5, 300_000), (len(FAKE_BLOB) - 3, 3), (123_456, None)]:
                got = await collect(origin.read_blob(address, "fake/repo", FAKE_DIGEST, offset, length))
                end = None if length is None else offset + length
                assert got == FAKE_BLOB[offset:end]
            assert await collect(origin.read_blob(address, "fake/repo", FAKE_DIGEST)) == FAKE_BLOB
            with pytest.raises(OutOfRange):
                await collect(origin.read_blob(address, "fake/repo", FAKE_DIGEST, len(FAKE_BLOB) - 3, 4))

    assert storage_seen, "the storage backend was never asked"
    assert all("Authorization" not in headers for headers in storage_seen)
    assert all(headers.get("Accept-Encoding") == "identity" for headers in storage_seen)
    ranged = [h for h in storage_seen if "Range" in h]
    assert ranged and all(h["Range"].startswith("bytes=") for h in ranged)
    # The registry itself got the credentials (after its one 401 challenge).
    authorized = [h for h in registry_seen if "Authorization" in h]
    assert len(registry_seen) - len(authorized) == 1
    assert all(h["Authorization"] == basic_header(*FAKE_USER) for h in authorized)


async def test_same_origin_redirect_keeps_authorization(http: aiohttp.ClientSession) -> None:
    seen: list[dict[str, str]] = []
    port: list[int] = []
    app = registry_app(seen, lambda: f"http://127.0.0.1:{port[0]}/storage/blob")
    storage_seen: list[dict[str, str]] = []
    app.add_subapp("/storage", _storage_subapp(storage_seen))
    async with serve(app) as fake:
        port.append(fake.port)
        address = f"127.0.0.1:{fake.port}"
        store = CredentialStore.from_mapping({address: {"username": FAKE_USER[0], "password": FAKE_USER[1]}})
        origin = OriginClient(http, store, hosts={address: HostSettings(plain_http=True)})
        assert await collect(origin.read_blob(address, "fake/repo", FAKE_DIGEST, 7, 7)) == FAKE_BLOB[7:14]
    # The storage path is behind the same auth middleware: it answered, so the header came along.
    assert storage_seen and storage_seen[-1]["Authorization"] == basic_header(*FAKE_USER)


def _storage_subapp(seen: list[dict[str, str]]) -> web.Application:
    async def blob(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        return web.Response(body=FAKE_BLOB)

    app = web.Application()
    app.router.add_route("GET", "/blob", blob)
    return app


async def test_fake_registry_errors(http: aiohttp.ClientSession) -> None:
    async with serve(registry_app([], lambda: "http://127.0.0.1:1/never")) as fake:
        address = f"127.0.0.1:{fake.port}"
        store = CredentialStore.from_mapping({address: {"username": FAKE_USER[0], "password": FAKE_USER[1]}})
        origin = OriginClient(http, store, hosts={address: HostSettings(plain_http=True)})
        with pytest.raises(Unavailable, match="more than 10 redirects"):
            await collect(origin.read_blob(address, "fake/loop", FAKE_DIGEST, 0, 1))
        with pytest.raises(FailedPrecondition, match="digest mismatch"):
            await origin.resolve(address, "fake/repo", "v1")
        with pytest.raises(FailedPrecondition, match="digest mismatch"):
            await origin.resolve(address, "fake/repo", "sha256:" + hashlib.sha256(b"other").hexdigest())
        with pytest.raises(Unavailable, match=r"TOOMANYREQUESTS: slow down \(retry after 7\)"):
            await origin.resolve(address, "fake/repo", "overloaded")
        with pytest.raises(Unavailable, match="HTTP 500: UNKNOWN: disk on fire"):
            await origin.resolve(address, "fake/repo", "broken")
        with pytest.raises(FailedPrecondition, match="unauthorized.*DENIED: requested access"):
            await origin.resolve(address, "fake/repo", "denied")
        with pytest.raises(NotFound, match="BLOB_UNKNOWN"):
            await collect(origin.read_blob(address, "fake/repo", MISSING_DIGEST, 0, 1))
        # The redirect target is down: a connection error is Unavailable.
        with pytest.raises(Unavailable):
            await collect(origin.read_blob(address, "fake/repo", FAKE_DIGEST, 0, 1))


# ---------------------------------------------------------------------------------------------------
# https
# ---------------------------------------------------------------------------------------------------


def self_signed_localhost(workdir: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (IP SAN) and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = workdir / "cert.pem", workdir / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


async def test_https_private_ca_skip_verify_and_default_trust(
    http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    cert, key = self_signed_localhost(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    port = free_port()
    app = registry_app([], lambda: f"https://127.0.0.1:{port}/storage/blob")
    app.add_subapp("/storage", _storage_subapp([]))
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    address = f"127.0.0.1:{port}"
    store = CredentialStore.from_mapping({address: {"username": FAKE_USER[0], "password": FAKE_USER[1]}})
    try:
        for settings in (HostSettings(ca_file=str(cert)), HostSettings(skip_verify=True)):
            origin = OriginClient(http, store, hosts={address: settings})
            got = await collect(origin.read_blob(address, "fake/repo", FAKE_DIGEST, 1000, 5000))
            assert got == FAKE_BLOB[1000:6000]
        with pytest.raises(FailedPrecondition, match="TLS certificate verification failed"):
            await OriginClient(http, store).blob_size(address, "fake/repo", FAKE_DIGEST)
        plain = OriginClient(http, store, hosts={address: HostSettings(plain_http=True)})
        with pytest.raises(Unavailable):  # http to an https port
            await plain.blob_size(address, "fake/repo", FAKE_DIGEST)
    finally:
        await runner.cleanup()


# -- hostile redirects and answers (issue 10, findings 2 and 3); every server is on loopback -------


def recorder(seen: list[dict[str, str]], status: int, headers: Mapping[str, str], body: bytes = b"") -> web.Application:
    """A server that records every request's headers and answers each with `status`."""

    async def answer(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response(status=status, headers=headers, body=body)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


async def test_a_redirect_targets_bearer_challenge_never_gets_the_registrys_credentials(
    http: aiohttp.ClientSession,
) -> None:
    token_seen: list[dict[str, str]] = []
    foreign_seen: list[dict[str, str]] = []
    registry_seen: list[dict[str, str]] = []
    async with serve(recorder(token_seen, 200, {}, b'{"token": "foreign"}')) as realm:
        challenge = {"WWW-Authenticate": f'Bearer realm="{realm.make_url("/token")}",service="evil"'}
        async with serve(recorder(foreign_seen, 401, challenge)) as foreign:
            foreign_url = str(foreign.make_url("/storage/blob"))
            async with serve(registry_app(registry_seen, lambda: foreign_url)) as fake:
                address = f"127.0.0.1:{fake.port}"
                store = CredentialStore.from_mapping({address: {"username": FAKE_USER[0], "password": FAKE_USER[1]}})
                origin = OriginClient(http, store, hosts={address: HostSettings(plain_http=True)})
                with pytest.raises(FailedPrecondition, match="digest mismatch"):  # learns basic auth
                    await origin.resolve(address, "fake/repo", "v1")
                with pytest.raises(FailedPrecondition) as refused:  # sent with credentials up front
                    await collect(origin.read_blob(address, "fake/repo", FAKE_DIGEST))
                # The registry's own challenge is intact: a later request authenticates with basic
                # auth up front and never goes near the foreign realm.
                with pytest.raises(FailedPrecondition, match="digest mismatch"):
                    await origin.resolve(address, "fake/repo", "v1")
    assert token_seen == [], "the foreign realm was asked for a token (with the registry's credentials)"
    assert "redirected to a host that refused" in str(refused.value)
    assert foreign_seen and all("Authorization" not in h for h in foreign_seen)
    assert registry_seen[-1]["Authorization"] == basic_header(*FAKE_USER)


async def test_a_redirect_from_https_to_plain_http_is_refused(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    cert, key = self_signed_localhost(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    plain_seen: list[dict[str, str]] = []
    async with serve(recorder(plain_seen, 200, {}, FAKE_BLOB)) as plain:
        app = registry_app([], lambda: str(plain.make_url("/storage/blob")))
        port = free_port()
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
        address = f"127.0.0.1:{port}"
        store = CredentialStore.from_mapping({address: {"username": FAKE_USER[0], "password": FAKE_USER[1]}})
        origin = OriginClient(http, store, hosts={address: HostSettings(ca_file=str(cert))})
        try:
            with pytest.raises(FailedPrecondition, match="from https to plain http"):
                await collect(origin.read_blob(address, "fake/repo", FAKE_DIGEST))
        finally:
            await runner.cleanup()
    assert plain_seen == [], "the plain-http target was asked"


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b'{"internal": "secret", "hostname": "db-7"}'),
        ("text/html", b"<html>admin console</html>"),
        (MEDIA_OCI_MANIFEST, b'{"schemaVersion": 2, "mediaType": "' + MEDIA_OCI_MANIFEST.encode() + b'"}'),
        (MEDIA_OCI_MANIFEST, b'{"schemaVersion": 2, "config": {}, "layers": [], "mediaType": "x/y"}'),
    ],
    ids=["json", "html", "manifest-without-layers", "declares-another-type"],
)
async def test_a_tag_lookup_only_returns_a_manifest_of_an_allowed_type(
    http: aiohttp.ClientSession, content_type: str, body: bytes
) -> None:
    async with serve(recorder([], 200, {"Content-Type": content_type}, body)) as internal:
        target = str(internal.make_url("/internal/status"))

        async def manifest(request: web.Request) -> web.StreamResponse:
            raise web.HTTPTemporaryRedirect(target)

        app = web.Application()
        app.router.add_route("GET", "/v2/fake/repo/manifests/{reference}", manifest)
        async with serve(app) as fake:
            address = f"127.0.0.1:{fake.port}"
            origin = OriginClient(http, hosts={address: HostSettings(plain_http=True)})
            with pytest.raises(FailedPrecondition, match="not a manifest|not a well-formed|declares"):
                await origin.resolve(address, "fake/repo", "latest")


async def test_network_errors_do_not_tell_refused_from_not_tls(http: aiohttp.ClientSession) -> None:
    """A port nobody listens on and a plain-http server spoken to with TLS read alike."""
    async with serve(recorder([], 200, {})) as plain:
        closed = f"127.0.0.1:{free_port()}"
        not_tls = f"127.0.0.1:{plain.port}"
        origin = OriginClient(http)
        texts = []
        for address in (closed, not_tls):
            with pytest.raises(Unavailable) as caught:
                await origin.resolve(address, "fake/repo", "latest")
            texts.append(str(caught.value).replace(address, "HOST"))
    assert texts[0] == texts[1]
    assert not any(word in texts[0].lower() for word in ("refused", "ssl", "tls", "errno", "connect"))
