"""peer.policy.membership: member records on the wire, the versioned member table (liveness,
deltas, full resends) and the no-tracker fan-out.

The table's promise is checked the way members rely on it: copies of the tracker's table, each
synced at its own moments, always reach exactly the tracker's records by applying the delta
since their own version, however far behind they were."""

from __future__ import annotations

import math
from typing import Any

import pytest
from control_cases import member, members, node_id
from hypothesis import given
from hypothesis import strategies as st

from peer.policy.membership import Delta, Member, MemberTable

# -- records -------------------------------------------------------------------------------------


@given(members(max_size=4))
def test_a_record_survives_the_wire(records: list[Member]) -> None:
    for record in records:
        assert Member.from_wire(record.to_wire()) == record


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"id": "xyz"}, "id"),
        ({"id": "A" * 32}, "id"),
        ({"url": "10.0.0.1:5381"}, "url"),
        ({"url": "http://a b:1"}, "url"),
        ({"site": "Not A Site"}, "site"),
        ({"started": "yesterday"}, "started"),
        ({"started": math.nan}, "started"),
        ({"started": True}, "started"),
        ({"priority": 1.5}, "priority"),
        ({"priority": False}, "priority"),
        ({"cpus": 2**60}, "cpus"),
    ],
)
def test_a_malformed_record_is_refused_naming_the_field(change: dict[str, Any], complaint: str) -> None:
    wire = {**member(1).to_wire(), **change}
    with pytest.raises(ValueError, match=complaint):
        Member.from_wire(wire)


def test_a_record_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(ValueError):
        Member.from_wire(["id", "url"])


def test_missing_capacities_count_as_unknown() -> None:
    wire = {k: v for k, v in member(1).to_wire().items() if k not in ("cpus", "mem_mib", "link_mbit")}
    assert Member.from_wire(wire).cpus == 0


@given(members(max_size=5), st.booleans())
def test_a_delta_survives_the_wire(records: list[Member], full: bool) -> None:
    delta = Delta(7, full, tuple(records), () if full else (node_id(9999),))
    assert Delta.from_wire(delta.to_wire()) == delta


@pytest.mark.parametrize(
    "wire",
    [[], {"v": -1, "add": []}, {"v": True, "all": []}, {"v": 1, "all": {}}, {"v": 1, "remove": ["nope"]}],
)
def test_a_malformed_delta_is_refused(wire: Any) -> None:
    with pytest.raises(ValueError):
        Delta.from_wire(wire)


# -- the table -------------------------------------------------------------------------------------


def test_hearing_of_a_new_member_adds_it_and_bumps_the_version() -> None:
    table = MemberTable()
    assert table.heard(member(1), now=10.0)
    assert member(1).id in table and len(table) == 1 and table.version == 1
    assert table.last_heard(member(1).id) == 10.0


def test_hearing_again_of_an_unchanged_member_only_refreshes_it() -> None:
    table = MemberTable()
    table.heard(member(1), 10.0)
    assert not table.heard(member(1), 12.0)
    assert table.version == 1 and table.last_heard(member(1).id) == 12.0


def test_a_changed_record_is_a_change() -> None:
    table = MemberTable()
    table.heard(member(1), 10.0)
    assert table.heard(member(1, started=1_800_000_000.0), 11.0)  # restarted under the same id
    assert table.version == 2 and table.get(member(1).id) == member(1, started=1_800_000_000.0)


def test_last_heard_never_goes_back() -> None:
    table = MemberTable()
    table.heard(member(1), 10.0)
    table.touch(member(1).id, 9.0)  # a late, reordered sync
    assert table.last_heard(member(1).id) == 10.0


def test_touching_a_stranger_is_refused() -> None:
    assert not MemberTable().touch(node_id(5), 1.0)


def test_removing_returns_the_record_once() -> None:
    table = MemberTable()
    table.heard(member(1), 1.0)
    assert table.remove(member(1).id) == member(1)
    assert table.remove(member(1).id) is None
    assert table.version == 2 and table.last_heard(member(1).id) is None


def test_expire_drops_exactly_the_members_silent_too_long_oldest_first() -> None:
    table = MemberTable()
    for n, heard in ((1, 5.0), (2, 1.0), (3, 8.0), (4, 7.0)):
        table.heard(member(n), heard)
    dead = table.expire(now=10.0, timeout=3.0)
    assert dead == [member(2), member(1)]
    assert {m.id for m in table} == {member(3).id, member(4).id}


def test_expire_at_exactly_the_timeout_keeps_the_member() -> None:
    table = MemberTable()
    table.heard(member(1), 7.0)
    assert table.expire(now=10.0, timeout=3.0) == []


