"""Builders and hypothesis strategies for the control plane's policy tests (membership and
election): member records and tracker references, all plain values."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from peer.policy.election import Answer, TrackerRef
from peer.policy.membership import Member

SITE = "default"


def node_id(n: int) -> str:
    """The 32-hex-digit id of node number `n`."""
    return f"{n:032x}"


def member(
    n: int,
    *,
    priority: int = 0,
    link: int = 10000,
    cpus: int = 2,
    mem: int = 4096,
    started: float = 1_700_000_000.0,
    site: str = SITE,
) -> Member:
    """Node `n` at http://10.0.0.<n>:5381 (all capacities equal unless given)."""
    return Member(
        node_id(n), f"http://10.0.{n // 250}.{n % 250 + 1}:5381", site, started, priority, cpus, mem, link
    )


def ref(n: int, epoch: int, **kwargs: Any) -> TrackerRef:
    """Node `n` as tracker at `epoch`."""
    return TrackerRef(epoch, member(n, **kwargs))


def alive(record: Member, tracker: TrackerRef | None = None, epoch_seen: int = 0) -> Answer:
    """`record`'s whois answer: following `tracker` (None: none)."""
    return Answer(record, tracker, epoch_seen)


@st.composite
def members(draw: st.DrawFn, min_size: int = 1, max_size: int = 12) -> list[Member]:
    """Records with distinct ids and every rank field varied (ties on all but the id included)."""
    ids = draw(st.lists(st.integers(0, 4000), min_size=min_size, max_size=max_size, unique=True))
    return [
        Member(
            node_id(i),
            f"http://10.1.{i // 250}.{i % 250 + 1}:5381",
            SITE,
            draw(st.sampled_from([1_700_000_000.0, 1_700_000_050.5, 1_700_000_100.0])),
            draw(st.integers(-2, 2)),
            draw(st.sampled_from([1, 2, 4])),
            draw(st.sampled_from([2048, 4096])),
            draw(st.sampled_from([0, 1000, 10000])),
        )
        for i in ids
    ]


def refs(records: list[Member]) -> st.SearchStrategy[TrackerRef]:
    """A tracker reference to one of `records` at a small epoch."""
    return st.builds(TrackerRef, st.integers(1, 4), st.sampled_from(records))
