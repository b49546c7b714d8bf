"""PeerSync: peer-to-peer container image distribution for containerd at the network edge.

This package is the daemon assembly, the top layer: `service` builds the store (`kernel.store`),
the containerd-facing side (`snapshotter`) and the network side (`peer`) and joins them through
the two seam adapters (`blobs`, `layers`); `cli` is the `peersync` command. Nothing below imports
it (ARCHITECTURE.md).
"""

__version__ = "0.1.0"
