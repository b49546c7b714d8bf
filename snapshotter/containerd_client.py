"""containerd's own API, called by the daemon as one of containerd's clients: snapshots and leases.

Why the daemon calls containerd at all: containerd 1.6's `ctr images pull` unpacks an image with
`rootfs.ApplyLayerWithOpts`, which first asks containerd's *metadata* for a snapshot named by the
layer's chain ID and applies the layer itself (reading the blob back through one 32 KiB Read RPC
at a time) only when there is none. The metadata learns of a snapshot only through its own API,
never from the snapshotter, so for a layer the daemon unpacked to count there, the daemon must
prepare the chain through containerd exactly as containerd's Go unpacker does:

    Prepare(key = "extract-<unique> <chain ID>", parent = <parent chain ID>,
            labels = {containerd.io/snapshot.ref: <chain ID>})

which containerd forwards to our snapshotter; it unpacks (or takes what it unpacked ahead),
commits the chain and answers AlreadyExists, and containerd's metadata then records the committed
snapshot under the chain ID (metadata/snapshot.go, the remote-snapshot branch of createSnapshot).
`snapshotter.preparer` decides when.

The Prepares run under a lease of ours with an expiry (`containerd.io/gc.expire`), so containerd's
GC keeps the new snapshots until the client's unpack labels the image config with the top chain
(`containerd.io/gc.ref.snapshot.<snapshotter>`); the preparer deletes the lease once it sees that
label (`content_labels`), and containerd collects the snapshots with the lease if no client ever
labels them.

Calls use grpcio's blocking client in a worker thread: a handful per image, and it works under
any event loop (uvloop included). Every call carries the namespace (`containerd-namespace`) and,
for the Prepares, the lease (`containerd-lease`), as containerd's Go client sends them.
"""

from __future__ import annotations

import asyncio
import datetime
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog

from kernel.errors import Unavailable
from snapshotter.api import (
    content_pb2,
    content_pb2_grpc,
    images_pb2,
    images_pb2_grpc,
    leases_pb2,
    leases_pb2_grpc,
    namespaces_pb2,
    namespaces_pb2_grpc,
    snapshots_pb2,
    snapshots_pb2_grpc,
)
from snapshotter.remote import REF_LABEL

log = structlog.get_logger(__name__)

EXPIRE_LABEL = "containerd.io/gc.expire"
SNAPSHOT_REF_LABEL = "containerd.io/gc.ref.snapshot.{name}"  # on an image config: its unpacked top chain
NAMESPACE_HEADER = "containerd-namespace"
LEASE_HEADER = "containerd-lease"
LEASE_PREFIX = "peersync-prepare-"
UNPACK_KEY = "extract-{unique} {chain}"  # containerd's snapshots.UnpackKeyFormat


@dataclass(frozen=True)
class ImageRecord:
    """An image in containerd's metadata: its namespace, target and when it last changed."""

    namespace: str
    target: str
    media_type: str
    updated_ns: int


