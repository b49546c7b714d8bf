"""A simulated site (or several under one registry) pulling an image: the real tracker, simulated nodes.

What runs is the product's control plane: each site's tracker is a real `peer.control.tracker.Tracker`
with the real index section (`peer.control.index_sections.IndexTracker`, over `peer.policy.index`)
registered in real `peer.control.sections.Sections`; every node's member side is a real
`IndexMember` over a `testbed.sim.node.SimEngine`. A sync is what the daemon sends: the member
side's payload inside the sync envelope, serialised to JSON, parsed by `SyncRequest.from_wire`,
answered by `Tracker.handle`, serialised back and handed to `IndexMember.incoming`. Only the HTTP
between them is simulated: half a round trip each way, and the tracker's CPU as one FIFO core that
each sync occupies for `tracker_cost` seconds (or, with `tracker_cost=None`, the mean CPU time the
real parsing, handling and serialising took, read on every `CPU_SAMPLE`th sync, plus `http_overhead`).

The clock is simpy's (`simpy.Environment.now`), handed to every product object that takes one
(`IndexMember(clock=...)`, `Tracker.handle(now=...)`, `PeerStats`): no product code reads the
wall clock here. Randomness is one seeded `random.Random` per site and per node.

Scenario: the site has settled (every node is a member of the tracker's table, as after
`bench/scale.py --settle`), then every node starts pulling the image at `arrival(i)` (0 for a
burst). A node's pull is `pre` seconds of fixed work (resolve, containerd), its layers downloaded
in parallel, then each layer unpacked (`Host.unpack`) and `post` seconds. `kill` lists nodes that
die at a given time (churn): they stop syncing, serving and downloading; the tracker drops them
after `member_timeout`; requests to them fail.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import simpy

from peer.control.index_sections import IndexMember, IndexTracker
from peer.control.member import ControlConfig
from peer.control.sections import Sections
from peer.control.tracker import SyncRequest, Tracker
from peer.policy.index import IndexConfig
from peer.policy.membership import Member
from peer.policy.pacing import SYNC_BUDGET, member_interval
from testbed.sim.network import Host, Link, NodeLinks, Topology, transfer
from testbed.sim.node import Blob, Flight, SimDownload, SimEngine

PROTOCOL = 1
CPU_SAMPLE = 8  # the tracker's CPU is read on every 8th sync (reading it costs more than a sync
# under load here); the others are charged the sampled mean


@dataclass
class Profile:
    """What a pull costs a node besides the transfers (see the module docstring)."""

    pre: float = 0.0  # seconds before the downloads start
    post: float = 0.0  # seconds after the last unpack
    host: Host = field(default_factory=Host)


@dataclass
class _Link:
    """A node's `ControlLink`: `sync_soon` wakes its sync loop; a sync fails after `timeout`
    (the simulator models the fixed `ControlConfig.sync_timeout`, not the learned one)."""

    node: SimNode
    timeout: float

    def patience(self) -> float:
        return self.timeout

    def sync_soon(self) -> None:
        self.node.soon = True
        ev = self.node.sync_wake
        if ev is not None and not ev.triggered:
            ev.succeed()


@dataclass
class SimNode:
    """One node of a site: its record, links, engine and member side, and how its pull went."""

    index: int
    site: int
    record: Member
    links: NodeLinks
    engine: SimEngine
    member: IndexMember = field(init=False)
    alive: bool = True
    mv: int = 0
    soon: bool = False
    sync_wake: simpy.Event | None = None
    last_sync: float = -1.0
    pace: float = 0.0  # the tracker's pace, from its last answer (`peer.policy.pacing`)
    syncs: int = 0
    arrived: float = 0.0
    done: float | None = None
    pending: int = 0  # layers not unpacked yet
    wake_events: dict[str, simpy.Event] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.record.url


@dataclass
class TrackerLoad:
    """What a site's tracker did: syncs answered, the CPU the real code took, its queue."""

    syncs: int = 0
    cpu: float = 0.0  # seconds of real CPU in from_wire + handle + serialising
    sampled_cpu: float = 0.0  # ... of the syncs whose CPU was read (every `CPU_SAMPLE`th)
    samples: int = 0
    busy: float = 0.0  # simulated seconds its core was busy
    free: float = 0.0  # when its core is next free
    max_wait: float = 0.0  # the longest a sync waited for the core
    memory: int = 0  # bytes of the tracker's state, sampled mid-pull (`deep_size`)


