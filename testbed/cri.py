"""Pulling images the way kubelet does: through containerd's CRI plugin (`runtime.v1.ImageService`).

`ctr images pull` fetches every blob first and unpacks afterwards, and never tells the snapshotter
which layer a snapshot is for. The CRI plugin (what kubelet, k3s and every Kubernetes edge node use)
pulls with containerd's unpacker instead: layers are fetched concurrently and each is unpacked as
soon as it and its parents are in, and with `disable_snapshot_annotations = false` every Prepare
carries the layer's digest and the image reference as `containerd.io/snapshot/cri.*` labels, which
lets a snapshotter provide the layer itself. Images pulled this way live in the `k8s.io` namespace.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from snapshotter.api import cri_pb2, cri_pb2_grpc

if TYPE_CHECKING:
    from testbed.containerd import Containerd

CRI_PLUGIN = "io.containerd.grpc.v1.cri"
CRI_NAMESPACE = "k8s.io"


def cri_config(snapshotter: str, hosts_dir: Path, base: Path, max_downloads: int = 3) -> dict[str, Any]:
    """The CRI plugin section for a private containerd: registry hosts from `hosts_dir`, no TCP.

    `base` receives the (empty) CNI dirs: image pulls need no network plugin, and pointing CNI at
    private dirs keeps the plugin off the machine's /etc/cni and /opt/cni.
    """
    return {
        "plugins": {
            CRI_PLUGIN: {
                "disable_tcp_service": True,
                "stream_server_address": "127.0.0.1",
                "stream_server_port": "0",
                "max_concurrent_downloads": max_downloads,
                "containerd": {"snapshotter": snapshotter, "disable_snapshot_annotations": False},
                "cni": {"bin_dir": str(base / "cni-bin"), "conf_dir": str(base / "cni-conf")},
                "registry": {"config_path": str(hosts_dir)},
            }
        }
    }


class CriClient:
    """A blocking `runtime.v1.ImageService` client on containerd's socket."""

    def __init__(self, address: Path) -> None:
        self._channel = grpc.insecure_channel(f"unix://{address}")
        self._images = cri_pb2_grpc.ImageServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CriClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pull(self, ref: str, timeout: float = 600.0, user: str | None = None) -> str:
        """Pull and unpack `ref` with the configured snapshotter; return the image ID (config digest)."""
        auth = None
        if user:
            name, _, password = user.partition(":")
            auth = cri_pb2.AuthConfig(username=name, password=password)
        request = cri_pb2.PullImageRequest(image=cri_pb2.ImageSpec(image=ref), auth=auth)
        return self._images.PullImage(request, timeout=timeout).image_ref

    def status(self, ref: str, timeout: float = 30.0) -> str | None:
        """The image ID if `ref` is present, else None."""
        request = cri_pb2.ImageStatusRequest(image=cri_pb2.ImageSpec(image=ref))
        response = self._images.ImageStatus(request, timeout=timeout)
        return response.image.id if response.HasField("image") else None

    def remove(self, ref: str, timeout: float = 60.0) -> None:
        """Remove the image (all its references); a missing image is not an error (as in CRI)."""
        request = cri_pb2.RemoveImageRequest(image=cri_pb2.ImageSpec(image=ref))
        self._images.RemoveImage(request, timeout=timeout)


def cri_pull(ctrd: Containerd, ref: str, timeout: float = 600.0) -> str:
    """Pull `ref` through `ctrd`'s CRI plugin, as kubelet does; the image ID."""
    with CriClient(ctrd.address) as cri:
        return cri.pull(ref, timeout=timeout)


def cri_remove(ctrd: Containerd, ref: str) -> None:
    """CRI RemoveImage, then a GC pass that frees the image's content and snapshots."""
    with CriClient(ctrd.address) as cri:
        cri.remove(ref)
    ctrd.gc()
