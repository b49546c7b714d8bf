"""Layers named by the chain ID alone: the daemon's LayerSource (`peersync.layers`) under the real
snapshotter, over a real store, content store, chain index and download engine (no network: every
blob is in the store, written through the content API as containerd would write it).

The hostile cases are the point: a chain ID that belongs on another parent, a config that lies
about a diff ID, a manifest that names a blob nobody can deliver, a chain ID nobody has seen. Each
must take the plain path (containerd gets an ordinary empty snapshot and applies the layer itself)
and leave no committed snapshot under the chain ID; never a broken layer.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import stat
import tarfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kernel.errors import AlreadyExists
from kernel.store.chains import ChainIndex, chain_ids
from kernel.store.chunkstore import ChunkStore
from kernel.store.meta import Meta
from peer.catalog import Catalog
from peer.engine import Engine
from peer.exchange import PeerClient
from peer.origin import OriginClient
from peer.peers import StaticPeers
from peersync.layers import DaemonLayers
from snapshotter import remote
from snapshotter.content import ContentStore
from snapshotter.snapshots import Kind, Snapshotter

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer(files: Mapping[str, bytes], dirs: Sequence[str] = ()) -> tuple[bytes, str]:
    """(gzip blob, diff ID) of a tar with `dirs` (mode 0750, uid 7) and `files`."""
    import gzip

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in dirs:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid, info.mtime = tarfile.DIRTYPE, 0o750, 7, 1_600_000_000
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    tar_bytes = raw.getvalue()
    return gzip.compress(tar_bytes, mtime=0), sha(tar_bytes)


LAYERS = [
    layer({"etc/one": b"1" * 5000, "bin/tool": os.urandom(2 << 20)}, dirs=["etc", "bin"]),
    layer({"etc/two": b"2", "etc/one": b"replaced"}),
    layer({"srv/deep/file": b"a parent dir missing here: its attributes come from below"}),
    layer({"srv/top": b"top"}, dirs=["srv"]),
]


@dataclass
class Image:
    manifest: bytes
    config: bytes
    blobs: list[bytes]
    diff_ids: list[str]

    @property
    def chains(self) -> list[str]:
        return chain_ids(self.diff_ids)


def make_image(layers: Sequence[tuple[bytes, str]], claimed: Sequence[str] | None = None) -> Image:
    """An OCI image of `layers`; `claimed` replaces the diff IDs its config states (a lying config)."""
    diff_ids = list(claimed or [d for _, d in layers])
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    )
    config_body = config.encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config_body),
                   "size": len(config_body)},
        "layers": [{"mediaType": GZIP, "digest": sha(b), "size": len(b)} for b, _ in layers],
    }  # fmt: skip
    return Image(json.dumps(manifest).encode(), config_body, [b for b, _ in layers], diff_ids)


@dataclass
class Node:
    """One daemon's store, content store, index, engine, layer source and snapshotter."""

    root: Path
    meta: Meta
    content: ContentStore
    chains: ChainIndex
    layers: DaemonLayers
    snapshotter: Snapshotter

    async def put(self, data: bytes) -> None:
        writer = await self.content.writer(f"ref-{sha(data)}", len(data))
        try:
            await writer.write_at(0, data)
            await writer.commit(len(data), sha(data))
        except AlreadyExists:
            pass

    async def put_image(self, image: Image, blobs: bool = True) -> None:
        """What containerd writes into the content store when it fetches an image itself."""
        for data in [image.manifest, image.config, *(image.blobs if blobs else [])]:
            await self.put(data)

    async def pull(self, image: Image, labels: Mapping[str, str] | None = None) -> None:
        """containerd's client unpacker: each layer's Prepare names only the chain ID."""
        parent = ""
        for i, chain in enumerate(image.chains):
            with pytest.raises(AlreadyExists):
                await self.snapshotter.prepare(
                    f"default/{i}/extract-{i} {chain}", parent, {remote.REF_LABEL: chain}
                )
            parent = chain

    def upper(self, name: str) -> Path:
        with self.meta.txn() as txn:
            from snapshotter import storage

            snap_id, _, _ = storage.get_info(txn, self.meta, name)
        return self.root / "snapshots" / snap_id / "fs"


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    async with aiohttp.ClientSession() as session:
        yield await build_node(tmp_path / "node", session)


async def build_node(root: Path, session: aiohttp.ClientSession, unpack_ahead: int = 2) -> Node:
    meta = Meta(root)
    chunks = ChunkStore(root, meta, 1 << 20)
    chunks.recover()
    catalog = Catalog(meta)
    engine = Engine(chunks, catalog, OriginClient(session), StaticPeers([]), PeerClient(session), "")
    content = ContentStore(chunks)
    chains = ChainIndex(meta)
    layers = DaemonLayers(content, engine, chunks.owners, chains)
    snapshotter = Snapshotter(root, meta, index_off=False, layers=layers, unpack_ahead=unpack_ahead)
    return Node(root, meta, content, chains, layers, snapshotter)


