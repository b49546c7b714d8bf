"""PeerSync's error vocabulary, mirroring containerd's `errdefs`.

    PeerSyncError
     ├── NotFound             the thing named does not exist
     ├── AlreadyExists        the thing to create is already there
     ├── InvalidArgument      the request itself is malformed
     ├── FailedPrecondition   the request is well-formed but the state forbids it
     ├── OutOfRange           an offset or size lies outside the data
     ├── Unavailable          busy or temporarily unreachable: the caller may retry
     ├── ResourceExhausted    it does not fit: the disk budget cannot make room for it
     └── Unimplemented        not supported by this implementation

Code raises these with a message that says what and why. The gRPC servicers map them to
status codes in exactly one place (`snapshotter.grpcerrors`); the network side translates
OS and HTTP errors into them at its boundary.
"""

from __future__ import annotations


class PeerSyncError(Exception):
    """Base class of every error PeerSync reports to a caller."""


class NotFound(PeerSyncError):
    pass


class AlreadyExists(PeerSyncError):
    pass


class InvalidArgument(PeerSyncError):
    pass


class FailedPrecondition(PeerSyncError):
    pass


class OutOfRange(PeerSyncError):
    pass


class Unavailable(PeerSyncError):
    pass


class ResourceExhausted(PeerSyncError):
    """Refused for lack of room: a download that does not fit the cache budget even after every
    evictable blob went (`peer.cache`). gRPC RESOURCE_EXHAUSTED (containerd 1.6 does not map that
    code and reports it as unknown, with our message: the message says what and why); HTTP 507
    Insufficient Storage from the registry mirror. Not retried by clients: the operator has to
    raise `[cache] budget`, unpin or remove images."""


class Unimplemented(PeerSyncError):
    pass


__all__ = [
    "PeerSyncError",
    "NotFound",
    "AlreadyExists",
    "InvalidArgument",
    "FailedPrecondition",
    "OutOfRange",
    "Unavailable",
    "ResourceExhausted",
    "Unimplemented",
]