class ContainerdClient:
    """The snapshots and leases services of the containerd at `address`, for snapshotter `name`
    (the proxy plugin's name in containerd's config). Each call waits at most `timeout` seconds;
    a Prepare waits as long as our snapshotter takes to unpack the layer, so its own bound is
    `prepare_timeout`."""

    def __init__(
        self, address: Path, name: str, timeout: float = 30.0, prepare_timeout: float = 3600.0
    ) -> None:
        self.address = address
        self.name = name
        self.timeout = timeout
        self.prepare_timeout = prepare_timeout
        self._channel: grpc.Channel | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None

    async def create_lease(self, namespace: str, ttl: float) -> str:
        """A new lease in `namespace` that containerd's GC drops `ttl` seconds from now."""
        expire = datetime.datetime.fromtimestamp(time.time() + ttl, datetime.UTC)
        lease_id = LEASE_PREFIX + secrets.token_hex(8)
        request = leases_pb2.CreateRequest(
            id=lease_id, labels={EXPIRE_LABEL: expire.strftime("%Y-%m-%dT%H:%M:%SZ")}
        )
        await self._call(self._leases().Create, request, namespace)
        return lease_id

    async def images(self, target: str = "", media_types: tuple[str, ...] = ()) -> list[ImageRecord]:
        """Every namespace's images whose target is digest `target`, or whose target is of one of
        `media_types` (both empty: all images)."""
        listed = await self._call(self._namespaces().List, namespaces_pb2.ListNamespacesRequest(), "")
        assert isinstance(listed, namespaces_pb2.ListNamespacesResponse)
        filters = [f"target.digest=={target}"] if target else []
        filters += [f'target.mediatype=="{t}"' for t in media_types]
        out = []
        for ns in listed.namespaces:
            answer = await self._call(
                self._images().List, images_pb2.ListImagesRequest(filters=filters), ns.name
            )
            assert isinstance(answer, images_pb2.ListImagesResponse)
            for image in answer.images:
                updated = image.updated_at.seconds * 1_000_000_000 + image.updated_at.nanos
                out.append(ImageRecord(ns.name, image.target.digest, image.target.media_type, updated))
        return out

    async def delete_lease(self, namespace: str, lease: str) -> None:
        """Delete our lease (what it kept is GC's again unless something else references it)."""
        await self._call(self._leases().Delete, leases_pb2.DeleteRequest(id=lease), namespace)

    async def content_labels(self, namespace: str, digest: str) -> dict[str, str]:
        """The labels containerd's metadata holds for blob `digest` in `namespace` ({} if none)."""
        try:
            answer = await self._call(self._content().Info, content_pb2.InfoRequest(digest=digest), namespace)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return {}
            raise
        assert isinstance(answer, content_pb2.InfoResponse)
        return dict(answer.info.labels)

    async def exists(self, namespace: str, name: str) -> bool:
        """Whether containerd's metadata has snapshot `name` (a chain ID) in `namespace`."""
        request = snapshots_pb2.StatSnapshotRequest(snapshotter=self.name, key=name)
        try:
            await self._call(self._snapshots().Stat, request, namespace)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        return True

    async def prepare_chain(self, namespace: str, lease: str, chain: str, parent: str) -> bool:
        """Ask containerd for committed snapshot `chain` on `parent` ("" for a first layer), as its
        unpacker does. True if it exists now (our snapshotter provided it, or somebody committed
        it meanwhile); False if containerd prepared an active snapshot instead (our snapshotter
        could not provide the layer), which is removed again so nothing is left behind."""
        key = UNPACK_KEY.format(unique=f"{time.time_ns()}-{secrets.token_hex(4)}", chain=chain)
        request = snapshots_pb2.PrepareSnapshotRequest(
            snapshotter=self.name, key=key, parent=parent, labels={REF_LABEL: chain}
        )
        try:
            await self._call(self._snapshots().Prepare, request, namespace, lease, self.prepare_timeout)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            return await self.exists(namespace, chain)
        remove = snapshots_pb2.RemoveSnapshotRequest(snapshotter=self.name, key=key)
        try:
            await self._call(self._snapshots().Remove, remove, namespace, lease)
        except grpc.RpcError as exc:  # containerd's GC takes it with the lease
            log.warning("could not remove a prepared snapshot", key=key, error=exc.code().name)
        return False

    # --- plumbing

    def _connect(self) -> grpc.Channel:
        with self._lock:
            if self._channel is None:
                self._channel = grpc.insecure_channel(f"unix:{self.address}")
            return self._channel

    def _snapshots(self) -> snapshots_pb2_grpc.SnapshotsStub:
        return snapshots_pb2_grpc.SnapshotsStub(self._connect())

    def _leases(self) -> leases_pb2_grpc.LeasesStub:
        return leases_pb2_grpc.LeasesStub(self._connect())

    def _content(self) -> content_pb2_grpc.ContentStub:
        return content_pb2_grpc.ContentStub(self._connect())

    def _images(self) -> images_pb2_grpc.ImagesStub:
        return images_pb2_grpc.ImagesStub(self._connect())

    def _namespaces(self) -> namespaces_pb2_grpc.NamespacesStub:
        return namespaces_pb2_grpc.NamespacesStub(self._connect())

    async def _call(
        self, method: object, request: object, namespace: str, lease: str = "", timeout: float | None = None
    ) -> object:
        metadata = [(NAMESPACE_HEADER, namespace)] if namespace else []
        metadata += [(LEASE_HEADER, lease)] if lease else []
        wait = self.timeout if timeout is None else timeout

        def call() -> object:
            return method(request, timeout=wait, metadata=metadata)  # type: ignore[operator]

        try:
            return await asyncio.to_thread(call)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(f"containerd at {self.address}: {exc.details()}") from exc
            raise


__all__ = [
    "ContainerdClient", "ImageRecord", "LEASE_PREFIX", "NAMESPACE_HEADER",
    "SNAPSHOT_REF_LABEL", "UNPACK_KEY",
]  # fmt: skip
