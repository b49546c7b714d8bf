"""The one place where PeerSync errors become gRPC status codes.

containerd's client maps errors back by code only (`errdefs.FromGRPC`): ALREADY_EXISTS,
NOT_FOUND, INVALID_ARGUMENT, FAILED_PRECONDITION, UNIMPLEMENTED, UNAVAILABLE. containerd 1.6 does
not map OUT_OF_RANGE, but the content Write protocol still answers it for a bad offset, as
containerd's own local store does; nor RESOURCE_EXHAUSTED (a download that does not fit the cache
budget), which it reports as unknown with our message. Servicers wrap each handler in `translate(context)`.

A full disk is not an internal error: the store's filesystem running out of space (ENOSPC,
EDQUOT, from a write or from LMDB's commit) is RESOURCE_EXHAUSTED with a message saying so and
no traceback in the log; what was committed before stays, and an interrupted ingest stays
resumable once there is room (tests/integration/test_faults.py fills a small loop-mounted disk).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog

from kernel import errors, limits

log = structlog.get_logger(__name__)

CODES: dict[type[errors.PeerSyncError], grpc.StatusCode] = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
}


def code_for(exc: BaseException) -> grpc.StatusCode:
    """The status code for an exception; anything outside our vocabulary is UNKNOWN."""
    for cls in type(exc).__mro__:
        if cls in CODES:
            return CODES[cls]
    return grpc.StatusCode.UNKNOWN


_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(exc: BaseException) -> bool:
    """True for the filesystem running out of space or quota: an OSError with that errno, or
    LMDB's error for it (py-lmdb raises its own classes, naming the errno only in the text)."""
    if isinstance(exc, OSError) and exc.errno in _FULL:
        return True
    text = str(exc)
    return type(exc).__module__.startswith("lmdb") and any(os.strerror(e) in text for e in _FULL)


@contextlib.asynccontextmanager
async def translate(context: grpc.aio.ServicerContext[Any, Any], method: str) -> AsyncIterator[None]:
    """Abort the RPC with the mapped status when the body raises a PeerSyncError.

    Messages are cut to `limits.ERROR_MESSAGE_MAX` characters: they often quote the request (a
    key, a ref), and a status carrying megabytes back breaks the client's header limits.
    Unexpected exceptions are logged with their traceback and reported as UNKNOWN (internal
    detail stays in the log, the message names the method)."""
    try:
        yield
    except errors.PeerSyncError as exc:
        errors.reported.note("grpc", exc)
        await context.abort(code_for(exc), limits.short(str(exc)))
    except (grpc.aio.AbortError, GeneratorExit):
        raise
    except Exception as exc:  # last line of defence for one RPC
        if disk_full(exc):
            log.warning("rpc failed: the store's filesystem is full", method=method, error=str(exc))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{method}: no space left on the store's filesystem; free some or "
                                "lower [cache] budget (nothing committed was lost)")
        log.exception("rpc failed", method=method)
        errors.reported.note("grpc", exc)
        await context.abort(grpc.StatusCode.UNKNOWN, limits.short(f"{method}: internal error: {exc}"))
