"""peer.control.popularity: the popularity sections of the sync message, driven in process the
way the control plane drives them (member.outgoing -> tracker.handle -> member.incoming), with
failed syncs, a tracker failover and a member leaving. Time is passed in."""

from __future__ import annotations

import json
from typing import Any

from peer.control.popularity import (
    ASK_LIMIT,
    HOT_LIMIT,
    STALE_AFTER,
    NoReplicaCounts,
    PopularityMember,
    PopularityTracker,
)
from peer.control.sections import MemberSection, TrackerSection
from peer.policy.popularity import Window
from peer.policy.replication import HotBlob

A, B, C = ("sha256:" + x * 64 for x in "abc")
T0 = 1_700_000_000.0 - 1_700_000_000.0 % 60


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class Holders:
    """Replica counts as the tracker index will give them: complete holders per blob."""

    def __init__(self, holders: dict[str, set[str]]) -> None:
        self.holders = holders

    def complete_holders(self, digest: str, excluding: str) -> int | None:
        if digest not in self.holders:
            return None
        return len(self.holders[digest] - {excluding})


def member(
    clock: Clock, sizes: dict[str, int] | None = None, ask: list[str] | None = None
) -> PopularityMember:
    sizes = sizes or {}
    return PopularityMember(Window(dedup=0.0), sizes.get, lambda: list(ask or []), clock)


def sync(m: PopularityMember, node: str, tracker: PopularityTracker, clock: Clock, full: bool = False) -> Any:
    """One round through JSON, as the control plane carries it."""
    payload = m.outgoing(full)
    reply = None
    if payload is not None:
        reply = tracker.handle(node, json.loads(json.dumps(payload)), clock.now)
        reply = json.loads(json.dumps(reply))
    m.incoming(reply)
    return payload


def test_the_sections_fit_the_seam() -> None:
    clock = Clock()
    m: MemberSection = member(clock)
    t: TrackerSection = PopularityTracker()
    assert m.name == t.name == "popularity"


def test_site_counts_sum_the_members_and_reports_are_deltas() -> None:
    clock = Clock()
    tracker = PopularityTracker()
    m1, m2 = member(clock, {A: 100}), member(clock)
    for _ in range(3):
        m1.window.request(A, clock.now)
    m2.window.request(A, clock.now)
    m2.window.request(B, clock.now)
    first = sync(m1, "n1", tracker, clock, full=True)
    assert first["counts"] == {A: [3, 100]} and first["full"]
    sync(m2, "n2", tracker, clock, full=True)
    assert sync(m1, "n1", tracker, clock) is None  # nothing new, nothing asked: nothing sent
    m1.window.request(A, clock.now)
    assert sync(m1, "n1", tracker, clock)["counts"] == {A: [1, 100]}  # only what is new
    assert m1.site_requests(A) == 5 and m1.site_requests(B) == 1  # B from the hot list
    assert m1.site_requests(C) is None
    sync(m2, "n2", tracker, clock)
    assert tracker.site.count(A, clock.now) == 5 and tracker.site.count(B, clock.now) == 1


def test_a_failed_sync_is_sent_again() -> None:
    clock = Clock()
    tracker = PopularityTracker()
    m = member(clock)
    sync(m, "n", tracker, clock, full=True)
    m.window.request(A, clock.now)
    lost = m.outgoing(False)
    assert lost["counts"] == {A: [1, -1]}
    m.failed()
    m.window.request(B, clock.now)
    assert m.outgoing(False)["counts"] == {A: [1, -1], B: [1, -1]}


def test_a_failed_full_sync_is_full_again() -> None:
    clock = Clock()
    m = member(clock)
    m.window.request(A, clock.now)
    assert m.outgoing(True)["full"]
    m.failed()
    again = m.outgoing(False)
    assert again["full"] and again["counts"] == {A: [1, -1]}


