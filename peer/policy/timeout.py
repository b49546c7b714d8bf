"""How long a member waits for its tracker's answer to a sync: learned from the answers it gets.

A sync that goes unanswered past its timeout has failed, and `fail_after` (2) failures in a row
lose the tracker: the member looks for another one, and its engine stops taking the tracker's
leases and stripes the origin by itself until it follows one again. A fixed 1 s timeout is right
on an idle site (answers take milliseconds; a tracker that stopped answering is noticed in about
2 s), and wrong on a loaded one: on the 32-node burst, where every node shares one saturated
2-core host, answers took more than a second often enough that in one burst all 32 nodes
counted 2-5 failed syncs (two in a row lose the tracker), and the bursts with such storms were
the ones that fetched runs twice, up to 1.2x the image over the uplink (bench/RESULTS.md, "A
sync timeout that learns").

So the timeout is TCP's retransmission timeout (RFC 6298), over the member's own answered syncs:
a smoothed answer time plus four times its smoothed deviation, never below `floor` (the
configured `sync_timeout`, so an idle site's syncs wait as long as before) nor above `ceiling`; a
failed sync doubles it (RFC 6298's back-off), up to the ceiling, and the next answer sets it
from the estimate again. A tracker that is gone (its process dead) refuses at once and is lost
as fast as before; one that went silent is lost after 1 + 2 s on an idle site (1 + 1 s before the
back-off), and after at most `fail_after` ceilings on a slow one.
"""

from __future__ import annotations

from dataclasses import dataclass

ALPHA = 0.125  # RFC 6298's gain for the smoothed answer time
BETA = 0.25  # ... and for its deviation
K = 4.0  # deviations above the smoothed answer time
CEILING = 4.0  # seconds a sync waits at most (with fail_after = 2: a silent tracker lost in <= 8 s)


@dataclass
class AnswerTimer:
    """The timeout of the next sync (see the module docstring): `observe` each answered sync's
    seconds, `failed` each one that got no answer, `timeout` before sending."""

    floor: float
    ceiling: float = CEILING
    srtt: float | None = None
    rttvar: float = 0.0
    backoff: float = 1.0

    def observe(self, seconds: float) -> None:
        """A sync was answered after `seconds`."""
        seconds = max(0.0, seconds)
        if self.srtt is None:
            self.srtt, self.rttvar = seconds, seconds / 2
        else:
            self.rttvar = (1 - BETA) * self.rttvar + BETA * abs(self.srtt - seconds)
            self.srtt = (1 - ALPHA) * self.srtt + ALPHA * seconds
        self.backoff = 1.0

    def failed(self) -> None:
        """A sync got no answer: the next one waits twice as long (up to the ceiling)."""
        self.backoff = min(self.backoff * 2, max(1.0, self.ceiling / max(self.floor, 1e-3)))

    def timeout(self) -> float:
        """Seconds the next sync waits for its answer."""
        base = self.floor if self.srtt is None else max(self.floor, self.srtt + K * self.rttvar)
        return min(max(self.ceiling, self.floor), base * self.backoff)
