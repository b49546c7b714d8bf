"""PeerSync: peer-to-peer container image distribution for containerd at the network edge.

This package holds what both halves of the daemon share: the error vocabulary, the store
(LMDB metadata and chunked blob files), configuration, logging, service assembly and the CLI.
`snapshotter/` (containerd-facing, gRPC) and `peer/` (network-facing, HTTP) build on it.
"""

__version__ = "0.1.0"
