"""The chain-ID index (`kernel.store.chains`): what a chain ID is made of, from manifests and configs."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kernel.store.chains import ChainIndex, PendingImage, chain_ids, parse_index, parse_manifest
from kernel.store.meta import Meta

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def fake(name: str) -> str:
    return sha(name.encode())


def image(
    diff_ids: list[str], layers: list[str] | None = None, media_type: str = GZIP
) -> tuple[bytes, bytes]:
    """(manifest body, config body) of an image whose layers are `layers` (fake digests by default)."""
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    )
    config_body = config.encode()
    blobs = layers or [fake(f"blob of {d}") for d in diff_ids]
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config_body),
                   "size": len(config_body)},
        "layers": [{"mediaType": media_type, "digest": b, "size": 1000 + i} for i, b in enumerate(blobs)],
    }  # fmt: skip
    return json.dumps(manifest).encode(), config_body


@pytest.fixture
def meta(tmp_path: Path) -> Iterator[Meta]:
    m = Meta(tmp_path)
    yield m
    m.close()


DIFFS = [fake("diff a"), fake("diff b"), fake("diff c")]


def test_a_manifest_and_its_config_give_every_layer_its_chain_id_and_parent(meta: Meta) -> None:
    index = ChainIndex(meta)
    manifest, config = image(DIFFS)
    assert index.note_manifest(sha(manifest), manifest) == sha(config)
    assert index.pending() == [PendingImage(sha(manifest), sha(config))]
    assert index.lookup(chain_ids(DIFFS)[1]) == []  # no chain IDs before the config is read
    layers = index.resolve(sha(manifest), config)
    chains = chain_ids(DIFFS)
    assert [layer.chain for layer in layers] == chains
    assert [layer.parent for layer in layers] == ["", chains[0], chains[1]]
    assert [layer.diff_id for layer in layers] == DIFFS
    [middle] = index.lookup(chains[1])
    assert middle == layers[1]
    assert middle.digest == json.loads(manifest)["layers"][1]["digest"]
    assert (middle.media_type, middle.size, middle.index, middle.manifest) == (GZIP, 1001, 1, sha(manifest))
    assert index.pending() == []
    assert index.image(sha(manifest)) == layers


def test_the_index_survives_a_restart(tmp_path: Path) -> None:
    manifest, config = image(DIFFS)
    meta = Meta(tmp_path)
    ChainIndex(meta).note_manifest(sha(manifest), manifest)
    ChainIndex(meta).resolve(sha(manifest), config)
    meta.close()
    meta = Meta(tmp_path)
    try:
        assert [x.diff_id for x in ChainIndex(meta).lookup(chain_ids(DIFFS)[2])] == [DIFFS[2]]
    finally:
        meta.close()


def test_a_chain_id_reachable_through_two_blobs_lists_both(meta: Meta) -> None:
    """The same tar compressed twice (gzip in one image, zstd in another) is the same chain."""
    index = ChainIndex(meta)
    for media_type in (GZIP, ZSTD):
        blobs = [fake(f"{media_type} {d}") for d in DIFFS]
        manifest, config = image(DIFFS, blobs, media_type)
        index.note_manifest(sha(manifest), manifest)
        index.resolve(sha(manifest), config)
    found = index.lookup(chain_ids(DIFFS)[0])
    assert sorted(x.media_type for x in found) == sorted([GZIP, ZSTD])
    assert len({x.digest for x in found}) == 2


def test_a_body_that_is_not_what_its_digest_says_is_not_noted(meta: Meta) -> None:
    index = ChainIndex(meta)
    manifest, config = image(DIFFS)
    other, _ = image([fake("x")])
    assert index.note_manifest(sha(other), manifest) is None
    assert index.pending() == []


def test_a_config_that_is_not_the_manifests_or_does_not_fit_it_resolves_nothing(meta: Meta) -> None:
    index = ChainIndex(meta)
    manifest, config = image(DIFFS)
    index.note_manifest(sha(manifest), manifest)
    _, stranger = image([fake("x"), fake("y"), fake("z")])
    assert index.resolve(sha(manifest), stranger) == []  # not the config the manifest names
    # a config with the right digest but fewer diff IDs than the manifest has layers
    short_manifest, short_config = image(DIFFS[:2])
    doc = json.loads(short_manifest)
    doc["layers"].append({"mediaType": GZIP, "digest": fake("extra"), "size": 5})
    lying = json.dumps(doc).encode()
    index.note_manifest(sha(lying), lying)
    assert index.resolve(sha(lying), short_config) == []
    assert index.lookup(chain_ids(DIFFS)[0]) == []


@pytest.mark.parametrize(
    "doc",
    [
        {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": []},
        {"schemaVersion": 2, "config": {"digest": "sha256:short"}, "layers": []},
        {"schemaVersion": 2, "config": {"digest": fake("c")}, "layers": [{"digest": fake("l"), "size": -1}]},
        {
            "schemaVersion": 2,
            "config": {"digest": fake("c")},
            "layers": [{"digest": fake("l"), "size": True}],
        },
        {"schemaVersion": 2, "config": {"digest": fake("c")}, "layers": "no"},
        ["not", "a", "manifest"],
    ],
)
def test_what_is_not_an_image_manifest_is_not_parsed(doc: Any) -> None:
    assert parse_manifest(json.dumps(doc).encode()) is None


def test_the_most_recently_noted_manifest_is_known(meta: Meta) -> None:
    index = ChainIndex(meta)
    first, _ = image(DIFFS)
    second, _ = image(DIFFS[:2])
    index.note_manifest(sha(first), first)
    index.note_manifest(sha(second), second)
    assert index.seen_ns(sha(second)) >= index.seen_ns(sha(first)) > 0
    index.note_manifest(sha(first), first)  # served again: the newest now
    assert index.seen_ns(sha(first)) >= index.seen_ns(sha(second))
    assert index.seen_ns(fake("never")) == 0
    index.forget(sha(first))
    assert [p.manifest for p in index.pending()] == [sha(second)]


def test_images_with_a_layer_are_every_noted_manifest_listing_it_resolved_or_not(meta: Meta) -> None:
    index = ChainIndex(meta)
    shared = fake("shared base layer")
    first, first_config = image(DIFFS[:2], [shared, fake("app one")])
    second, second_config = image(DIFFS[:2], [shared, fake("app two")])
    index.note_manifest(sha(first), first)
    index.resolve(sha(first), first_config)
    index.note_manifest(sha(second), second)  # its config not read yet
    found = {(m, c) for m, c, _ in index.images_with(shared)}
    assert found == {(sha(first), sha(first_config)), (sha(second), sha(second_config))}
    assert [(m, c) for m, c, _ in index.images_with(fake("app two"))] == [(sha(second), sha(second_config))]
    assert index.images_with(fake("no such layer")) == []
    seen = {m: ns for m, _, ns in index.images_with(shared)}
    assert seen[sha(second)] >= seen[sha(first)] > 0  # noted later


def test_an_index_lists_its_manifests_and_nothing_else_parses_as_one() -> None:
    a, b = fake("manifest a"), fake("manifest b")
    index = {"schemaVersion": 2, "manifests": [{"digest": a, "size": 1}, {"digest": b, "size": 2}]}
    assert parse_index(json.dumps(index).encode()) == [a, b]
    manifest, _ = image(DIFFS)
    assert parse_index(manifest) is None
    assert parse_index(b"not json") is None
    assert parse_index(json.dumps({"manifests": ["x"]}).encode()) is None
