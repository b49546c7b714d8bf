"""Which peers a node asks directly when there is no tracker (docs/control-plane.md, "No tracker").

With a tracker, a node learns holders from its candidate sets and polls nobody. Without one
(between a tracker's death and the next claim, or on a site where no node may be tracker), it
falls back to asking peers' `/have` itself; asking every member would make each node's control
traffic grow with the site, so it asks at most `fanout` (8) of them.

Which ones: the first `k` by rendezvous hashing of (this node, peer). The choice is stable while
the member list does not change (views accumulate instead of being thrown away each round, and the
striping among the nodes each one sees stays put), different nodes pick different subsets (so no
peer is everyone's), and a member joining or leaving changes only the choices it enters or leaves.
A site of at most `k + 1` nodes behaves exactly as before: everyone asks everyone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def fanout(peers: Sequence[str], me: str, k: int) -> list[str]:
    """At most `k` of `peers` for node `me` to poll, in `peers`' order (see the module docstring)."""
    if len(peers) <= k:
        return list(peers)
    ranked = sorted(peers, key=lambda p: hashlib.sha256(f"{me}\n{p}".encode()).digest())
    chosen = set(ranked[: max(0, k)])
    return [p for p in peers if p in chosen]
