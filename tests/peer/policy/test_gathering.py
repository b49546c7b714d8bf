"""peer.policy.gathering: whether to keep waiting for a burst's nodes before dealing stripes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from policy_cases import PEERS, view, views_of

from peer.policy.gathering import Gather, gather
from peer.policy.holdings import BlobView

A, B, C = PEERS[:3]
NOW, LATER = 10.0, 12.0


@pytest.mark.parametrize(
    ("seen", "usable", "now", "verdict"),
    [
        ({}, [A, B], NOW, Gather.ALONE),  # nobody else knows the blob: a lone pull
        ({}, [], NOW, Gather.ALONE),
        ({A: view(4, complete=True)}, [A, B], NOW, Gather.HOLDER),  # fetch it from A
        ({A: view(4), B: view(4, complete=True)}, [A, B, C], NOW, Gather.HOLDER),
        ({A: view(4)}, [A, B], NOW, Gather.WAIT),  # B has not joined yet
        ({A: view(4), B: view(4, {1})}, [A, B], NOW, Gather.JOINED),
        ({A: view(4), B: view(4)}, [A, B, C], LATER, Gather.DEADLINE),
        ({A: view(4), B: view(4)}, [A, B, C], LATER + 5, Gather.DEADLINE),
        ({A: view(4)}, [A], LATER, Gather.JOINED),  # joined wins over the deadline
        ({A: view(4, complete=True)}, [A, B], LATER, Gather.HOLDER),
        ({A: view(4), C: view(4)}, [A], NOW, Gather.JOINED),  # C is suspended: not waited for
    ],
)
def test_gather_verdicts(seen: dict[str, BlobView], usable: list[str], now: float, verdict: Gather) -> None:
    assert gather(seen, usable, now, LATER) is verdict


@pytest.mark.parametrize("verdict", list(Gather))
def test_only_wait_keeps_gathering(verdict: Gather) -> None:
    assert verdict.done is (verdict is not Gather.WAIT)


def test_usable_peers_may_be_any_iterable() -> None:
    assert gather({A: view(4)}, iter([A, B]), NOW, LATER) is Gather.WAIT


@given(views_of(4), st.lists(st.sampled_from(PEERS), unique=True), st.floats(0.0, 20.0))
def test_wait_exactly_while_a_burst_is_still_assembling(
    seen: dict[str, BlobView], usable: list[str], now: float
) -> None:
    waiting = (
        bool(seen)
        and not any(v.complete for v in seen.values())
        and any(p not in seen for p in usable)
        and now < LATER
    )
    assert (gather(seen, usable, now, LATER) is Gather.WAIT) is waiting


@given(views_of(4), st.lists(st.sampled_from(PEERS), unique=True), st.floats(0.0, 100.0))
def test_never_wait_past_the_deadline(seen: dict[str, BlobView], usable: list[str], extra: float) -> None:
    assert gather(seen, usable, LATER + extra, LATER).done
