"""Image references and what an image is made of: the operator's names for images (`peersync
prefetch`, `peersync seed export`) turned into the manifests and blobs to fetch.

    parse_ref("busybox")                      -> docker.io/library/busybox:latest
    parse_ref("127.0.0.1:5000/team/app:v2")  -> registry 127.0.0.1:5000, repository team/app, tag v2
    parse_ref("ghcr.io/x/y@sha256:...")      -> by digest

`walk(resolve, ref)` follows an index to the manifest of this machine's platform (linux and its
architecture, as containerd picks by default) and returns every manifest on the way plus the
config and layers, each with the size the manifest that names it declares: never another size.
`resolve` is who answers for manifests (the mirror, which keeps and catalogues them, or the
origin directly), so one walk serves the daemon and an offline export alike.
"""

from __future__ import annotations

import json
import platform
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from kernel.errors import InvalidArgument, NotFound

# (body, media type, digest) of a manifest or index of registry/repository at reference
Resolver = Callable[[str, str, str], Awaitable[tuple[bytes, str, str]]]

DEFAULT_REGISTRY = "docker.io"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm"}


@dataclass(frozen=True)
class ImageRef:
    """A parsed image reference: where it lives and the tag or digest asked for."""

    registry: str
    repository: str
    reference: str  # a tag or a digest

    def __str__(self) -> str:
        sep = "@" if _DIGEST.fullmatch(self.reference) else ":"
        return f"{self.registry}/{self.repository}{sep}{self.reference}"


@dataclass(frozen=True)
class Blob:
    """One blob of an image: its digest, the size its manifest declares, its media type."""

    digest: str
    size: int
    media_type: str


@dataclass
class Image:
    """What `walk` found: the manifests on the way (index first) and the config and layers."""

    ref: ImageRef
    digest: str  # of the top manifest or index the reference names
    manifests: list[tuple[Blob, bytes]] = field(default_factory=list)
    blobs: list[Blob] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Bytes of everything the image is made of."""
        return sum(b.size for b, _ in self.manifests) + sum(b.size for b in self.blobs)


def parse_ref(text: str, default_registry: str = DEFAULT_REGISTRY) -> ImageRef:
    """Docker's reference rules: the first component is a registry when it has a dot or a colon
    or is "localhost"; Docker Hub's one-component names are under library/."""
    text = text.strip()
    name, digest = text.split("@", 1) if "@" in text else (text, "")
    if digest and not _DIGEST.fullmatch(digest):
        raise InvalidArgument(f"image {text!r}: not a sha256 digest after '@'")
    tag = ""
    slash = name.rfind("/")
    if name.rfind(":") > slash:
        name, tag = name.rsplit(":", 1)
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, rest
    else:
        registry, repository = default_registry, name
    if registry == "docker.io" and "/" not in repository:
        repository = f"library/{repository}"
    if not repository or not re.fullmatch(r"[a-z0-9]+(?:[._/-][a-z0-9]+)*", repository):
        raise InvalidArgument(f"image {text!r}: not a valid repository name")
    return ImageRef(registry, repository, digest or tag or "latest")


def host_platform() -> tuple[str, str]:
    """("linux", architecture) as OCI names them."""
    machine = platform.machine().lower()
    return "linux", _ARCH.get(machine, machine)


async def walk(resolve: Resolver, ref: ImageRef, want: tuple[str, str] | None = None) -> Image:
    """The manifests, config and layers of `ref` for platform `want` (default: this host's)."""
    os_, arch = want or host_platform()
    body, media_type, digest = await resolve(ref.registry, ref.repository, ref.reference)
    image = Image(ref, digest)
    image.manifests.append((Blob(digest, len(body), media_type), body))
    doc = _json(body, digest)
    for _ in range(4):  # an index of indexes is allowed; a loop of them is not followed forever
        children = doc.get("manifests")
        if not isinstance(children, list):
            break
        child = _pick(children, os_, arch, digest)
        body, media_type, digest = await resolve(ref.registry, ref.repository, child.digest)
        if len(body) != child.size:
            raise InvalidArgument(f"manifest {digest}: {len(body)} bytes, its index says {child.size}")
        image.manifests.append((Blob(digest, child.size, media_type or child.media_type), body))
        doc = _json(body, digest)
    config, layers = doc.get("config"), doc.get("layers")
    descs = [config] if isinstance(config, dict) else []
    descs += [d for d in layers if isinstance(d, dict)] if isinstance(layers, list) else []
    image.blobs = [_blob(d, digest) for d in descs]
    return image


def _json(body: bytes, digest: str) -> dict[str, object]:
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise InvalidArgument(f"manifest {digest}: not JSON") from exc
    if not isinstance(doc, dict):
        raise InvalidArgument(f"manifest {digest}: not a JSON object")
    return doc


def _blob(desc: dict[str, object], where: str) -> Blob:
    digest, size, media = desc.get("digest"), desc.get("size"), desc.get("mediaType", "")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest) or not isinstance(size, int) or size < 0:
        raise InvalidArgument(f"manifest {where}: a descriptor without a sha256 digest and size")
    return Blob(digest, size, media if isinstance(media, str) else "")


def _pick(children: list[object], os_: str, arch: str, where: str) -> Blob:
    """The index entry for os/arch (a single entry without a platform is taken as it is)."""
    entries = [c for c in children if isinstance(c, dict)]
    for entry in entries:
        plat = entry.get("platform")
        if isinstance(plat, dict) and plat.get("os") == os_ and plat.get("architecture") == arch:
            return _blob(entry, where)
    if len(entries) == 1 and not isinstance(entries[0].get("platform"), dict):
        return _blob(entries[0], where)
    raise NotFound(f"index {where}: no manifest for {os_}/{arch}")
