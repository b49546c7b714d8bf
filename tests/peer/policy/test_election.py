"""peer.policy.election: the rank, which tracker wins, and one election round's decision.

The site-wide promises are checked as they matter: every node of a simulated site computes its
own decision from its own table and its own answers, and the decisions are compared: the same
order everywhere, the same winner from both sides, one claimer among nodes that see each other,
a claim above every epoch seen, never a claim from a node that may not lead."""

from __future__ import annotations

from random import Random

import pytest
from control_cases import SITE, alive, member, members, node_id, ref, refs
from hypothesis import assume, given
from hypothesis import strategies as st

from peer.policy.election import (
    Answer,
    Claim,
    Follow,
    NoLeader,
    TrackerRef,
    Wait,
    accept,
    better_tracker,
    can_lead,
    claim_epoch,
    decide,
    offered,
    outranks,
    probe_targets,
    rank_key,
    rank_order,
    usable,
    winner,
)
from peer.policy.membership import Member

WAIT = 3.0  # claim_wait


# -- rank ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("better", "worse", "why"),
    [
        (member(9, priority=1, link=0, cpus=1), member(1, priority=0), "priority first"),
        (member(9, link=10000, cpus=1), member(1, link=1000, cpus=8), "then link speed"),
        (member(9, cpus=4, mem=1), member(1, cpus=2, mem=99999), "then CPUs"),
        (member(9, mem=8192, started=2e9), member(1, mem=4096, started=1e9), "then memory"),
        (member(9, started=1e9), member(1, started=2e9), "then the longer-lived"),
        (member(1), member(9), "then the lower id"),
        (member(9, priority=0, link=0, cpus=0, mem=0), member(1, priority=-1, link=99999), "leaders first"),
    ],
)
def test_the_rank_order(better: Member, worse: Member, why: str) -> None:
    assert outranks(better, worse), why
    assert not outranks(worse, better), why
    assert rank_order([worse, better]) == [better, worse]


def test_a_negative_priority_may_never_lead() -> None:
    assert not can_lead(member(1, priority=-1)) and can_lead(member(1, priority=0))


@given(members(max_size=15), st.randoms(use_true_random=False))
def test_every_node_with_the_same_table_computes_the_same_order(records: list[Member], rng: Random) -> None:
    """Whatever order a node holds its records in: one order, and no two records tie."""
    shuffled = list(records)
    rng.shuffle(shuffled)
    assert rank_order(shuffled) == rank_order(records)
    keys = [rank_key(m) for m in records]
    assert len(set(keys)) == len(keys)


@given(members(max_size=8))
def test_the_order_is_the_outranks_relation(records: list[Member]) -> None:
    order = rank_order(records)
    for i, a in enumerate(order):
        for b in order[i + 1 :]:
            assert outranks(a, b) and not outranks(b, a)


def test_rank_order_keeps_one_record_per_id() -> None:
    assert rank_order([member(1), member(1), member(2)]) == [member(1), member(2)]


# -- which tracker wins -----------------------------------------------------------------------------------


def test_the_higher_epoch_wins_whatever_the_rank() -> None:
    assert better_tracker(ref(9, 3, priority=-5), ref(1, 2, priority=5))


def test_of_equal_epochs_the_better_ranked_wins() -> None:
    assert better_tracker(ref(1, 2), ref(9, 2)) and not better_tracker(ref(9, 2), ref(1, 2))


def test_a_tracker_does_not_beat_itself() -> None:
    assert not better_tracker(ref(1, 2), ref(1, 2))


@given(st.data(), members(min_size=2, max_size=8))
def test_two_trackers_resolve_to_the_same_winner_from_both_sides(
    data: st.DataObject, records: list[Member]
) -> None:
    a, b = data.draw(refs(records)), data.draw(refs(records))
    assert winner(a, b) == winner(b, a)
    assert winner(a, b) in (a, b)
    if a != b:
        assert better_tracker(a, b) != better_tracker(b, a)  # exactly one of them wins


@given(st.data(), members(min_size=3, max_size=8), st.randoms(use_true_random=False))
def test_many_trackers_resolve_to_one_whatever_order_they_meet_in(
    data: st.DataObject, records: list[Member], rng: Random
) -> None:
    trackers = data.draw(st.lists(refs(records), min_size=2, max_size=5))
    met = list(trackers)
    rng.shuffle(met)
    first, second = trackers[0], met[0]
    for t in trackers[1:]:
        first = winner(first, t)
    for t in met[1:]:
        second = winner(second, t)
    assert first == second


def test_a_tracker_ref_survives_the_wire() -> None:
    r = ref(3, 7, priority=2)
    assert TrackerRef.from_wire(r.to_wire()) == r