def describe_tree(root: Path, started_ns: int) -> dict[str, Any]:
    """Everything about a tree that unpacking decides: times the kernel set while unpacking (after
    `started_ns`: a directory created to hold an entry, then written into) are left out."""
    out: dict[str, Any] = {}
    for p in sorted(root.rglob("*")):
        st = os.lstat(p)
        mtime = None if st.st_mtime_ns >= started_ns else st.st_mtime_ns
        names = [] if stat.S_ISLNK(st.st_mode) else os.listxattr(p, follow_symlinks=False)
        xattrs = {a: os.getxattr(p, a, follow_symlinks=False) for a in names}
        body = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
        out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, mtime, st.st_rdev, body, xattrs)
    return out


async def test_chain_ids_alone_unpack_from_manifests_in_the_content_store(node: Node) -> None:
    """containerd wrote the image into our content store itself: no mirror ever saw the manifest."""
    image = make_image(LAYERS)
    await node.put_image(image)
    await node.pull(image)
    top = await node.snapshotter.stat(image.chains[-1])
    assert top.kind is Kind.COMMITTED and top.parent == image.chains[-2]
    assert top.labels[remote.UNPACKED_LABEL] == sha(image.blobs[-1])
    assert (node.upper(image.chains[1]) / "etc/one").read_bytes() == b"replaced"
    # the missing parent dir of layer 2 took its attributes from layer 0's (via the Lowers wait)
    deep = os.lstat(node.upper(image.chains[2]) / "srv")
    assert stat.S_IMODE(deep.st_mode) == 0o755  # layer 0 has no srv: containerd's mkparent default
    assert {i.kind for i in await node.snapshotter.walk()} == {Kind.COMMITTED}


async def test_a_manifest_the_mirror_served_is_enough(node: Node) -> None:
    image = make_image(LAYERS[:2])
    node.chains.note_manifest(sha(image.manifest), image.manifest)  # what peer.mirror does
    for data in [image.config, *image.blobs]:  # the config and layers, but no manifest, in the store
        await node.put(data)
    await node.pull(image)
    assert (await node.snapshotter.stat(image.chains[1])).kind is Kind.COMMITTED


async def plain_prepare(node: Node, key: str, chain: str, parent: str = "") -> None:
    """The Prepare must answer with an ordinary empty active snapshot, and commit nothing as `chain`."""
    mounts = await node.snapshotter.prepare(key, parent, {remote.REF_LABEL: chain})
    assert mounts, "the plain path returns mounts"
    info = await node.snapshotter.stat(key)
    assert info.kind is Kind.ACTIVE
    assert os.listdir(node.upper(key)) == []
    assert not [i for i in await node.snapshotter.walk() if i.name == chain]


async def test_a_chain_id_on_another_parent_takes_the_plain_path(node: Node) -> None:
    image = make_image(LAYERS[:2])
    other = make_image([layer({"x": b"other base"})])
    await node.put_image(image)
    await node.put_image(other)
    await node.pull(other)  # a committed snapshot of another chain
    await plain_prepare(node, "default/9/extract-x", image.chains[1], parent=other.chains[0])
    # and a parent whose chain nothing says (named without a chain ID, no ref label)
    await node.snapshotter.prepare("default/10/plain", "")
    await node.snapshotter.commit("default/11/not-a-chain", "default/10/plain")
    await plain_prepare(node, "default/12/extract-y", image.chains[1], parent="default/11/not-a-chain")


async def test_a_config_that_lies_about_a_diff_id_takes_the_plain_path(node: Node) -> None:
    """The index believes the config; the unpack does not: the diff ID is checked as the tar streams."""
    honest = [d for _, d in LAYERS[:2]]
    liar = make_image(LAYERS[:2], claimed=[honest[0], sha(b"not the tar of layer 1")])
    await node.put_image(liar)
    with pytest.raises(AlreadyExists):
        await node.snapshotter.prepare("default/1/extract-0", "", {remote.REF_LABEL: liar.chains[0]})
    await plain_prepare(node, "default/2/extract-1", liar.chains[1], parent=liar.chains[0])
    assert sorted(os.listdir(node.root / "unpacking")) == []  # the half-unpacked layer is gone


async def test_a_manifest_naming_a_blob_nobody_has_takes_the_plain_path(node: Node) -> None:
    image = make_image(LAYERS[:1])
    await node.put_image(image, blobs=False)  # manifest and config only; no source for the layer
    await plain_prepare(node, "default/1/extract", image.chains[0])


