"""The member loop: sync with the tracker, count failures, hold elections, follow, reconcile.

One `MemberAgent` per node runs one loop (docs/control-plane.md). What it does each turn
depends on the node's role:

- **member** (following a tracker): one sync, every `sync_busy` seconds while the engine has
  downloads (`set_busy`), `sync_idle` otherwise, never more often than the tracker's `pace` (its
  answer says it: `policy.pacing`, so a large site's tracker stays within its budget), sooner on
  `wake()`. The sync carries every
  registered section's payload and brings back the member-table delta and the sections'
  answers. A sync that fails is retried at once; `fail_after` failures in a row and the tracker
  is lost (removed from this node's copy at once, remembered at its epoch in `lost`), and the
  node starts an election. A node that answers the sync but is no longer tracker redirects to
  the one it follows; the node follows the redirect and re-announces in full.
- **electing** (no tracker): one election round every `probe_interval`: ask the best-ranked
  nodes better than this one, the lost tracker, and a few candidates not asked lately
  (`GET whois`), then act on `peer.policy.election.decide`: follow, wait, claim, or (a node
  that may not lead, and nobody who may) run leaderless with slower rounds. For
  `startup_grace` after start it only looks for an existing tracker, so a booting site's
  discovery can complete before anyone claims.
- **tracker**: every `tracker_tick`: drop silent members (`Tracker.expire`) and sync its own
  sections locally (no HTTP); every `reconcile_interval`: ask a few addresses that are known
  (discovery, members dropped lately, lost trackers) but not in the table who their tracker
  is. A better tracker there (a healed partition) makes this one step down and follow it; a
  worse one, or a node with no tracker, is told about this one (`POST tracker`).

Claiming: epoch above everything seen, the table seeded from this node's copy (minus the lost
tracker), every section's tracker side `reset`, and every known address told (`POST tracker`);
an answer naming a better tracker makes it step down at once.

Sections (`peer.control.sections`): `outgoing(full)` is asked each sync, `full` on the first sync
to a tracker (and after the tracker asked for a resync, or for a section registered since);
`incoming` gets the answer of each section that sent something; `failed` is called for each
section that sent something when the sync did not reach a tracker (failure, redirect, resync).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import structlog

from peer.control.client import PROTOCOL, ControlClient, Counters
from peer.control.discovery import Discovery
from peer.control.sections import Sections
from peer.control.tracker import SyncRequest, Tracker
from peer.policy.election import (
    Answer,
    Claim,
    Follow,
    NoLeader,
    TrackerRef,
    Wait,
    better_tracker,
    decide,
    offered,
    probe_targets,
    rank_order,
    usable,
)
from peer.policy.membership import Delta, Member, MemberTable
from peer.policy.pacing import member_interval
from peer.policy.timeout import AnswerTimer

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ControlConfig:
    """Timings and bounds of the control plane (docs/control-plane.md says why each is what it is)."""

    sync_busy: float = 0.25  # seconds between syncs while downloads run
    sync_idle: float = 1.0  # ... otherwise
    sync_timeout: float = 1.0  # a sync unanswered this long has failed, at least (`policy.timeout`)
    fail_after: int = 2  # failed syncs in a row that lose the tracker
    retry_after: float = 0.05  # a failed sync is retried this soon
    member_timeout: float = 3.0  # the tracker drops a member silent this long
    tracker_tick: float = 0.25  # how often the tracker looks for silent members
    startup_grace: float = 1.5  # after start, look for an existing tracker this long before claiming
    probe_timeout: float = 1.0  # a whois or announcement unanswered this long has failed
    probe_interval: float = 0.5  # seconds between election rounds
    election_probe: int = 8  # better-ranked nodes asked per round (and unasked candidates per round)
    claim_wait: float = 3.0  # how long a better-ranked node that answers is given to claim
    leaderless_interval: float = 2.0  # rounds when no node that may lead is known
    reconcile_interval: float = 2.0  # a tracker looks for other trackers this often
    reconcile_probe: int = 4  # ... asking at most this many addresses each time
    fanout: int = 8  # members the engine polls directly when there is no tracker (`policy.fanout`)
    min_sync_gap: float = 0.05  # wake() never makes syncs closer than this
    announce_parallel: int = 32  # announcements of a claim in flight at once
    lost_ttl: float = 60.0  # a lost tracker stays suspect (not followed on hearsay) this long


def _guard(name: str, what: str, fn: Any, *args: Any) -> Any:
    """Call a section's method; a section that raises loses this round, not the sync."""
    try:
        return fn(*args)
    except Exception:
        log.exception("section failed", section=name, call=what)
        return None


class MemberAgent:
    """This node's side of the control plane (see the module docstring)."""

    def __init__(
        self,
        me: Member,
        sections: Sections,
        discovery: Discovery,
        client: ControlClient,
        counters: Counters,
        config: ControlConfig,
    ) -> None:
        self.me = me
        self.site = me.site
        self.sections = sections
        self.discovery = discovery
        self.client = client
        self.counters = counters
        self.cfg = config
        now = time.monotonic()
        self.started = now
        self.view = MemberTable()  # this node's copy of the member table (itself included)
        self.view.reset([me], now)
        self.following: TrackerRef | None = None  # the tracker (this node itself when it is one)
        self.tracker: Tracker | None = None  # this node's tracker role, while it has it
        self.epoch_seen = 0
        self.lost: dict[str, int] = {}  # tracker id -> epoch it was lost at
        self._lost: dict[str, tuple[Member, float]] = {}  # tracker id -> (record, when lost)
        self.failures = 0
        self.busy = False
        self.answer_timer = AnswerTimer(floor=config.sync_timeout)  # how long a sync waits (`policy.timeout`)
        self.pace = 0.0  # the tracker's pace (`policy.pacing`): our syncs are at least this far apart
        self.elections = 0
        self.claims = 0
        self.electing_since: float | None = now
        self.synced_at: float | None = None
        self._mv = 0
        self._first = True  # the next sync is the first to this tracker: announce in full
        self._owed: set[str] = set()  # sections that owe a full announcement
        self._leaderless = False
        self._known: dict[str, Member] = {}  # url -> record (whois answers, mDNS)
        self._asked: dict[str, float] = {}  # url -> when last asked
        self._cursor = 0
        self._next_reconcile = now
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- what the rest of the node reads -------------------------------------------------

    @property
    def role(self) -> str:
        """ "tracker", "member" (following a tracker) or "electing" (no tracker)."""
        if self.tracker is not None:
            return "tracker"
        return "member" if self.following is not None else "electing"

    def table(self) -> MemberTable:
        """The member table this node goes by: its own as tracker, else its copy."""
        return self.tracker.table if self.tracker is not None else self.view

    def members(self) -> list[Member]:
        """The other members alive in this node's view."""
        return [m for m in self.table().records() if m.id != self.me.id]

    def member_urls(self) -> list[str]:
        """Every other member's URL, sorted: what the engine gets whether or not there is a
        tracker. The bound on direct polling is applied by the engine (`peer.policy.fanout`),
        over this full list, so that every node deals the same groups."""
        return sorted(m.url for m in self.members())

    def wake(self) -> None:
        """Do the next turn now (an early sync, or an early election round)."""
        self._wake.set()

    def set_busy(self, busy: bool) -> None:
        """Downloads run (sync every `sync_busy`) or not (`sync_idle`)."""
        if busy and not self.busy:
            self._wake.set()
        self.busy = busy

    def section_added(self, name: str) -> None:
        """A section registered now owes its whole state to the tracker."""
        self._owed.add(name)

    def discovered(self) -> None:
        """Discovery found or lost a node: an electing node looks again at once."""
        if self.following is None:
            self._wake.set()

    # -- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        """Turn after turn until cancelled (see the module docstring)."""
        while not self._closed:
            began = time.monotonic()
            try:
                await self._turn()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("control plane turn failed")
            await self._pause(began)

    async def _turn(self) -> None:
        now = time.monotonic()
        self._prune_lost(now)
        if self.tracker is not None:
            self._tracker_tick(now)
            if now >= self._next_reconcile:
                self._next_reconcile = now + self.cfg.reconcile_interval
                await self._reconcile()
        elif self.following is not None:
            await self._sync(self.following)
        else:
            await self._elect()

    def _interval(self) -> float:
        if self.tracker is not None:
            return min(self.cfg.tracker_tick, self.cfg.sync_busy)
        if self.following is not None:
            if self.failures or self._first:
                return self.cfg.retry_after
            return member_interval(self.cfg.sync_busy if self.busy else self.cfg.sync_idle, self.pace)
        return self.cfg.leaderless_interval if self._leaderless else self.cfg.probe_interval

    async def _pause(self, began: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self._interval())
        self._wake.clear()
        gap = began + self.cfg.min_sync_gap - time.monotonic()
        if gap > 0:
            await asyncio.sleep(gap)

    # -- syncing ---------------------------------------------------------------------------

    def _request(self) -> tuple[dict[str, Any], list[str]]:
        """The next sync's body and the sections that put something in it."""
        payloads: dict[str, Any] = {}
        for name, section in self.sections.member.items():
            full = self._first or name in self._owed
            payload = _guard(name, "outgoing", section.outgoing, full)
            if payload is not None:
                payloads[name] = payload
        assert self.following is not None
        body: dict[str, Any] = {
            "v": PROTOCOL,
            "site": self.site,
            "id": self.me.id,
            "epoch": self.following.epoch,
            "mv": 0 if self._first else self._mv,
            "full": self._first,
            "sections": payloads,
        }
        if self._first:
            body["record"] = self.me.to_wire()
        return body, list(payloads)

    def sync_patience(self) -> float:
        """How long a sync sent now may wait before it counts as failed (see `_sync`)."""
        return self.client.patience(self.answer_timer.timeout())

    async def _sync(self, ref: TrackerRef) -> None:
        body, sent = self._request()
        began = time.monotonic()
        reply = await self.client.sync(ref.url, body, timeout=self.answer_timer.timeout())
        if reply is None:
            self.answer_timer.failed()
        else:
            self.answer_timer.observe(time.monotonic() - began)
        if self.following != ref or self.tracker is not None:
            self._failed(sent)  # the tracker changed while we waited: this answer is stale
            return
        self._answer(reply, sent, time.monotonic())

    def _tracker_tick(self, now: float) -> None:
        assert self.tracker is not None
        self.tracker.expire(now)
        body, sent = self._request()
        reply = self.tracker.handle(SyncRequest.from_wire(body), now)
        self._answer(reply, sent, now)

    def _failed(self, sent: Iterable[str]) -> None:
        for name in sent:
            _guard(name, "failed", self.sections.member[name].failed)

    def _answer(self, reply: dict[str, Any] | None, sent: list[str], now: float) -> None:
        """Act on a sync's reply (None: no useful answer)."""
        assert self.following is not None
        if reply is None:
            self._failed(sent)
            self.failures += 1
            if self.failures >= self.cfg.fail_after:
                self._lose(now)
            return
        if "redirect" in reply:
            self._failed(sent)
            self._redirected(reply.get("redirect"), now)
            return
        if reply.get("resync"):
            self._failed(sent)
            self._first = True
            self._owed = set(self.sections.member)
            return
        try:
            ref = TrackerRef.from_wire(reply.get("tracker"))
            delta = Delta.from_wire(reply.get("members"))
            answers = reply.get("sections") or {}
            if ref.id != self.following.id or not isinstance(answers, dict):
                raise ValueError("the answer is not from the tracker we follow")
        except ValueError as exc:
            log.warning("malformed sync reply", tracker=self.following.url, error=str(exc))
            reply = None
            self._answer(None, sent, now)
            return
        self.following = ref
        self.epoch_seen = max(self.epoch_seen, ref.epoch)
        if self.tracker is None:
            gone = self.view.apply(delta, now)
            if gone:
                log.info("members left", members=gone)
        self._mv = delta.version
        for name in sent:
            _guard(name, "incoming", self.sections.member[name].incoming, answers.get(name))
        self._first = False
        self._owed.clear()
        self.failures = 0
        pace = reply.get("pace")
        self.pace = float(pace) if isinstance(pace, int | float) and pace >= 0 else 0.0
        self.synced_at = now

    def _redirected(self, redirect: Any, now: float) -> None:
        """The node we synced with is not tracker: follow the one it names, or elect."""
        target: TrackerRef | None = None
        with contextlib.suppress(ValueError):
            target = TrackerRef.from_wire(redirect) if redirect is not None else None
        if target is not None and target.id != self.me.id and usable(target, self.lost):
            log.info("redirected", old=self.following.id if self.following else None, new=target.id)
            self._follow(target, now)
        else:
            self._lose(now)

    def _follow(self, ref: TrackerRef, now: float) -> None:
        if ref.id == self.me.id and self.tracker is None:
            return  # hearsay that we are tracker: we are not
        if self.following != ref:
            log.info("following tracker", tracker=ref.id, url=ref.url, epoch=ref.epoch)
        self.following = ref
        self.epoch_seen = max(self.epoch_seen, ref.epoch)
        self.failures = 0
        self._mv = 0
        self._first = True
        self._owed = set(self.sections.member)
        self.electing_since = None
        self._leaderless = False
        if self.lost.get(ref.id, 0) >= ref.epoch:
            self.lost.pop(ref.id, None)
            self._lost.pop(ref.id, None)
        self._wake.set()

    def _lose(self, now: float) -> None:
        ref = self.following
        assert ref is not None
        log.warning("tracker lost", tracker=ref.id, url=ref.url, epoch=ref.epoch, failures=self.failures)
        self.following = None
        self.failures = 0
        self.lost[ref.id] = max(self.lost.get(ref.id, 0), ref.epoch)
        self._lost[ref.id] = (ref.record, now)
        self.view.remove(ref.id)
        self.electing_since = now
        self.elections += 1
        self._wake.set()

    def _prune_lost(self, now: float) -> None:
        for node_id, (_record, at) in list(self._lost.items()):
            if now - at > self.cfg.lost_ttl:
                self._lost.pop(node_id, None)
                self.lost.pop(node_id, None)

    # -- elections --------------------------------------------------------------------------

    async def _ask(self, urls: list[str]) -> list[tuple[str, Answer | None]]:
        """whois to each of `urls` at once; answers are learned from (records, epochs)."""
        lost = max(self._lost, key=lambda i: self._lost[i][1]) if self._lost else None
        answers = await asyncio.gather(*(self.client.whois(u, self.me, lost) for u in urls))
        now = time.monotonic()
        out: list[tuple[str, Answer | None]] = []
        for url, answer in zip(urls, answers, strict=True):
            self._asked[url] = now
            if answer is None or answer.record.site != self.site or answer.record.id == self.me.id:
                known = self._known.get(url)
                if (
                    answer is None
                    and known is not None
                    and known.id not in self.lost
                    and self.tracker is None
                ):
                    if self.following is None:
                        self.view.remove(known.id)  # not answering: not a member we can vouch for
                out.append((url, None))
                continue
            self._known[url] = answer.record
            self._known[answer.record.url] = answer.record
            if self.tracker is None and self.following is None:
                self.view.heard(answer.record, now)
            seen = [answer.epoch_seen, answer.tracker.epoch if answer.tracker else 0]
            self.epoch_seen = max(self.epoch_seen, *seen)
            out.append((url, answer))
        return out

    def _probe_list(self, startup: bool) -> list[str]:
        candidates = self.discovery.candidates()
        for url, record in candidates.items():
            if record is not None and record.id != self.me.id:
                self._known[url] = record
        records = {m.id: m for m in [*self._known.values(), *self.view.records()] if m.id != self.me.id}
        k = self.cfg.election_probe
        urls = [m.url for m in probe_targets(self.me, records.values(), self.lost, k)]
        urls += [record.url for record, _at in self._lost.values()]
        extra = k if startup or not self._leaderless else 2
        pool = [u for u in candidates if u not in urls and u != self.me.url]
        pool += [m.url for m in records.values() if m.url not in urls and m.url not in pool]
        pool.sort(key=lambda u: self._asked.get(u, 0.0))
        return list(dict.fromkeys([*urls, *pool[:extra]]))

    async def _elect(self) -> None:
        startup = time.monotonic() - self.started < self.cfg.startup_grace
        urls = self._probe_list(startup)
        asked = await self._ask(urls) if urls else []
        if self.following is not None or self.tracker is not None:
            return  # an announcement came in while we asked
        now = time.monotonic()
        answers = [a for _u, a in asked]
        if startup:
            found = offered(answers, self.lost, self.site)
            if found is not None:
                self._follow(found, now)
            return
        since = self.electing_since if self.electing_since is not None else now
        decision = decide(self.me, answers, self.epoch_seen, self.lost, now - since, self.cfg.claim_wait)
        match decision:
            case Follow(tracker=ref):
                self._follow(ref, now)
            case Claim(epoch=epoch):
                self._claim(epoch, now)
            case Wait():
                self._leaderless = False
            case NoLeader():
                if not self._leaderless:
                    log.info("no node here may be tracker; fanning out directly", fanout=self.cfg.fanout)
                self._leaderless = True

    def _claim(self, epoch: int, now: float) -> None:
        seed = [m for m in self.view.records() if m.id not in self.lost]
        self.tracker = Tracker(self.me, epoch, self.sections, self.cfg.member_timeout, now, seed)
        self.claims += 1
        log.info("claimed tracker", epoch=epoch, members=len(self.tracker.table))
        self._follow(self.tracker.ref, now)
        self._next_reconcile = now + self.cfg.reconcile_interval
        targets = [m.url for m in seed if m.id != self.me.id]
        targets += [*self.discovery.candidates(), *(r.url for r, _at in self._lost.values())]
        self._spawn(self._announce(list(dict.fromkeys(targets)), self.tracker.ref))

    def _step_down(self, better: TrackerRef, now: float) -> None:
        assert self.tracker is not None
        log.info("stepping down", epoch=self.tracker.ref.epoch, to=better.id, their_epoch=better.epoch)
        self.view.reset(self.tracker.table.records(), now)
        self.tracker = None
        self.following = None
        self._follow(better, now)

    async def _announce(self, urls: list[str], ref: TrackerRef) -> None:
        """Tell `urls` that `ref` is tracker; step down if one of them follows a better one."""
        limit = asyncio.Semaphore(self.cfg.announce_parallel)

        async def one(url: str) -> None:
            async with limit:
                if not self._holds(ref):
                    return
                theirs = await self.client.announce(url, ref)
            if theirs is not None and self._holds(ref) and better_tracker(theirs, ref):
                self._step_down(theirs, time.monotonic())

        await asyncio.gather(*(one(u) for u in urls if u != self.me.url))

    def _holds(self, ref: TrackerRef) -> bool:
        """Whether this node is still tracker as `ref`."""
        return self.tracker is not None and self.tracker.ref == ref

    async def _reconcile(self) -> None:
        """Look for another tracker among addresses known but not in the table."""
        tracker = self.tracker
        assert tracker is not None
        now = time.monotonic()
        members = {m.url for m in tracker.table}
        pool = [
            *self.discovery.candidates(),
            *tracker.former_urls(now),
            *(r.url for r, _ in self._lost.values()),
        ]
        pool = [u for u in dict.fromkeys(pool) if u not in members and u != self.me.url]
        if not pool:
            return
        k = self.cfg.reconcile_probe
        start = self._cursor % len(pool)
        pick = (pool[start:] + pool[:start])[:k]
        self._cursor = start + k
        for _url, answer in await self._ask(pick):
            if self.tracker is not tracker:
                return
            if answer is None:
                continue
            theirs = answer.tracker
            if theirs is not None and theirs.id != self.me.id:
                if better_tracker(theirs, tracker.ref):
                    self._step_down(theirs, time.monotonic())
                    return
                self._spawn(self._announce([theirs.url, answer.record.url], tracker.ref))
            elif theirs is None:
                self._spawn(self._announce([answer.record.url], tracker.ref))

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- what other nodes ask (the routes) -------------------------------------------------

    def sync_reply(self, request: SyncRequest) -> dict[str, Any]:
        """Answer a member's sync: as tracker, or with a redirect to the tracker we follow."""
        if self.tracker is None:
            target = (
                self.following if self.following is not None and self.following.id != request.id else None
            )
            return {"redirect": target.to_wire() if target is not None else None}
        return self.tracker.handle(request, time.monotonic())

    def whois_reply(self, asker: Member | None, lost: str | None) -> dict[str, Any]:
        """Who we are and whom we follow; check our tracker now if the asker lost it. A node
        with no tracker learns of the asker (a leaderless site meets through these questions)."""
        if asker is not None and asker.site == self.site and asker.id != self.me.id:
            self._known[asker.url] = asker
            if self.tracker is None and self.following is None:
                self.view.heard(asker, time.monotonic())
        if (
            lost is not None
            and self.tracker is None
            and self.following is not None
            and self.following.id == lost
        ):
            self._wake.set()
        return {
            "record": self.me.to_wire(),
            "tracker": self.following.to_wire() if self.following is not None else None,
            "epoch_seen": self.epoch_seen,
        }

    def announced(self, ref: TrackerRef) -> dict[str, Any]:
        """A node says `ref` is tracker: follow it if it wins over ours (step down, if we are)."""
        now = time.monotonic()
        if ref.record.site == self.site and ref.id != self.me.id:
            if self.tracker is not None:
                if better_tracker(ref, self.tracker.ref):
                    self._step_down(ref, now)
            elif self.following is None or better_tracker(ref, self.following):
                self._follow(ref, now)  # it told us itself: alive, whatever we lost
        return {"tracker": self.following.to_wire() if self.following is not None else None}

    # -- status and shutdown ------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """See `peer.control.plane` for the keys (`direct_peers` is added there: it needs the
        static list)."""
        now = time.monotonic()
        table = self.table()
        ranked = rank_order(table.records())
        members = []
        for rank, m in enumerate(ranked):
            heard = table.last_heard(m.id)
            members.append(
                {
                    "id": m.id,
                    "url": m.url,
                    "rank": rank,
                    "priority": m.priority,
                    "started": m.started,
                    "last_heard": None if heard is None else round(max(0.0, now - heard), 3),
                    "self": m.id == self.me.id,
                }
            )
        tracker = self.following
        return {
            "id": self.me.id,
            "site": self.site,
            "url": self.me.url,
            "role": self.role,
            "tracker": None
            if tracker is None
            else {"id": tracker.id, "url": tracker.url, "epoch": tracker.epoch},
            "epoch_seen": self.epoch_seen,
            "members": members,
            "messages": self.counters.snapshot(),
            "elections": self.elections,
            "claims": self.claims,
            "busy": self.busy,
            "uptime": round(now - self.started, 3),
            "mdns": self.discovery.mdns,
            "candidates": len(self.discovery.candidates()),
        }

    async def leave(self) -> None:
        """Tell the tracker this node is going (it drops us at once), then stop."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        ref = self.following
        if ref is not None and self.tracker is None:
            body = {"v": PROTOCOL, "site": self.site, "id": self.me.id, "epoch": ref.epoch, "leave": True}
            await self.client.sync(ref.url, body, timeout=self.cfg.sync_timeout)
