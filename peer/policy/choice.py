"""Which peer a chunk is asked from: the one predicted to deliver it soonest.

Each candidate's `PeerStats.predicted` time for one chunk is multiplied by a random factor in
[1 - JITTER, 1 + JITTER]. The jitter is the exploration: peers whose predictions are close share
the load instead of one of them taking every request until its measured queue catches up, and a
peer measured a little slow once still gets a sample now and then, so its estimate can recover.
Ties after jitter go to the smaller peer URL, so a decision is a pure function of its inputs and
the random draws.

One draw per candidate, in candidate order: a caller that feeds the same `random.Random` state
gets the same choice.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from peer.policy.peerstats import PeerStats, stat_of

JITTER = 0.1


def best_peer(
    candidates: Sequence[str], stats: Mapping[str, PeerStats], nbytes: int, rng: random.Random
) -> str | None:
    """The candidate with the smallest jittered predicted time for `nbytes`; None if there is none.

    A candidate without stats is predicted from the optimistic prior (`PeerStats()`)."""
    if not candidates:
        return None
    scored = [
        (stat_of(stats, p).predicted(nbytes) * rng.uniform(1 - JITTER, 1 + JITTER), p) for p in candidates
    ]
    return min(scored)[1]
