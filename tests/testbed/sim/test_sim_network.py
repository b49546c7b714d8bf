"""The reservation calendars of `testbed.sim.network`: capacity is conserved, FIFO order, the host."""

from __future__ import annotations

import random

from testbed.sim.network import MBIT, Host, Link, Topology, transfer


def test_a_link_never_carries_more_than_its_rate() -> None:
    link = Link(rate=1000.0)
    ends = [link.reserve(0.0, 100) for _ in range(10)]
    assert ends == [0.1 * (i + 1) for i in range(10)] or all(
        abs(a - b) < 1e-9 for a, b in zip(ends, [0.1 * (i + 1) for i in range(10)], strict=True)
    )
    assert link.bytes == 1000


def test_a_transfer_ends_with_its_slowest_link_and_an_idle_link_starts_at_once() -> None:
    fast, slow = Link(rate=1000.0), Link(rate=100.0)
    assert transfer(1.0, 100, [fast, slow]) == 2.0
    assert fast.free == 1.1  # the fast link was held only for its own share
    assert Link(rate=0).reserve(3.0, 10**9) == 3.0  # unlimited


def test_the_host_unpacks_on_its_cores_in_turn() -> None:
    host = Host(cores=2, unpack_rate=10.0)
    assert [host.unpack(0.0, 10) for _ in range(4)] == [1.0, 1.0, 2.0, 2.0]
    assert Host().unpack(5.0, 10**9) == 5.0  # no unpack modelled


def test_topology_racks_and_heterogeneity() -> None:
    topo = Topology(nodes=600, slow_share=0.5, rack=250)
    assert topo.address(0, 0) == "http://10.0.0.1:5381"
    assert topo.address(1, 251) == "http://10.1.1.2:5381"
    rates = topo.rates(random.Random(0))
    slow = sum(up < topo.up for up, _down in rates)
    assert 200 < slow < 400
    assert min(up for up, _ in rates) == topo.up * topo.slow_factor == 100 * MBIT
