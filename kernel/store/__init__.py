"""The node's store: where `snapshotter/` and `peer/` meet.

- `meta.Meta`: the LMDB environment holding every piece of metadata (snapshots, blobs, chunk
  hashes, ingests), with one transaction helper and a versioned schema.
- `chunkstore.ChunkStore`: blob files cut into fixed-size chunks, with the chunk index and
  per-chunk SHA-256 hashes in LMDB; reads, deletes, and start-up recovery.
- `ingest.Ingests`: in-progress writes (containerd's Writer), one per ref, with per-ref locks,
  hashing whole blob and chunks in one pass, resumable after a restart.
- `fsutil`: the few filesystem primitives whose ordering crash safety depends on.
"""