def test_expire_spares_the_ids_kept() -> None:
    table = MemberTable()
    table.heard(member(1), 0.0)
    table.heard(member(2), 0.0)
    assert table.expire(100.0, 3.0, keep=[member(1).id]) == [member(2)]


def test_a_copy_at_the_current_version_gets_an_empty_delta() -> None:
    table = MemberTable()
    table.heard(member(1), 0.0)
    assert table.delta_since(table.version) == Delta(table.version, False)


def test_the_delta_names_what_changed_since_the_copy() -> None:
    table = MemberTable()
    for n in range(1, 6):
        table.heard(member(n), 0.0)
    seen = table.version
    table.remove(member(2).id)
    table.heard(member(6), 1.0)
    table.heard(member(3, cpus=8), 1.0)
    delta = table.delta_since(seen)
    assert not delta.full
    assert set(delta.add) == {member(6), member(3, cpus=8)} and delta.remove == (member(2).id,)


def test_a_copy_from_the_future_or_another_tracker_gets_the_whole_table() -> None:
    table = MemberTable()
    table.heard(member(1), 0.0)
    assert table.delta_since(table.version + 5).full
    assert table.delta_since(-1).full


def test_a_copy_behind_the_remembered_removals_gets_the_whole_table() -> None:
    table = MemberTable(history=2)
    for n in range(1, 8):
        table.heard(member(n), 0.0)
    old = table.version
    for n in (1, 2, 3):
        table.remove(member(n).id)
    delta = table.delta_since(old)
    assert delta.full and {m.id for m in delta.add} == {member(n).id for n in range(4, 8)}


def test_a_delta_longer_than_the_table_is_sent_as_the_table() -> None:
    table = MemberTable()
    for n in range(1, 10):
        table.heard(member(n), 0.0)
    for n in range(1, 9):
        table.remove(member(n).id)
    assert table.delta_since(0).full


def test_applying_a_full_delta_drops_what_it_does_not_name() -> None:
    copy = MemberTable()
    copy.reset([member(1), member(2)], 0.0)
    gone = copy.apply(Delta(9, True, (member(2), member(3))), now=5.0)
    assert gone == [member(1).id]
    assert {m.id for m in copy} == {member(2).id, member(3).id} and copy.version == 9
    assert copy.last_heard(member(2).id) == 5.0


def test_applying_vouches_for_every_member_at_that_moment() -> None:
    copy = MemberTable()
    copy.reset([member(1)], 0.0)
    copy.apply(Delta(3, False), now=4.0)
    assert copy.last_heard(member(1).id) == 4.0 and copy.version == 3


def test_reset_starts_a_new_history() -> None:
    table = MemberTable()
    for n in range(1, 4):
        table.heard(member(n), 0.0)
    table.reset([member(7)], 2.0)
    assert [m.id for m in table] == [member(7).id] and table.version == 1
    assert table.delta_since(0) == Delta(1, False, (member(7),))


ops = st.lists(
    st.one_of(
        st.tuples(st.just("heard"), st.integers(0, 9), st.integers(0, 2)),
        st.tuples(st.just("remove"), st.integers(0, 9), st.just(0)),
        st.tuples(st.just("expire"), st.integers(0, 9), st.just(0)),
        st.tuples(st.just("sync"), st.integers(0, 3), st.just(0)),
    ),
    max_size=60,
)


@given(ops, st.sampled_from([1, 2, 4096]))
def test_copies_synced_at_any_moments_reach_the_trackers_table(
    script: list[tuple[str, int, int]], history: int
) -> None:
    """Four members' copies, each synced whenever the script says; after a last sync every copy
    holds exactly the tracker's records, whether it got deltas or whole tables."""
    tracker = MemberTable(history=history)
    copies = [MemberTable() for _ in range(4)]
    for c in copies:
        c.version = -1  # never synced: gets the whole table
    now = 0.0
    for op, n, variant in script:
        now += 1.0
        if op == "heard":
            tracker.heard(member(n, cpus=1 + variant), now)
        elif op == "remove":
            tracker.remove(node_id(n))
        elif op == "expire":
            tracker.expire(now, timeout=float(n))
        else:
            copies[n].apply(tracker.delta_since(copies[n].version), now)
    for c in copies:
        c.apply(tracker.delta_since(c.version), now)
        assert sorted(c.records(), key=lambda m: m.id) == sorted(tracker.records(), key=lambda m: m.id)
        assert c.version == tracker.version


@given(st.lists(st.integers(0, 30), max_size=40))
def test_versions_only_grow_and_count_changes(ns: list[int]) -> None:
    table = MemberTable()
    last = table.version
    for i, n in enumerate(ns):
        changed = table.remove(node_id(n)) is not None if i % 3 == 2 else table.heard(member(n), float(i))
        assert table.version == last + (1 if changed else 0)
        last = table.version
