"""The snapshotter's side of the remote-snapshot handshake (snapshotter/remote.py).

The layer source here is an in-memory table of real gzip'd tar layers, standing in for the
daemon's store and engine (those are exercised with a real containerd in
tests/integration/test_cri.py); everything else is the real snapshotter and applier.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import os
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from kernel.errors import AlreadyExists, NotFound
from kernel.store.meta import Meta
from snapshotter import remote
from snapshotter.remote import Layer, Planned
from snapshotter.snapshots import Kind, Snapshotter

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_layer(files: Mapping[str, bytes]) -> tuple[bytes, str]:
    """(gzip blob, diff ID) of a tar holding `files`."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    tar_bytes = raw.getvalue()
    return gzip.compress(tar_bytes, mtime=0), sha(tar_bytes)


class MemoryLayers:
    """A LayerSource over blobs held in memory; records what the snapshotter asked."""

    def __init__(self, layers: Sequence[tuple[bytes, str]], diff_override: str | None = None) -> None:
        self.blobs = {sha(blob): blob for blob, _ in layers}
        diff_ids = [diff_override or d for _, d in layers]
        self.chain = remote.chain_ids([d for _, d in layers])
        self.layers = {
            self.chain[i]: Layer(sha(blob), GZIP, len(blob), diff_ids[i])
            for i, (blob, _) in enumerate(layers)
        }
        self.described: list[str] = []
        self.prefetched: list[str] = []
        self.released: list[str] = []

    async def describe(self, target: str, parent: str, labels: Mapping[str, str]) -> Layer | None:
        self.described.append(target)
        if target not in self.layers:
            return None
        index = self.chain.index(target)
        return self.layers[target] if parent == (self.chain[index - 1] if index else "") else None

    async def plan(self, target: str, labels: Mapping[str, str]) -> list[Planned]:
        index = self.chain.index(target)
        return [Planned(c, self.chain[i - 1]) for i, c in enumerate(self.chain) if i > index]

    def prefetch(self, digests: Sequence[str]) -> None:
        self.prefetched.extend(digests)

    async def read(self, digest: str, offset: int, size: int) -> bytes:
        await asyncio.sleep(0)
        return self.blobs[digest][offset : offset + size]

    async def release(self, digest: str) -> None:
        self.released.append(digest)


def labels_for(source: MemoryLayers, index: int) -> dict[str, str]:
    target = source.chain[index]
    digest = source.layers[target].digest
    return {
        remote.REF_LABEL: target,
        remote.LAYER_DIGEST_LABEL: digest,
        remote.MANIFEST_LABEL: "sha256:" + "0" * 64,
        remote.LAYERS_LABEL: ",".join(source.layers[c].digest for c in source.chain[index:]),
        "containerd.io/snapshot/cri.image-ref": "registry.example/app:1",
    }


@pytest.fixture
def meta(tmp_path: Path) -> Meta:
    m = Meta(tmp_path)
    yield m
    m.close()


LAYERS = [
    make_layer({"etc/one": b"1" * 5000, "bin/tool": os.urandom(3 << 20)}),
    make_layer({"etc/two": b"2", "etc/one": b"replaced"}),
]


async def unpack_all(sn: Snapshotter, source: MemoryLayers) -> None:
    parent = ""
    for i, target in enumerate(source.chain):
        with pytest.raises(AlreadyExists):
            await sn.prepare(f"ns/{i}/extract-{i} {target}", parent, labels_for(source, i))
        parent = target


