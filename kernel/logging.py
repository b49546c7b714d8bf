"""structlog setup: one call at start-up, console or JSON lines on stderr.

Everything goes through structlog's processors, stdlib logging too (grpc's, aiohttp's, asyncio's
records are rendered by the same chain through `structlog.stdlib.ProcessorFormatter`), so a log
collector reading the JSON stream never meets a line in another format. `format="auto"` (the
default) picks console when stderr is a terminal, JSON otherwise: an operator at a shell reads
columns, journald or a container runtime gets one JSON object per line.

Context bound with `bind_transfer` (structlog's contextvars) is merged into every line logged in
the same task and the tasks it starts, so every line of one pull carries its `transfer` id. A pull
through the mirror is one request and one id. containerd's own pulls (full mode) come as many RPCs
that name no pull, so there each unit of the pull's work gets its id where it starts
(`in_transfer`): a blob's download (`peer.engine.Engine.ensure`), a layer unpacked ahead
(`snapshotter.unpacker`), a layer provided at its Prepare (`snapshotter.snapshots`); every such
line carries the blob's or layer's digest too, which ties them to one image.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import structlog

_transfers = itertools.count(1)


def resolve_format(fmt: str, stream: TextIO) -> str:
    """"console" or "json": `fmt` itself, or for "auto" what suits `stream`."""
    if fmt != "auto":
        return fmt
    return "console" if stream.isatty() else "json"


def setup(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> str:
    """Route structlog and stdlib logging to `stream` (stderr) at `level`; the format used."""
    stream = stream if stream is not None else sys.stderr
    numeric = getattr(logging, level.upper())
    fmt = resolve_format(fmt, stream)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
    return fmt


def new_transfer_id() -> str:
    """A transfer id unique on this node for its lifetime: pid and a sequence number."""
    return f"{os.getpid():x}-{next(_transfers)}"


@contextmanager
def in_transfer(**context: Any) -> Iterator[str]:
    """The transfer id bound already (the request or download this work is part of), or else a
    new one bound with `context` for the block, as `bind_transfer`; yields the id."""
    bound = structlog.contextvars.get_contextvars().get("transfer")
    if isinstance(bound, str) and bound:
        yield bound
        return
    with bind_transfer(**context) as transfer:
        yield transfer


@contextmanager
def bind_transfer(**context: Any) -> Iterator[str]:
    """Bind a new transfer id (and `context`) to every log line of the block and of the tasks it
    starts; yields the id. Restores what was bound before on exit."""
    transfer = new_transfer_id()
    tokens = structlog.contextvars.bind_contextvars(transfer=transfer, **context)
    try:
        yield transfer
    finally:
        structlog.contextvars.reset_contextvars(**tokens)