@pytest.mark.parametrize("epoch", [0, -1, True, 1.5, None, 2**60])
def test_a_tracker_ref_with_a_bad_epoch_is_refused(epoch: object) -> None:
    with pytest.raises(ValueError, match="epoch"):
        TrackerRef.from_wire({"epoch": epoch, "record": member(1).to_wire()})


# -- lost trackers, announcements ------------------------------------------------------------------------


def test_a_lost_tracker_is_not_followed_on_hearsay_at_that_epoch() -> None:
    lost = {node_id(1): 3}
    assert not usable(ref(1, 3), lost) and not usable(ref(1, 2), lost)
    assert usable(ref(1, 4), lost)  # it claimed again since: a new tracker
    assert usable(ref(2, 1), lost)


def test_an_announcement_is_accepted_only_if_it_wins() -> None:
    assert accept(None, ref(5, 1), {})
    assert accept(ref(5, 1), ref(6, 2), {})
    assert not accept(ref(5, 2), ref(6, 1), {})
    assert not accept(ref(5, 2), ref(5, 2), {})
    assert not accept(None, ref(5, 1), {node_id(5): 1})


# -- probe targets -----------------------------------------------------------------------------------------


def test_an_election_asks_the_best_ranked_nodes_better_than_itself() -> None:
    site = [member(n, started=1e9 + n) for n in range(1, 12)]  # node 1 is the best
    me = site[9]  # node 10
    targets = probe_targets(me, site, lost={node_id(1): 1}, k=3)
    assert [m.id for m in targets] == [node_id(2), node_id(3), node_id(4)]


def test_the_best_node_asks_nobody() -> None:
    site = [member(n, started=1e9 + n) for n in range(1, 5)]
    assert probe_targets(site[0], site, {}, 8) == []


def test_a_node_that_may_not_lead_asks_the_nodes_that_may() -> None:
    me = member(1, priority=-1)
    site = [me, member(2, priority=-1), member(3), member(4)]
    assert {m.id for m in probe_targets(me, site, {}, 8)} == {node_id(3), node_id(4)}


@given(members(max_size=12), st.integers(0, 10))
def test_probe_targets_are_bounded_better_and_never_me(records: list[Member], k: int) -> None:
    me = records[0]
    targets = probe_targets(me, records, {}, k)
    assert len(targets) <= k and me not in targets
    assert all(outranks(t, me) and can_lead(t) for t in targets)
    assert targets == rank_order(targets)


# -- deciding -------------------------------------------------------------------------------------------


def test_with_no_answers_and_no_better_node_it_claims_the_next_epoch() -> None:
    assert decide(member(1), [], epoch_seen=4, lost={}, waited=0.0, claim_wait=WAIT) == Claim(5)


def test_a_live_tracker_is_followed_even_by_a_better_ranked_node() -> None:
    """Stickiness: rank decides elections, not who keeps the role."""
    me = member(1, priority=5)
    tracker = ref(7, 3)
    decision = decide(me, [alive(member(7), tracker)], 3, {}, 0.0, WAIT)
    assert decision == Follow(tracker)


def test_the_best_tracker_named_is_followed() -> None:
    answers = [alive(member(7), ref(7, 2)), alive(member(8), ref(9, 3)), None]
    assert decide(member(20), answers, 0, {}, 0.0, WAIT) == Follow(ref(9, 3))


def test_a_better_node_alive_is_given_time_to_claim() -> None:
    me = member(5, started=2e9)
    better = member(2, started=1e9)
    assert decide(me, [alive(better)], 1, {}, waited=1.0, claim_wait=WAIT) == Wait((better.id,))


def test_a_better_node_that_never_claims_is_overtaken_after_claim_wait() -> None:
    """It answers but follows the tracker we cannot reach (a partition that is not transitive)."""
    me = member(5, started=2e9)
    better = member(2, started=1e9)
    lost = {node_id(9): 4}
    answers = [alive(better, ref(9, 4))]
    assert decide(me, answers, 4, lost, waited=WAIT, claim_wait=WAIT) == Claim(5)


def test_hearsay_of_the_lost_tracker_is_not_followed_but_its_own_answer_is() -> None:
    lost = {node_id(9): 4}
    hearsay = alive(member(2, started=2.5e9), ref(9, 4))
    assert not isinstance(decide(member(5, started=2e9), [hearsay], 4, lost, 0.0, WAIT), Follow)
    itself = alive(member(9), ref(9, 4))
    assert decide(member(5), [itself], 4, lost, 0.0, WAIT) == Follow(ref(9, 4))


