"""containerd's content service (`containerd.services.content.v1.Content`) over `ContentStore`.

A thin adapter: every handler converts messages, calls the store, and runs inside `translate`,
the one place where PeerSync errors become status codes. The Write session follows containerd's
`services/content/service.go` message by message (strict lockstep: one response per request).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from kernel import limits
from kernel.errors import InvalidArgument
from snapshotter.api import content_pb2, content_pb2_grpc
from snapshotter.content import READ_PIECE, ContentStore, Info, Status, Writer
from snapshotter.grpcerrors import translate
from snapshotter.preparer import ChainPreparer

LIST_BATCH = 100  # Info messages per List response, at most (and at most LIST_MESSAGE_BYTES)

_Context = grpc.aio.ServicerContext  # typed with each method's [request, response] messages


class ContentServicer(content_pb2_grpc.ContentServicer):
    """Serves one ContentStore. `read_message_size` caps the data of one Read response. With a
    `preparer`, Infos tell it which blobs containerd's clients fetch, and
    Reads of the config of such an image wait while it prepares it (`snapshotter.preparer`)."""

    def __init__(
        self, store: ContentStore, read_message_size: int = READ_PIECE, preparer: ChainPreparer | None = None
    ) -> None:
        self._store = store
        self._piece = read_message_size
        self._preparer = preparer

    async def Info(
        self,
        request: content_pb2.InfoRequest,
        context: _Context[content_pb2.InfoRequest, content_pb2.InfoResponse],
    ) -> content_pb2.InfoResponse:
        async with translate(context, "Info"):
            info = await self._store.info(request.digest)
            if self._preparer is not None:
                self._preparer.noticed(info.digest)
            return content_pb2.InfoResponse(info=info_pb(info))

    async def Update(
        self,
        request: content_pb2.UpdateRequest,
        context: _Context[content_pb2.UpdateRequest, content_pb2.UpdateResponse],
    ) -> content_pb2.UpdateResponse:
        async with translate(context, "Update"):
            info = Info(request.info.digest, labels=dict(request.info.labels))
            updated = await self._store.update(info, list(request.update_mask.paths))
            return content_pb2.UpdateResponse(info=info_pb(updated))

    async def List(
        self,
        request: content_pb2.ListContentRequest,
        context: _Context[content_pb2.ListContentRequest, content_pb2.ListContentResponse],
    ) -> AsyncIterator[content_pb2.ListContentResponse]:
        async with translate(context, "List"):
            batch: list[content_pb2.Info] = []
            size = 0
            async for info in self._store.walk(list(request.filters)):
                pb = info_pb(info)
                n = pb.ByteSize()
                if batch and (len(batch) >= LIST_BATCH or size + n > limits.LIST_MESSAGE_BYTES):
                    yield content_pb2.ListContentResponse(info=batch)
                    batch, size = [], 0
                batch.append(pb)
                size += n
            if batch:
                yield content_pb2.ListContentResponse(info=batch)

    async def Delete(
        self,
        request: content_pb2.DeleteContentRequest,
        context: _Context[content_pb2.DeleteContentRequest, empty_pb2.Empty],
    ) -> empty_pb2.Empty:
        async with translate(context, "Delete"):
            await self._store.delete(request.digest)
            return empty_pb2.Empty()

    async def Read(
        self,
        request: content_pb2.ReadContentRequest,
        context: _Context[content_pb2.ReadContentRequest, content_pb2.ReadContentResponse],
    ) -> AsyncIterator[content_pb2.ReadContentResponse]:
        if self._preparer is not None and self._preparer.gated(request.digest):
            await self._preparer.settled(request.digest)
        once = self._store.read_once(request.digest, request.offset, request.size, self._piece)
        if once is not None:  # containerd's unpack: thousands of sequential 32 KiB reads
            yield content_pb2.ReadContentResponse(offset=once[0], data=once[1])
            return
        async with translate(context, "Read"):
            pieces = self._store.read(request.digest, request.offset, request.size, self._piece)
            async with contextlib.aclosing(pieces):  # releases the blob's fd if the client goes away
                async for offset, data in pieces:
                    yield content_pb2.ReadContentResponse(offset=offset, data=data)

    async def Status(
        self,
        request: content_pb2.StatusRequest,
        context: _Context[content_pb2.StatusRequest, content_pb2.StatusResponse],
    ) -> content_pb2.StatusResponse:
        async with translate(context, "Status"):
            return content_pb2.StatusResponse(status=status_pb(await self._store.status(request.ref)))

    async def ListStatuses(
        self,
        request: content_pb2.ListStatusesRequest,
        context: _Context[content_pb2.ListStatusesRequest, content_pb2.ListStatusesResponse],
    ) -> content_pb2.ListStatusesResponse:
        async with translate(context, "ListStatuses"):
            statuses = await self._store.list_statuses(list(request.filters))
            return content_pb2.ListStatusesResponse(statuses=[status_pb(st) for st in statuses])

    async def Abort(
        self,
        request: content_pb2.AbortRequest,
        context: _Context[content_pb2.AbortRequest, empty_pb2.Empty],
    ) -> empty_pb2.Empty:
        async with translate(context, "Abort"):
            await self._store.abort(request.ref)
            return empty_pb2.Empty()

    async def Write(
        self,
        request_iterator: AsyncIterator[content_pb2.WriteContentRequest],
        context: _Context[content_pb2.WriteContentRequest, content_pb2.WriteContentResponse],
    ) -> AsyncIterator[content_pb2.WriteContentResponse]:
        async with translate(context, "Write"):
            requests = aiter(request_iterator)
            request = await anext(requests, None)
            if request is None:
                return
            if not request.ref:
                raise InvalidArgument("first message must have a reference")
            writer = await self._store.writer(request.ref, request.total, request.expected)
            try:
                session = _WriteSession(writer, request.total)
                while request is not None:
                    yield await session.handle(request)
                    request = await anext(requests, None)
            finally:
                writer.close()


class _WriteSession:
    """The per-stream state of containerd's Write protocol: the latest total, expected digest
    and labels seen, applied at COMMIT."""

    def __init__(self, writer: Writer, total: int) -> None:
        self._writer = writer
        self._total = total if total > 0 else writer.status().total
        self._expected = ""
        self._labels: dict[str, str] = {}

    async def handle(self, req: content_pb2.WriteContentRequest) -> content_pb2.WriteContentResponse:
        if req.expected:
            await self._writer.expect(req.expected)
            self._expected = req.expected
        if req.total > 0:
            self._total = req.total
        if req.labels:  # gathered over the session: bounded as the blob's labels will be
            self._labels.update(req.labels)
            limits.check_labels(self._labels, f"write of ingest {limits.short(self._writer.ref, 100)}")
        digest = ""
        if req.action == content_pb2.WRITE:
            await self._writer.write_at(req.offset, req.data)
        elif req.action == content_pb2.COMMIT:
            if req.data or req.offset > 0:  # a bare COMMIT commits what is stored, never truncates
                await self._writer.write_at(req.offset, req.data)
            digest = await self._writer.commit(self._total, self._expected, self._labels)
        elif req.action != content_pb2.STAT:
            raise InvalidArgument(f"unknown write action {req.action}")
        return self._response(req.action, digest or self._writer.digest())

    def _response(
        self, action: content_pb2.WriteAction.ValueType, digest: str
    ) -> content_pb2.WriteContentResponse:
        st = self._writer.status()
        return content_pb2.WriteContentResponse(
            action=action, started_at=timestamp(st.started_ns), updated_at=timestamp(st.updated_ns),
            offset=st.offset, total=self._total, digest=digest)


def info_pb(info: Info) -> content_pb2.Info:
    return content_pb2.Info(digest=info.digest, size=info.size, created_at=timestamp(info.created_ns),
                            updated_at=timestamp(info.updated_ns), labels=dict(info.labels))


def status_pb(st: Status) -> content_pb2.Status:
    return content_pb2.Status(ref=st.ref, offset=st.offset, total=st.total, expected=st.expected,
                              started_at=timestamp(st.started_ns), updated_at=timestamp(st.updated_ns))


def timestamp(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


__all__ = ["ContentServicer"]
