"""peer.control.plane.ControlPlane in one process: several nodes on loopback, each with its own
root, HTTP server and control plane (real aiohttp servers and clients, multicast DNS off, the
nodes meet through `[peer] bootstrap`), and real sections riding on the sync message. The nodes
speak mutual TLS with certificates from one site CA (`peersync site`), as deployed nodes do.

This is the seam's contract as the index and cache concerns see it: what `outgoing`,
`incoming`, `failed`, `handle`, `forget` and `reset` are called with, and when, across joins,
leaves and a tracker failover. Timings are shortened (`FAST`); the waits below are deadlines
for a condition, not measurements (the bounds are measured on real daemons in
tests/integration/test_control_plane.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from sections_cases import Board, Broken, Notes

from kernel.config import loads
from peer.control.member import ControlConfig
from peer.control.plane import ControlPlane
from peer.policy.fanout import fanout
from peer.tls import load
from testbed.pki import SiteCA
from testbed.procs import free_port

FAST = ControlConfig(
    sync_busy=0.05,
    sync_idle=0.1,
    sync_timeout=0.5,
    member_timeout=0.6,
    tracker_tick=0.05,
    startup_grace=0.3,
    probe_timeout=0.5,
    probe_interval=0.1,
    claim_wait=0.6,
    leaderless_interval=0.2,
    reconcile_interval=0.3,
)


@dataclass
class Node:
    plane: ControlPlane
    runner: web.AppRunner
    notes: Notes = field(default_factory=Notes)
    board: Board = field(default_factory=Board)

    @property
    def id(self) -> str:
        return self.plane.node_id

    async def stop(self) -> None:
        await self.plane.stop()
        await self.runner.cleanup()


class Site:
    """Nodes on loopback that bootstrap from the first one's address."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ports: list[int] = []
        self.nodes: list[Node] = []
        self.ca = SiteCA(tmp / "site")

    async def add(
        self,
        priority: int = 0,
        site: str = "default",
        tunables: ControlConfig = FAST,
        sections: bool = True,
        peers: Sequence[str] = (),
    ) -> Node:
        port = free_port()
        self.ports.append(port)
        boot = [f"127.0.0.1:{p}" for p in self.ports[:2]]
        text = (
            f'[peer]\nlisten = "127.0.0.1:{port}"\nbootstrap = {boot!r}\npeers = {list(peers)!r}\n'.replace(
                "'", '"'
            )
            + f'[site]\nname = "{site}"\ntracker_priority = {priority}\n[discovery]\nmdns = false\n'
        )
        name = f"n{len(self.ports)}"
        text += self.ca.issue(name).toml()
        cfg = loads(text).with_overrides(root=self.tmp / name)
        transport = load(cfg.tls)
        plane = ControlPlane(cfg, f"https://127.0.0.1:{port}", tunables, transport=transport)
        node = Node(plane, web.AppRunner(web.Application()))
        if sections:
            plane.register(node.notes, node.board)
        app = node.runner.app
        app.add_routes(plane.routes())
        await node.runner.setup()
        await web.TCPSite(node.runner, "127.0.0.1", port, ssl_context=transport.server).start()
        await plane.start()
        self.nodes.append(node)
        return node

    def alive(self) -> list[Node]:
        return [n for n in self.nodes if n.plane._task is not None]


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    s = Site(tmp_path)
    yield s
    for node in s.alive():
        with contextlib.suppress(Exception):
            await node.stop()


