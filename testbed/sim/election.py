"""The tracker election after the tracker dies, simulated: the bully rounds of `peer.policy.election`.

A settled site of `n` members follows tracker T (the best-ranked node) at epoch 1; T is killed at
t = 0. What each member then does is what `peer.control.member.MemberAgent` does, in simulated time:

- its next sync (each member's sync phase is uniform in one `sync_idle`) is refused at once (a
  killed process refuses connections), retried after `retry_after`, refused again: the tracker is
  lost (`fail_after` = 2), remembered in `lost` at its epoch, and the member starts electing;
- every `probe_interval` it holds one round: it asks (`whois`) the `election_probe` best-ranked
  members that outrank it (`election.probe_targets`) and the lost tracker, waits for the answers
  (half a round trip each way, plus the asked node's queue: each whois costs the asked node
  `whois_cost` of its one core, so the best-ranked node, asked by everyone, queues), and acts on
  `election.decide`: follow a tracker an answer names, wait for a better-ranked node to claim, or
  claim. A node asked about a tracker it still follows checks it at once and loses it too (the
  whois carries `lost`), so the best-ranked survivor starts electing with its first question;
- a claim builds the real `peer.control.tracker.Tracker` (its table seeded with the claimer's copy
  minus the lost tracker) and announces itself to every member, `announce_parallel` at a time; a
  member accepts an announcement by `election.accept`.

Result: when the last live member followed the new tracker (the election time), how many claims
were made (1 is the bully's promise while fewer than `election_probe` better-ranked nodes die at
once), and how many control messages it took. The full re-announcements that follow (every member's
first sync to a new tracker is full) are the site simulation's business (`testbed.sim.site`).

Shortcut, exact: `probe_targets` depends only on the best-ranked records (it returns the `k` best
that outrank the asker, skipping lost ones), so each call gets the site's rank order's first
`k + len(lost) + 1` records and the asker's own, instead of all `n`: the same answer in O(k).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import simpy

from peer.control.member import ControlConfig
from peer.control.sections import Sections
from peer.control.tracker import Tracker
from peer.policy.election import (
    Answer,
    Claim,
    Follow,
    TrackerRef,
    accept,
    decide,
    probe_targets,
    rank_order,
)
from peer.policy.membership import Member


@dataclass
class _Voter:
    """One member's election state."""

    record: Member
    following: TrackerRef | None
    alive: bool = True
    lost: dict[str, int] = field(default_factory=dict)
    epoch_seen: int = 1
    electing_since: float | None = None
    core_free: float = 0.0  # when its core is next free to answer a whois
    tracker: Tracker | None = None


@dataclass(frozen=True)
class ElectionResult:
    """How one election went."""

    nodes: int
    seconds: float  # from the tracker's death until every live member followed one new tracker
    claims: int
    whois: int
    announcements: int
    winner_rank: int  # the winner's place in the rank order (0: the best-ranked survivor... is 1)


