"""Tracker election: the bully algorithm (Garcia-Molina, 1982) with epochs as fencing tokens.

Rank. Every node orders the site's members the same way from their records alone
(`rank_key`): nodes that may lead (`[site] tracker_priority` >= 0) before nodes that may not,
then higher priority, faster link, more CPUs, more memory, longer-lived (earlier `started`),
and the lower node id last, so no two records tie. Same records, same order, on every node:
the election never depends on which timer fired first.

One election round (`decide`), held by a node that has no tracker (its syncs failed twice, or
start-up discovery found none): it asks the best-ranked members better than itself (and the
tracker it lost, once more) who their tracker is (`probe_targets`), then

- if any answer names a live tracker, it follows the best of them (`better_tracker`);
- else if a better-ranked node that may lead answered, it waits for that node to claim (the
  node it asked was told which tracker was lost and checks it at once), at most `claim_wait`
  seconds: a better node that answers but never claims can still reach the old tracker (the
  partition is not transitive), and then this node claims rather than stay leaderless;
- else it claims, with an epoch above every epoch it has seen or been told of (`claim_epoch`),
  unless it may not lead (priority < 0): then there is no tracker (`NoLeader`) and the engine
  falls back to direct fan-out.

Epochs fence. A tracker's identity is `TrackerRef(epoch, record)`. Of two trackers the one with
the higher epoch wins, and of equal epochs the better-ranked one (`better_tracker`): a total
order, so both sides of a healed partition pick the same winner and the loser steps down. A
tracker a node has lost (found unreachable) is not followed again on hearsay at that epoch
(`usable`), only if it answers itself; leases and other tracker state carry the epoch, so a
deposed tracker's word is recognisably old.

Stickiness. A node follows a tracker that answers even when it outranks that tracker; a
better-ranked node that joins follows the sitting tracker. Rank decides elections only, so the
role does not flap as nodes come and go.

Pure: no clock (`waited` is passed in), no I/O; the member loop (`peer/control/member.py`) asks
the questions and acts on the decisions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from peer.policy.membership import Member

RankKey = tuple[int, int, int, int, int, float, str]


def can_lead(member: Member) -> bool:
    """Whether `member` may ever be tracker (`[site] tracker_priority` >= 0)."""
    return member.priority >= 0


def rank_key(member: Member) -> RankKey:
    """The election's sort key: smaller is better (see the module docstring for the order)."""
    return (
        0 if can_lead(member) else 1,
        -member.priority,
        -member.link_mbit,
        -member.cpus,
        -member.mem_mib,
        member.started,
        member.id,
    )


def outranks(a: Member, b: Member) -> bool:
    """Whether `a` comes before `b` in the rank order."""
    return rank_key(a) < rank_key(b)


def rank_order(members: Iterable[Member]) -> list[Member]:
    """`members` best first (one record per id; the same order on every node)."""
    unique = {m.id: m for m in members}
    return sorted(unique.values(), key=rank_key)


@dataclass(frozen=True)
class TrackerRef:
    """A tracker: its record and the epoch it claimed."""

    epoch: int
    record: Member

    @property
    def id(self) -> str:
        """The tracker's node id."""
        return self.record.id

    @property
    def url(self) -> str:
        """Where the tracker is reached."""
        return self.record.url

    def to_wire(self) -> dict[str, Any]:
        """{"epoch", "record"} as JSON-compatible values."""
        return {"epoch": self.epoch, "record": self.record.to_wire()}

    @classmethod
    def from_wire(cls, data: Any) -> TrackerRef:
        """Parse and check a tracker reference; ValueError names what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("a tracker must be an object")
        epoch = data.get("epoch")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 < epoch < 1 << 53:
            raise ValueError(f"tracker epoch must be a positive integer, got {epoch!r}")
        return cls(epoch, Member.from_wire(data.get("record")))


def better_tracker(a: TrackerRef, b: TrackerRef) -> bool:
    """Whether tracker `a` wins over tracker `b`: higher epoch, then better rank."""
    if a.epoch != b.epoch:
        return a.epoch > b.epoch
    return rank_key(a.record) < rank_key(b.record)


def winner(a: TrackerRef, b: TrackerRef) -> TrackerRef:
    """The one of two trackers that stays; the same whichever side asks."""
    return b if better_tracker(b, a) else a


Lost = Mapping[str, int]  # node id -> the epoch at which this node found that tracker unreachable


def usable(tracker: TrackerRef, lost: Lost) -> bool:
    """Whether a tracker named by someone else may be followed: not one this node lost at that
    epoch (hearsay from a node that has not noticed yet)."""
    return tracker.epoch > lost.get(tracker.id, 0)


def accept(current: TrackerRef | None, offered: TrackerRef, lost: Lost) -> bool:
    """Whether a node following `current` (None: no tracker) switches to `offered` (announced by
    a claimer, or named in an answer): only to a usable tracker that wins over the current one."""
    if not usable(offered, lost):
        return False
    return current is None or better_tracker(offered, current)


@dataclass(frozen=True)
class Answer:
    """A node's answer to "who is your tracker?" (`GET /peersync/v1/control/whois`)."""

    record: Member
    tracker: TrackerRef | None  # the tracker it follows (itself, if it is the tracker)
    epoch_seen: int = 0  # the highest epoch it has seen

    @property
    def is_tracker(self) -> bool:
        """Whether the answering node is itself the tracker."""
        return self.tracker is not None and self.tracker.id == self.record.id


