"""peer.policy.eviction: the documented score, the order it gives, the last copy of a hot blob,
and the plan against the watermarks. Table cases, then hypothesis properties."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from peer.policy.eviction import Candidate, Weights, eviction_key, last_hot_copy, order, plan, score

NOW = 1_700_000_000.0
HOUR = 3600.0
MIB = 1 << 20


def c(name: str, size: int = MIB, age: float = 0.0, local: int = 0, site: int = 0,
      replicas: int | None = None, protected: bool = False) -> Candidate:
    return Candidate(name, size, NOW - age, local, site, replicas, protected)


def test_the_score_is_the_documented_formula() -> None:
    w = Weights(half_life=HOUR, site_weight=0.5)
    # (1 + heat) * 2^(-age/H) / (1 + replicas), heat = local + 0.5 * (site - local)
    assert score(c("x", age=0), NOW, w) == 1.0
    assert score(c("x", age=HOUR), NOW, w) == 0.5
    assert score(c("x", local=2, site=6), NOW, w) == 1 + 2 + 0.5 * 4
    assert score(c("x", replicas=3), NOW, w) == 0.25
    assert score(c("x", local=1, age=2 * HOUR, replicas=1), NOW, w) == 2 * 0.25 / 2
    assert score(c("x", age=-50), NOW, w) == 1.0  # a last use in the future (clock step) is now
    assert score(Candidate("never", MIB, 0.0), NOW, w) < 1e-100  # never used: first to go


def test_recency_popularity_and_replicas_each_move_the_order() -> None:
    old, fresh = c("old", age=2 * HOUR), c("fresh", age=0)
    assert [x.digest for x in order([fresh, old], NOW)] == ["old", "fresh"]  # LRU when nothing else
    popular_old = c("popular-old", age=HOUR, local=3)  # 4 * 0.5 = 2 > 1
    assert [x.digest for x in order([popular_old, fresh], NOW)] == ["fresh", "popular-old"]
    replicated = c("replicated", age=0, replicas=3)
    assert [x.digest for x in order([fresh, replicated], NOW)] == ["replicated", "fresh"]


def test_ties_go_to_the_older_use_then_the_bigger_blob_then_the_digest() -> None:
    small, big = c("small", size=MIB), c("big", size=4 * MIB)
    assert [x.digest for x in order([small, big], NOW)] == ["big", "small"]
    assert [x.digest for x in order([c("b"), c("a")], NOW)] == ["a", "b"]


def test_protected_blobs_are_never_in_the_order() -> None:
    assert order([c("p", protected=True), c("q")], NOW) == [c("q")]


def test_the_last_copy_of_a_hot_blob_goes_last() -> None:
    hot_last = c("hot-last", age=10 * HOUR, site=5)  # very old, but hot and nobody else has it
    hot_replicated = c("hot-replicated", age=0, site=5, replicas=2)
    cold = c("cold", age=0, local=20)  # not in the second tier: hot means site-wide or ours
    assert last_hot_copy(hot_last) and not last_hot_copy(hot_replicated)
    assert last_hot_copy(cold)  # our own requests count when the site's are not known
    cold = c("cold", age=0, local=1)
    assert not last_hot_copy(cold)
    assert [x.digest for x in order([hot_last, hot_replicated, cold], NOW)] == [
        "hot-replicated", "cold", "hot-last"]


def test_plan_evicts_down_to_the_low_watermark_in_score_order() -> None:
    cands = [c("a", age=3 * HOUR), c("b", age=2 * HOUR), c("c", age=HOUR), c("d", age=0)]
    p = plan(cands, usage=10 * MIB, target=8 * MIB, budget=9 * MIB, now=NOW)
    assert p.evict == ("a", "b") and p.freed == 2 * MIB and p.usage == 8 * MIB and p.fits
    assert plan(cands, usage=8 * MIB, target=8 * MIB, budget=9 * MIB, now=NOW).evict == ()


def test_plan_takes_the_last_hot_copy_only_to_get_within_the_budget() -> None:
    hot = c("hot", size=2 * MIB, age=9 * HOUR, site=9)
    cold = c("cold", size=MIB, age=0)
    # over the high watermark only: the cold one goes, the hot last copy stays although older
    p = plan([hot, cold], usage=9 * MIB, target=7 * MIB, budget=9 * MIB, now=NOW)
    assert p.evict == ("cold",) and p.fits and p.usage == 8 * MIB
    # over the budget itself, with nothing else left: the hot last copy goes too
    p = plan([hot, cold], usage=11 * MIB, target=7 * MIB, budget=9 * MIB, now=NOW)
    assert p.evict == ("cold", "hot") and p.fits and p.usage == 8 * MIB


def test_plan_says_when_nothing_can_make_it_fit() -> None:
    p = plan([c("p", size=5 * MIB, protected=True), c("q", size=MIB)], usage=12 * MIB,
             target=8 * MIB, budget=10 * MIB, now=NOW)
    assert p.evict == ("q",) and not p.fits and p.usage == 11 * MIB


# -- properties --------------------------------------------------------------------------------

candidates = st.lists(
    st.builds(
        Candidate,
        digest=st.text("abcdef0123456789", min_size=1, max_size=6),
        size=st.integers(0, 8 * MIB),
        last_use=st.floats(NOW - 48 * HOUR, NOW + 10),
        local=st.integers(0, 6),
        site=st.integers(0, 12),
        replicas=st.none() | st.integers(0, 4),
        protected=st.booleans(),
    ),
    max_size=25,
    unique_by=lambda x: x.digest,
)


@given(candidates, st.integers(0, 100 * MIB), st.integers(0, 60 * MIB), st.integers(0, 60 * MIB))
def test_plan_properties(cands: list[Candidate], usage: int, target: int, budget: int) -> None:
    target = min(target, budget)
    p = plan(cands, usage, target, budget, NOW)
    by_digest = {x.digest: x for x in cands}
    chosen = [by_digest[d] for d in p.evict]
    # never a protected blob, never twice
    assert not any(x.protected for x in chosen) and len(set(p.evict)) == len(p.evict)
    # the evictions follow the score's order
    keys = [eviction_key(x, NOW) for x in chosen]
    assert keys == sorted(keys)
    # within each tier, what is evicted is a prefix of that tier's order
    ordered = order(cands, NOW)
    for tier in (False, True):
        tier_order = [x.digest for x in ordered if last_hot_copy(x) == tier]
        tier_chosen = [x.digest for x in chosen if last_hot_copy(x) == tier]
        assert tier_chosen == tier_order[: len(tier_chosen)]
    # a last hot copy goes only once every other evictable blob has gone, to get within the budget
    freed = 0
    for x in chosen:
        if last_hot_copy(x):
            assert all(y.digest in p.evict for y in ordered if not last_hot_copy(y))
            assert usage - freed > budget
        freed += x.size
    assert freed == p.freed and p.usage == usage - freed and p.fits == (p.usage <= budget)
    # and it stops as soon as it may: each eviction was needed
    if chosen:
        last = chosen[-1]
        limit = budget if last_hot_copy(last) else target
        assert usage - (freed - last.size) > limit
    # nothing evictable is left out while the store is still over its target (or budget)
    left = [x for x in ordered if x.digest not in p.evict]
    if p.usage > target:
        assert all(last_hot_copy(x) for x in left)
    if p.usage > budget:
        assert left == []


@given(candidates)
def test_order_is_total_deterministic_and_ignores_input_order(cands: list[Candidate]) -> None:
    assert order(cands, NOW) == order(list(reversed(cands)), NOW)


@given(st.floats(0, 48 * HOUR), st.floats(0, 48 * HOUR), st.integers(0, 9), st.integers(0, 9),
       st.integers(0, 4))
def test_score_is_monotone(age1: float, age2: float, local1: int, local2: int, replicas: int) -> None:
    young, old = sorted((age1, age2))
    assert score(c("x", age=young), NOW) >= score(c("x", age=old), NOW)
    few, many = sorted((local1, local2))
    assert score(c("x", local=few), NOW) <= score(c("x", local=many), NOW)
    assert score(c("x", replicas=replicas), NOW) >= score(c("x", replicas=replicas + 1), NOW)
