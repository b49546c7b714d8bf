"""kernel.logging: JSON when the stream is not a terminal, console when it is, stdlib records
through the same renderer, and a transfer id bound on every line of a block and its tasks."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from kernel import logging as pslogging


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_auto_is_json_off_a_terminal_and_console_on_one() -> None:
    assert pslogging.resolve_format("auto", io.StringIO()) == "json"
    assert pslogging.resolve_format("auto", Terminal()) == "console"
    assert pslogging.resolve_format("console", io.StringIO()) == "console"
    term = Terminal()
    assert pslogging.setup("info", "auto", term) == "console"
    structlog.get_logger("t").info("hello", key="v")
    out = term.getvalue()
    assert "hello" in out and "key" in out and not out.lstrip().startswith("{")


def test_stdlib_records_are_json_too() -> None:
    stream = io.StringIO()
    assert pslogging.setup("info", "auto", stream) == "json"
    structlog.get_logger("t").warning("from structlog", n=1)
    logging.getLogger("grpc._cython").warning("from stdlib %s", "logging")
    logging.getLogger("quiet").debug("below the level")
    first, second = lines(stream)
    assert first["event"] == "from structlog" and first["n"] == 1 and first["level"] == "warning"
    assert second["event"] == "from stdlib logging" and second["logger"] == "grpc._cython"
    assert second["level"] == "warning" and "timestamp" in second


async def test_a_transfer_id_is_on_every_line_of_the_block_and_its_tasks() -> None:
    stream = io.StringIO()
    pslogging.setup("info", "json", stream)
    log = structlog.get_logger("t")

    async def inner() -> None:
        log.info("in a task")
        logging.getLogger("lib").info("stdlib in a task")

    with pslogging.bind_transfer(path="/v2/x/blobs/sha256:0") as transfer:
        log.info("start")
        await asyncio.create_task(inner())
    with pslogging.bind_transfer() as other:
        log.info("another")
    log.info("after")
    recs = lines(stream)
    assert [r.get("transfer") for r in recs] == [transfer, transfer, transfer, other, None]
    assert transfer != other and recs[0]["path"] == "/v2/x/blobs/sha256:0"


async def test_work_started_inside_a_transfer_keeps_its_id_and_work_started_outside_gets_one() -> None:
    """`in_transfer`: a download started by a mirror request carries that request's id; one started
    by an RPC that names no pull gets an id of its own, which its tasks keep."""
    stream = io.StringIO()
    pslogging.setup("info", "json", stream)
    log = structlog.get_logger("t")

    async def download() -> None:
        log.info("chunk", blob="sha256:1")

    with pslogging.bind_transfer(path="/v2/x/blobs/sha256:1") as request:
        with pslogging.in_transfer(blob="sha256:1") as joined:
            task = asyncio.create_task(download())
        await task
    with pslogging.in_transfer(blob="sha256:2") as own:
        task = asyncio.create_task(download())
    await task
    log.info("after")
    recs = lines(stream)
    assert joined == request and own != request
    assert [r.get("transfer") for r in recs] == [request, own, None]
    assert recs[1]["blob"] == "sha256:1"  # the task's own field; `blob=sha256:2` is bound beside it