class SimSite:
    """Sites under one registry, each with its tracker (see the module docstring)."""

    def __init__(
        self,
        topology: Topology,
        blobs: Sequence[Blob],
        profile: Profile | None = None,
        seed: int = 0,
        control: ControlConfig | None = None,
        tracker_cost: float | None = 150e-6,
        http_overhead: float = 100e-6,
        arrival: Callable[[int], float] = lambda i: 0.0,
        kill: Sequence[tuple[int, int, float]] = (),
        index_config: IndexConfig | None = None,
        sync_budget: float = SYNC_BUDGET,
    ) -> None:
        self.topology = topology
        self.blobs = list(blobs)
        self.profile = profile or Profile()
        self.control = control or ControlConfig()
        self.tracker_cost = tracker_cost
        self.http_overhead = http_overhead
        self.arrival = arrival
        self.index_config = index_config or IndexConfig()
        self.sync_budget = sync_budget  # the trackers' (`Tracker.sync_budget`; 0: members unpaced)
        self.env = simpy.Environment()
        self.rng = random.Random(seed)
        self.registry = Link(topology.registry)
        self.uplinks = [Link(topology.uplink) for _ in range(topology.sites)]
        self.nodes: list[SimNode] = []
        self.by_url: dict[str, SimNode] = {}
        self.trackers: list[Tracker] = []
        self.loads = [TrackerLoad() for _ in range(topology.sites)]
        self.syncs_at_end = 0
        self.loads_at_end: list[tuple[int, float, float]] = []
        self._build(seed)
        for site, i, at in kill:
            self.env.process(self._kill(self.nodes[site * topology.nodes + i], at))

    # -- construction -----------------------------------------------------------------------------

    def _build(self, seed: int) -> None:
        topo, env = self.topology, self.env
        for s in range(topo.sites):
            rates = topo.rates(random.Random(seed * 7919 + s))
            members = []
            for i, (up, down) in enumerate(rates):
                node_id = f"{self.rng.getrandbits(128):032x}"
                record = Member(
                    node_id, topo.address(s, i), f"site{s}", started=float(i), link_mbit=int(up * 8 / 1e6)
                )
                engine = SimEngine(
                    record.url, lambda: env.now, random.Random(self.rng.getrandbits(64)), self._wake
                )
                node = SimNode(len(self.nodes), s, record, NodeLinks(Link(up), Link(down)), engine)
                node.member = IndexMember(engine, _Link(node, self.control.sync_timeout), clock=lambda: env.now)
                self.nodes.append(node)
                self.by_url[record.url] = node
                members.append(record)
            sections = Sections()
            first = self.nodes[s * topo.nodes]
            sections.add(first.member, IndexTracker(self.index_config, rng=random.Random(seed * 31 + s)))
            timeout = self.control.member_timeout
            tracker = Tracker(
                members[0], 1, sections, timeout, 0.0, seed=members, sync_budget=self.sync_budget
            )
            self.trackers.append(tracker)
        for node in self.nodes:
            node.mv = self.trackers[node.site].table.version
            env.process(self._sync_loop(node))
            env.process(self._pull(node))
        for s in range(topo.sites):
            env.process(self._expire_loop(s))

    def _is_tracker(self, node: SimNode) -> bool:
        return self.trackers[node.site].me.id == node.record.id

    # -- the control plane --------------------------------------------------------------------------

    def _sync_loop(self, node: SimNode) -> Any:
        env, cfg = self.env, self.control
        while node.alive:
            interval = member_interval(cfg.sync_busy if node.member.active() else cfg.sync_idle, node.pace)
            due = node.last_sync + interval
            if node.soon:
                due = min(due, node.last_sync + cfg.min_sync_gap)
            if due > env.now:
                node.sync_wake = env.event()
                yield env.timeout(due - env.now) | node.sync_wake
                node.sync_wake = None
                continue
            node.soon = False
            node.last_sync = env.now
            yield from self._sync(node)

    def _sync(self, node: SimNode) -> Any:
        env, load = self.env, self.loads[node.site]
        tracker = self.trackers[node.site]
        local = self._is_tracker(node)
        half = 0.0 if local else self.topology.lan_rtt / 2
        payload = node.member.outgoing(False)
        body = {
            "v": PROTOCOL,
            "site": node.record.site,
            "id": node.record.id,
            "epoch": tracker.ref.epoch,
            "mv": node.mv,
            "full": False,
            "sections": {} if payload is None else {"index": payload},
        }
        wire = json.dumps(body)
        node.syncs += 1
        yield env.timeout(half)
        tracker_node = self.by_url[tracker.me.url]
        if not tracker_node.alive:
            yield env.timeout(self.control.sync_timeout)
            node.member.failed()
            return
        start = max(env.now, load.free)
        load.max_wait = max(load.max_wait, start - env.now)
        if start > env.now:
            yield env.timeout(start - env.now)
        sampled = load.syncs % CPU_SAMPLE == 0
        t0 = time.process_time() if sampled else 0.0  # this process's CPU, not the machine's
        reply = tracker.handle(SyncRequest.from_wire(json.loads(wire)), env.now)
        out = json.dumps({"v": PROTOCOL, "site": node.record.site, **reply})
        if sampled:
            load.sampled_cpu += time.process_time() - t0
            load.samples += 1
        cpu = load.sampled_cpu / load.samples  # the mean of the sampled syncs' CPU
        cost = cpu + self.http_overhead if self.tracker_cost is None else self.tracker_cost
        load.syncs += 1
        load.cpu += cpu
        load.busy += cost
        load.free = env.now + cost
        yield env.timeout(cost + half)
        if not node.alive:
            return
        answer = json.loads(out)
        members = answer.get("members")
        if isinstance(members, dict):
            node.mv = int(members.get("v", node.mv))
        node.pace = float(answer.get("pace", 0.0))
        node.member.incoming(answer.get("sections", {}).get("index"))

    def _expire_loop(self, site: int) -> Any:
        while True:
            yield self.env.timeout(self.control.tracker_tick)
            self.trackers[site].expire(self.env.now)

    def _kill(self, node: SimNode, at: float) -> Any:
        yield self.env.timeout(at)
        node.alive = False
        for ev in [node.sync_wake, *node.wake_events.values()]:
            if ev is not None and not ev.triggered:
                ev.succeed()

    # -- pulls ------------------------------------------------------------------------------------

    def _pull(self, node: SimNode) -> Any:
        env = self.env
        node.arrived = self.arrival(node.index)
        yield env.timeout(node.arrived + self.profile.pre)
        if not node.alive:
            return
        node.pending = len(self.blobs)
        for blob in self.blobs:
            dl = node.engine.start(blob)
            env.process(self._fill(node, dl))

    def _fill(self, node: SimNode, dl: SimDownload) -> Any:
        env = self.env
        while node.alive and not dl.task.done():
            dl.plan(self._launch, self._origin)
            ev = env.event()
            node.wake_events[dl.blob.digest] = ev
            yield ev | env.timeout(0.25)

    def _wake(self, dl: SimDownload) -> None:
        node = self.by_url[dl.engine.self_url]
        ev = node.wake_events.get(dl.blob.digest)
        if ev is not None and not ev.triggered:
            ev.succeed()

    def _launch(self, dl: SimDownload, index: int, peer: str, hedge: bool) -> None:
        env, eng = self.env, dl.engine
        st = eng.stat(peer)
        f = Flight(index, peer, env.now, st.inflight, hedge, hedge)
        eng.inflight += 1
        st.inflight += 1
        dl.flights.setdefault(index, []).append(f)
        src, dst = self.by_url[peer], self.by_url[eng.self_url]
        half = self.topology.lan_rtt / 2
        nbytes = dl.blob.chunk_bytes(index)
        if not src.alive:
            delay = self.control.sync_timeout  # connection refused or timed out: a failure
        else:
            links = [src.links.up, dst.links.down, *self.profile.host.lan_links()]
            end = transfer(env.now + half, nbytes, links)
            f.first_byte = max(env.now + 2 * half, end - nbytes / max(src.links.up.rate, 1.0) + half)
            delay = end + half - env.now
        ev = env.timeout(delay)
        ev.callbacks.append(lambda _e: self._landed(dl, f, src, nbytes))

    def _landed(self, dl: SimDownload, f: Flight, src: SimNode, nbytes: int) -> None:
        eng, now = dl.engine, self.env.now
        node = self.by_url[eng.self_url]
        if f.cancelled or not node.alive:
            return
        st = eng.stat(f.peer)
        eng.inflight -= 1
        st.inflight -= 1
        flights = dl.flights.get(f.index, [])
        if f in flights:
            flights.remove(f)
        if not src.alive:
            if st.chunk_failed(nbytes=nbytes, seconds=now - f.started, queue=f.queue, now=now):
                st.drop(now, 20.0, "suspended")
        else:
            shared = (f.queue + st.inflight) / 2
            st.observe(nbytes, now - f.started, latency=f.first_byte - f.started, queue=shared, now=now)
            if f.index in dl.missing:
                eng.counters["peer_bytes"] += nbytes
                self._stored(node, dl, f.index)
        if not dl.flights.get(f.index):
            dl.flights.pop(f.index, None)
        for other in eng.downloads.values():
            self._wake(other)

    def _stored(self, node: SimNode, dl: SimDownload, index: int) -> None:
        """Chunk `index` is stored: twins cancelled (hedged stragglers recorded as outrun)."""
        eng, now = dl.engine, self.env.now
        completed = eng.landed(dl, index)
        for twin in dl.flights.pop(index, []):
            twin.cancelled = True
            eng.inflight -= 1
            tw = eng.stat(twin.peer)
            tw.inflight -= 1
            if twin.hedged and not twin.hedge:
                tw.outrun(dl.blob.chunk_size, now - twin.started, queue=twin.queue, now=now)
        if completed:
            done = self.profile.host.unpack(now, dl.blob.size)
            ev = self.env.timeout(done - now)
            ev.callbacks.append(lambda _e: self._unpacked(node))

    def _unpacked(self, node: SimNode) -> None:
        node.pending -= 1
        if node.pending == 0:
            node.done = self.env.now + self.profile.post
            if self.loads[node.site].memory == 0 and self._done_share(node.site) >= 0.5:
                self.loads[node.site].memory = tracker_memory(self.trackers[node.site])

    def _origin(self, dl: SimDownload, first: int, last: int) -> None:
        self.env.process(self._origin_run(dl, first, last))

    def _origin_run(self, dl: SimDownload, first: int, last: int) -> Any:
        env, eng = self.env, dl.engine
        node = self.by_url[eng.self_url]
        yield env.timeout(self.topology.wan_rtt)  # the Range request and its first byte
        uplink = self.uplinks[node.site]
        for i in range(first, last + 1):
            if not node.alive:
                return
            nbytes = dl.blob.chunk_bytes(i)
            links = [uplink, self.registry, node.links.down, *self.profile.host.lan_links()]
            end = transfer(env.now, nbytes, links)
            yield env.timeout(end - env.now)
            eng.counters["origin_bytes"] += nbytes
            dl.origin_chunks.discard(i)
            if i in dl.missing:
                self._stored(node, dl, i)
            self._wake(dl)
        dl.origin_chunks = set()
        self._wake(dl)

    # -- running and results ------------------------------------------------------------------------

    def _done_share(self, site: int) -> float:
        nodes = [n for n in self.nodes if n.site == site and n.alive]
        return sum(n.done is not None for n in nodes) / max(len(nodes), 1)

    def _finished(self) -> bool:
        return all(n.done is not None or not n.alive for n in self.nodes)

    def run(self, until: float = 600.0) -> SiteResult:
        """Run until every live node has pulled the image and told the tracker (or `until`
        simulated seconds)."""
        t0 = time.perf_counter()
        done_ev = self.env.process(self._watch())
        self.env.run(until=simpy.AnyOf(self.env, [done_ev, self.env.timeout(until)]))
        return SiteResult.of(self, time.perf_counter() - t0)

    def _watch(self) -> Any:
        """Until every live node is done, and one idle sync interval more: the last completions
        reach the tracker's index."""
        while not self._finished():
            yield self.env.timeout(0.05)
        self.syncs_at_end = sum(n.syncs for n in self.nodes)  # the pull's control traffic
        self.loads_at_end = [(ld.syncs, ld.cpu, ld.busy) for ld in self.loads]
        yield self.env.timeout(self.control.sync_idle + 0.05)


