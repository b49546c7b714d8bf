"""Seeds end to end: `peersync seed export` (straight from a registry, and from a running daemon
through its admin socket: the same file), `peersync seed import` into a fresh root with no daemon
(every blob verified: a corrupt seed installs nothing of the bad blob and fails naming it), then
a daemon booted on that root pulls and runs the image with 0 bytes from the origin (by its
metrics; the registry answers only the mirror's access checks) and serves it to a peer, which
gets every blob byte from it and none from the registry.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from kernel.store.meta import Meta
from kernel.store.ownership import Ownership
from testbed.images import BuiltImage, build_sized_image, push_image
from testbed.opsnode import blob_sizes, cli, metric, start_node
from testbed.registry import start_registry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MIB = 1 << 20


def members(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def corrupted_copy(seed: Path, out: Path, digest: str) -> None:
    """`seed` with one byte of blob `digest` flipped (same sizes: only the digest check sees it)."""
    name = "blobs/sha256/" + digest[7:]
    with tarfile.open(seed) as src, tarfile.open(out, "w") as dst:
        for m in src.getmembers():
            f = src.extractfile(m)
            data = f.read() if f is not None else b""
            if m.name == name:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            dst.addfile(m, io.BytesIO(data))


def test_seed_export_import_then_boot_with_no_origin_bytes_and_serve_a_peer(tmp_path: Path) -> None:
    image: BuiltImage = build_sized_image(tmp_path / "image", 3 * MIB, layers=2, tag="seed", seed=77)
    sizes = blob_sizes(image)
    total = sum(sizes.values())
    reg_dir = tmp_path / "registry"
    with start_registry(reg_dir) as reg:
        port = reg.port
        ref = push_image(image, reg, "peersync/seeded")
        by_digest = f"{reg.address}/peersync/seeded@{image.manifest.digest}"
        config = tmp_path / "export.toml"
        config.write_text(f'[origin]\nplain_http = ["{reg.address}"]\n')
        direct = tmp_path / "direct.tar"
        out = json.loads(cli("seed", "export", ref, "--out", str(direct), "--direct", "--config", str(config),
                             "--json").stdout)
        assert out["bytes"] == direct.stat().st_size and out["direct"]
        with start_node(tmp_path / "source", reg.address) as source:
            via_daemon = tmp_path / "daemon.tar"
            source.cli("seed", "export", ref, "--out", str(via_daemon))
        # the same layout either way: oci-layout, index.json, every blob once
        assert direct.read_bytes() == via_daemon.read_bytes()
        names = members(direct)
        assert names[:2] == ["oci-layout", "index.json"]
        assert sorted(names[2:]) == sorted(f"blobs/sha256/{d[7:]}" for d in image.blob_digests)
    # the registry is gone from here on

    root = tmp_path / "seeded" / "daemon" / "root"
    bad = tmp_path / "bad.tar"
    layer = image.layers[-1].descriptor.digest
    corrupted_copy(direct, bad, layer)
    refused = cli("seed", "import", str(bad), "--root", str(root), check=False)
    assert refused.returncode == 1 and layer in refused.stderr and "corrupt" in refused.stderr
    assert not (root / "content" / "blobs" / "sha256" / layer[7:]).exists()

    report = json.loads(cli("seed", "import", str(direct), "--root", str(root), "--json").stdout)
    assert report["images"] == [ref]
    assert report["written"] + report["present"] == len(image.blob_digests)
    assert report["pinned"] == len(image.blob_digests)
    meta = Meta(root)
    try:
        assert set(Ownership(meta).pinned()) == image.blob_digests
    finally:
        meta.close()

    # The registry is back, as an edge site's would be, but only to answer the mirror's access
    # checks (a HEAD per object with the client's own credentials, peer.access: content is never
    # served on the node's word; it fails closed while the origin cannot be asked, docs/security.md):
    # every byte of the image comes from the seed, as the daemon's counters show.
    with start_registry(reg_dir, port=port) as reg, start_node(tmp_path / "seeded", reg.address) as node:
        assert node.daemon.root == root
        node.pull(by_digest)
        assert node.containerd.run(by_digest) == image.expected_output
        m = node.scrape()
        assert metric(m, "peersync_bytes_total", source="origin", direction="in") == 0
        assert metric(m, "peersync_bytes_total", source="local", direction="out") == total

        with start_node(tmp_path / "peer", reg.address, peers=[node.peer]) as peer:
            peer.pull(ref)  # the tag resolves at the registry; every blob comes from the seeded node
            assert peer.containerd.run(ref) == image.expected_output
            mp = peer.scrape()
            assert metric(mp, "peersync_bytes_total", source="origin", direction="in") == 0
            assert metric(mp, "peersync_bytes_total", source="peer", direction="in") == total
            served = metric(node.scrape(), "peersync_bytes_total", source="peer", direction="out")
            assert served >= total
