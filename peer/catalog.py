"""Where each blob can be fetched from: what the registry mirror learned from manifests.

When the mirror serves a manifest it records every descriptor it names (layers, config, child
manifests) with the registry and repository it came from. The content store's lazy `Info` answers
"present, N bytes" for a catalogued digest, and the download engine uses the entry to reach the
origin when no peer has a chunk. Entries live in LMDB (db `sources`, key = digest, JSON value) so a
restart mid-pull can still complete a claimed blob.

Sizes come from manifests only (never from a registry's HEAD or headers). A digest names one
blob, so two manifests that disagree on its size cannot both be right; the catalog keeps the
smaller claim (a larger one is refused, with a warning): a wrong size fails the download's checks
either way, and the smaller one bounds what a lying manifest can make this node reserve.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from kernel.store.meta import Meta, dumps, loads

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Source:
    """A blob's size and media type and one place at the origin that serves it."""

    digest: str
    size: int
    media_type: str
    registry: str
    repository: str

    def as_dict(self) -> dict[str, str]:
        return {"registry": self.registry, "repository": self.repository}


class Catalog:
    """The `sources` database: digest -> Source."""

    def __init__(self, meta: Meta) -> None:
        self._meta = meta
        self._db = meta.db("sources")

    def record(self, sources: list[Source]) -> None:
        """Remember where these blobs come from (newest registry/repository wins; the smaller
        size wins, see the module docstring)."""
        with self._meta.txn(write=True) as txn:
            for s in sources:
                raw = txn.get(s.digest.encode(), db=self._db)
                known = None if raw is None else int(loads(bytes(raw))["size"])
                if known is not None and s.size > known:
                    log.warning("manifest declares a larger size than another manifest did; refused",
                                digest=s.digest, declared=s.size, known=known, repository=s.repository)
                    s = Source(s.digest, known, s.media_type, s.registry, s.repository)
                value = {
                    "size": s.size,
                    "media_type": s.media_type,
                    "registry": s.registry,
                    "repository": s.repository,
                }
                txn.put(s.digest.encode(), dumps(value), db=self._db)

    def lookup(self, digest: str) -> Source | None:
        with self._meta.txn() as txn:
            raw = txn.get(digest.encode(), db=self._db)
        if raw is None:
            return None
        v = loads(bytes(raw))  # a bytes object already; bytes() narrows lmdb's bytes | memoryview
        return Source(digest, int(v["size"]), v.get("media_type", ""), v["registry"], v["repository"])

    def forget(self, digest: str) -> None:
        with self._meta.txn(write=True) as txn:
            txn.delete(digest.encode(), db=self._db)
