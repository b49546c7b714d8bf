"""Seeds: images carried into a node's store before it first boots (`peersync seed`).

A seed is an OCI image layout in one tar file (`oci-layout`, `index.json`, `blobs/sha256/...`),
so `skopeo`, `umoci` or `ctr import` read it too. `index.json` names each image's top manifest
with its reference (`org.opencontainers.image.ref.name`) and where it came from
(`io.peersync.registry`, `io.peersync.repository`): what the daemon's catalog needs to serve the
image and to tell peers where its blobs live.

Export streams the tar as it goes (constant memory whatever the image's size), from a running
daemon (`AdminServer`'s `/v1/seed`: what the node has, fetched through its engine when missing)
or straight from a registry (`export_from_registry`, no daemon). Every blob's bytes are hashed
on the way and a blob that does not match its digest or size ends the export with an error.

Import (`import_seed`) needs no daemon: it takes the root's lock, so it refuses a root a daemon
is using, and writes each blob through the store's ingest path, which verifies size and digest
before installing it: a corrupt or truncated seed installs nothing of the bad blob and fails
naming it. Then the manifests are catalogued and noted in the chain index (so the daemon can
unpack their layers by chain ID), every blob they name is checked to be present, and, unless
told otherwise, pinned: a flashed node keeps its seeded images whatever its cache budget says.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from kernel import errors
from kernel.store.chains import ChainIndex
from kernel.store.chunkstore import ChunkStore
from kernel.store.meta import Meta
from peer.catalog import Catalog, Source
from peer.images import Blob, Image, ImageRef, Resolver, parse_ref, walk
from peersync.rootlock import lock_root

LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"
REGISTRY = "io.peersync.registry"
REPOSITORY = "io.peersync.repository"
PIECE = 1 << 20

Write = Callable[[bytes], Awaitable[None]]
ReadBlob = Callable[[Image, Blob], AsyncIterator[bytes]]


# -- export ----------------------------------------------------------------------------------


def index_json(images: list[Image]) -> bytes:
    """The layout's index.json: each image's top manifest with its reference and origin."""
    manifests = []
    for image in images:
        top, _ = image.manifests[0]
        ref = image.ref
        annotations = {REF_NAME: str(ref), REGISTRY: ref.registry, REPOSITORY: ref.repository}
        manifests.append({"mediaType": top.media_type, "digest": top.digest, "size": top.size,
                          "annotations": annotations})
    return json.dumps({"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": manifests}).encode()


def tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    return info.tobuf(format=tarfile.PAX_FORMAT)


def tar_padding(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)


async def export(images: list[Image], read_blob: ReadBlob, write: Write) -> int:
    """Write the seed tar of `images` through `write`; the blobs written. The manifests come from
    the walk; configs and layers from `read_blob`, checked against their digest and size."""
    for name, body in (("oci-layout", LAYOUT), ("index.json", index_json(images))):
        await write(tar_header(name, len(body)) + body + tar_padding(len(body)))
    done: set[str] = set()
    for image in images:
        for blob, body in image.manifests:
            if blob.digest not in done:
                done.add(blob.digest)
                await write(tar_header(_member(blob.digest), len(body)) + body + tar_padding(len(body)))
        for blob in image.blobs:
            if blob.digest in done:
                continue
            done.add(blob.digest)
            await write(tar_header(_member(blob.digest), blob.size))
            h, n = hashlib.sha256(), 0
            async for piece in read_blob(image, blob):
                n += len(piece)
                if n > blob.size:
                    break
                h.update(piece)
                await write(piece)
            if n != blob.size or "sha256:" + h.hexdigest() != blob.digest:
                raise errors.FailedPrecondition(
                    f"{image.ref}: blob {blob.digest} did not match its digest and size ({n} bytes read)"
                )
            await write(tar_padding(blob.size))
    await write(b"\0" * (2 * tarfile.BLOCKSIZE))
    return len(done)


async def walk_all(resolve: Resolver, refs: list[str], default_registry: str) -> list[Image]:
    return [await walk(resolve, parse_ref(r, default_registry)) for r in refs]


def _member(digest: str) -> str:
    return "blobs/sha256/" + digest.removeprefix("sha256:")


# -- import ----------------------------------------------------------------------------------


@dataclass
class ImportReport:
    """What an import did: blobs written, blobs already there, bytes written, images, pins."""

    written: int = 0
    present: int = 0
    bytes: int = 0
    images: list[str] = field(default_factory=list)
    pinned: int = 0

    def as_dict(self) -> dict[str, object]:
        return {"written": self.written, "present": self.present, "bytes": self.bytes,
                "images": self.images, "pinned": self.pinned}


def import_seed(path: Path, root: Path, chunk_size: int, pin: bool = True) -> ImportReport:
    """Install the seed at `path` into the store at `root` (no daemon may be running on it)."""
    lock = lock_root(root)
    meta = Meta(root)
    try:
        store = ChunkStore(root, meta, chunk_size)
        store.recover()
        report = ImportReport()
        try:
            with tarfile.open(path, "r|*") as tar:
                index = _install_members(tar, store, report)
        except (tarfile.TarError, OSError) as exc:
            raise errors.InvalidArgument(f"seed {path}: not a readable tar: {exc}") from exc
        if index is None:
            raise errors.InvalidArgument(f"seed {path}: no index.json (not an OCI image layout)")
        _catalogue(index, store, Catalog(meta), ChainIndex(meta), report, pin)
        store.owners.flush()
        return report
    finally:
        meta.close()
        os.close(lock)


def _install_members(tar: tarfile.TarFile, store: ChunkStore, report: ImportReport) -> bytes | None:
    index = None
    for member in tar:
        f = tar.extractfile(member) if member.isfile() else None
        if f is None:
            continue
        if member.name.lstrip("./") == "index.json":
            index = f.read()
        elif member.name.lstrip("./").startswith("blobs/sha256/"):
            digest = "sha256:" + member.name.rsplit("/", 1)[1]
            if not _is_digest(digest):
                raise errors.InvalidArgument(f"seed member {member.name}: not a sha256 blob name")
            _install_blob(store, digest, member.size, f, report)
    return index


def _is_digest(digest: str) -> bool:
    hexpart = digest.removeprefix("sha256:")
    return len(hexpart) == 64 and all(c in "0123456789abcdef" for c in hexpart)


def _install_blob(store: ChunkStore, digest: str, size: int, f: IO[bytes], report: ImportReport) -> None:
    """Write one blob through an ingest, which verifies its size and digest before installing."""
    if store.exists(digest):
        report.present += 1
        return
    ref = f"seed-{digest}"
    writer = store.ingests.open(ref, total=size, expected=digest)
    try:
        writer.truncate()
        offset = 0
        while piece := f.read(PIECE):
            writer.write_at(offset, piece)
            offset += len(piece)
        writer.commit(size, digest)
    except errors.AlreadyExists:
        report.present += 1
        return
    except errors.FailedPrecondition as exc:
        store.ingests.abort(ref)
        raise errors.InvalidArgument(f"seed blob {digest} is corrupt: {exc}") from exc
    finally:
        writer.close()
    report.written += 1
    report.bytes += size


def _catalogue(index: bytes, store: ChunkStore, catalog: Catalog, chains: ChainIndex,
               report: ImportReport, pin: bool) -> None:
    """Walk each image of index.json through the store: catalogue and note its manifests, check
    every blob is here, pin them."""
    try:
        entries = json.loads(index)["manifests"]
    except (ValueError, KeyError, TypeError) as exc:
        raise errors.InvalidArgument("seed index.json is not an OCI index") from exc
    for entry in entries:
        notes = entry.get("annotations") or {}
        ref = ImageRef(notes.get(REGISTRY, ""), notes.get(REPOSITORY, ""), entry["digest"])

        async def local(_registry: str, _repo: str, digest: str) -> tuple[bytes, str, str]:
            if not store.exists(digest):
                raise errors.InvalidArgument(f"seed: manifest {digest} is named but not in the seed")
            rec = store.record(digest)
            return store.read(digest, 0, rec.size), rec.media_type or "", digest

        image = _run(walk(local, ref))
        blobs = [b for b, _ in image.manifests] + image.blobs
        missing = [b.digest for b in blobs if not store.exists(b.digest)]
        if missing:
            raise errors.InvalidArgument(f"seed: {notes.get(REF_NAME, ref)} lacks blobs {missing}")
        if ref.registry and ref.repository:
            where = (ref.registry, ref.repository)
            catalog.record([Source(b.digest, b.size, b.media_type, *where) for b in blobs])
        for blob, body in image.manifests:
            chains.note_manifest(blob.digest, body)
        if pin:
            report.pinned += sum(1 for b in blobs if store.owners.pin(b.digest))
        report.images.append(notes.get(REF_NAME, entry["digest"]))


def _run(coro: Awaitable[Image]) -> Image:
    """Run a walk whose resolver never awaits anything (the store answers at once)."""
    import asyncio

    async def main() -> Image:
        return await coro

    return asyncio.run(main())
