"""The simulator's network: per-node links, a site's LAN and shared uplink, round trips, the host.

Bandwidth is modelled by **reservation calendars**: each direction of each link is a FIFO server
of `rate` bytes per second that remembers when it is next free. A transfer reserves every link it
crosses (the sender's up link, the receiver's down link, the site's uplink for origin traffic, the
emulation host for LAN traffic in the testbed profile) from the moment its request arrives: on each
link it starts when both it and the link are ready and holds the link for `bytes / rate`; it ends
when its slowest reservation ends. That conserves every link's capacity exactly (no link carries
more than its rate over any interval) at O(1) per transfer, which is what lets 10,000 nodes and
hundreds of thousands of chunk transfers run in minutes. What it gives up: within one link,
concurrent transfers are served one after another instead of sharing the rate (processor sharing);
their total finish time is the same, the order of individual finishes is not, and a reservation on
a fast link is not stretched to the pace of a slow one it crosses too. The origin fetches reserve
the uplink one chunk at a time as each arrives, so concurrent origin runs interleave chunk by chunk,
which is what TCP flows through the tbf-shaped uplink do at that granularity.

Topology (`Topology`): one or more sites, each a LAN of nodes in /24 racks behind one uplink to the
registry; nodes' up and down rates may differ (heterogeneity: a share of slow nodes); round trips
are `lan_rtt` inside a site and `wan_rtt` to the registry. Churn and failures are the site's
(`testbed.sim.site`): a node that dies stops answering, and what it had reserved is wasted.

The **emulation host** (`Host`): in the testbed profile every node runs on one 2-core machine, so
LAN transfers are limited by what that machine can copy and hash (`host_rate`, all nodes together),
and each node's unpack of a layer competes for the machine's `cores`. The profile's two constants
are calibrated once from the emulated N=1 and N=4 runs and then predict the other sizes
(bench/SIMULATION.md).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

MBIT = 1e6 / 8  # bytes per second in one Mbit/s


@dataclass
class Link:
    """One direction of one link: a FIFO reservation calendar (see the module docstring)."""

    rate: float  # bytes per second; 0 or less: unlimited
    free: float = 0.0  # when the link is next free
    bytes: int = 0  # bytes it carried (reserved)

    def reserve(self, ready: float, nbytes: int) -> float:
        """Reserve the link for `nbytes` from `ready` on; when the transfer's bytes have passed."""
        self.bytes += nbytes
        if self.rate <= 0:
            return ready
        begin = max(ready, self.free)
        self.free = begin + nbytes / self.rate
        return self.free


def transfer(ready: float, nbytes: int, links: list[Link]) -> float:
    """A transfer of `nbytes` crossing `links`, its request arrived at `ready`: when it ends."""
    return max((link.reserve(ready, nbytes) for link in links), default=ready)


@dataclass
class Host:
    """The machine an emulated site runs on: LAN copying capacity and cores for unpacking."""

    rate: float = 0.0  # LAN bytes per second, all nodes together (0: not modelled)
    cores: int = 0  # cores for unpacking (0: each node unpacks on its own, unlimited)
    unpack_rate: float = 0.0  # bytes of compressed layer unpacked per core-second (0: no unpack)
    link: Link = field(init=False)
    _core_free: list[float] = field(init=False)

    def __post_init__(self) -> None:
        self.link = Link(self.rate)
        self._core_free = [0.0] * max(self.cores, 0)

    def lan_links(self) -> list[Link]:
        """The host's share of a LAN transfer ([] when the host is not modelled)."""
        return [self.link] if self.rate > 0 else []

    def unpack(self, ready: float, nbytes: int) -> float:
        """A node unpacks a layer of `nbytes` from `ready` on: when it is done."""
        if self.unpack_rate <= 0:
            return ready
        seconds = nbytes / self.unpack_rate
        if not self._core_free:
            return ready + seconds
        i = min(range(len(self._core_free)), key=self._core_free.__getitem__)
        begin = max(ready, self._core_free[i])
        self._core_free[i] = begin + seconds
        return self._core_free[i]


@dataclass(frozen=True)
class Topology:
    """The shape of the simulated world (see the module docstring). Rates in bytes per second."""

    nodes: int  # per site
    sites: int = 1
    up: float = 1000 * MBIT  # a node's up rate
    down: float = 1000 * MBIT  # ... and down rate
    uplink: float = 100 * MBIT  # each site's uplink to the registry (WAN -> LAN)
    registry: float = 0.0  # the registry's own egress, all sites together (0: unlimited)
    lan_rtt: float = 0.0004
    wan_rtt: float = 0.02
    slow_share: float = 0.0  # heterogeneity: this share of nodes has `slow_factor` of the rates
    slow_factor: float = 0.1
    rack: int = 250  # nodes per /24 (the subnet preference's unit)

    def rates(self, rng: random.Random) -> list[tuple[float, float]]:
        """(up, down) of each node of one site, drawn with `rng`."""
        out = []
        for _ in range(self.nodes):
            f = self.slow_factor if rng.random() < self.slow_share else 1.0
            out.append((self.up * f, self.down * f))
        return out

    def address(self, site: int, i: int) -> str:
        """Node `i` of `site`'s peer URL: racks of `rack` nodes, one /24 each."""
        rack, slot = divmod(i, self.rack)
        return f"http://10.{site}.{rack}.{slot + 1}:5381"


@dataclass
class NodeLinks:
    """A node's two directions."""

    up: Link
    down: Link