def test_a_new_tracker_rebuilds_the_site_counts_from_full_reports() -> None:
    clock = Clock()
    old = PopularityTracker()
    members = {f"n{i}": member(clock) for i in range(3)}
    for i, (node, m) in enumerate(members.items()):
        for _ in range(i + 1):
            m.window.request(A, clock.now)
        sync(m, node, old, clock, full=True)
    clock.now += 120
    for m in members.values():
        m.window.request(B, clock.now)  # pending when the old tracker dies: never reported
    new = PopularityTracker()  # elected after the old one died: starts empty
    for node, m in members.items():
        sync(m, node, new, clock, full=True)
    assert new.site.count(A, clock.now) == 6 and new.site.count(B, clock.now) == 3
    # and nothing was counted twice: the pending B requests went with the full window
    for node, m in members.items():
        assert sync(m, node, new, clock) is None


def test_a_member_that_leaves_no_longer_counts() -> None:
    clock = Clock()
    tracker = PopularityTracker()
    m1, m2 = member(clock), member(clock)
    m1.window.request(A, clock.now)
    m2.window.request(A, clock.now)
    sync(m1, "n1", tracker, clock, full=True)
    sync(m2, "n2", tracker, clock, full=True)
    tracker.forget("n2")
    assert tracker.site.count(A, clock.now) == 1
    tracker.reset()
    assert tracker.site.count(A, clock.now) == 0


def test_replica_counts_are_others_holding_a_complete_copy_for_what_the_member_asks() -> None:
    clock = Clock()
    tracker = PopularityTracker(Holders({A: {"n1", "n2", "n3"}, B: {"n2"}}))
    m = member(clock, ask=[A, B, C])
    sync(m, "n1", tracker, clock, full=True)
    assert (m.replicas(A), m.replicas(B), m.replicas(C)) == (2, 1, None)
    # the default knows nothing
    m2 = member(clock, ask=[A])
    sync(m2, "n1", PopularityTracker(NoReplicaCounts()), clock, full=True)
    assert m2.replicas(A) is None


def test_asks_and_the_hot_list_are_bounded() -> None:
    clock = Clock()
    tracker = PopularityTracker(Holders({}))
    many = [f"sha256:{i:064x}" for i in range(3 * ASK_LIMIT)]
    m = member(clock, {d: 7 for d in many}, ask=many)
    for i, d in enumerate(many):
        for _ in range(1 + i % 5):
            m.window.request(d, clock.now)
    payload = sync(m, "n", tracker, clock, full=True)
    assert len(payload["ask"]) == ASK_LIMIT
    hot = m.hot()
    assert len(hot) == HOT_LIMIT and all(h.requests == 5 and h.size == 7 for h in hot)
    assert hot == sorted(hot, key=lambda h: (-h.requests, h.digest))


def test_the_hot_list_carries_sizes_from_manifests_and_replicas() -> None:
    clock = Clock()
    tracker = PopularityTracker(Holders({A: {"n1"}}))
    reporter = member(clock, {A: 4096})
    for _ in range(4):
        reporter.window.request(A, clock.now)
    sync(reporter, "n1", tracker, clock, full=True)
    idle = member(clock)
    sync(idle, "n2", tracker, clock, full=True)
    assert idle.hot() == [HotBlob(A, 4, 4096, 1)]  # n1 holds it: one copy besides n2's none
    assert idle.site_requests(A) == 4


def test_answers_go_stale() -> None:
    clock = Clock()
    tracker = PopularityTracker(Holders({A: {"n2"}}))
    m = member(clock, ask=[A])
    m.window.request(A, clock.now)
    sync(m, "n1", tracker, clock, full=True)
    assert m.replicas(A) == 1 and m.hot()
    clock.now += STALE_AFTER
    assert m.replicas(A) is None and m.site_requests(A) is None and m.hot() == []


def test_garbage_is_ignored_on_both_sides() -> None:
    clock = Clock()
    tracker = PopularityTracker()
    assert tracker.handle("n", "nonsense", clock.now) is None
    reply = tracker.handle("n", {"counts": {A: "x", B: [2, "big"], C: [-1, 5]}, "ask": [3, A]}, clock.now)
    assert reply["site"] == {A: 0, B: 2}
    m = member(clock)
    m.incoming({"site": {A: "x"}, "replicas": [1], "hot": [[A, 1], "x", [B, 1, 2, "three"]]})
    m.incoming(None)
    assert m.site_requests(A) is None and m.hot() == []
