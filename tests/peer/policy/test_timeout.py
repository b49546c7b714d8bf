"""peer.policy.timeout: how long a sync waits for its answer, learned from the answers."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from peer.policy.timeout import CEILING, AnswerTimer


def test_an_idle_site_keeps_the_configured_timeout() -> None:
    """Answers in milliseconds: the floor (the configured `sync_timeout`) is what a sync waits."""
    timer = AnswerTimer(floor=1.0)
    assert timer.timeout() == 1.0
    for _ in range(50):
        timer.observe(0.004)
    assert timer.timeout() == 1.0


def test_slow_answers_stretch_the_timeout_past_them() -> None:
    """A loaded site answering in 0.6-1.0 s: the timeout settles above the answers it sees."""
    timer = AnswerTimer(floor=1.0)
    for i in range(40):
        timer.observe(0.6 + 0.4 * (i % 2))
    assert 1.0 < timer.timeout() <= CEILING
    assert timer.timeout() > 1.0 + 0.1  # past the slowest answer, with room for its spread


def test_a_failure_doubles_the_timeout_and_an_answer_resets_the_back_off() -> None:
    timer = AnswerTimer(floor=1.0)
    timer.failed()
    assert timer.timeout() == 2.0
    timer.failed()
    assert timer.timeout() == CEILING
    timer.observe(0.01)
    assert timer.timeout() == 1.0


@given(st.lists(st.one_of(st.none(), st.floats(0, 100)), max_size=80), st.floats(0.05, 6.0))
def test_the_timeout_stays_between_its_floor_and_its_ceiling(events: list[float | None], floor: float) -> None:
    timer = AnswerTimer(floor=floor)
    for e in events:
        if e is None:
            timer.failed()
        else:
            timer.observe(e)
        assert floor <= timer.timeout() <= max(floor, CEILING)
