"""Blobs the daemon holds for its own snapshots, out of sight of containerd's garbage collector.

When the snapshotter unpacks a layer itself (the remote-snapshot handshake, `snapshotter/remote.py`),
containerd never fetches that layer: the blob is not in containerd's metadata, so its GC, which
deletes every blob of ours it does not reference, would delete it minutes after the pull, while
peers may still be fetching it from us. Such a blob is *held*: the content store hides it from
List (the GC's view) and the daemon deletes it itself when the last snapshot made from it goes.

If containerd later asks for the blob (Info, or opening a writer for it, as a `ctr pull` of the
same image does), it takes it into its metadata; from then on it is containerd's like any other
blob, so the hold is dropped (`adopt`) and the snapshot's removal no longer deletes it.

Holds live in LMDB (db `holds`, key = digest) and are mirrored in a set, because `adopt` sits on
the content store's Info path.
"""

from __future__ import annotations

from kernel.store.meta import Meta


class Holds:
    """The `holds` database: digests of blobs held for snapshots, with an in-memory mirror."""

    def __init__(self, meta: Meta) -> None:
        self._meta = meta
        self._db = meta.db("holds")
        with meta.txn() as txn:
            self._held = {bytes(k).decode() for k, _ in txn.cursor(db=self._db)}

    def __contains__(self, digest: str) -> bool:
        return digest in self._held

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, digest: str) -> None:
        """Keep `digest` out of containerd's sight until released or adopted."""
        if digest not in self._held:
            with self._meta.txn(write=True) as txn:
                txn.put(digest.encode(), b"1", db=self._db)
            self._held.add(digest)

    def adopt(self, digest: str) -> bool:
        """containerd took the blob into its metadata: it is containerd's now. True if it was held."""
        if digest not in self._held:
            return False
        with self._meta.txn(write=True) as txn:
            txn.delete(digest.encode(), db=self._db)
        self._held.discard(digest)
        return True

    release = adopt  # the last snapshot made from it is gone (the caller deletes the blob)
