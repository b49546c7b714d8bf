"""PeerSync's network side: peer chunk exchange, the registry mirror, the download engine and the
origin registry client (`peer.origin`).

Everything here speaks HTTP (aiohttp) and never imports grpc; network and HTTP errors are translated
into `kernel.errors` at this package's boundary. The exception is `peer.policy`: the download
engine's decisions as pure functions, with no I/O at all.
"""
