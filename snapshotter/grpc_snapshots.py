"""containerd's Snapshots gRPC service over a `Snapshotter`: conversion only, no semantics.

Each handler converts the request, calls the snapshotter, converts the answer, and runs inside
`translate`, the one place where PeerSync errors become status codes. The `snapshotter` field of
every request names the proxy plugin and is ignored; keys are opaque strings. `Info.kind` is
always set (containerd reads UNKNOWN as committed). List streams its answer in batches so a
large store never becomes one huge message (at most `list_batch` Infos and, past the first,
`kernel.limits.LIST_MESSAGE_BYTES` per message). Commit's `parent` (field 5, containerd 2.x) is not
used: a commit keeps the parent its active snapshot was prepared on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from kernel import limits
from snapshotter.api import mount_pb2, snapshots_pb2, snapshots_pb2_grpc
from snapshotter.grpcerrors import translate
from snapshotter.snapshots import Info, Kind, Mount, Snapshotter

__all__ = ["SnapshotsServicer", "info_to_proto", "info_from_proto", "mounts_to_proto"]

LIST_BATCH = 100  # Info messages per List response, at most

_Context = grpc.aio.ServicerContext  # typed with each method's [request, response] messages


class SnapshotsServicer(snapshots_pb2_grpc.SnapshotsServicer):
    """The `containerd.services.snapshots.v1.Snapshots` service of the proxy plugin."""

    def __init__(self, snapshotter: Snapshotter, list_batch: int = LIST_BATCH) -> None:
        self.snapshotter = snapshotter
        self.list_batch = max(1, list_batch)

    async def Prepare(
        self,
        request: snapshots_pb2.PrepareSnapshotRequest,
        context: _Context[snapshots_pb2.PrepareSnapshotRequest, snapshots_pb2.PrepareSnapshotResponse],
    ) -> snapshots_pb2.PrepareSnapshotResponse:
        async with translate(context, "Prepare"):
            mounts = await self.snapshotter.prepare(request.key, request.parent, dict(request.labels))
            return snapshots_pb2.PrepareSnapshotResponse(mounts=mounts_to_proto(mounts))

    async def View(
        self,
        request: snapshots_pb2.ViewSnapshotRequest,
        context: _Context[snapshots_pb2.ViewSnapshotRequest, snapshots_pb2.ViewSnapshotResponse],
    ) -> snapshots_pb2.ViewSnapshotResponse:
        async with translate(context, "View"):
            mounts = await self.snapshotter.view(request.key, request.parent, dict(request.labels))
            return snapshots_pb2.ViewSnapshotResponse(mounts=mounts_to_proto(mounts))

    async def Mounts(
        self,
        request: snapshots_pb2.MountsRequest,
        context: _Context[snapshots_pb2.MountsRequest, snapshots_pb2.MountsResponse],
    ) -> snapshots_pb2.MountsResponse:
        async with translate(context, "Mounts"):
            mounts = await self.snapshotter.mounts(request.key)
            return snapshots_pb2.MountsResponse(mounts=mounts_to_proto(mounts))

    async def Commit(
        self,
        request: snapshots_pb2.CommitSnapshotRequest,
        context: _Context[snapshots_pb2.CommitSnapshotRequest, empty_pb2.Empty],
    ) -> empty_pb2.Empty:
        async with translate(context, "Commit"):
            await self.snapshotter.commit(request.name, request.key, dict(request.labels))
            return empty_pb2.Empty()

    async def Remove(
        self,
        request: snapshots_pb2.RemoveSnapshotRequest,
        context: _Context[snapshots_pb2.RemoveSnapshotRequest, empty_pb2.Empty],
    ) -> empty_pb2.Empty:
        async with translate(context, "Remove"):
            await self.snapshotter.remove(request.key)
            return empty_pb2.Empty()

    async def Stat(
        self,
        request: snapshots_pb2.StatSnapshotRequest,
        context: _Context[snapshots_pb2.StatSnapshotRequest, snapshots_pb2.StatSnapshotResponse],
    ) -> snapshots_pb2.StatSnapshotResponse:
        async with translate(context, "Stat"):
            info = await self.snapshotter.stat(request.key)
            return snapshots_pb2.StatSnapshotResponse(info=info_to_proto(info))

    async def Update(
        self,
        request: snapshots_pb2.UpdateSnapshotRequest,
        context: _Context[snapshots_pb2.UpdateSnapshotRequest, snapshots_pb2.UpdateSnapshotResponse],
    ) -> snapshots_pb2.UpdateSnapshotResponse:
        async with translate(context, "Update"):
            paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
            info = await self.snapshotter.update(info_from_proto(request.info), paths)
            return snapshots_pb2.UpdateSnapshotResponse(info=info_to_proto(info))

    async def List(
        self,
        request: snapshots_pb2.ListSnapshotsRequest,
        context: _Context[snapshots_pb2.ListSnapshotsRequest, snapshots_pb2.ListSnapshotsResponse],
    ) -> AsyncIterator[snapshots_pb2.ListSnapshotsResponse]:
        async with translate(context, "List"):
            infos = await self.snapshotter.walk(list(request.filters))
            batch: list[snapshots_pb2.Info] = []
            size = 0
            for info in infos:
                pb = info_to_proto(info)
                n = pb.ByteSize()
                if batch and (len(batch) >= self.list_batch or size + n > limits.LIST_MESSAGE_BYTES):
                    yield snapshots_pb2.ListSnapshotsResponse(info=batch)
                    batch, size = [], 0
                batch.append(pb)
                size += n
            if batch:
                yield snapshots_pb2.ListSnapshotsResponse(info=batch)

    async def Usage(
        self,
        request: snapshots_pb2.UsageRequest,
        context: _Context[snapshots_pb2.UsageRequest, snapshots_pb2.UsageResponse],
    ) -> snapshots_pb2.UsageResponse:
        async with translate(context, "Usage"):
            usage = await self.snapshotter.usage(request.key)
            return snapshots_pb2.UsageResponse(size=usage.size, inodes=usage.inodes)

    async def Cleanup(
        self,
        request: snapshots_pb2.CleanupRequest,
        context: _Context[snapshots_pb2.CleanupRequest, empty_pb2.Empty],
    ) -> empty_pb2.Empty:
        async with translate(context, "Cleanup"):
            await self.snapshotter.cleanup()
            return empty_pb2.Empty()


def mounts_to_proto(mounts: Iterable[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


def info_to_proto(info: Info) -> snapshots_pb2.Info:
    return snapshots_pb2.Info(
        name=info.name,
        parent=info.parent,
        kind=snapshots_pb2.Kind.ValueType(info.kind),
        created_at=_timestamp(info.created),
        updated_at=_timestamp(info.updated),
        labels=info.labels,
    )


def info_from_proto(message: snapshots_pb2.Info) -> Info:
    """An Info from the wire; only `name` and `labels` matter to Update, the rest is carried along."""
    return Info(
        name=message.name,
        parent=message.parent,
        kind=_kind(message.kind),
        created=message.created_at.ToDatetime(tzinfo=UTC),
        updated=message.updated_at.ToDatetime(tzinfo=UTC),
        labels=dict(message.labels),
    )


def _kind(value: int) -> Kind:
    try:
        return Kind(value)
    except ValueError:
        return Kind.UNKNOWN


def _timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp
