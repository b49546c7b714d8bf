"""The tracker role, and the control plane's HTTP routes (docs/control-plane.md).

`Tracker` is what a node holds while it is the site's tracker at some epoch: the member table
(the membership authority: a member is dead after `member_timeout` without a sync), the tracker
sides of the registered sections (soft state, rebuilt from the members' announcements: `reset`
when the role begins), and the members it dropped lately (`former`: where reconciliation looks
for the other side of a healed partition). It answers syncs; it does no I/O of its own.

Routes, under `/peersync/v1/control/` on the peer port, answered by every node (the node's
current role decides the answer; `ControlNode` is what they need of it):

    POST sync      a member's periodic sync: {v, site, id, epoch, mv, full, record?, leave?,
                   sections: {name: payload}} -> {v, site, tracker, members, sections, pace} from
                   the tracker (`pace`: the seconds between one member's syncs, `policy.pacing`);
                   {v, site, redirect: tracker | null} from a node that is not (the member
                   follows the redirect); {v, site, resync: true} when the tracker does not know
                   the member or the member's state (the member re-announces in full).
    POST whois     {v, site, record, lost?} -> {v, site, record, tracker: tracker | null, epoch_seen}:
                   who this node is and which tracker it follows (itself when it is the tracker);
                   the asker's record lets a node with no tracker learn of it. `lost` names a
                   tracker the asker could not reach: the asked node checks it now.
    POST tracker   {v, site, tracker}: "this is the tracker" (a claim, or reconciliation);
                   -> {v, site, tracker}: the tracker this node follows afterwards.
    GET  status    this node's `ControlPlane.status()` (for tests and the admin CLI).

A request of another site is refused with 409: sites sharing a LAN never mix.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from aiohttp import web

from peer.control.client import PREFIX, PROTOCOL, Counters
from peer.control.sections import Sections
from peer.policy.election import TrackerRef
from peer.policy.membership import NODE_ID, Member, MemberTable
from peer.policy.pacing import SYNC_BUDGET, member_timeout, sync_pace

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class SyncRequest:
    """A parsed sync (see the module docstring)."""

    id: str
    epoch: int
    mv: int
    full: bool
    record: Member | None
    leave: bool
    sections: dict[str, Any]

    @classmethod
    def from_wire(cls, data: Any) -> SyncRequest:
        """Parse and check a sync body; ValueError names what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("a sync must be an object")
        node_id = data.get("id")
        if not isinstance(node_id, str) or not NODE_ID.fullmatch(node_id):
            raise ValueError("sync id must be a node id")
        epoch, mv = data.get("epoch", 0), data.get("mv", 0)
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (epoch, mv)):
            raise ValueError("sync epoch and mv must be integers")
        record = Member.from_wire(data["record"]) if data.get("record") is not None else None
        if record is not None and record.id != node_id:
            raise ValueError("sync record is another node's")
        sections = data.get("sections")
        sections = {} if sections is None else sections
        if not isinstance(sections, dict):
            raise ValueError("sync sections must be an object")
        return cls(node_id, epoch, mv, bool(data.get("full")), record, bool(data.get("leave")), sections)