class ElectionSim:
    """A site of `n` members whose tracker dies at t = 0 (see the module docstring)."""

    def __init__(
        self,
        n: int,
        seed: int = 0,
        config: ControlConfig | None = None,
        rtt: float = 0.0004,
        whois_cost: float = 100e-6,
        announce_cost: float = 100e-6,
        also_dead: int = 0,
    ) -> None:
        """`also_dead`: how many of the next best-ranked nodes die with the tracker."""
        self.cfg = config or ControlConfig()
        self.rtt, self.whois_cost, self.announce_cost = rtt, whois_cost, announce_cost
        rng = random.Random(seed)
        records = [
            Member(
                f"{rng.getrandbits(128):032x}",
                f"http://10.0.{i // 250}.{i % 250 + 1}:5381",
                "site0",
                started=float(rng.randrange(1_000_000)),
                cpus=rng.choice((2, 4, 8)),
                link_mbit=rng.choice((1000, 10000)),
            )
            for i in range(n)
        ]
        self.ranked = rank_order(records)
        old = TrackerRef(1, self.ranked[0])
        self.voters = {m.id: _Voter(m, old) for m in records}
        for m in self.ranked[: 1 + also_dead]:
            self.voters[m.id].alive = False
        self.env = simpy.Environment()
        self.rng = rng
        self.claims = self.whois = self.announcements = 0

    def run(self, until: float = 120.0) -> ElectionResult:
        """Run the election; ElectionResult.seconds is `until` if it never converged."""
        for v in self.voters.values():
            if v.alive:
                self.env.process(self._member(v))
        done = self.env.process(self._watch())
        self.env.run(until=simpy.AnyOf(self.env, [done, self.env.timeout(until)]))
        live = [v for v in self.voters.values() if v.alive]
        winner = live[0].following
        rank = next((i for i, m in enumerate(self.ranked) if winner is not None and m.id == winner.id), -1)
        return ElectionResult(
            len(self.voters), self.env.now, self.claims, self.whois, self.announcements, rank
        )

    def _converged(self) -> bool:
        live = [v for v in self.voters.values() if v.alive]
        first = live[0].following
        return (
            first is not None
            and self.voters[first.id].alive
            and all(v.following is not None and v.following.id == first.id for v in live)
        )

    def _watch(self) -> Any:
        while not self._converged():
            yield self.env.timeout(0.01)

    def _lose(self, v: _Voter, now: float) -> None:
        if v.following is not None and not self.voters[v.following.id].alive:
            v.lost[v.following.id] = v.following.epoch
            v.following = None
            if v.electing_since is None:
                v.electing_since = now

    def _member(self, v: _Voter) -> Any:
        env, cfg = self.env, self.cfg
        yield env.timeout(self.rng.random() * cfg.sync_idle)  # the next sync of this member
        if v.following is not None and not self.voters[v.following.id].alive:
            yield env.timeout(cfg.retry_after)  # refused, retried at once, refused again
            self._lose(v, env.now)
        while v.following is None:
            yield from self._round(v)
            if v.following is None:
                yield env.timeout(cfg.probe_interval)

    def _round(self, v: _Voter) -> Any:
        env, cfg = self.env, self.cfg
        k = cfg.election_probe
        head = self.ranked[: k + len(v.lost) + 1]
        targets = [m for m in probe_targets(v.record, [*head, v.record], v.lost, k)]
        asked = [self.voters[m.id] for m in targets] + [self.voters[i] for i in v.lost]
        slowest = env.now
        answers: list[Answer | None] = []
        for a in asked:
            self.whois += 1
            if not a.alive:
                answers.append(None)
                continue
            begin = max(env.now + self.rtt / 2, a.core_free)
            a.core_free = begin + self.whois_cost
            slowest = max(slowest, a.core_free + self.rtt / 2)
            self._lose(a, begin)  # the whois names the lost tracker: the asked node checks it
            answers.append(Answer(a.record, a.following, a.epoch_seen))
        yield env.timeout(slowest - env.now)
        if v.following is not None:
            return  # an announcement came in while we asked
        waited = env.now - (v.electing_since if v.electing_since is not None else env.now)
        decision = decide(v.record, answers, v.epoch_seen, v.lost, waited, cfg.claim_wait)
        if isinstance(decision, Follow):
            self._follow(v, decision.tracker)
        elif isinstance(decision, Claim):
            self._claim(v, decision.epoch)

    def _follow(self, v: _Voter, ref: TrackerRef) -> None:
        v.following = ref
        v.epoch_seen = max(v.epoch_seen, ref.epoch)
        v.electing_since = None

    def _claim(self, v: _Voter, epoch: int) -> None:
        self.claims += 1
        seed = [m for m in self.ranked if m.id not in v.lost]
        v.tracker = Tracker(v.record, epoch, Sections(), self.cfg.member_timeout, self.env.now, seed)
        self._follow(v, v.tracker.ref)
        self.env.process(self._announce(v, v.tracker.ref, [m for m in seed if m.id != v.record.id]))

    def _announce(self, v: _Voter, ref: TrackerRef, to: Sequence[Member]) -> Any:
        """`announce_parallel` announcements in flight at once, each a round trip and the
        receiver's cost: the claimer's announcements go out in waves."""
        env, par = self.env, self.cfg.announce_parallel
        for start in range(0, len(to), par):
            if v.following != ref:
                return
            wave = to[start : start + par]
            yield env.timeout(self.rtt + self.announce_cost * len(wave) / par + self.announce_cost)
            for m in wave:
                self.announcements += 1
                r = self.voters[m.id]
                if r.alive and accept(r.following, ref, r.lost):
                    self._follow(r, ref)
