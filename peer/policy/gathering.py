"""Whether to keep waiting for the nodes of a burst to join before dealing out stripes.

Stripe ownership (`striping`) is a function of which nodes are filling a blob. When a rollout
starts, nodes claim the blob within a second or two of each other; a node that dealt the stripes
the moment it claimed would see only the nodes that had joined so far, a later node would see more,
and the two would disagree about owners: a stripe both believe they own is fetched twice over the
uplink, one neither believes it owns waits for a stall timeout. So after claiming, a node waits
until every usable peer has shown up filling the blob (they all have views), or a deadline passes.

It does not wait when waiting cannot help: nobody else is filling the blob (a lone pull must not
wait for peers that will never come), or a peer already holds the blob whole (its chunks come from
that peer, not the uplink, so there is nothing to deal).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping

from peer.policy.holdings import BlobView


class Gather(enum.Enum):
    """The verdict of one look at who is filling the blob."""

    WAIT = "wait"  # others are joining and some usable peer has not yet shown up
    ALONE = "alone"  # no peer knows the blob: nobody to wait for
    HOLDER = "holder"  # a peer holds the blob whole: nothing to deal
    JOINED = "joined"  # every usable peer has a view of the blob: deal now
    DEADLINE = "deadline"  # waited long enough: deal with who is there

    @property
    def done(self) -> bool:
        """Stop gathering and deal the stripes."""
        return self is not Gather.WAIT


def gather(seen: Mapping[str, BlobView], usable: Iterable[str], now: float, deadline: float) -> Gather:
    """Whether to stop gathering, given the peers' views of the blob (`seen`, any peer that
    answered), the usable peers, the time and the gathering deadline."""
    if not seen:
        return Gather.ALONE
    if any(v.complete for v in seen.values()):
        return Gather.HOLDER
    if all(p in seen for p in usable):
        return Gather.JOINED
    if now >= deadline:
        return Gather.DEADLINE
    return Gather.WAIT
