"""peer.policy.history: the sliding window of a peer's transfers, newest weighing most, and the
weighted quantiles taken over it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from policy_cases import CHUNK, transfers

from peer.policy.history import DECAY, HALF_LIFE, WINDOW, History, Transfer, weighted_quantile

NOW = 1000.0


def ok(seconds: float, at: float = NOW, queue: float = 0.0, latency: float = 0.0) -> Transfer:
    return Transfer(at, CHUNK, seconds, latency, queue)


def seconds(t: Transfer) -> float:
    return t.seconds


# -- weighted_quantile --------------------------------------------------------------------------------


def test_no_weight_no_quantile() -> None:
    assert weighted_quantile([], 0.5) is None
    assert weighted_quantile([(1.0, 0.0)], 0.5) is None


@pytest.mark.parametrize(
    ("q", "expected"), [(0.0, 1.0), (0.25, 1.0), (0.26, 2.0), (0.5, 2.0), (0.75, 3.0), (0.9, 4.0), (1.0, 4.0)]
)
def test_equal_weights_give_the_empirical_quantile(q: float, expected: float) -> None:
    assert weighted_quantile([(v, 1.0) for v in (3.0, 1.0, 4.0, 2.0)], q) == expected


def test_a_heavy_sample_pulls_the_quantile_to_itself() -> None:
    pairs = [(1.0, 1.0), (2.0, 1.0), (10.0, 8.0)]
    assert weighted_quantile(pairs, 0.5) == 10.0
    assert weighted_quantile(pairs, 0.2) == 2.0


@given(st.lists(st.tuples(st.floats(0, 100), st.floats(0.01, 10)), min_size=1), st.floats(0, 1), st.randoms())
def test_the_quantile_is_one_of_the_values_and_ignores_order(
    pairs: list[tuple[float, float]], q: float, rnd: object
) -> None:
    got = weighted_quantile(pairs, q)
    assert got in [v for v, _ in pairs]
    shuffled = list(pairs)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert weighted_quantile(shuffled, q) == got


@given(
    st.lists(st.tuples(st.floats(0, 100), st.floats(0.01, 10)), min_size=1), st.floats(0, 1), st.floats(0, 1)
)
def test_the_quantile_is_monotone_in_q(pairs: list[tuple[float, float]], a: float, b: float) -> None:
    lo, hi = sorted((a, b))
    assert weighted_quantile(pairs, lo) <= weighted_quantile(pairs, hi)  # type: ignore[operator]


# -- weights ------------------------------------------------------------------------------------------


def test_the_window_keeps_the_newest_transfers() -> None:
    h = History()
    for k in range(WINDOW + 5):
        h.add(ok(float(k)))
    assert len(h) == WINDOW
    assert [t.seconds for t in h.items] == [float(k) for k in range(5, WINDOW + 5)]


def test_the_newest_transfer_weighs_most() -> None:
    """The published prototype weighted its oldest samples most; here each older one weighs DECAY
    times the next newer one (at the same age in time)."""
    h = History()
    for k in range(5):
        h.add(ok(float(k)))
    got = list(h.weighted(NOW))
    assert [t.seconds for t, _ in got] == [4.0, 3.0, 2.0, 1.0, 0.0]
    assert [w for _, w in got] == pytest.approx([DECAY**k for k in range(5)])


def test_weights_halve_every_half_life() -> None:
    h = History()
    h.add(ok(1.0, at=NOW - 2 * HALF_LIFE))
    ((_, w),) = h.weighted(NOW)
    assert w == pytest.approx(0.25)
    assert h.evidence(NOW) == pytest.approx(0.25)
    assert h.evidence(NOW + HALF_LIFE) == pytest.approx(0.125)


def test_a_transfer_stamped_in_the_future_has_age_zero() -> None:
    h = History()
    h.add(ok(1.0, at=NOW + 5))
    assert h.evidence(NOW) == pytest.approx(1.0)


def test_recent_samples_outweigh_old_ones_in_the_quantiles() -> None:
    """Ten slow answers, then five fast ones: with equal weights the median would be slow (two in
    three are); with the newest weighing most it is already fast."""
    h = History()
    for _ in range(10):
        h.add(ok(1.0))
    for _ in range(5):
        h.add(ok(0.1))
    assert weighted_quantile([(t.seconds, 1.0) for t in h.items], 0.5) == 1.0
    assert h.quantile(0.5, NOW, seconds) == 0.1
    assert h.quantile(0.95, NOW, seconds) == 1.0  # the tail still remembers


def test_evidence_counts_successes_and_failures_apart() -> None:
    h = History()
    h.add(ok(1.0))
    h.add(Transfer(NOW, CHUNK, 1.0, 1.0, ok=False))
    assert h.evidence(NOW, ok=False) == pytest.approx(1.0)
    assert h.evidence(NOW, ok=True) == pytest.approx(DECAY)
    assert h.evidence(NOW, ok=None) == pytest.approx(1.0 + DECAY)


def test_failures_are_not_response_times_and_censored_samples_can_be_left_out() -> None:
    h = History()
    h.add(ok(1.0))
    h.add(Transfer(NOW, CHUNK, 9.0, 9.0, ok=False))
    h.add(Transfer(NOW, CHUNK, 5.0, 0.0, censored=True))
    assert h.quantile(1.0, NOW, seconds) == 5.0
    assert h.quantile(1.0, NOW, seconds, censored=False) == 1.0
    assert h.mean(NOW, seconds) == 1.0


def test_an_empty_window_answers_none() -> None:
    h = History()
    assert h.quantile(0.5, NOW, seconds) is None and h.mean(NOW, seconds) is None
    assert h.evidence(NOW) == 0.0


# -- Transfer.per_byte ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        (Transfer(NOW, 1000, 1.1, 0.1), 1e-3),  # after the first byte, per byte
        (Transfer(NOW, 1000, 1.1, 0.1, queue=3), 0.25e-3),  # shared with 3 others: a quarter each
        (Transfer(NOW, 1000, 2.0, 0.0, queue=1, censored=True), 1e-3),  # all of it counts
        (Transfer(NOW, 0, 1.0, 0.0), 1.0),  # no bytes: one
        (Transfer(NOW, 1000, 0.5, 0.7), 0.0),  # first byte "after" the last: clamped
    ],
)
def test_per_byte_is_normalised_by_the_queue(t: Transfer, expected: float) -> None:
    assert t.per_byte == pytest.approx(expected)


@given(transfers(), st.floats(0.0, 10.0))
def test_per_byte_never_negative_and_falls_with_the_queue(t: Transfer, more: float) -> None:
    shared = Transfer(t.at, t.nbytes, t.seconds, t.latency, t.queue + more, t.ok, t.censored)
    assert 0.0 <= shared.per_byte <= t.per_byte