async def test_prepare_with_layer_labels_commits_the_layer_itself(tmp_path: Path, meta: Meta) -> None:
    source = MemoryLayers(LAYERS)
    sn = Snapshotter(tmp_path, meta, layers=source)
    await unpack_all(sn, source)
    top = await sn.stat(source.chain[1])
    assert top.kind is Kind.COMMITTED and top.parent == source.chain[0]
    assert top.labels[remote.UNPACKED_LABEL] == source.layers[source.chain[1]].digest
    assert top.labels[remote.REF_LABEL] == source.chain[1]
    # what containerd's metadata looks for after AlreadyExists
    infos = [i for i in await sn.walk() if i.labels.get(remote.REF_LABEL) == source.chain[1]]
    assert [(i.name, i.parent) for i in infos] == [(source.chain[1], source.chain[0])]
    # no active snapshot is left behind, and the files are there
    assert {i.kind for i in await sn.walk()} == {Kind.COMMITTED}
    mounts = await sn.view("ns/9/view", source.chain[1])
    lower = [o for o in mounts[0].options if o.startswith("lowerdir=")][0].split("=", 1)[1].split(":")
    assert Path(lower[0], "etc/one").read_bytes() == b"replaced"
    assert Path(lower[1], "etc/one").read_bytes() == b"1" * 5000
    assert source.prefetched[:2] == [source.layers[c].digest for c in source.chain]


async def test_existing_target_answers_at_once(tmp_path: Path, meta: Meta) -> None:
    source = MemoryLayers(LAYERS)
    sn = Snapshotter(tmp_path, meta, layers=source)
    await unpack_all(sn, source)
    source.described.clear()
    with pytest.raises(AlreadyExists):
        await sn.prepare("other/1/extract", "", labels_for(source, 0))
    assert source.described == []


async def test_unknown_layer_falls_back_to_a_plain_prepare(tmp_path: Path, meta: Meta) -> None:
    source = MemoryLayers(LAYERS)
    sn = Snapshotter(tmp_path, meta, layers=source)
    labels = {**labels_for(source, 0), remote.REF_LABEL: "sha256:" + "f" * 64}
    mounts = await sn.prepare("ns/1/extract", "", labels)
    assert mounts[0].type == "bind"
    assert (await sn.stat("ns/1/extract")).kind is Kind.ACTIVE


async def test_wrong_diff_id_falls_back_and_leaves_nothing(tmp_path: Path, meta: Meta) -> None:
    source = MemoryLayers(LAYERS, diff_override="sha256:" + "e" * 64)
    sn = Snapshotter(tmp_path, meta, layers=source)
    mounts = await sn.prepare("ns/1/extract", "", labels_for(source, 0))
    assert mounts[0].type == "bind"  # containerd gets a normal snapshot to apply the layer itself
    assert [i.name for i in await sn.walk()] == ["ns/1/extract"]
    assert os.listdir(Path(mounts[0].source)) == []  # the half-unpacked files are gone
    assert len(os.listdir(tmp_path / "snapshots")) == 1


async def test_without_a_source_labels_are_only_labels(tmp_path: Path, meta: Meta) -> None:
    source = MemoryLayers(LAYERS)
    sn = Snapshotter(tmp_path, meta)
    await sn.prepare("ns/1/extract", "", labels_for(source, 0))
    assert (await sn.stat("ns/1/extract")).labels[remote.REF_LABEL] == source.chain[0]


async def test_removing_the_last_snapshot_of_a_layer_releases_the_blob(tmp_path: Path, meta: Meta) -> None:
    source = MemoryLayers(LAYERS)
    sn = Snapshotter(tmp_path, meta, layers=source)
    await unpack_all(sn, source)
    await sn.remove(source.chain[1])
    assert source.released == [source.layers[source.chain[1]].digest]
    await sn.remove(source.chain[0])
    assert source.released[-1] == source.layers[source.chain[0]].digest
    with pytest.raises(NotFound):
        await sn.stat(source.chain[0])


def test_chain_ids_and_the_chain_of_a_snapshot() -> None:
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    assert remote.chain_of("k8s.io/7/" + a, {}) == a  # containerd named it by the chain ID
    assert remote.chain_of(b, {remote.REF_LABEL: a}) == a  # the label wins
    assert remote.chain_of("default/3/extract-1 layer", {}) is None
    assert remote.chain_ids([a, b]) == [a, sha(f"{a} {b}".encode())]