class Tracker:
    """This node's tracker role at one epoch (see the module docstring)."""

    def __init__(
        self,
        me: Member,
        epoch: int,
        sections: Sections,
        member_timeout: float,
        now: float,
        seed: Iterable[Member] = (),
        former_max: int = 256,
        former_ttl: float = 600.0,
        sync_budget: float = SYNC_BUDGET,
    ) -> None:
        """Seed the table with `seed` (this node's member copy, minus the tracker it lost), all
        heard at `now`: the members get `member_timeout` to sync with the new tracker before
        they count as dead."""
        self.ref = TrackerRef(epoch, me)
        self.sections = sections
        self.member_timeout = member_timeout
        self.sync_budget = sync_budget  # syncs per second the members' pace keeps it within
        self.table = MemberTable()
        self.table.reset([me, *(m for m in seed if m.id != me.id and m.site == me.site)], now)
        self.former: OrderedDict[str, tuple[Member, float]] = OrderedDict()  # id -> (record, dropped at)
        self._former_max = former_max
        self._former_ttl = former_ttl
        for name, section in sections.tracker.items():
            _guard(name, "reset", section.reset)

    @property
    def me(self) -> Member:
        return self.ref.record

    def handle(self, req: SyncRequest, now: float) -> dict[str, Any]:
        """Answer one member's sync at `now`."""
        if req.leave:
            self._drop(req.id, now, why="left")
            return {"left": True}
        known = req.id in self.table
        if not known and not (req.full and req.record is not None):
            return {"resync": True}  # dropped as dead meanwhile, or never met: re-announce in full
        if req.record is not None:
            if req.record.site != self.me.site:
                return {"resync": True}
            self.table.heard(req.record, now)
        else:
            self.table.touch(req.id, now)
        self.former.pop(req.id, None)
        if req.full and known:  # the member restarted or re-announces: its whole state follows
            for name, section in self.sections.tracker.items():
                _guard(name, "forget", section.forget, req.id)
        replies: dict[str, Any] = {}
        for name, payload in req.sections.items():
            handler = self.sections.tracker.get(name)
            if handler is None:
                continue  # a concern this node does not run (a newer member): no answer
            reply = _guard(name, "handle", handler.handle, req.id, payload, now)
            if reply is not None:
                replies[name] = reply
        # a first sync, or a copy from another tracker's epoch, gets the whole table
        mv = req.mv if req.epoch == self.ref.epoch and not req.full and req.mv > 0 else -1
        return {
            "tracker": self.ref.to_wire(),
            "members": self.table.delta_since(mv).to_wire(),
            "sections": replies,
            "pace": round(self.pace(), 3),
        }

    def pace(self) -> float:
        """The seconds between one member's syncs that keep this site's within `sync_budget`."""
        return sync_pace(len(self.table), self.sync_budget)

    def expire(self, now: float) -> list[Member]:
        """Drop the members that have not synced for `member_timeout` (stretched to `MISSED`
        paces in a site large enough to be paced, `policy.pacing`); their records."""
        timeout = member_timeout(self.member_timeout, self.pace())
        dead = self.table.expire(now, timeout, keep=[self.me.id])
        for record in dead:
            self._forget(record, now, why="silent")
        return dead

    def former_urls(self, now: float) -> list[str]:
        """Where members dropped lately were reached, most recent first (reconciliation)."""
        while self.former:
            oldest = next(iter(self.former.values()))
            if now - oldest[1] <= self._former_ttl:
                break
            self.former.popitem(last=False)
        return [m.url for m, _t in reversed(self.former.values())]

    def _drop(self, node_id: str, now: float, why: str) -> None:
        record = self.table.remove(node_id)
        if record is not None:
            self._forget(record, now, why)

    def _forget(self, record: Member, now: float, why: str) -> None:
        log.info("member dropped", member=record.id, url=record.url, why=why)
        self.former[record.id] = (record, now)
        self.former.move_to_end(record.id)
        while len(self.former) > self._former_max:
            self.former.popitem(last=False)
        for name, section in self.sections.tracker.items():
            _guard(name, "forget", section.forget, record.id)


def _guard(name: str, what: str, fn: Any, *args: Any) -> Any:
    """Call a section's method; a section that raises loses its answer, not the sync."""
    try:
        return fn(*args)
    except Exception:
        log.exception("section failed", section=name, call=what)
        return None


class ControlNode(Protocol):
    """What the routes need of this node's control plane (`peer.control.member.MemberAgent`)."""

    site: str
    counters: Counters

    def sync_reply(self, request: SyncRequest) -> dict[str, Any]: ...

    def whois_reply(self, asker: Member | None, lost: str | None) -> dict[str, Any]: ...

    def announced(self, tracker: TrackerRef) -> dict[str, Any]: ...

    def status(self) -> dict[str, Any]: ...


def routes(node: ControlNode, status: Callable[[], dict[str, Any]] | None = None) -> web.RouteTableDef:
    """The control routes over `node` (mounted on the peer exchange's app by `peer.node`);
    `status` is what `GET status` serves (by default `node.status`: `ControlPlane.status()`
    passes itself, which adds what only it knows, such as `direct_peers` and its transport)."""
    r = web.RouteTableDef()
    status_of = status or node.status

    def answer(body: dict[str, Any], status: int = 200) -> web.Response:
        return web.json_response({"v": PROTOCOL, "site": node.site, **body}, status=status)

    async def body_of(request: web.Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="body must be JSON") from None
        if not isinstance(data, dict):
            raise web.HTTPBadRequest(text="body must be a JSON object")
        if data.get("site") != node.site:
            raise web.HTTPConflict(text=f"this node belongs to site {node.site!r}")
        return data

    @r.post(PREFIX + "/sync")
    async def sync(request: web.Request) -> web.Response:
        node.counters.add("sync_received")
        data = await body_of(request)
        try:
            req = SyncRequest.from_wire(data)
        except ValueError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from exc
        return answer(node.sync_reply(req))

    @r.post(PREFIX + "/whois")
    async def whois(request: web.Request) -> web.Response:
        node.counters.add("whois_received")
        data = await body_of(request)
        asker: Member | None = None
        with contextlib.suppress(ValueError):
            asker = Member.from_wire(data.get("record"))
        lost = data.get("lost")
        lost = lost if isinstance(lost, str) and NODE_ID.fullmatch(lost) else None
        return answer(node.whois_reply(asker, lost))

    @r.post(PREFIX + "/tracker")
    async def tracker(request: web.Request) -> web.Response:
        node.counters.add("tracker_received")
        data = await body_of(request)
        try:
            ref = TrackerRef.from_wire(data.get("tracker"))
        except ValueError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from exc
        return answer(node.announced(ref))

    status_of = status or node.status

    @r.get(PREFIX + "/status")
    async def status_route(request: web.Request) -> web.Response:
        return web.json_response(status_of())

    return r
