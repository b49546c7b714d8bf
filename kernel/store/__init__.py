"""The node's store: where `snapshotter/` and `peer/` meet.

Callers hold one object, `chunkstore.ChunkStore`: the complete blobs on the object itself, the
partial blobs as `store.partials`, the ingests as `store.ingests`. They import its value types
from where they are defined (`schema.BlobRecord`, `schema.parse_digest`, the errors of
`partial`), and `meta.Meta` (shared with the snapshotter) on its own; who keeps each blob is
`store.owners` (`ownership.Ownership`).

Modules, top to bottom. Each imports only modules below it (`import-linter` contract
`store-layers` in pyproject.toml checks it, exhaustively, so a new module must take its place):

    chunkstore                   the facade
    partial | ingest | ownership blobs filled chunk by chunk; containerd's in-progress writes;
                                 who keeps each blob (protected or cache-only)
    blobs                complete blobs
    commit               the commit primitives
    schema               the persistent format
    meta | fsutil        LMDB; filesystem primitives

- `chunkstore.ChunkStore`: builds the sides below in dependency order and is the only code that
  knows all of them; the two operations that span sides (`open_chunk` of a complete-or-partial
  blob, `install` retiring a partial copy) and the order of recovery live here. The name is kept
  from before (a store of blobs served in verified chunks): every caller already holds it.
- `ownership.Ownership`: every blob is protected (containerd's, held for our own snapshots,
  pinned, in flight) or cache-only (evictable); its docstring is the spec of those states and
  their transitions, and of what containerd sees. On `schema` and `meta`, not on the files.
- `partial.Partials`: blobs filled chunk by chunk, in any order, read while they fill, promoted
  once complete. On `blobs` (a blob completed meanwhile is answered from there) and `commit`.
- `ingest.Ingests`: containerd's Writer, one per ref, resumable after a restart. It commits into
  an `IngestTarget` it defines (the `ChunkStore`), so it needs neither `blobs` nor `partial`.
- `blobs.Blobs`: complete blobs, what containerd sees and peers are served; the fd cache, labels,
  install, delete, and their recovery.
- `commit.Committer`: the one place a blob becomes complete or stops being one, shared by the
  ingest commit, the partial promotion and recovery: the install lock, the file install ordering
  (read-only, rename, fsync the directory, then one LMDB transaction) and the record commit/drop.
- `schema`: the persistent format in one place: the on-disk layout, every LMDB key and record of
  blobs, chunk tables, partial progress and ingests (plain functions inside a transaction the
  caller opened), digests and chunk arithmetic, and the crash-safety invariants.
- `meta.Meta`: the LMDB environment, the transaction helper, and `SCHEMA_VERSION` (it versions
  every database, the snapshotter's too).
- `fsutil`: the fsync/rename helpers crash safety depends on, and streaming hashes.
"""
