"""peer.control.tracker.Tracker: the tracker's answer to a sync, with real sections riding on it
(no network: the tracker role does no I/O of its own; the routes are exercised in test_plane)."""

from __future__ import annotations

from typing import Any

import pytest
from sections_cases import Board, Broken

from peer.control.sections import Sections
from peer.control.tracker import SyncRequest, Tracker
from peer.policy.membership import Delta, Member
from peer.policy.pacing import sync_pace

SITE = "default"


def member(n: int) -> Member:
    return Member(f"{n:032x}", f"http://10.0.0.{n}:5381", SITE, 1e9 + n)


ME = member(1)


def tracker(*boards: Board | Broken, seed: list[Member] | None = None, now: float = 0.0) -> Tracker:
    sections = Sections()
    for board in boards:
        sections.member[board.name] = None  # type: ignore[assignment]  # the tracker reads only its side
        sections.tracker[board.name] = board  # type: ignore[assignment]
    return Tracker(ME, 3, sections, member_timeout=3.0, now=now, seed=seed or [])


def sync(
    n: int, *, full: bool = False, record: bool = False, mv: int = 0, epoch: int = 3, **sections: Any
) -> SyncRequest:
    return SyncRequest(f"{n:032x}", epoch, mv, full, member(n) if record else None, False, sections)


def test_becoming_tracker_resets_every_section() -> None:
    board = Board()
    tracker(board)
    assert board.resets == 1


def test_the_table_starts_from_the_seed_and_the_tracker_itself() -> None:
    t = tracker(seed=[member(2), member(3), Member(f"{9:032x}", "http://10.9.9.9:1", "elsewhere", 0.0)])
    assert {m.id for m in t.table} == {ME.id, member(2).id, member(3).id}


def test_a_stranger_without_its_record_is_asked_to_resync() -> None:
    board = Board()
    t = tracker(board)
    assert t.handle(sync(2, notes={"full": False, "notes": ["a"]}), 1.0) == {"resync": True}
    assert board.by_member == {}


def test_a_first_full_sync_joins_and_gets_the_whole_table_and_its_answer() -> None:
    board = Board()
    t = tracker(board, seed=[member(3)])
    reply = t.handle(sync(2, full=True, record=True, notes={"full": True, "notes": ["a", "b"]}), 1.0)
    assert member(2).id in t.table
    delta = Delta.from_wire(reply["members"])
    assert delta.full and {m.id for m in delta.add} == {ME.id, member(2).id, member(3).id}
    assert reply["sections"] == {"notes": {"site_notes": 2}}
    assert reply["tracker"]["epoch"] == 3
    assert board.by_member == {member(2).id: ["a", "b"]}


def test_a_later_sync_gets_only_what_changed() -> None:
    t = tracker()
    first = t.handle(sync(2, full=True, record=True), 1.0)
    mv = Delta.from_wire(first["members"]).version
    t.handle(sync(4, full=True, record=True), 1.5)
    delta = Delta.from_wire(t.handle(sync(2, mv=mv), 2.0)["members"])
    assert not delta.full and [m.id for m in delta.add] == [member(4).id]


def test_a_copy_from_another_epoch_gets_the_whole_table() -> None:
    t = tracker()
    t.handle(sync(2, full=True, record=True), 1.0)
    assert Delta.from_wire(t.handle(sync(2, mv=2, epoch=2), 2.0)["members"]).full


def test_a_full_sync_from_a_known_member_replaces_its_state() -> None:
    """A member that restarted, or re-announces after a resync: the tracker forgets what it had."""
    board = Board()
    t = tracker(board)
    t.handle(sync(2, full=True, record=True, notes={"full": True, "notes": ["old"]}), 1.0)
    t.handle(sync(2, full=True, record=True, notes={"full": True, "notes": ["new"]}), 2.0)
    assert board.forgotten == [member(2).id]
    assert board.by_member[member(2).id] == ["new"]


def test_a_full_sync_that_carries_nothing_for_a_section_still_clears_it() -> None:
    board = Board()
    t = tracker(board)
    t.handle(sync(2, full=True, record=True, notes={"full": True, "notes": ["old"]}), 1.0)
    t.handle(sync(2, full=True, record=True), 2.0)
    assert member(2).id not in board.by_member


