"""Fixtures for the network side: real registries (anonymous, htpasswd basic auth, bearer tokens).

Tests marked `integration` here need the `docker-registry` and `skopeo` binaries (and busybox, which
the test image is built from); without them they are skipped with the reason.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from testbed.images import BUSYBOX, TEST_IMAGE_REPO, BuiltImage, build_test_image, push_image
from testbed.registry import REGISTRY_BINARY, Credentials, Registry, start_registry
from testbed.tokenserver import TokenServer, start_token_server

BASIC_USER = Credentials("alice", "basic-secret")
TOKEN_USER = Credentials("bob", "token-secret")
SECOND_REPO = "peersync/second"  # the token registry's second copy of the image (another scope)


def missing_registry_requirements() -> str | None:
    """Why registry-backed tests cannot run here, or None when they can."""
    missing = [b for b in (REGISTRY_BINARY, "skopeo", str(BUSYBOX)) if shutil.which(b) is None]
    if missing:
        return (
            f"missing binaries: {', '.join(missing)} (apt-get install docker-registry skopeo busybox-static)"
        )
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip this directory's integration tests, with the reason, when the binaries are missing."""
    reason = missing_registry_requirements()
    if reason is None:
        return
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents and item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def basic_user() -> Credentials:
    """The htpasswd user of `basic_registry`."""
    return BASIC_USER


@pytest.fixture(scope="session")
def token_user() -> Credentials:
    """The user `token_server` issues tokens to."""
    return TOKEN_USER


@pytest.fixture(scope="session")
def test_image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """The 5-layer conformance image as an OCI layout (its blobs are the expected bytes)."""
    return build_test_image(tmp_path_factory.mktemp("oci-test-image"))


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """One anonymous plain-HTTP registry for the session."""
    with start_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="session")
def test_image_ref(registry: Registry, test_image: BuiltImage) -> str:
    """The conformance image pushed once to the anonymous registry."""
    return push_image(test_image, registry, TEST_IMAGE_REPO)


@pytest.fixture(scope="session")
def basic_registry(tmp_path_factory: pytest.TempPathFactory, test_image: BuiltImage) -> Iterator[Registry]:
    """A registry with htpasswd basic auth (user BASIC_USER), the test image pushed."""
    with start_registry(tmp_path_factory.mktemp("registry-basic"), auth=BASIC_USER) as reg:
        push_image(test_image, reg, TEST_IMAGE_REPO)
        yield reg


@pytest.fixture(scope="session")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    """A token service knowing TOKEN_USER; anonymous access off unless a test turns it on."""
    users = {TOKEN_USER.username: TOKEN_USER.password}
    with start_token_server(tmp_path_factory.mktemp("tokenserver"), users=users) as server:
        yield server


@pytest.fixture(scope="session")
def token_registry(
    tmp_path_factory: pytest.TempPathFactory, token_server: TokenServer, test_image: BuiltImage
) -> Iterator[Registry]:
    """A registry with bearer-token auth through `token_server`, the image in two repositories."""
    auth = token_server.registry_auth(TOKEN_USER)
    with start_registry(tmp_path_factory.mktemp("registry-token"), token_auth=auth) as reg:
        push_image(test_image, reg, TEST_IMAGE_REPO)
        push_image(test_image, reg, SECOND_REPO)
        yield reg


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A fresh aiohttp session per test (the client under test never owns it)."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def hanging_origin() -> AsyncIterator[str]:
    """A registry address (a second loopback server) that accepts requests and never answers
    (a dead uplink)."""

    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(3600)
        return web.Response()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hang)
    server = TestServer(app)
    await server.start_server()
    yield f"{server.host}:{server.port}"
    await server.close()


@pytest.fixture
def pushed_layer(test_image: BuiltImage, test_image_ref: str) -> tuple[str, int, bytes]:
    """The test image's biggest layer (digest, size, bytes), the image pushed to the registry."""
    layer = max(test_image.layers, key=lambda la: la.descriptor.size).descriptor
    data = (test_image.layout / "blobs" / "sha256" / layer.digest[7:]).read_bytes()
    return layer.digest, layer.size, data
