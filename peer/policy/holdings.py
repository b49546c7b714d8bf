"""What other nodes hold of a blob, as this node last heard it (`POST /have`, see `peer.exchange`).

A `BlobView` is a frozen snapshot of one peer's holdings of one blob: the presence bitmap, whether
the peer holds the blob whole (digest-verified), and the chunks it announced it is fetching from
the origin right now. Views only ever describe the past: a peer may hold more by now, never less
(holdings only grow until a blob is complete), which is why a stale view is still safe to plan with.

`usable_views` is the filter every decision starts from: a peer we dropped (it served bad chunks)
or suspended (it stopped answering) is not asked for chunks, not counted among the nodes filling a
blob, and does not own stripes; a peer that reports a different blob size describes some other
object under the same digest (or lies), and is ignored for this blob.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from peer.policy.peerstats import PeerStats, stat_of


@dataclass(frozen=True)
class BlobView:
    """What one peer holds of one blob."""

    digest: str
    size: int
    chunk_size: int
    complete: bool
    have: bytes
    fetching: frozenset[int] = frozenset()  # chunks the peer is fetching from the origin right now

    def count(self) -> int:
        """How many chunks the peer holds (for spotting progress); -1 for a complete blob, whose
        holdings can no longer grow."""
        return -1 if self.complete else sum(bin(b).count("1") for b in self.have)

    def has(self, index: int) -> bool:
        """Whether the peer holds chunk `index` (bit `index % 8` of byte `index // 8`, LSB first)."""
        return self.complete or bool(index // 8 < len(self.have) and self.have[index // 8] >> (index % 8) & 1)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> BlobView:
        """A view from its `/have` JSON form (the wire format is `peer.exchange`'s). `fetching`
        (the chunks the peer announced it is fetching from the origin) is optional: an older
        peer does not send it."""
        return cls(
            obj["digest"],
            int(obj["size"]),
            int(obj["chunk_size"]),
            bool(obj["complete"]),
            base64.b64decode(obj["have"]),
            frozenset(int(i) for i in obj.get("fetching") or ()),
        )


def usable_views(
    views: Mapping[str, BlobView], stats: Mapping[str, PeerStats], now: float, size: int
) -> dict[str, BlobView]:
    """The views worth planning with: of peers not dropped at `now`, for a blob of `size` bytes.

    A peer without stats has never failed, so it is usable. Order is kept (it is the order peers
    are offered to `choice.best_peer` in)."""
    return {p: v for p, v in views.items() if stat_of(stats, p).usable(now) and v.size == size}


def holders(views: Mapping[str, BlobView], chunks: Iterable[int], chunk_size: int) -> dict[int, list[str]]:
    """For each chunk, the peers that hold it, cut with our `chunk_size` (a peer that cut the blob
    differently cannot serve our chunks as ranges of its own)."""
    # each bitmap read once as an int (bit i = chunk i, as `BlobView.has`): this runs every
    # planning round over every candidate and missing chunk, the simulator's hottest loop
    full = -1
    same = [
        (p, full if v.complete else int.from_bytes(v.have, "little"))
        for p, v in views.items()
        if v.chunk_size == chunk_size
    ]
    return {i: [p for p, bits in same if bits >> i & 1] for i in chunks}


def filling(views: Mapping[str, BlobView]) -> frozenset[str]:
    """The peers whose copy of the blob is still partial (what `choice.Picker` caps: their
    chunks will be at more members soon)."""
    return frozenset(p for p, v in views.items() if not v.complete)
