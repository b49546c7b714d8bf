"""One node, no peers, the origin alone: pulls through the registry mirror from anonymous, htpasswd
basic-auth and bearer-token registries, in both integration modes.

- full: containerd uses our content store and snapshotter (`daemon.containerd_config()`) and pulls
  through our mirror with `--snapshotter peersync --hosts-dir`;
- mirror-only: containerd keeps its builtin content store and overlayfs and only pulls through our
  mirror (`--hosts-dir`).

The registry credentials live in the daemon's config (`[origin.auth."host:port"]`); ctr passes none.
Also: wrong credentials, skopeo through the mirror (no `?ns=`: the default registry), a moved tag,
and the mirror's blob endpoint (HEAD, Range, unknown blobs).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from peersync import hosts
from testbed.containerd import Containerd, start_containerd
from testbed.images import (
    TEST_IMAGE_REPO,
    BuiltImage,
    build_sized_image,
    compare_manifests,
    push_image,
    snapshot_tree,
)
from testbed.peersyncd import PeerSyncDaemon, start_peersync
from testbed.procs import CommandError, free_port, run_checked
from testbed.registry import Credentials, Registry, start_registry
from testbed.tokenserver import TokenServer, start_token_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPO = TEST_IMAGE_REPO
BASIC_USER = Credentials("alice", "basic-secret")
TOKEN_USER = Credentials("bob", "token-secret")
MODES = ("full", "mirror-only")
AUTHS = ("anonymous", "basic", "token")
MANIFEST_ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)
MISSING_DIGEST = "sha256:" + "0" * 64


# ---------------------------------------------------------------------------------------------------
# Origins: one registry per auth kind for the module
# ---------------------------------------------------------------------------------------------------


@dataclass
class Origin:
    """A registry the test started and the credentials the daemon needs for it (None: anonymous)."""

    kind: str
    registry: Registry
    credentials: Credentials | None


@pytest.fixture(scope="module")
def anonymous_origin(tmp_path_factory: pytest.TempPathFactory, test_image: BuiltImage) -> Iterator[Origin]:
    with start_registry(tmp_path_factory.mktemp("reg-anon")) as reg:
        push_image(test_image, reg, REPO)
        yield Origin("anonymous", reg, None)


@pytest.fixture(scope="module")
def basic_origin(tmp_path_factory: pytest.TempPathFactory, test_image: BuiltImage) -> Iterator[Origin]:
    with start_registry(tmp_path_factory.mktemp("reg-basic"), auth=BASIC_USER) as reg:
        push_image(test_image, reg, REPO)
        yield Origin("basic", reg, BASIC_USER)


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    users = {TOKEN_USER.username: TOKEN_USER.password}
    with start_token_server(tmp_path_factory.mktemp("tokens"), users=users) as server:
        yield server


@pytest.fixture(scope="module")
def token_origin(
    tmp_path_factory: pytest.TempPathFactory, token_server: TokenServer, test_image: BuiltImage
) -> Iterator[Origin]:
    auth = token_server.registry_auth(TOKEN_USER)
    with start_registry(tmp_path_factory.mktemp("reg-token"), token_auth=auth) as reg:
        push_image(test_image, reg, REPO)
        yield Origin("token", reg, TOKEN_USER)


def get_origin(request: pytest.FixtureRequest, kind: str) -> Origin:
    origin = request.getfixturevalue(f"{kind}_origin")
    assert isinstance(origin, Origin)
    return origin


# ---------------------------------------------------------------------------------------------------
# A node: daemon (+ containerd) with a hosts dir pointing the origin at the daemon's mirror
# ---------------------------------------------------------------------------------------------------


def q(text: str) -> str:
    """A TOML basic string."""
    return json.dumps(text)


def daemon_config(
    origin: Registry,
    peer_port: int,
    credentials: Credentials | None = None,
    default_registry: str | None = None,
    tag_ttl: float | None = None,
) -> str:
    """The daemon's TOML: loopback listeners, multicast DNS off, the origin over plain HTTP, its
    credentials if any."""
    lines = ["[peer]", f'listen = "127.0.0.1:{peer_port}"', "peers = []", ""]
    lines += ["[discovery]", "mdns = false", ""]
    lines += ["[mirror]", f'listen = "127.0.0.1:{free_port()}"']
    if default_registry is not None:
        lines.append(f"default_registry = {q(default_registry)}")
    if tag_ttl is not None:
        lines.append(f"tag_ttl = {tag_ttl!r}")
    lines += ["", "[origin]", f"plain_http = [{q(origin.address)}]", ""]
    if credentials is not None:
        lines += [
            f"[origin.auth.{q(origin.address)}]",
            f"username = {q(credentials.username)}",
            f"password = {q(credentials.password)}",
        ]
    return "\n".join(lines) + "\n"


@dataclass
class Node:
    daemon: PeerSyncDaemon
    peer_url: str
    mode: str
    containerd: Containerd | None = None
    hosts_dir: Path | None = None

    @property
    def mirror_url(self) -> str:
        return f"http://{self.daemon.mirror}"

    @property
    def snapshotter(self) -> str:
        return "peersync" if self.mode == "full" else "overlayfs"

    @property
    def ctr(self) -> Containerd:
        assert self.containerd is not None, "this node has no containerd"
        return self.containerd

    def pull(self, ref: str) -> None:
        """Pull through the mirror only: ctr gets no credentials, the daemon holds them."""
        self.ctr.pull(
            ref,
            snapshotter=self.snapshotter,
            plain_http=True,
            extra_args=["--hosts-dir", str(self.hosts_dir)],
        )

    def run(self, ref: str) -> str:
        return self.ctr.run(ref, snapshotter=self.snapshotter)

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self.peer_url}/peersync/v1/stats", timeout=10) as resp:
            return json.loads(resp.read())


@contextlib.contextmanager
def start_node(
    workdir: Path,
    origin: Registry,
    mode: str | None,
    credentials: Credentials | None = None,
    **mirror: object,
) -> Iterator[Node]:
    """A daemon for `origin` and, unless `mode` is None, a containerd in that mode with a hosts dir
    that sends `origin`'s pulls to the daemon's mirror."""
    peer_port = free_port()
    config = daemon_config(origin, peer_port, credentials, **mirror)  # type: ignore[arg-type]
    with ExitStack() as stack:
        daemon = stack.enter_context(start_peersync(workdir / "daemon", config=config))
        node = Node(daemon, f"http://127.0.0.1:{peer_port}", mode or "")
        if mode is not None:
            extra = daemon.containerd_config() if mode == "full" else None
            node.containerd = stack.enter_context(
                start_containerd(workdir / "containerd", extra_config=extra)
            )
            node.hosts_dir = workdir / "hosts"
            hosts.install(origin.address, node.mirror_url, node.hosts_dir)
            toml = node.hosts_dir / origin.address / "hosts.toml"
            toml.write_text(toml.read_text().replace(f"https://{origin.address}", origin.url))
        yield node


def wait_for(check: object, timeout: float = 10.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if check():  # type: ignore[operator]
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------------
# Plain HTTP against the mirror
# ---------------------------------------------------------------------------------------------------


def http(
    url: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def mirror_manifest(node: Node, registry: Registry, repo: str, ref: str, method: str = "HEAD") -> tuple:
    url = f"{node.mirror_url}/v2/{repo}/manifests/{ref}?ns={registry.address}"
    return http(url, method, {"Accept": MANIFEST_ACCEPT})


def blob_bytes(image: BuiltImage, digest: str) -> bytes:
    return (image.layout / "blobs" / "sha256" / digest[7:]).read_bytes()


# ---------------------------------------------------------------------------------------------------
# Pull, run, check: 3 registries x 2 modes
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("auth", AUTHS)
@pytest.mark.parametrize("mode", MODES)
def test_pull_through_mirror(
    request: pytest.FixtureRequest, tmp_path: Path, test_image: BuiltImage, mode: str, auth: str
) -> None:
    origin = get_origin(request, auth)
    ref = origin.registry.ref(REPO, test_image.tag)
    with start_node(tmp_path, origin.registry, mode, origin.credentials) as node:
        node.pull(ref)
        assert node.run(ref) == test_image.expected_output
        assert test_image.expected is not None
        with node.ctr.mount_image(ref, snapshotter=node.snapshotter) as rootfs:
            assert compare_manifests(test_image.expected, snapshot_tree(rootfs)) == []
        stats = node.stats()
        assert stats["origin_bytes"] > 0, stats
        assert stats["corrupt_chunks"] == 0, stats
        # Everything went through the daemon (nothing fetched around the mirror), all committed whole.
        assert wait_for(lambda: test_image.blob_digests <= node.daemon.blob_files()), (
            test_image.blob_digests - node.daemon.blob_files()
        )
        assert node.stats()["origin_bytes"] >= test_image.compressed_size
        assert node.daemon.corrupt_blobs() == []


@pytest.mark.parametrize("auth", ["basic", "token"])
@pytest.mark.parametrize("mode", MODES)
def test_wrong_credentials_fail_clearly(
    request: pytest.FixtureRequest, tmp_path: Path, test_image: BuiltImage, mode: str, auth: str
) -> None:
    origin = get_origin(request, auth)
    assert origin.credentials is not None
    wrong = Credentials(origin.credentials.username, "not-the-password")
    ref = origin.registry.ref(REPO, test_image.tag)
    with start_node(tmp_path, origin.registry, mode, wrong) as node:
        with pytest.raises(CommandError) as failed:
            node.pull(ref)
        # ctr's own error line (containerd shows the mirror's status line, not its body) says why:
        # regression, it used to read only "403 Forbidden".
        final = failed.value.stderr.strip().splitlines()[-1]
        assert final.startswith("ctr: ") and "403 Forbidden (unauthorized: " in final, final
        assert f"{origin.registry.address}/{REPO}:{test_image.tag}" in final, final
        # The mirror itself says what went wrong, registry style.
        status, _, body = mirror_manifest(node, origin.registry, REPO, test_image.tag, "GET")
        assert status == 403, body
        error = json.loads(body)["errors"][0]
        assert error["code"] == "DENIED" and "unauthorized" in error["message"], error
        assert node.daemon.blob_files() == set()
        assert node.daemon.corrupt_blobs() == []
        assert node.stats()["origin_bytes"] == 0


# ---------------------------------------------------------------------------------------------------
# skopeo through the mirror, without ?ns=
# ---------------------------------------------------------------------------------------------------


def test_skopeo_copy_through_mirror_default_registry(
    tmp_path: Path, anonymous_origin: Origin, test_image: BuiltImage
) -> None:
    reg = anonymous_origin.registry
    with start_node(tmp_path, reg, None, default_registry=reg.address) as node:
        dest = tmp_path / "copied"
        src = f"docker://{node.daemon.mirror}/{REPO}:{test_image.tag}"
        run_checked(
            [
                "skopeo",
                "--insecure-policy",
                "copy",
                "--quiet",
                "--src-tls-verify=false",
                src,
                f"oci:{dest}:copy",
            ],
            timeout=120,
        )
        blobs = {f"sha256:{p.name}": p for p in (dest / "blobs" / "sha256").iterdir()}
        assert set(blobs) == test_image.blob_digests
        for digest, path in blobs.items():
            assert path.read_bytes() == blob_bytes(test_image, digest), digest
        index = json.loads((dest / "index.json").read_text())
        assert [m["digest"] for m in index["manifests"]] == [test_image.manifest.digest]
        stats = node.stats()
        assert stats["origin_bytes"] > 0 and stats["corrupt_chunks"] == 0, stats
        assert node.daemon.corrupt_blobs() == []


# ---------------------------------------------------------------------------------------------------
# A moved tag
# ---------------------------------------------------------------------------------------------------


def test_moved_tag_is_never_served_stale(
    tmp_path: Path, anonymous_origin: Origin, test_image: BuiltImage
) -> None:
    reg = anonymous_origin.registry
    ttl = 0.5
    repo = "peersync/moving"
    ref = push_image(test_image, reg, repo, "v1")
    other = build_sized_image(tmp_path / "other", 64 << 10, layers=1, tag="v1")
    assert other.manifest.digest != test_image.manifest.digest
    with start_node(tmp_path, reg, "mirror-only", tag_ttl=ttl) as node:
        node.pull(ref)
        assert node.run(ref) == test_image.expected_output

        def head() -> str:
            status, headers, _ = mirror_manifest(node, reg, repo, "v1")
            assert status == 200
            return headers["Docker-Content-Digest"]

        assert head() == test_image.manifest.digest
        # Move the tag while clients keep asking for it more often than the TTL: the cached answer
        # must still expire (a hit must not extend it), so the new digest shows within about a TTL.
        pusher = threading.Thread(target=push_image, args=(other, reg, repo, "v1"))
        pusher.start()
        while pusher.is_alive():
            head()
            time.sleep(ttl / 5)
        pusher.join()
        moved_at = time.monotonic()
        seen = head()
        while seen != other.manifest.digest and time.monotonic() - moved_at < ttl + 2.0:
            time.sleep(ttl / 5)
            seen = head()
        assert seen == other.manifest.digest, "the mirror kept serving the old digest of a moved tag"
        assert time.monotonic() - moved_at <= ttl + 1.0

        time.sleep(ttl + 0.1)
        assert head() == other.manifest.digest
        status, headers, body = mirror_manifest(node, reg, repo, "v1", "GET")
        assert status == 200
        assert "sha256:" + hashlib.sha256(body).hexdigest() == other.manifest.digest
        # containerd follows the move through the mirror too.
        node.pull(ref)
        assert node.run(ref) == other.expected_output
        assert node.daemon.corrupt_blobs() == []


# ---------------------------------------------------------------------------------------------------
# The blob endpoint: HEAD, Range, unknown blobs
# ---------------------------------------------------------------------------------------------------


def test_blob_head_range_and_unknown(
    tmp_path: Path, anonymous_origin: Origin, test_image: BuiltImage
) -> None:
    reg = anonymous_origin.registry
    layer = max(test_image.layers, key=lambda layer: layer.descriptor.size).descriptor
    data = blob_bytes(test_image, layer.digest)
    assert len(data) > (1 << 20) + 1000, "want a blob of several chunks"
    with start_node(tmp_path, reg, None) as node:
        url = f"{node.mirror_url}/v2/{REPO}/blobs/{layer.digest}?ns={reg.address}"

        # before any manifest named it: relayed from the origin, never stored
        status, headers, body = http(url, "HEAD")
        assert status == 200 and body == b""
        assert int(headers["Content-Length"]) == layer.size
        assert headers["Docker-Content-Digest"] == layer.digest
        status, _, body = http(url, "GET", {"Range": "bytes=5-1004"})
        assert status == 206 and body == data[5:1005]
        status, _, body = http(url)
        assert status == 200 and body == data
        assert layer.digest not in node.daemon.blob_files()
        assert not any((node.daemon.root / "content" / "partial" / "sha256").iterdir())

        # a manifest names it: its size is the manifest's, and it is fetched into the store
        assert mirror_manifest(node, reg, REPO, test_image.tag, "GET")[0] == 200
        status, headers, body = http(url, "HEAD")
        assert status == 200 and int(headers["Content-Length"]) == layer.size

        def ranged(a: int, b: int | None) -> None:
            spec = f"bytes={a}-" + ("" if b is None else str(b))
            status, headers, body = http(url, "GET", {"Range": spec})
            last = layer.size - 1 if b is None else min(b, layer.size - 1)
            assert status == 206, (spec, status, body[:200])
            assert headers["Content-Range"] == f"bytes {a}-{last}/{layer.size}", spec
            assert body == data[a : last + 1], spec
            assert int(headers["Content-Length"]) == last + 1 - a

        # Not held yet: streamed as chunks arrive (across a chunk boundary, then to the end).
        assert layer.digest not in node.daemon.blob_files()
        ranged((1 << 20) - 100, (1 << 20) + 200)
        ranged(layer.size - 1000, None)
        status, _, body = http(url)
        assert status == 200 and hashlib.sha256(body).hexdigest() == layer.digest[7:]
        # Held: served from the committed file, ranges the same.
        assert wait_for(lambda: layer.digest in node.daemon.blob_files())
        ranged((1 << 20) - 100, (1 << 20) + 200)
        ranged(5, layer.size + 50)  # an end past the blob is clipped
        ranged(layer.size - 1000, None)
        status, headers, _ = http(url, "GET", {"Range": f"bytes={layer.size}-"})
        assert status == 416, status
        assert headers["Content-Range"] == f"bytes */{layer.size}"

        missing = f"{node.mirror_url}/v2/{REPO}/blobs/{MISSING_DIGEST}?ns={reg.address}"
        status, _, body = http(missing, "HEAD")
        assert status == 404 and body == b""
        status, headers, body = http(missing)
        assert status == 404
        assert headers["Content-Type"].startswith("application/json")
        error = json.loads(body)["errors"][0]
        assert error["code"] == "BLOB_UNKNOWN" and error["message"], error

        assert node.daemon.corrupt_blobs() == []
        assert node.stats()["corrupt_chunks"] == 0
