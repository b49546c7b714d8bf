"""The gRPC server containerd dials: both proxy-plugin services on one unix socket."""

from __future__ import annotations

import os
import socket as socketlib
from pathlib import Path

import grpc

from kernel import limits
from kernel.config import GrpcConfig
from kernel.errors import FailedPrecondition
from snapshotter import h2server
from snapshotter.api import content_pb2_grpc, snapshots_pb2_grpc
from snapshotter.content import ContentStore
from snapshotter.grpc_content import ContentServicer
from snapshotter.grpc_snapshots import SnapshotsServicer
from snapshotter.preparer import ChainPreparer
from snapshotter.snapshots import Snapshotter


def build_server(
    socket: Path,
    snapshotter: Snapshotter,
    content: ContentStore,
    cfg: GrpcConfig,
    listener: socketlib.socket | None = None,
    preparer: ChainPreparer | None = None,
) -> grpc.aio.Server:
    """An unstarted asyncio gRPC server bound to `socket`, or serving `listener` (a listening
    socket inherited from systemd; only our own HTTP/2 server can take one)."""
    options = [
        ("grpc.max_receive_message_length", cfg.max_receive_message_size),
        # What containerd's proxy client accepts (16 MiB): Read answers carry at most
        # read_message_size of data anyway, and a ListStatuses answer holds every ingest at once.
        ("grpc.max_send_message_length", max(limits.GRPC_MAX_SEND, cfg.read_message_size + 64 * 1024)),
    ]
    server = new_server(options, cfg.implementation)
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(SnapshotsServicer(snapshotter), server)
    servicer = ContentServicer(content, cfg.read_message_size, preparer)
    content_pb2_grpc.add_ContentServicer_to_server(servicer, server)
    if listener is None:
        server.add_insecure_port(f"unix:{socket}")
    elif isinstance(server, h2server.H2Server):
        server.add_socket(listener)
    else:
        raise FailedPrecondition('socket activation needs grpc.implementation = "h2"')
    return server


def new_server(options: list[tuple[str, int]], implementation: str = "h2") -> grpc.aio.Server:
    """An empty server: our HTTP/2 gRPC server (default; ~5x less CPU per small RPC, see
    bench/rpc_overhead.py) or grpcio's asyncio server. Both take the same servicers."""
    if implementation == "grpcio":
        return grpc.aio.server(options=options)
    # H2Server implements grpc.aio.Server's interface without deriving from it; the generated
    # add_*Servicer_to_server functions are typed to take only grpcio's servers.
    return h2server.server(options)  # type: ignore[return-value]


def restrict_socket(socket: Path) -> None:
    """containerd runs as root; nobody else needs to reach the plugin."""
    os.chmod(socket, 0o660)
