"""How often members sync with their tracker: the tracker's load bounded by design, whatever the site's size.

Every member syncs every `sync_busy` (0.25 s) while it downloads, so a flat site's tracker answers
about 4 syncs per member and second: at 10,000 members, ~40,000 syncs/s, and at the ~0.34 ms of
CPU the real tracker code takes per sync (parse, `Tracker.handle`, serialise; the scale simulator,
bench/SIMULATION.md) ~13 cores, where one is all it may use. So the tracker sets the pace: each
answer carries `pace`, the seconds between one member's syncs that keep the whole site within
`SYNC_BUDGET` syncs per second (`sync_pace`), and members sync no more often than that
(`member_interval`). A small site never notices (its pace is below `sync_busy`: 500 members or
fewer at the default budget); a site of 10,000 syncs every 5 s.

A member silent for the tracker's `member_timeout` counts as dead, so a stretched pace stretches the
timeout with it (`member_timeout`: `MISSED` paces at least): at 10,000 members a dead one is
dropped after ~15 s instead of 3 s. What that costs is small, because the chunk path does not wait
for it: a peer that stops answering is suspended by the requester's own `PeerStats` after its
failures, long before the tracker's table forgets it.

`SYNC_BUDGET` (2,000 syncs/s) is ~0.7 core at the measured cost, leaving the rest of one core for
the full syncs after a failover and the bursts of woken syncs (`min_sync_gap`) the pace does not
cover.
"""

from __future__ import annotations

SYNC_BUDGET = 2000.0  # syncs per second one tracker answers at most, from the periodic syncs
MISSED = 3  # paces a member may miss before it counts as dead
MAX_PACE = 30.0  # a member never waits longer than this between syncs, whatever an answer says


def sync_pace(members: int, budget: float = SYNC_BUDGET) -> float:
    """Seconds between one member's syncs that keep `members` syncing members within `budget`
    syncs per second together (0 with no budget: not paced)."""
    if budget <= 0:
        return 0.0
    return min(MAX_PACE, max(members, 0) / budget)


def member_interval(base: float, pace: float) -> float:
    """A member's seconds between syncs: its own `base` (busy or idle), stretched to the tracker's
    `pace` (a malformed or absurd pace is cut to `MAX_PACE`, never below `base`)."""
    return max(base, min(pace, MAX_PACE))


def member_timeout(base: float, pace: float) -> float:
    """How long the tracker lets a member stay silent before dropping it: its configured `base`,
    or `MISSED` paces when the pace is longer."""
    return max(base, MISSED * pace)
