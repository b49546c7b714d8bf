"""peer.images: Docker's reference rules, and the walk from a tag to the blobs of this
platform's manifest with the sizes the manifests declare."""

from __future__ import annotations

import hashlib
import json

import pytest

from kernel.errors import InvalidArgument, NotFound
from peer.images import ImageRef, parse_ref, walk

D = "sha256:" + "a" * 64


@pytest.mark.parametrize(("text", "want"), [
    ("busybox", ImageRef("docker.io", "library/busybox", "latest")),
    ("busybox:1.36", ImageRef("docker.io", "library/busybox", "1.36")),
    ("team/app", ImageRef("docker.io", "team/app", "latest")),
    ("127.0.0.1:5000/team/app:v2", ImageRef("127.0.0.1:5000", "team/app", "v2")),
    ("localhost/app", ImageRef("localhost", "app", "latest")),
    (f"ghcr.io/x/y@{D}", ImageRef("ghcr.io", "x/y", D)),
    (f"ghcr.io/x/y:tag@{D}", ImageRef("ghcr.io", "x/y", D)),
])
def test_parse_ref(text: str, want: ImageRef) -> None:
    assert parse_ref(text) == want


def test_parse_ref_round_trips_and_refuses_nonsense() -> None:
    assert str(parse_ref("127.0.0.1:5000/a/b:v")) == "127.0.0.1:5000/a/b:v"
    assert str(parse_ref(f"r.io/a@{D}")) == f"r.io/a@{D}"
    for bad in ("r.io/a@sha256:xyz", "r.io/UPPER", ""):
        with pytest.raises(InvalidArgument):
            parse_ref(bad)


def doc(obj: object) -> tuple[bytes, str]:
    body = json.dumps(obj).encode()
    return body, "sha256:" + hashlib.sha256(body).hexdigest()


def blob(n: int) -> dict[str, object]:
    return {"mediaType": "application/octet-stream", "digest": "sha256:" + f"{n:064x}", "size": 100 + n}


async def test_walk_follows_the_index_to_this_platform() -> None:
    amd, amd_d = doc({"config": blob(1), "layers": [blob(2), blob(3)]})
    arm, arm_d = doc({"config": blob(4), "layers": [blob(5)]})
    index, index_d = doc({"manifests": [
        {"digest": arm_d, "size": len(arm), "platform": {"os": "linux", "architecture": "arm64"}},
        {"digest": amd_d, "size": len(amd), "platform": {"os": "linux", "architecture": "amd64"}},
    ]})
    docs = {"v1": (index, index_d), index_d: (index, index_d), amd_d: (amd, amd_d), arm_d: (arm, arm_d)}
    asked = []

    async def resolve(registry: str, repo: str, ref: str) -> tuple[bytes, str, str]:
        asked.append((registry, repo, ref))
        body, digest = docs[ref]
        return body, "application/json", digest

    image = await walk(resolve, parse_ref("r.io/a:v1"), want=("linux", "amd64"))
    assert image.digest == index_d
    assert [b.digest for b, _ in image.manifests] == [index_d, amd_d]
    assert [b.digest for b in image.blobs] == [blob(n)["digest"] for n in (1, 2, 3)]
    assert image.size == len(index) + len(amd) + 101 + 102 + 103
    assert asked == [("r.io", "a", "v1"), ("r.io", "a", amd_d)]
    with pytest.raises(NotFound, match="linux/s390x"):
        await walk(resolve, parse_ref("r.io/a:v1"), want=("linux", "s390x"))