async def until(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def agreed(nodes: Sequence[Node]) -> bool:
    trackers = [n for n in nodes if n.plane.role == "tracker"]
    ids = {n.id for n in nodes}
    return (
        len(trackers) == 1
        and all(n.plane.tracker is not None and n.plane.tracker.id == trackers[0].id for n in nodes)
        and all({m.id for m in n.plane.members()} | {n.id} == ids for n in nodes)
    )


def tracker(nodes: Sequence[Node]) -> Node:
    (t,) = [n for n in nodes if n.plane.role == "tracker"]
    return t


async def test_nodes_meet_through_bootstrap_and_elect_the_best_ranked(site: Site) -> None:
    nodes = [await site.add() for _ in range(3)]
    await until(lambda: agreed(nodes))
    assert tracker(nodes) is nodes[0], "earliest started, all else equal: rank 0"
    assert all(sorted(n.plane.peers()) == sorted(m.plane.me.url for m in nodes if m is not n) for n in nodes)


async def test_static_peers_that_are_no_member_are_untracked(site: Site) -> None:
    """A static `[peer] peers` entry that never joins (nothing speaks the control plane there:
    a free loopback port) is `untracked()`, polled by the engine beside the tracker's candidate
    sets; a static entry that is a member is not (the candidate sets cover it)."""
    first = await site.add()
    outside = f"http://127.0.0.1:{free_port()}"
    second = await site.add(peers=[first.plane.me.url, outside])
    await until(lambda: agreed([first, second]))
    assert second.plane.untracked() == [outside]
    assert outside in second.plane.peers()
    assert first.plane.untracked() == []


async def test_sections_ride_on_the_sync_in_full_then_incrementally(site: Site) -> None:
    nodes = [await site.add() for _ in range(3)]
    await until(lambda: agreed(nodes))
    t = tracker(nodes)
    for n in nodes:
        n.notes.add(f"{n.id[:4]}-1")
    await until(lambda: sum(len(v) for v in t.board.by_member.values()) == 3)
    for n in nodes:
        n.notes.add(f"{n.id[:4]}-2")
    await until(lambda: all(t.board.by_member.get(n.id) == [f"{n.id[:4]}-1", f"{n.id[:4]}-2"] for n in nodes))
    # each answer is the tracker's view when it answered: at least this member's own notes (the
    # answer to the sync carrying a member's second note may still be on its way back: wait for it)
    await until(lambda: all(n.notes.answers and n.notes.answers[-1]["site_notes"] >= 2 for n in nodes))
    assert t.board.resets == 1
    assert all(n.board.by_member == {} for n in nodes if n is not t), "only the tracker's side is used"


async def test_the_tracker_itself_rides_on_its_own_sections(site: Site) -> None:
    nodes = [await site.add() for _ in range(2)]
    await until(lambda: agreed(nodes))
    t = tracker(nodes)
    t.notes.add("mine")
    await until(lambda: t.board.by_member.get(t.id) == ["mine"])


async def test_a_member_that_stops_is_dropped_at_once_and_forgotten(site: Site) -> None:
    nodes = [await site.add() for _ in range(3)]
    await until(lambda: agreed(nodes))
    t, leaver = tracker(nodes), next(n for n in nodes if n.plane.role == "member")
    leaver.notes.add("bye")
    await until(lambda: t.board.by_member.get(leaver.id) == ["bye"])
    await leaver.stop()
    await until(lambda: leaver.id in t.board.forgotten)
    rest = [n for n in nodes if n is not leaver]
    await until(lambda: all(leaver.id not in {m.id for m in n.plane.members()} for n in rest))


async def test_after_the_trackers_death_the_best_survivor_rebuilds_from_full_announcements(
    site: Site,
) -> None:
    """Nothing lost: each survivor re-announces everything to the new tracker, whose sections
    were reset when it claimed."""
    nodes = [await site.add() for _ in range(4)]
    await until(lambda: agreed(nodes))
    old = tracker(nodes)
    for n in nodes:
        n.notes.add(f"{n.id[:4]}")
    await until(lambda: len(old.board.by_member) == 4)
    fulls = {n.id: n.notes.fulls for n in nodes}
    await old.stop()
    survivors = [n for n in nodes if n is not old]
    await until(lambda: agreed(survivors))
    new = tracker(survivors)
    assert new is survivors[0], "the best-ranked survivor"
    assert new.plane.tracker is not None and new.plane.tracker.epoch > 1
    assert new.board.resets == 1
    await until(lambda: all(new.board.by_member.get(n.id) == [n.id[:4]] for n in survivors))
    assert all(n.notes.fulls > fulls[n.id] for n in survivors)
    # someone noticed the loss and held an election; a survivor whose own syncs had not failed twice
    # yet when the new tracker's claim reached it just follows it, without an election of its own
    assert sum(n.plane.status()["elections"] for n in survivors) >= 1


async def test_a_sync_that_fails_tells_the_sections(site: Site) -> None:
    nodes = [await site.add() for _ in range(2)]
    await until(lambda: agreed(nodes))
    t = tracker(nodes)
    member = next(n for n in nodes if n is not t)
    await t.stop()
    member.notes.add("pending")
    await until(lambda: member.notes.failures > 0)
    await until(lambda: member.plane.role == "tracker")  # alone now: it leads itself
    await until(lambda: member.board.by_member.get(member.id) == ["pending"])


async def test_wake_syncs_now(site: Site) -> None:
    slow = ControlConfig(**{**FAST.__dict__, "sync_idle": 60.0, "sync_busy": 60.0})
    nodes = [await site.add(tunables=slow) for _ in range(2)]
    await until(lambda: agreed(nodes))
    t = tracker(nodes)
    member = next(n for n in nodes if n is not t)
    await until(lambda: member.id in t.board.by_member)  # the first, full sync
    member.notes.add("now")
    await asyncio.sleep(0.2)
    assert t.board.by_member[member.id] == []  # the next sync is a minute away
    member.plane.wake()
    await until(lambda: t.board.by_member[member.id] == ["now"], timeout=5.0)


async def test_members_sync_at_the_pace_the_tracker_answers(site: Site) -> None:
    """A tracker whose budget the site exceeds stretches its members' syncs (`policy.pacing`)."""
    nodes = [await site.add() for _ in range(2)]
    await until(lambda: agreed(nodes))
    t = tracker(nodes)
    member = next(n for n in nodes if n is not t)
    assert t.plane.agent.tracker is not None
    t.plane.agent.tracker.sync_budget = 2 / 30  # two members: one sync each every 30 s
    await until(lambda: member.plane.agent.pace == pytest.approx(30.0))
    member.notes.add("later")
    await asyncio.sleep(0.5)  # ten busy intervals of FAST
    assert t.board.by_member[member.id] == []  # the next sync is half a minute away
    member.plane.wake()  # the pace bounds the periodic syncs, not a wake
    await until(lambda: t.board.by_member[member.id] == ["later"], timeout=5.0)


async def test_a_site_with_no_node_that_may_lead_fans_out_directly(site: Site) -> None:
    """The engine gets every member (it deals the groups itself, from the same list on every
    node); the status reports the group it polls: at most `fanout`, the same groups everywhere."""
    few = ControlConfig(**{**FAST.__dict__, "fanout": 1})
    nodes = [await site.add(priority=-1, tunables=few) for _ in range(3)]
    await until(lambda: all(len(n.plane.members()) == 2 for n in nodes))
    await asyncio.sleep(FAST.startup_grace + FAST.claim_wait)
    polled: dict[str, set[str]] = {}
    for n in nodes:
        assert n.plane.role == "electing" and n.plane.tracker is None
        assert sorted(n.plane.peers()) == sorted(m.plane.me.url for m in nodes if m is not n)
        direct = n.plane.status()["direct_peers"]
        assert direct == fanout(n.plane.peers(), n.plane.me.url, 1) and len(direct) <= 1
        polled[n.plane.me.url] = set(direct)
    for me, others in polled.items():  # groups are cliques: whom I poll polls me
        assert all(me in polled[o] for o in others)


async def test_a_node_of_another_site_never_joins(site: Site) -> None:
    ours = [await site.add() for _ in range(2)]
    stranger = await site.add(site="elsewhere")
    await until(lambda: agreed(ours) and stranger.plane.role == "tracker")
    await asyncio.sleep(FAST.reconcile_interval * 3)
    assert agreed(ours)
    assert stranger.id not in {m.id for n in ours for m in n.plane.members()}
    assert stranger.plane.members() == []


async def test_register_refuses_a_name_twice_or_mismatched_sides(site: Site) -> None:
    node = await site.add(sections=False)
    node.plane.register(Notes("a"), Board("a"))
    with pytest.raises(ValueError):
        node.plane.register(Notes("a"), Board("a"))
    with pytest.raises(ValueError):
        node.plane.register(Notes("b"), Board("c"))


async def test_a_broken_section_does_not_stop_the_others(site: Site) -> None:
    nodes = [await site.add() for _ in range(2)]
    for n in nodes:
        n.plane.register(Broken(), Broken())
    await until(lambda: agreed(nodes))
    t = tracker(nodes)
    for n in nodes:
        n.notes.add("ok")
    await until(lambda: all(t.board.by_member.get(n.id) == ["ok"] for n in nodes))


async def test_status_has_the_documented_keys(site: Site) -> None:
    nodes = [await site.add() for _ in range(2)]
    await until(lambda: agreed(nodes) and nodes[0].plane.status()["messages"]["sync_received"] >= 1)
    st = nodes[1].plane.status()
    assert set(st) >= {
        "id",
        "site",
        "url",
        "role",
        "tracker",
        "epoch_seen",
        "members",
        "direct_peers",
        "messages",
        "elections",
        "claims",
        "busy",
        "uptime",
        "mdns",
        "candidates",
    }
    assert st["role"] == "member" and st["tracker"]["id"] == nodes[0].id
    assert [m["rank"] for m in st["members"]] == [0, 1]
    # the route serves the same document (it lacked `direct_peers`, which only the plane adds)
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{nodes[1].plane.me.url}/peersync/v1/control/status", ssl=nodes[0].plane.transport.client
        ) as r,
    ):
        served = await r.json()
    assert set(served) == set(st) and served["direct_peers"] == st["direct_peers"]
    assert set(st["members"][0]) == {"id", "url", "rank", "priority", "started", "last_heard", "self"}
    assert st["messages"]["sync_sent"] >= 1 and nodes[0].plane.status()["messages"]["sync_received"] >= 1


