"""containerd's client-side unpacker, driven over containerd's own snapshots API: the Prepares that
`client.Pull(ctx, ref, containerd.WithPullUnpack, containerd.WithPullSnapshotter(NAME))` makes.

Why: that is how nerdctl pulls for a snapshotter it does not know, how Go programs pull, and how
containerd 1.7/2.x's unpacker prepares layers; unlike CRI it names each layer's snapshot by the
chain ID alone (`containerd.io/snapshot.ref`), no layer digest, no manifest. The tests drive it
through containerd (its metadata layer namespaces the keys and forwards only that label to the
proxy plugin, exactly as for the Go client) until the Go test client (testbed/go/pull) merges.

Per layer, as containerd 1.6's `unpacker.unpack` does: Stat(chain ID) (done if it exists);
Prepare(key "extract-<unique> <chain ID>", parent = the previous chain ID, labels
{snapshot.ref: chain ID}); AlreadyExists then Stat(chain ID) means the snapshotter provided the
layer. Any other answer (mounts to apply the layer into) is reported as "apply" and the snapshot
removed again: this driver applies nothing itself.
"""

from __future__ import annotations

import json
import secrets
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import grpc

from snapshotter.api import snapshots_pb2, snapshots_pb2_grpc
from snapshotter.remote import REF_LABEL, chain_ids

Metadata = tuple[tuple[str, str | bytes], ...]  # gRPC call metadata, as the stubs type it

PROVIDED = "provided"  # AlreadyExists: the snapshotter committed the layer itself
PRESENT = "present"  # the chain existed before this pull (containerd's Stat found it)
APPLY = "apply"  # the snapshotter handed back a snapshot for containerd to apply the layer into


def unpack_by_chain_ids(
    address: Path,
    namespace: str,
    snapshotter: str,
    diff_ids: Sequence[str],
    lease: str | None = None,
    timeout: float = 300.0,
) -> list[str]:
    """What became of each layer (PROVIDED, PRESENT or APPLY), bottom first. Stops at the first
    APPLY: containerd's unpacker would fetch and apply that layer before preparing the next."""
    pairs = [("containerd-namespace", namespace)] + ([("containerd-lease", lease)] if lease else [])
    metadata: Metadata = tuple((k, v) for k, v in pairs)
    outcome: list[str] = []
    with grpc.insecure_channel(f"unix://{address}") as channel:
        stub = snapshots_pb2_grpc.SnapshotsStub(channel)
        parent = ""
        for chain in chain_ids(diff_ids):
            if _exists(stub, snapshotter, chain, metadata, timeout):
                outcome.append(PRESENT)
                parent = chain
                continue
            key = f"extract-{secrets.token_hex(8)} {chain}"
            request = snapshots_pb2.PrepareSnapshotRequest(
                snapshotter=snapshotter, key=key, parent=parent, labels={REF_LABEL: chain}
            )
            try:
                stub.Prepare(request, metadata=metadata, timeout=timeout)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise
                if not _exists(stub, snapshotter, chain, metadata, timeout):
                    raise RuntimeError(f"AlreadyExists for {chain}, but no such snapshot") from exc
                outcome.append(PROVIDED)
                parent = chain
                continue
            remove = snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=key)
            stub.Remove(remove, metadata=metadata, timeout=timeout)
            outcome.append(APPLY)
            break
    return outcome


def _exists(
    stub: snapshots_pb2_grpc.SnapshotsStub,
    snapshotter: str,
    name: str,
    metadata: Metadata,
    timeout: float,
) -> bool:
    try:
        stub.Stat(snapshots_pb2.StatSnapshotRequest(snapshotter=snapshotter, key=name), metadata=metadata,
                  timeout=timeout)  # fmt: skip
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return False
        raise
    return True


MANIFEST_ACCEPT = (
    "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
)


def diff_ids_through_mirror(mirror: str, ref: str, timeout: float = 60.0) -> tuple[str, list[str]]:
    """What the client's resolver and config fetch learn, through the node's mirror (`host:port`,
    hosts.toml's first host): the image manifest, then its config's digest and diff IDs. The mirror
    sees the manifest as it does in any pull (and notes it in the daemon's chain index)."""
    registry, _, rest = ref.partition("/")
    repo, _, tag = rest.rpartition(":")
    base = f"http://{mirror}/v2/{repo}"
    request = urllib.request.Request(
        f"{base}/manifests/{tag}?ns={registry}", headers={"Accept": MANIFEST_ACCEPT}
    )
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        manifest = json.loads(resp.read())
    config_digest = str(manifest["config"]["digest"])
    with urllib.request.urlopen(f"{base}/blobs/{config_digest}?ns={registry}", timeout=timeout) as resp:
        config = json.loads(resp.read())
    return config_digest, list(config["rootfs"]["diff_ids"])
