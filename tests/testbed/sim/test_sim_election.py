"""The bully election of `peer.policy.election` in simulated time (`testbed.sim.election`)."""

from __future__ import annotations

import pytest

from testbed.sim.election import ElectionSim


@pytest.mark.parametrize("n", [3, 8, 40])
def test_one_new_tracker_well_within_five_seconds(n: int) -> None:
    r = ElectionSim(n, seed=n).run()
    assert r.claims == 1
    assert r.seconds < 5.0
    assert r.winner_rank == 1  # the best-ranked survivor


def test_when_the_next_best_die_too_a_later_one_wins() -> None:
    r = ElectionSim(30, seed=2, also_dead=3).run()
    assert r.winner_rank == 4
    assert r.seconds < 5.0


def test_seeded_runs_repeat() -> None:
    assert ElectionSim(20, seed=5).run() == ElectionSim(20, seed=5).run()