@dataclass(frozen=True)
class Follow:
    """Follow `tracker` (sync with it, re-announce in full)."""

    tracker: TrackerRef


@dataclass(frozen=True)
class Wait:
    """Better-ranked nodes that may lead are alive: give them time to claim, ask again."""

    better: tuple[str, ...]


@dataclass(frozen=True)
class Claim:
    """Become tracker at `epoch` and tell every member."""

    epoch: int


@dataclass(frozen=True)
class NoLeader:
    """No tracker, and this node may not be one: fall back to direct fan-out, ask again later."""


Decision = Follow | Wait | Claim | NoLeader


def probe_targets(me: Member, members: Iterable[Member], lost: Lost, k: int) -> list[Member]:
    """The members an election asks: the `k` best-ranked that outrank `me` (nodes that may
    lead; for a node that may not lead, every node that may), skipping lost trackers (asked
    separately) and `me`."""
    better = [
        m
        for m in rank_order(members)
        if m.id != me.id and m.id not in lost and can_lead(m) and outranks(m, me)
    ]
    return better[: max(0, k)]


def offered(answers: Iterable[Answer | None], lost: Lost, site: str) -> TrackerRef | None:
    """The best tracker the answers name, or None: a tracker that answered itself always counts
    (it is alive, whatever this node lost), one named by others only if `usable`."""
    best: TrackerRef | None = None
    for a in answers:
        if a is None or a.tracker is None or a.tracker.record.site != site:
            continue
        if (a.is_tracker or usable(a.tracker, lost)) and (best is None or better_tracker(a.tracker, best)):
            best = a.tracker
    return best


def claim_epoch(epoch_seen: int, answers: Iterable[Answer | None], lost: Lost) -> int:
    """The epoch of a claim: above this node's highest epoch, every epoch an answer reported
    (seen or followed), and every lost tracker's."""
    epochs = [epoch_seen, *lost.values()]
    for a in answers:
        if a is not None:
            epochs.append(a.epoch_seen)
            if a.tracker is not None:
                epochs.append(a.tracker.epoch)
    return max(epochs) + 1


def decide(
    me: Member,
    answers: Sequence[Answer | None],
    epoch_seen: int,
    lost: Lost,
    waited: float,
    claim_wait: float,
) -> Decision:
    """One election round's outcome for `me`, given this round's `answers` (None: no answer)
    from `probe_targets` and the lost tracker, the highest epoch seen, the trackers lost, and
    how long this election has been waiting (see the module docstring). Answers of nodes of
    another site count for nothing."""
    ours = [a for a in answers if a is not None and a.record.site == me.site]
    tracker = offered(ours, lost, me.site)
    if tracker is not None:
        return Follow(tracker)
    better = tuple(sorted(a.record.id for a in ours if can_lead(a.record) and outranks(a.record, me)))
    if not can_lead(me):
        return Wait(better) if better else NoLeader()
    if better and waited < claim_wait:
        return Wait(better)
    return Claim(claim_epoch(epoch_seen, ours, lost))