async def test_a_tracker_that_stalls_past_two_sync_timeouts_is_not_lost(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tracker answers nothing for 2.4 sync timeouts (a loop stalled on a crowded host), then
    answers again. With a fixed timeout the member's sync and its retry would both time out and
    the member would lose a live tracker (and look for another: whois). With the learned timeout
    (`policy.timeout`) the first failure doubles the wait, the retry is answered, and the member
    keeps its tracker."""
    nodes = [await site.add() for _ in range(2)]
    await until(lambda: agreed(nodes))
    t = tracker(nodes)
    member = next(n for n in nodes if n is not t)
    stall_until = 0.0
    real = web.BaseRequest.json

    async def stalled(request: web.BaseRequest, **kwargs: object) -> object:
        """The sync handler's first await (reading the body) waits out the stall."""
        wait = stall_until - time.monotonic()
        if request.path.endswith("/sync") and wait > 0:
            await asyncio.sleep(wait)
        return await real(request, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(web.BaseRequest, "json", stalled)
    before = member.plane.agent.counters.snapshot()
    stall_until = time.monotonic() + 2.4 * FAST.sync_timeout
    await asyncio.sleep(2.4 * FAST.sync_timeout + 1.0)
    after = member.plane.agent.counters.snapshot()
    assert after.get("sync_failed", 0) > before.get("sync_failed", 0)  # the stall was felt
    assert after.get("whois_sent", 0) == before.get("whois_sent", 0)  # ... and no election
    assert member.plane.tracker is not None and member.plane.tracker.id == t.id
