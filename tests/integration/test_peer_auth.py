"""Issue 10, finding 1: the peer exchange served private images to anyone on the LAN.

What was found: after a node pulled a repository that needs credentials, plain
`curl -H "Range: bytes=0-1048575" http://<node>:5381/peersync/v1/blobs/<layer>/data` returned a
byte-identical copy of the private layer; `/have` let anyone probe which digests a node holds,
`/stats` listed what it was pulling. Here the same: a real daemon whose config holds the
credentials of a htpasswd registry pulls a private image through its mirror, then `curl` (the
real binary) asks its peer port as a stranger would: plain HTTP, and HTTPS without a site
certificate (with and without checking the server). Every request gets no HTTP answer at all. A
site member (`curl --cert` with a certificate from the site CA) gets the layer: the bytes were
there to be had.

The daemon runs with the testbed's default, a node certificate from the site CA (`peersync site
issue`); on the code before site membership (plain HTTP on the peer port) the first curl gets
the layer and the test fails there.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.images import BuiltImage, build_sized_image, push_image
from testbed.peersyncd import start_peersync
from testbed.procs import free_port
from testbed.registry import Credentials, Registry, start_registry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
if shutil.which("curl") is None:
    pytestmark.append(pytest.mark.skip(reason="needs curl"))

USER = Credentials("alice", "private-secret")
REPO = "private/app"
CHUNK = 1 << 20
MANIFEST = ", ".join(
    ("application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json")
)


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, BuiltImage]]:
    """A registry that needs credentials, holding a ~3 MB image (a layer of several 1 MiB chunks)."""
    image = build_sized_image(tmp_path_factory.mktemp("private-image"), 3 << 20, layers=1, tag="v1")
    with start_registry(tmp_path_factory.mktemp("private-registry"), auth=USER) as reg:
        push_image(image, reg, REPO)
        yield reg, image


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args], capture_output=True, timeout=30)


def test_a_private_layer_a_node_pulled_is_served_to_site_members_only(
    tmp_path: Path, private: tuple[Registry, BuiltImage]
) -> None:
    registry, image = private
    peer, mirror = free_port(), free_port()
    config = (
        f'[peer]\nlisten = "127.0.0.1:{peer}"\n[mirror]\nlisten = "127.0.0.1:{mirror}"\n'
        f"[discovery]\nmdns = false\n"
        f'[origin]\nplain_http = ["{registry.address}"]\n'
        f'[origin.auth."{registry.address}"]\nusername = "{USER.username}"\npassword = "{USER.password}"\n'
    )
    layer = max(image.layers, key=lambda la: la.descriptor.size).descriptor
    assert layer.size > 2 * CHUNK
    private_bytes = (image.layout / "blobs" / "sha256" / layer.digest[7:]).read_bytes()
    with start_peersync(tmp_path / "node", config=config) as daemon:
        # The node pulls the private image through its mirror, the client showing its own
        # credentials (the mirror checks them at the origin before it serves private content).
        base = f"http://127.0.0.1:{mirror}/v2/{REPO}"
        ns = f"?ns={registry.address}"
        basic = base64.b64encode(f"{USER.username}:{USER.password}".encode()).decode()
        auth = {"Authorization": f"Basic {basic}"}
        ask = urllib.request.Request(f"{base}/manifests/v1{ns}", headers={"Accept": MANIFEST, **auth})
        with urllib.request.urlopen(ask, timeout=30) as resp:
            manifest = json.loads(resp.read())
        for blob in [manifest["config"], *manifest["layers"]]:
            url = urllib.request.Request(f"{base}/blobs/{blob['digest']}{ns}", headers=auth)
            with urllib.request.urlopen(url, timeout=60) as r:
                assert hashlib.sha256(r.read()).hexdigest() == blob["digest"][7:]
        deadline = time.monotonic() + 30
        while layer.digest not in daemon.blob_files():
            assert time.monotonic() < deadline, "the daemon never stored the layer"
            time.sleep(0.1)

        # A stranger on the LAN, as in the finding.
        ranges = ["-H", f"Range: bytes=0-{CHUNK - 1}"]
        node = f"SCHEME://127.0.0.1:{peer}/peersync/v1"
        have = ["-X", "POST", "-H", "Content-Type: application/json"]
        have += ["-d", json.dumps({"digests": [layer.digest]}), f"{node}/have"]
        probes: list[list[str]] = [
            [*ranges, f"{node}/blobs/{layer.digest}/data"],
            [f"{node}/blobs/{layer.digest}"],
            [f"{node}/blobs/{layer.digest}/table"],
            have,
            [f"{node}/stats"],
            [f"{node}/control/status"],
        ]
        strangers = [("http", []), ("https", ["-k"])]
        site = getattr(daemon, "tls", None)  # None from a harness that predates site certificates
        if site is not None:
            strangers.append(("https", ["--cacert", str(site.ca)]))
        for scheme, how in strangers:
            for probe in probes:
                args = [*how, "-i", *(a.replace("SCHEME", scheme) for a in probe)]
                done = curl(*args)
                assert done.stdout == b"", f"curl {' '.join(args)} got an answer: {done.stdout[:300]!r}"
                assert done.returncode != 0, f"curl {' '.join(args)} succeeded"
                assert private_bytes[:4096] not in done.stdout

        # A site member gets the private layer chunk by chunk: it was there to be had.
        assert daemon.tls is not None
        tls = daemon.tls
        member = ["--cacert", str(tls.ca), "--cert", str(tls.cert), "--key", str(tls.key)]
        chunk = ["-H", f"Range: bytes={CHUNK}-{2 * CHUNK - 1}"]
        got = curl(*member, *chunk, f"https://127.0.0.1:{peer}/peersync/v1/blobs/{layer.digest}/data")
        assert got.returncode == 0, got.stderr
        assert got.stdout == private_bytes[CHUNK : 2 * CHUNK]
