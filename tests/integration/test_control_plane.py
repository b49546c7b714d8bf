"""The control plane on real daemons in network namespaces (issue 9's election bounds).

Every node runs `peersync daemon` with the same config file, naming no peers: the nodes must
find each other by multicast DNS on the namespace LAN bridge (or through `[peer] bootstrap`
with mDNS off), elect exactly one tracker, and agree on it and on who the members are. Then:
SIGKILL the tracker (a new one within 5 s, the dead node out of every view within 5 s); cut the
LAN in two (each side its own tracker) and heal it (one tracker again within 10 s); a node of
another site on the same LAN is ignored; a site where no node may lead runs leaderless.

Each test polls the daemons' `GET /peersync/v1/control/status` (asked from inside each node's
namespace) until a condition holds or a deadline passes, and prints the measured times.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from testbed.netns import Site, SiteNode, missing_tools
from testbed.peersyncd import PeerSyncDaemon

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
if missing_tools():
    pytestmark.append(pytest.mark.skip(reason=missing_tools()))

PORT = 5381
NODES = 5
Status = dict[str, Any]


def config(
    *, mdns: bool = True, bootstrap: Sequence[str] = (), site: str = "default", priority: int = 0
) -> str:
    """One config for every node: a wildcard listen address (the URL comes from the node's own
    address), the mirror on the namespace's loopback, no peers."""
    return (
        f'[peer]\nlisten = "0.0.0.0:{PORT}"\nbootstrap = {json.dumps(list(bootstrap))}\n'
        '[mirror]\nlisten = "127.0.0.1:5380"\n'
        f'[site]\nname = "{site}"\ntracker_priority = {priority}\n'
        f"[discovery]\nmdns = {'true' if mdns else 'false'}\n"
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with Site(nodes=NODES, uplink_mbit=None, workdir=tmp_path_factory.mktemp("control")) as s:
        yield s


@pytest.fixture
def nodes(site: Site) -> Iterator[list[SiteNode]]:
    """The site's nodes; every daemon a test started is stopped after it, the LAN healed."""
    yield site.nodes
    site.heal()
    with ThreadPoolExecutor(len(site.nodes)) as pool:
        list(pool.map(lambda n: n.stop_services(), site.nodes))


def start(nodes: Sequence[SiteNode], configs: Sequence[str]) -> list[PeerSyncDaemon]:
    """Start a daemon on each node at once; returns when all serve."""
    with ThreadPoolExecutor(len(nodes)) as pool:
        return list(pool.map(lambda nc: nc[0].start_peersync(config=nc[1]), zip(nodes, configs, strict=True)))


def status(node: SiteNode) -> Status | None:
    """A daemon's control-plane status, or None if it does not answer."""

    def get() -> Status:
        url = f"http://{node.ip}:{PORT}/peersync/v1/control/status"
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            body: Status = json.loads(resp.read())
        return body

    try:
        return node.call(get)
    except OSError:
        return None


def statuses(nodes: Sequence[SiteNode]) -> list[Status | None]:
    with ThreadPoolExecutor(len(nodes)) as pool:
        return list(pool.map(status, nodes))


def poll(nodes: Sequence[SiteNode], cond: Callable[[list[Status | None]], bool], timeout: float) -> float:
    """Seconds until `cond(statuses)` holds (polling every 0.1 s); fails with the last statuses."""
    started = time.monotonic()
    last: list[Status | None] = []
    while time.monotonic() - started < timeout:
        last = statuses(nodes)
        if cond(last):
            return time.monotonic() - started
        time.sleep(0.1)
    pytest.fail(f"not within {timeout} s: {summary(last)}")


def summary(sts: Sequence[Status | None]) -> list[Any]:
    return [
        None
        if st is None
        else (
            st["url"],
            st["role"],
            st["tracker"] and st["tracker"]["url"],
            sorted(m["url"] for m in st["members"]),
        )
        for st in sts
    ]


def agreed(sts: Sequence[Status | None]) -> bool:
    """Exactly one tracker among these nodes, every one of them following it, and every view
    holding exactly these nodes."""
    if any(st is None for st in sts):
        return False
    ids = {st["id"] for st in sts if st is not None}
    trackers = [st for st in sts if st is not None and st["role"] == "tracker"]
    if len(trackers) != 1:
        return False
    tid = trackers[0]["id"]
    return all(
        st["tracker"] is not None and st["tracker"]["id"] == tid and {m["id"] for m in st["members"]} == ids
        for st in sts
        if st is not None
    )


def tracker_of(sts: Sequence[Status | None]) -> Status:
    (tracker,) = [st for st in sts if st is not None and st["role"] == "tracker"]
    return tracker


def test_nodes_with_one_config_find_each_other_and_elect_one_tracker(nodes: list[SiteNode]) -> None:
    """(a) Five daemons, one config, no peers named: mDNS on the LAN bridge, one tracker, the
    best-ranked node (rank 0 in every view: earliest started, all else equal)."""
    start(nodes, [config()] * NODES)
    took = poll(nodes, agreed, timeout=15)
    sts = statuses(nodes)
    tracker = tracker_of(sts)
    print(f"\n{NODES} nodes agree on one tracker {took:.2f} s after the last daemon served")
    for st in sts:
        assert st is not None and st["mdns"] is True
        best = next(m for m in st["members"] if m["rank"] == 0)
        assert best["id"] == tracker["id"], "the tracker is the best-ranked node"
    assert sum(st["claims"] for st in sts if st) == 1, "exactly one node ever claimed"
    # one sync per second per member when idle, whatever the site size; no other traffic once settled
    before = statuses(nodes)
    time.sleep(3.0)
    after = statuses(nodes)
    for b, a in zip(before, after, strict=True):
        assert a is not None and b is not None
        sent = {k: (a["messages"][k] - b["messages"][k]) / (a["uptime"] - b["uptime"]) for k in a["messages"]}
        print(a["role"], {k: round(v, 2) for k, v in sent.items() if v})
        if a["role"] == "member":
            assert 0.5 <= sent["sync_sent"] <= 1.5
            assert sent["whois_sent"] == 0 and sent["tracker_sent"] == 0


def test_killing_the_tracker_elects_one_new_tracker_within_5_s(nodes: list[SiteNode]) -> None:
    """(b) SIGKILL the tracker: exactly one new tracker within 5 s, every survivor follows it, the
    dead node leaves every view within 5 s; never two trackers at once."""
    daemons = start(nodes, [config()] * NODES)
    poll(nodes, agreed, timeout=15)
    sts = statuses(nodes)
    dead = tracker_of(sts)
    index = next(i for i, st in enumerate(sts) if st is not None and st["id"] == dead["id"])
    survivors = [n for i, n in enumerate(nodes) if i != index]
    # the bully's choice: the best-ranked survivor
    ranks = {m["id"]: m["rank"] for m in dead["members"]}
    heir = min((st["id"] for st in sts if st is not None and st["id"] != dead["id"]), key=ranks.__getitem__)

    daemons[index].kill()
    killed = time.monotonic()
    new_tracker_at = left_at = None
    most_trackers = 0
    while time.monotonic() - killed < 10 and (new_tracker_at is None or left_at is None):
        now_sts = statuses(survivors)
        t = time.monotonic() - killed
        trackers = {st["id"] for st in now_sts if st is not None and st["role"] == "tracker"}
        most_trackers = max(most_trackers, len(trackers))
        if new_tracker_at is None and agreed(now_sts):
            new_tracker_at = t
        if left_at is None and all(
            st is not None and dead["id"] not in {m["id"] for m in st["members"]} for st in now_sts
        ):
            left_at = t
        time.sleep(0.05)
    print(f"\ntracker killed: new tracker agreed by all after {new_tracker_at} s,", end=" ")
    print(f"dead node out of every view after {left_at} s")
    assert new_tracker_at is not None and new_tracker_at <= 5.0
    assert left_at is not None and left_at <= 5.0
    assert most_trackers <= 1
    new = tracker_of(statuses(survivors))
    assert new["id"] == heir
    assert new["tracker"]["epoch"] > dead["tracker"]["epoch"]


def test_a_partition_has_a_tracker_per_side_and_one_again_after_healing(
    site: Site, nodes: list[SiteNode]
) -> None:
    """(c) Cut the LAN in two (bridge ports moved to a second bridge, links up): each side ends
    with one tracker of its own; heal: exactly one tracker within 10 s, all agree."""
    start(nodes, [config()] * NODES)
    poll(nodes, agreed, timeout=15)
    sts = statuses(nodes)
    tracker = tracker_of(sts)
    t_index = next(i for i, st in enumerate(sts) if st is not None and st["id"] == tracker["id"])
    others = [i for i in range(NODES) if i != t_index]
    side_a = [t_index, *others[:2]]  # the tracker's side
    side_b = others[2:]
    a_nodes, b_nodes = [nodes[i] for i in side_a], [nodes[i] for i in side_b]

    site.partition(side_b)
    cut = time.monotonic()
    poll(a_nodes + b_nodes, lambda s: agreed(s[: len(side_a)]) and agreed(s[len(side_a) :]), timeout=20)
    side_sts = statuses(a_nodes + b_nodes)
    a_tracker, b_tracker = tracker_of(side_sts[: len(side_a)]), tracker_of(side_sts[len(side_a) :])
    assert a_tracker["id"] == tracker["id"], "the side that kept its tracker keeps it (stickiness)"
    assert b_tracker["tracker"]["epoch"] > tracker["tracker"]["epoch"]
    print(f"\npartition: each side with its own tracker after {time.monotonic() - cut:.2f} s")

    site.heal()
    healed = time.monotonic()
    took = poll(nodes, agreed, timeout=15)
    final = tracker_of(statuses(nodes))
    print(f"healed: one tracker ({final['url']}, epoch {final['tracker']['epoch']}) after {took:.2f} s")
    assert time.monotonic() - healed <= 10.0 + 1.0  # the last poll round's own time
    assert took <= 10.0
    # the higher epoch wins: the side that elected anew
    assert final["id"] == b_tracker["id"]


def test_bootstrap_only_with_multicast_dns_off(nodes: list[SiteNode]) -> None:
    """(d) mDNS off, the same bootstrap list on every node (two of them): one tracker, all agree."""
    boot = [f"{nodes[0].ip}:{PORT}", f"{nodes[1].ip}:{PORT}"]
    start(nodes, [config(mdns=False, bootstrap=boot)] * NODES)
    took = poll(nodes, agreed, timeout=15)
    print(f"\nbootstrap only: agreed after {took:.2f} s")
    for st in statuses(nodes):
        assert st is not None and st["mdns"] is False


def test_a_node_of_another_site_on_the_lan_is_ignored(nodes: list[SiteNode]) -> None:
    """(e) One node names another site: the others never list it, it never lists them."""
    configs = [config()] * (NODES - 1) + [config(site="elsewhere")]
    start(nodes, configs)
    ours, stranger = nodes[:-1], nodes[-1]
    took = poll(ours, agreed, timeout=15)
    poll([stranger], agreed, timeout=15)  # alone: its own tracker, itself its only member
    time.sleep(2.0)  # mDNS answers keep coming; a leak would show by now
    sts = statuses(nodes)
    alone = sts[-1]
    assert alone is not None and alone["site"] == "elsewhere"
    assert [m["id"] for m in alone["members"]] == [alone["id"]]
    for st in sts[:-1]:
        assert st is not None and alone["id"] not in {m["id"] for m in st["members"]}
    assert agreed(sts[:-1])
    print(f"\nanother site on the LAN: ours agreed after {took:.2f} s, the stranger stayed alone")


def test_a_site_where_no_node_may_lead_runs_leaderless(nodes: list[SiteNode]) -> None:
    """Every node with tracker_priority < 0: no tracker ever, and each node still knows the
    others (discovery and whois answers) and offers them to the engine for direct questions."""
    few = nodes[:3]
    start(few, [config(priority=-1)] * len(few))

    def leaderless_and_known(sts: list[Status | None]) -> bool:
        return all(
            st is not None and st["role"] == "electing" and len(st["direct_peers"]) == len(few) - 1
            for st in sts
        )

    poll(few, leaderless_and_known, timeout=15)
    deadline = time.monotonic() + 4.0  # past start-up grace and claim_wait: nobody claims
    while time.monotonic() < deadline:
        for st in statuses(few):
            assert st is not None and st["tracker"] is None and st["claims"] == 0
        time.sleep(0.5)
