"""Which layer a chain ID is made of: an index over the image manifests and configs this node has seen.

Why: containerd names the snapshot it wants by its chain ID alone (`containerd.io/snapshot.ref`)
on most pull paths: its own client's `Pull(WithPullUnpack)` (nerdctl, Go programs), the 1.7/2.x
unpacker and transfer service. Only CRI adds labels naming the layer blob and the manifest. To
unpack a layer for such a Prepare the daemon must know, from the chain ID alone, which blob it is
made of, the diff ID its uncompressed tar must have, and the chain it sits on. An image's manifest
lists its layer blobs; its config lists their diff IDs; the chain IDs follow from the diff IDs
(`chain_ids`), so the two documents together give, for each layer, every entry this index holds.

What the index proves, and what it does not: it is computed here from documents whose digests
were checked on the way in, so a chain ID really is the chain of those diff IDs on top of that
parent chain. It does not prove that a layer blob has the diff ID the config claims (a config
may lie); the unpacker checks that while it unpacks (`snapshotter.apply`), and a mismatch is
never committed. One chain ID may be reachable through several blobs (the same tar compressed
twice); each is an entry.

Fed by the registry mirror (every image manifest it serves, `note_manifest`) and by the daemon
assembly (configs, once readable: `resolve`; manifests it finds in the content store). Lives in
LMDB (db `chains`), so it survives restarts:

    "image/<manifest digest>"         JSON {config, layers: [[digest, media type, size], ...],
                                      seen_ns: when last noted, diff_ids: [...] or absent
                                      until the config is known}
    "chain/<chain id>/<layer digest>" JSON {parent, diff_id, media_type, size, manifest, index}
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kernel.store.meta import Meta, dumps, loads

MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
MAX_DOCUMENT = 4 << 20  # manifests and configs are small: refuse to parse anything bigger


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """containerd's identity.ChainIDs: chain[0] = diff[0], chain[i] = sha256(chain[i-1] + " " + diff[i])."""
    chain: list[str] = []
    for diff_id in diff_ids:
        if not chain:
            chain.append(diff_id)
        else:
            chain.append("sha256:" + hashlib.sha256(f"{chain[-1]} {diff_id}".encode()).hexdigest())
    return chain


@dataclass(frozen=True)
class ChainLayer:
    """One layer of an image as its chain ID names it: the blob, what unpacking it must produce,
    and the chain it must sit on ("" for an image's first layer)."""

    chain: str
    parent: str
    digest: str
    diff_id: str
    media_type: str
    size: int
    manifest: str
    index: int


@dataclass(frozen=True)
class PendingImage:
    """An image manifest whose config has not been read yet (its layers have no chain IDs yet)."""

    manifest: str
    config: str


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _is_digest(value: object) -> bool:
    return isinstance(value, str) and value.startswith("sha256:") and len(value) == 71


def parse_manifest(body: bytes) -> tuple[str, list[tuple[str, str, int]]] | None:
    """(config digest, [(layer digest, media type, size)]) of an image manifest; None for anything
    else (an index, a schema-1 manifest, malformed JSON or descriptors)."""
    if len(body) > MAX_DOCUMENT:
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict):
        return None
    media_type = doc.get("mediaType")
    if media_type is not None and media_type not in MANIFEST_TYPES:
        return None
    layers = doc.get("layers")
    config = doc["config"].get("digest")
    if not isinstance(layers, list) or not layers or not _is_digest(config):
        return None
    out = []
    for d in layers:
        if not isinstance(d, dict) or not _is_digest(d.get("digest")):
            return None
        size, layer_type = d.get("size"), d.get("mediaType", "")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(layer_type, str):
            return None
        out.append((d["digest"], layer_type, size))
    return config, out


def parse_index(body: bytes) -> list[str] | None:
    """The manifest digests an image index lists; None for anything else (a manifest, malformed
    JSON or entries)."""
    if len(body) > MAX_DOCUMENT:
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    entries = doc.get("manifests") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        return None
    return [e["digest"] for e in entries if _is_digest(e.get("digest"))]


def parse_diff_ids(body: bytes) -> list[str] | None:
    """The `rootfs.diff_ids` of an image config, or None if it has none or is malformed."""
    if len(body) > MAX_DOCUMENT:
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    rootfs = doc.get("rootfs") if isinstance(doc, dict) else None
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not diff_ids or not all(_is_digest(d) for d in diff_ids):
        return None
    return list(diff_ids)