def test_answers_from_another_site_count_for_nothing() -> None:
    stranger = member(2, started=1.0, site="elsewhere")
    other_tracker = TrackerRef(3, stranger)
    decision = decide(member(5), [alive(stranger, other_tracker)], 0, {}, 0.0, WAIT)
    assert decision == Claim(1)
    assert offered([alive(stranger, other_tracker)], {}, SITE) is None


def test_a_node_that_may_not_lead_waits_for_one_that_may_or_runs_leaderless() -> None:
    me = member(1, priority=-1)
    assert decide(me, [alive(member(2))], 0, {}, 100.0, WAIT) == Wait((node_id(2),))
    assert decide(me, [alive(member(3, priority=-1)), None], 0, {}, 100.0, WAIT) == NoLeader()


def test_the_claim_epoch_is_above_everything_reported() -> None:
    answers = [alive(member(2), None, epoch_seen=6), alive(member(3), ref(4, 8)), None]
    assert claim_epoch(2, answers, {node_id(9): 9}) == 10


answers_st = st.lists(
    st.one_of(
        st.none(),
        st.builds(
            Answer,
            st.builds(
                member,
                st.integers(2, 30),
                priority=st.integers(-1, 2),
                started=st.sampled_from([1e9, 2e9, 3e9]),
                site=st.sampled_from([SITE, SITE, "elsewhere"]),
            ),
            st.one_of(st.none(), st.builds(ref, st.integers(2, 30), st.integers(1, 9))),
            st.integers(0, 9),
        ),
    ),
    max_size=8,
)
lost_st = st.dictionaries(st.builds(node_id, st.integers(2, 30)), st.integers(1, 9), max_size=3)


@given(answers_st, st.integers(0, 9), lost_st, st.floats(0, 10), st.integers(-2, 2))
def test_a_claim_exceeds_every_epoch_seen_and_never_comes_from_a_node_that_may_not_lead(
    answers: list[Answer | None], seen: int, lost: dict[str, int], waited: float, priority: int
) -> None:
    me = member(1, priority=priority, started=2e9)
    decision = decide(me, answers, seen, lost, waited, WAIT)
    if isinstance(decision, Claim):
        assert can_lead(me)
        epochs = [seen, *lost.values()]
        for a in answers:
            if a is not None and a.record.site == SITE:  # other sites' epochs are theirs
                epochs += [a.epoch_seen, a.tracker.epoch if a.tracker else 0]
        assert decision.epoch > max(epochs)
    if priority < 0:
        assert not isinstance(decision, Claim)


@given(answers_st, st.integers(0, 9), lost_st, st.floats(0, 10))
def test_a_node_never_claims_while_a_usable_tracker_answers(
    answers: list[Answer | None], seen: int, lost: dict[str, int], waited: float
) -> None:
    decision = decide(member(1, started=0.5), answers, seen, lost, waited, WAIT)
    answers = [a for a in answers if a is not None and a.record.site == SITE]
    named = offered(answers, lost, SITE)
    if named is not None:
        assert decision == Follow(named)
        assert all(
            not (a.tracker is not None and a.tracker.record.site == SITE and usable(a.tracker, lost))
            or not better_tracker(a.tracker, named)
            for a in answers
        )


@given(members(min_size=1, max_size=14), st.data())
def test_among_nodes_that_see_each_other_only_the_best_may_claim(
    records: list[Member], data: st.DataObject
) -> None:
    """A simulated election round on a site with no tracker: each live node asks its probe
    targets and hears from the live ones (none of them tracker yet). At most one node claims:
    the best-ranked live node that may lead, and one does exactly when such a node lives."""
    live = data.draw(st.lists(st.sampled_from(records), min_size=1, unique=True))
    live_ids = {m.id for m in live}
    assume(len(records) - len(live) < 8)  # fewer dead than an election asks: the bully's assumption
    claimers = []
    for me in live:
        asked = probe_targets(me, records, {}, 8)
        answers = [alive(m) if m.id in live_ids else None for m in asked]
        if isinstance(decide(me, answers, 0, {}, waited=0.0, claim_wait=WAIT), Claim):
            claimers.append(me)
    leaders = [m for m in rank_order(live) if can_lead(m)]
    assert claimers == leaders[:1]


@given(members(min_size=2, max_size=10), st.data())
def test_rival_claims_resolve_to_the_best_claimer(records: list[Member], data: st.DataObject) -> None:
    """Nodes that did not see each other all claimed the same epoch: when they meet, every one
    of them picks the same winner, the best-ranked claimer."""
    claimers = data.draw(st.lists(st.sampled_from(records), min_size=2, unique=True))
    claims = [TrackerRef(1, m) for m in claimers]
    for side in claims:
        final = side
        for other in claims:
            final = winner(final, other)
        assert final.record == rank_order(claimers)[0]