async def test_an_unknown_chain_id_takes_the_plain_path(node: Node) -> None:
    await node.put_image(make_image(LAYERS[:1]))
    await plain_prepare(node, "default/1/extract", sha(b"a chain nobody has seen"))


async def test_layers_unpacked_ahead_are_identical_to_one_at_a_time(tmp_path: Path) -> None:
    """Every layer of the image is unpacked ahead as soon as the first Prepare names the image;
    the snapshots are the same as when each waits for its own Prepare."""
    image = make_image(LAYERS)
    trees = []
    started = time.time_ns()
    async with aiohttp.ClientSession() as session:
        for ahead in (0, 2):
            node = await build_node(tmp_path / f"ahead-{ahead}", session, unpack_ahead=ahead)
            await node.put_image(image)
            await node.pull(image)
            trees.append([describe_tree(node.upper(c), started) for c in image.chains])
            await node.snapshotter.close()
            node.meta.close()
    assert trees[0] == trees[1]


async def test_layers_are_unpacked_before_containerd_asks(node: Node) -> None:
    image = make_image(LAYERS)
    await node.put_image(image)
    with pytest.raises(AlreadyExists):
        await node.snapshotter.prepare("default/1/extract-0", "", {remote.REF_LABEL: image.chains[0]})
    unpacker = node.snapshotter.unpacker
    assert all(unpacker.known(c) for c in image.chains[1:])  # queued, running or staged
    job = unpacker._jobs[image.chains[1]]
    assert job.task is not None  # running now, though containerd has not asked for it
    await asyncio.shield(job.task)
    assert job.dir is not None and (job.dir / "fs" / "etc" / "two").read_bytes() == b"2"
    # layer 2 needs its parents (a missing directory): it waits until layer 1 is committed
    waiting = unpacker._jobs[image.chains[2]]
    assert waiting.task is not None and not waiting.task.done()
    await node.pull(image)  # the rest of the pull takes what was staged
    assert not any(unpacker.known(c) for c in image.chains)
    assert os.listdir(node.root / "unpacking") == []


async def test_a_staged_layer_nobody_claims_is_dropped_and_its_blob_released(node: Node) -> None:
    image = make_image([LAYERS[0], layer({"etc/two": b"2"}, dirs=["etc"])])
    await node.put_image(image)
    node.layers.owners.hold(sha(image.blobs[1]))  # as if the daemon had fetched it for the unpack
    unpacker = node.snapshotter.unpacker
    unpacker.ttl = 0.0
    with pytest.raises(AlreadyExists):
        await node.snapshotter.prepare("default/1/extract-0", "", {remote.REF_LABEL: image.chains[0]})
    blob = sha(image.blobs[1])
    for _ in range(1000):  # the unpack ahead, its expiry, then the discard: all on this loop
        if not unpacker.known(image.chains[1]) and "held" not in node.content.chunks.owners.reasons(blob):
            break
        await asyncio.sleep(0.01)
    assert not unpacker.known(image.chains[1])
    # Released: no longer held by us. What keeps it now is only what kept it before the hold (here
    # containerd, which wrote the image); a blob nobody else keeps would be cache-only, the cache
    # manager's to evict when it needs the room.
    assert "held" not in node.content.chunks.owners.reasons(blob)
    assert node.content.chunks.exists(sha(image.blobs[0]))  # a snapshot uses this one
    assert os.listdir(node.root / "unpacking") == []


async def test_the_preparers_questions_are_answered_from_the_index_and_the_store(node: Node) -> None:
    """`snapshotter.preparer.Images`: the image a layer belongs to, its chains once the config
    is read (learnt from the store on a miss), and whether an index lists a manifest."""
    image = make_image(LAYERS[:2])
    node.chains.note_manifest(sha(image.manifest), image.manifest)  # the mirror served it
    await node.put(image.config)
    found = node.layers.image_with(sha(image.blobs[1]))
    assert found is not None and (found.manifest, found.config) == (sha(image.manifest), sha(image.config))
    assert node.layers.image_with(sha(b"not a layer")) is None
    chains = await node.layers.chains_of(sha(image.manifest))  # resolves the config it had not read
    assert [(p.chain, p.parent) for p in chains] == [(image.chains[0], ""), (image.chains[1], image.chains[0])]
    index = json.dumps(
        {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
         "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": sha(image.manifest), "size": len(image.manifest)}]}
    ).encode()  # fmt: skip
    await node.put(index)
    assert await node.layers.lists_manifest(sha(index), sha(image.manifest))
    assert not await node.layers.lists_manifest(sha(index), sha(image.config))
    assert not await node.layers.lists_manifest(sha(image.config), sha(image.manifest))  # not an index
    assert not await node.layers.lists_manifest(sha(b"nowhere"), sha(image.manifest))
