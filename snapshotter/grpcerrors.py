"""The one place where PeerSync errors become gRPC status codes.

containerd's client maps errors back by code only (`errdefs.FromGRPC`): ALREADY_EXISTS,
NOT_FOUND, INVALID_ARGUMENT, FAILED_PRECONDITION, UNIMPLEMENTED, UNAVAILABLE. containerd 1.6 does
not map OUT_OF_RANGE, but the content Write protocol still answers it for a bad offset, as
containerd's own local store does; nor RESOURCE_EXHAUSTED (a download that does not fit the cache
budget), which it reports as unknown with our message. Servicers wrap each handler in `translate(context)`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog

from kernel import errors

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


@contextlib.asynccontextmanager
async def translate(context: grpc.aio.ServicerContext[Any, Any], method: str) -> AsyncIterator[None]:
    """Abort the RPC with the mapped status when the body raises a PeerSyncError.

    Unexpected exceptions are logged with their traceback and reported as UNKNOWN (internal
    detail stays in the log, the message names the method)."""
    try:
        yield
    except errors.PeerSyncError as exc:
        await context.abort(code_for(exc), str(exc))
    except (grpc.aio.AbortError, GeneratorExit):
        raise
    except Exception as exc:  # last line of defence for one RPC
        log.exception("rpc failed", method=method)
        await context.abort(grpc.StatusCode.UNKNOWN, f"{method}: internal error: {exc}")
