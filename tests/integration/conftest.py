"""Fixtures for tests that run real processes: a registry, private containerds, the test image.

Reuse for the peersync plugin: override `containerd_extra_config` (TOML text from
`peersync containerd-config --socket PATH`) and `snapshotter_name` ("peersync") in a conftest or
module; every fixture and check below then runs against the plugin instead of containerd's builtins:

    @pytest.fixture
    def containerd_extra_config(peersync_socket: Path) -> str:
        return run_checked(["peersync", "containerd-config", "--socket", str(peersync_socket)])
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

try:
    import testbed  # noqa: F401
except ImportError:  # plain `pytest` (not `python -m pytest`) does not put the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from testbed.containerd import (
    CONTAINERD_BINARY,
    CTR_BINARY,
    Containerd,
    ContainerdFactory,
    start_containerd,
)
from testbed.images import BUSYBOX, TEST_IMAGE_REPO, BuiltImage, build_test_image, push_image
from testbed.registry import REGISTRY_BINARY, Registry, start_registry

REQUIRED_BINARIES = (CONTAINERD_BINARY, CTR_BINARY, REGISTRY_BINARY, "skopeo", "runc", str(BUSYBOX), "umount")


def missing_requirements() -> str | None:
    """Why integration tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "integration tests need root (containerd, runc and overlay mounts)"
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    if missing:
        apt = "apt-get install containerd runc docker-registry skopeo busybox-static"
        return f"missing binaries: {', '.join(missing)} ({apt})"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every integration test in this directory, with the reason, when requirements are missing."""
    reason = missing_requirements()
    if reason is None:
        return
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """One plain-HTTP registry on 127.0.0.1 for the whole session (anonymous push and pull)."""
    with start_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="session")
def test_image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """The 5-layer conformance image as an OCI layout, with its expected root filesystem."""
    return build_test_image(tmp_path_factory.mktemp("oci-test-image"))


@pytest.fixture(scope="session")
def test_image_ref(registry: Registry, test_image: BuiltImage) -> str:
    """The conformance image pushed once per session; the reference to pull."""
    return push_image(test_image, registry, TEST_IMAGE_REPO)


@pytest.fixture(scope="session")
def debian_image(registry: Registry) -> tuple[BuiltImage, str]:
    """The testbed's Debian Python + NumPy image (~10k files, 3 layers), built once and cached
    (`testbed.debimage`), pushed once per session; skipped where it cannot be built."""
    from testbed.debimage import DEFAULT_CACHE, DebootstrapError, build_debian_image

    try:
        image = build_debian_image(DEFAULT_CACHE, log=lambda _msg: None)
    except DebootstrapError as exc:  # no Debian mirror reachable and nothing cached
        pytest.skip(f"the Debian image cannot be built here: {exc}")
    return image, push_image(image, registry, "peersync/debian")


@pytest.fixture
def containerd_extra_config() -> str | dict[str, Any] | None:
    """Extra containerd config merged into every daemon of `containerd_factory` (None: builtins)."""
    return None


@pytest.fixture
def snapshotter_name() -> str:
    """Snapshotter the generic checks pull, run and mount with."""
    return "overlayfs"


@pytest.fixture
def containerd_factory(
    tmp_path: Path, containerd_extra_config: str | dict[str, Any] | None
) -> Iterator[ContainerdFactory]:
    """Start private containerds on demand; all are stopped (tasks, shims, mounts) after the test.

    `factory(extra_config=...)` overrides the fixture-level extra config for one daemon; other
    keyword arguments go to `start_containerd`.
    """
    with contextlib.ExitStack() as stack:
        count = 0

        def factory(**kwargs: Any) -> Containerd:
            nonlocal count
            count += 1
            kwargs.setdefault("extra_config", containerd_extra_config)
            logs = tmp_path / f"containerd-{count}"
            logs.mkdir()
            return stack.enter_context(start_containerd(logs, **kwargs))

        yield factory


@pytest.fixture
def containerd(containerd_factory: ContainerdFactory) -> Containerd:
    """One private containerd with the fixture-level config."""
    return containerd_factory()
