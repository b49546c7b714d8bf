"""Which peers a node asks directly when there is no tracker (docs/control-plane.md, "No tracker").

With a tracker, a node learns holders from its candidate sets and polls nobody. Without one
(between a tracker's death and the next claim, or on a site where no node may be tracker), it
falls back to asking peers' `/have` itself and striping the origin work among the nodes it sees
filling a blob (`striping`). Asking every member would make each node's control traffic grow with
the site, so it asks at most `k` (`fanout`, 8) of them.

Which ones: the site's members (the same list on every node) are sorted and dealt into the fewest
*groups* of at most `k + 1` nodes, round-robin; a node asks the other members of its group. The
groups are cliques: every member of a group sees the same members filling a blob, so they agree
on every stripe's owner and the group fetches each chunk from the origin once, without holes
that wait for a stall timeout. A random choice of `k` per node (tried first: rendezvous hashing)
gives every node a different view of who is filling the blob; owners then disagree, and on a
32-node site the uplink carried 7.4x the image (bench/RESULTS.md). With groups, a burst crosses
the uplink once per group: ceil(N / 9) times. That is the price of no tracker, paid only while
there is none. A site of at most `k + 1` nodes is one group: everyone asks everyone, as before.
"""

from __future__ import annotations

from collections.abc import Sequence


def fanout(peers: Sequence[str], me: str, k: int) -> list[str]:
    """At most `k` of `peers` (every other member of the site) for node `me` to poll: the other
    members of its group, in `peers`' order (see the module docstring)."""
    if len(peers) <= k:
        return list(peers)
    ring = sorted({*peers, me})
    groups = -(-len(ring) // (max(1, k) + 1))
    mine = ring.index(me) % groups
    chosen = {p for j, p in enumerate(ring) if j % groups == mine and p != me}
    return [p for p in peers if p in chosen]