class ChainIndex:
    """The `chains` database (see the module docstring for its records)."""

    def __init__(self, meta: Meta) -> None:
        self._meta = meta
        self._db = meta.db("chains")

    def note_manifest(self, digest: str, body: bytes) -> str | None:
        """Remember an image manifest (again: it is the most recently seen now); returns its
        config's digest, or None if `body` is not an image manifest named `digest`. Its layers get
        chain IDs once `resolve` has the config."""
        if _sha256(body) != digest:
            return None
        parsed = parse_manifest(body)
        if parsed is None:
            return None
        config, layers = parsed
        key = f"image/{digest}".encode()
        with self._meta.txn(write=True) as txn:
            raw = txn.get(key, db=self._db)
            record = (
                loads(bytes(raw))
                if raw is not None
                else {"config": config, "layers": [list(x) for x in layers]}
            )
            record["seen_ns"] = time.time_ns()
            txn.put(key, dumps(record), db=self._db)
        return config

    def seen_ns(self, manifest: str) -> int:
        """When `manifest` was last noted (Unix ns; 0 if never)."""
        record = self._image(manifest)
        return int(record.get("seen_ns", 0)) if record is not None else 0

    def resolve(self, manifest: str, config_body: bytes) -> list[ChainLayer]:
        """Give the layers of a noted manifest their chain IDs from its config's body; returns
        them in image order, or [] if the body is not that config or does not fit the manifest
        (another number of diff IDs than layers)."""
        record = self._image(manifest)
        if record is None or _sha256(config_body) != record["config"]:
            return []
        diff_ids = parse_diff_ids(config_body)
        if diff_ids is None or len(diff_ids) != len(record["layers"]):
            return []
        layers = self._layers(manifest, record["layers"], diff_ids)
        with self._meta.txn(write=True) as txn:
            txn.put(f"image/{manifest}".encode(), dumps({**record, "diff_ids": diff_ids}), db=self._db)
            for layer in layers:
                value = {
                    "parent": layer.parent, "diff_id": layer.diff_id, "media_type": layer.media_type,
                    "size": layer.size, "manifest": manifest, "index": layer.index,
                }  # fmt: skip
                txn.put(f"chain/{layer.chain}/{layer.digest}".encode(), dumps(value), db=self._db)
        return layers

    def lookup(self, chain: str) -> list[ChainLayer]:
        """Every known layer blob that chain ID `chain` is made of (usually one)."""
        prefix = f"chain/{chain}/".encode()
        out = []
        with self._meta.txn() as txn:
            cursor = txn.cursor(db=self._db)
            if cursor.set_range(prefix):
                for raw_key, raw in cursor:
                    key = bytes(raw_key)
                    if not key.startswith(prefix):
                        break
                    v = loads(bytes(raw))
                    out.append(
                        ChainLayer(
                            chain,
                            v["parent"],
                            key[len(prefix) :].decode(),
                            v["diff_id"],
                            v["media_type"],
                            int(v["size"]),
                            v["manifest"],
                            int(v["index"]),
                        )  # fmt: skip
                    )
        return out

    def image(self, manifest: str) -> list[ChainLayer]:
        """The layers of a resolved image, in order; [] if unknown or not resolved yet."""
        record = self._image(manifest)
        if record is None or "diff_ids" not in record:
            return []
        return self._layers(manifest, record["layers"], record["diff_ids"])

    def images_with(self, layer: str) -> list[tuple[str, str, int]]:
        """(manifest, config, seen_ns) of every noted manifest that lists blob `layer`, resolved
        or not. A scan of the image records: a node holds tens of images, and this is asked once
        per blob a client fetches."""
        return [
            (manifest, v["config"], int(v.get("seen_ns", 0)))
            for manifest, v in self._records()
            if any(entry[0] == layer for entry in v["layers"])
        ]

    def pending(self) -> list[PendingImage]:
        """Noted manifests whose config is not resolved yet."""
        return [PendingImage(manifest, v["config"]) for manifest, v in self._records() if "diff_ids" not in v]

    def _records(self) -> list[tuple[str, dict[str, Any]]]:
        """Every image record, by manifest digest."""
        out = []
        with self._meta.txn() as txn:
            cursor = txn.cursor(db=self._db)
            if cursor.set_range(b"image/"):
                for raw_key, raw in cursor:
                    key = bytes(raw_key)
                    if not key.startswith(b"image/"):
                        break
                    out.append((key[len(b"image/") :].decode(), loads(bytes(raw))))
        return out

    def forget(self, manifest: str) -> None:
        """Drop a manifest that cannot be resolved (its config says something else), so it is not
        read again on every miss."""
        with self._meta.txn(write=True) as txn:
            txn.delete(f"image/{manifest}".encode(), db=self._db)

    def _image(self, manifest: str) -> dict[str, Any] | None:
        with self._meta.txn() as txn:
            raw = txn.get(f"image/{manifest}".encode(), db=self._db)
        if raw is None:
            return None
        record: dict[str, Any] = loads(bytes(raw))
        return record

    @staticmethod
    def _layers(manifest: str, layers: list[list[Any]], diff_ids: list[str]) -> list[ChainLayer]:
        chains = chain_ids(diff_ids)
        return [
            ChainLayer(chains[i], chains[i - 1] if i else "", d, diff_ids[i], t, int(s), manifest, i)
            for i, (d, t, s) in enumerate(layers)
        ]


__all__ = [
    "ChainIndex", "ChainLayer", "INDEX_TYPES", "MANIFEST_TYPES", "PendingImage", "chain_ids", "parse_index",
    "parse_manifest",
]  # fmt: skip