@dataclass
class SiteResult:
    """One simulated pull: per-node times, uplink bytes per site, the trackers' load."""

    times: list[float]  # per live node: seconds from its arrival until its pull was done
    all_done: float  # simulated seconds until the last live node was done
    unfinished: int  # live nodes not done when the run stopped
    image_bytes: int
    uplink_bytes: list[int]
    syncs_per_node_per_s: float
    tracker_syncs_per_s: list[float]
    tracker_cores: list[float]  # real CPU seconds of the tracker code per simulated second
    tracker_busy: list[float]  # the simulated core's utilisation
    tracker_max_wait: list[float]
    tracker_memory: list[int]
    wall: float  # seconds the simulation took

    @classmethod
    def of(cls, site: SimSite, wall: float) -> SiteResult:
        live = [n for n in site.nodes if n.alive]
        times = sorted(n.done - n.arrived for n in live if n.done is not None)
        end = max((n.done for n in live if n.done is not None), default=site.env.now)
        span = max(end, 1e-9)
        syncs = site.syncs_at_end or sum(n.syncs for n in site.nodes)
        loads = site.loads_at_end or [(ld.syncs, ld.cpu, ld.busy) for ld in site.loads]
        return cls(
            times=times,
            all_done=end,
            unfinished=sum(n.done is None for n in live),
            image_bytes=sum(b.size for b in site.blobs),
            uplink_bytes=[u.bytes for u in site.uplinks],
            syncs_per_node_per_s=syncs / len(site.nodes) / span,
            tracker_syncs_per_s=[n / span for n, _cpu, _busy in loads],
            tracker_cores=[cpu / span for _n, cpu, _busy in loads],
            tracker_busy=[busy / span for _n, _cpu, busy in loads],
            tracker_max_wait=[ld.max_wait for ld in site.loads],
            tracker_memory=[
                ld.memory or tracker_memory(t) for ld, t in zip(site.loads, site.trackers, strict=True)
            ],
            wall=wall,
        )

    def quantile(self, q: float) -> float:
        """The `q` quantile of the per-node pull times (nearest rank)."""
        if not self.times:
            return float("nan")
        return self.times[min(len(self.times) - 1, max(0, int(q * len(self.times) + 0.5) - 1))]

    def uplink_x(self, site: int = 0) -> float:
        """Site `site`'s uplink bytes over the image's size."""
        return self.uplink_bytes[site] / self.image_bytes


def tracker_memory(tracker: Tracker) -> int:
    """Bytes of a tracker's state: its member table, the members it dropped lately, and the
    state of its sections' tracker sides (the index)."""
    state: list[object] = [tracker.table, tracker.former]
    for section in tracker.sections.tracker.values():
        state.append(section.index if isinstance(section, IndexTracker) else section)
    return deep_size(state)


def deep_size(obj: object) -> int:
    """Bytes held by `obj` and everything it refers to (each object counted once; modules,
    classes and functions not followed): what the tracker's state costs in memory."""
    import sys
    import types

    seen: set[int] = set()
    stack = [obj]
    total = 0
    skip = (type, types.ModuleType, types.FunctionType, types.MethodType, types.BuiltinFunctionType)
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, skip):
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, list | tuple | set | frozenset):
            stack.extend(o)
        if hasattr(o, "__dict__"):
            stack.append(vars(o))
        for slot in getattr(type(o), "__slots__", ()):
            if hasattr(o, slot):
                stack.append(getattr(o, slot))
    return total
