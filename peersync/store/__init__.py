"""The node's store: where `snapshotter/` and `peer/` meet.

- `meta.Meta`: the LMDB environment holding every piece of metadata (snapshots, blobs, chunk
  hashes, ingests), with one transaction helper and a versioned schema.
- `chunkstore.ChunkStore`: blob files cut into fixed-size chunks, with the chunk index and
  per-chunk SHA-256 hashes in LMDB.
"""