def test_a_section_this_tracker_does_not_run_is_not_answered() -> None:
    t = tracker(Board())
    reply = t.handle(sync(2, full=True, record=True, popularity={"x": 1}), 1.0)
    assert reply["sections"] == {}


def test_a_section_that_raises_loses_its_answer_not_the_sync() -> None:
    board = Board()
    t = tracker(board, Broken())
    reply = t.handle(sync(2, full=True, record=True, notes={"full": True, "notes": ["a"]}, broken={}), 1.0)
    assert reply["sections"] == {"notes": {"site_notes": 1}}
    assert member(2).id in t.table


def test_a_member_that_leaves_is_dropped_and_forgotten_at_once() -> None:
    board = Board()
    t = tracker(board)
    t.handle(sync(2, full=True, record=True, notes={"full": True, "notes": ["a"]}), 1.0)
    leave = SyncRequest(member(2).id, 3, 0, False, None, True, {})
    assert t.handle(leave, 1.5) == {"left": True}
    assert member(2).id not in t.table and board.forgotten == [member(2).id]
    assert t.former_urls(1.5) == [member(2).url]


def test_silent_members_expire_are_forgotten_and_remembered_as_former() -> None:
    board = Board()
    t = tracker(board, seed=[member(5)], now=0.0)
    t.handle(sync(2, full=True, record=True, notes={"full": True, "notes": ["a"]}), 2.0)
    assert [m.id for m in t.expire(3.5)] == [member(5).id]  # seeded at 0, never synced
    assert [m.id for m in t.expire(5.5)] == [member(2).id]
    assert ME.id in t.table, "the tracker never expires itself"
    assert board.forgotten == [member(5).id, member(2).id]
    assert t.former_urls(5.5) == [member(2).url, member(5).url]


def test_former_members_are_forgotten_after_a_while() -> None:
    t = tracker(seed=[member(5)], now=0.0)
    t.expire(10.0)
    assert t.former_urls(10.0 + 599) == [member(5).url]
    assert t.former_urls(10.0 + 601) == []


def test_a_former_member_that_syncs_again_is_no_longer_former() -> None:
    t = tracker(seed=[member(5)], now=0.0)
    t.expire(10.0)
    t.handle(sync(5, full=True, record=True), 11.0)
    assert t.former_urls(11.0) == []


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"id": "nope"},
        {"id": f"{2:032x}", "epoch": "3"},
        {"id": f"{2:032x}", "record": member(3).to_wire()},
        {"id": f"{2:032x}", "sections": []},
    ],
)
def test_a_malformed_sync_is_refused(body: Any) -> None:
    with pytest.raises(ValueError):
        SyncRequest.from_wire(body)


def test_the_answer_carries_the_pace_and_a_large_site_gets_a_longer_one() -> None:
    small = tracker(seed=[member(n) for n in range(2, 10)])
    reply = small.handle(sync(2, full=True, record=True), 1.0)
    assert reply["pace"] == pytest.approx(sync_pace(len(small.table)), abs=1e-3)
    big = Tracker(ME, 3, Sections(), member_timeout=3.0, now=0.0, seed=[member(n) for n in range(2, 202)])
    big.sync_budget = 20.0  # 201 members within 20 syncs/s: one sync each every ~10 s
    assert big.handle(sync(2, full=True, record=True), 1.0)["pace"] == pytest.approx(201 / 20.0, abs=1e-3)


def test_a_paced_site_drops_a_silent_member_after_missed_paces_not_the_base_timeout() -> None:
    t = Tracker(ME, 3, Sections(), member_timeout=3.0, now=0.0, seed=[member(2), member(3)], sync_budget=1.0)
    assert t.pace() == pytest.approx(3.0)  # 3 members, 1 sync/s
    assert t.expire(5.0) == []  # silent 5 s: more than the base timeout, fewer than MISSED paces
    assert {m.id for m in t.expire(9.5)} == {member(2).id, member(3).id}
