"""Builders and hypothesis strategies shared by the policy tests: peers, digests, holdings views
and measured peer stats, all plain values (the policy needs no mocks)."""

from __future__ import annotations

from collections.abc import Iterable

from hypothesis import strategies as st

from peer.policy.history import Transfer
from peer.policy.holdings import BlobView
from peer.policy.peerstats import PeerStats

CHUNK = 1 << 20
PEERS = [f"http://10.0.0.{n}:7420" for n in range(1, 9)]
ME = "http://10.0.0.100:7420"
DIGEST = "sha256:" + "3f" * 32


def bitmap(indices: Iterable[int], nchunks: int) -> bytes:
    """The presence bitmap of `indices` (bit i LSB first in byte i // 8), as `/have` sends it."""
    have = bytearray(-(-nchunks // 8))
    for i in indices:
        have[i // 8] |= 1 << (i % 8)
    return bytes(have)


def view(
    nchunks: int,
    held: Iterable[int] = (),
    *,
    complete: bool = False,
    fetching: Iterable[int] = (),
    chunk_size: int = CHUNK,
    size: int | None = None,
    digest: str = DIGEST,
) -> BlobView:
    """A peer's view of a blob of `nchunks` chunks holding `held`."""
    return BlobView(
        digest,
        nchunks * chunk_size if size is None else size,
        chunk_size,
        complete,
        b"" if complete else bitmap(held, nchunks),
        frozenset(fetching),
    )


digests = st.text("0123456789abcdef", min_size=64, max_size=64).map(lambda h: "sha256:" + h)
peer_urls = st.sampled_from(PEERS)


@st.composite
def views_of(draw: st.DrawFn, nchunks: int, peers: list[str] | None = None) -> dict[str, BlobView]:
    """Views of a blob of `nchunks` chunks from a subset of `peers`: partial (random holdings,
    some announcing origin fetches) or complete."""
    names = draw(st.lists(st.sampled_from(peers or PEERS), unique=True, max_size=6))
    out = {}
    for p in names:
        if draw(st.integers(0, 5)) == 0:
            out[p] = view(nchunks, complete=True)
        else:
            held = draw(st.sets(st.integers(0, nchunks - 1), max_size=nchunks))
            fetching = (
                draw(st.sets(st.integers(0, nchunks - 1), max_size=3)) if draw(st.booleans()) else set()
            )
            out[p] = view(nchunks, held, fetching=fetching - held)
    return out


@st.composite
def peer_stats(draw: st.DrawFn, now: float = 1000.0) -> PeerStats:
    """A measured peer: EWMA throughput from 100 kB/s to 1 GB/s, latency up to 2 s, a queue, a
    chunk failure streak, sometimes a drop that lasts past `now`, and a window of recent transfers
    (`transfers`)."""
    stats = PeerStats(
        bps=draw(st.floats(1e5, 1e9)),
        latency=draw(st.floats(0.0, 2.0)),
        inflight=draw(st.integers(0, 20)),
        chunk_failures=draw(st.integers(0, 4)),
        dropped_until=draw(st.sampled_from([0.0, now - 1.0, now + 30.0])),
    )
    for t in draw(st.lists(transfers(now), max_size=12)):
        stats.history.add(t)
    return stats


@st.composite
def transfers(draw: st.DrawFn, now: float = 1000.0) -> Transfer:
    """One chunk request's outcome, up to a minute before `now`: 1 MiB or less, up to 20 s, some
    failed, some censored (hedged and cancelled)."""
    seconds = draw(st.floats(0.0, 20.0))
    kind = draw(st.sampled_from(["ok", "ok", "ok", "failed", "censored"]))
    return Transfer(
        at=now - draw(st.floats(0.0, 60.0)),
        nbytes=draw(st.integers(1, CHUNK)),
        seconds=seconds,
        latency=draw(st.floats(0.0, 1.0)) * seconds,
        queue=draw(st.floats(0.0, 12.0)),
        ok=kind != "failed",
        censored=kind == "censored",
    )


def measured(
    seconds: float,
    count: int = 20,
    *,
    now: float = 1000.0,
    nbytes: int = CHUNK,
    latency: float = 0.001,
    queue: float = 0.0,
    every: float = 0.1,
) -> PeerStats:
    """A peer that answered `count` requests of `nbytes`, each in `seconds` (first byte after
    `latency`) with `queue` others in flight, one every `every` seconds up to `now`."""
    stats = PeerStats()
    for k in range(count):
        stats.observe(nbytes, seconds, latency=latency, queue=queue, now=now - (count - 1 - k) * every)
    return stats


def stats_for(peers: Iterable[str]) -> st.SearchStrategy[dict[str, PeerStats]]:
    """Stats for some of `peers` (the others were never measured)."""
    return st.fixed_dictionaries({}, optional={p: peer_stats() for p in peers})
