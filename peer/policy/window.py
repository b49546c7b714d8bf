"""How many chunk requests one blob keeps in flight to peers: its window.

Too few requests in flight and a fast peer idles between them (each request pays a round trip);
too many and chunk buffers pile up in memory and a slow peer hoards work it cannot deliver. The
right number is about the bandwidth-delay product: the bytes the usable peers can deliver during
one latency, in chunks. The window covers 1.5x the summed BDP plus one request per peer (so every
peer always has one queued), never below the configured base and never above the cap. Without any
usable peer the base is used as is (the first requests measure the peers).

The window is per blob; the engine-wide cap on requests over all blobs (`schedule.Slots`) bounds
the memory of many concurrent downloads together.
"""

from __future__ import annotations

from collections.abc import Sequence

from peer.policy.peerstats import PeerStats

MIN_LATENCY = 0.001  # seconds: a latency estimate below this is measurement noise on a LAN
BDP_FACTOR = 1.5  # headroom over the bandwidth-delay product, for jitter in answer times


def window(stats: Sequence[PeerStats], chunk_size: int, base: int, cap: int) -> int:
    """Requests in flight for one blob whose usable peers measure `stats` (one per peer)."""
    if not stats:
        return base
    bdp = sum(s.bps * max(s.latency, MIN_LATENCY) for s in stats) / chunk_size
    return int(min(cap, max(base, bdp * BDP_FACTOR + len(stats))))
