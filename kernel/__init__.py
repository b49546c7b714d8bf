"""The kernel: what both sides of the daemon stand on, importing nothing above it.

- `errors`: the error vocabulary (one base class, mapped once to gRPC codes and HTTP statuses);
- `config`: the daemon's configuration schema, defaults and validation;
- `logging`: structlog setup (console or JSON);
- `store`: the node's store, where `snapshotter/` and `peer/` meet: blob files cut into verified
  chunks, partial blobs, ingests, who keeps each blob (ownership) and the LMDB metadata under them.

Layers (import-linter contracts in pyproject.toml, checked by the test suite):
`peersync` (daemon assembly) -> `snapshotter` | `peer` (never each other) -> `kernel`.
"""
