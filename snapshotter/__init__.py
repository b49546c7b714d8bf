"""The containerd-facing half of PeerSync: a gRPC proxy plugin serving containerd's snapshots and
content APIs on a unix socket. Free of networking: it reaches peers only through the store."""
