"""The index section (`peer.control.index_sections`) over a real store and engine, no network:
incremental announcements (only what arrived since the last acknowledged sync, everything again
after a failed one or for a new tracker), drops and completions, the tracker's answers fed into the
engine's views, leases granted to downloads, malformed payloads ignored."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from random import Random
from typing import Any

import aiohttp
import pytest

from kernel.store.chunkstore import ChunkStore
from kernel.store.meta import Meta
from peer.catalog import Catalog
from peer.control.index_sections import IndexMember, IndexTracker
from peer.control.popularity import PopularityTracker
from peer.engine import Engine
from peer.exchange import PeerClient
from peer.origin import OriginClient
from peer.peers import StaticPeers
from peer.policy.index import IndexConfig

CS = 4096
DATA = bytes(range(256)) * 16 * 10  # 10 chunks
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()
OTHER = b"other blob" * 1000
OTHER_DIGEST = "sha256:" + hashlib.sha256(OTHER).hexdigest()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Member:
    """A store and an engine that never starts a download; its index section."""

    def __init__(self, root: Path, session: aiohttp.ClientSession, url: str, clock: Clock) -> None:
        self.meta = Meta(root)
        self.store = ChunkStore(root, self.meta, CS)
        self.store.recover()
        self.engine = Engine(
            self.store, Catalog(self.meta), OriginClient(session), StaticPeers([]), PeerClient(session), url
        )
        self.section = IndexMember(self.engine, clock=clock)

    def chunks(self, *indices: int) -> None:
        self.store.partials.claim(DIGEST, len(DATA))
        self.store.partials.put_chunks(DIGEST, [(i, DATA[i * CS : (i + 1) * CS]) for i in indices])

    def close(self) -> None:
        self.store.close()
        self.meta.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def members(
    tmp_path: Path, session: aiohttp.ClientSession, clock: Clock
) -> AsyncIterator[list[Member]]:
    made = [Member(tmp_path / f"m{i}", session, f"http://10.0.0.{i + 1}:5381", clock) for i in range(3)]
    yield made
    for m in made:
        m.close()


def announced(payload: dict[str, Any] | None, digest: str = DIGEST) -> dict[str, Any] | None:
    assert payload is not None
    return next((a for a in payload.get("announce", []) if a["d"] == digest), None)


async def test_announcements_are_incremental_and_resent_after_a_failed_sync(members: list[Member]) -> None:
    m = members[0]
    m.chunks(0, 1, 2, 5)
    first = announced(m.section.outgoing(full=True))
    assert first == {"d": DIGEST, "size": len(DATA), "cs": CS, "filling": True, "add": [[0, 2], [5, 5]]}
    m.section.incoming({})
    assert announced(m.section.outgoing(full=False)) is None  # nothing new
    m.section.incoming({})
    m.chunks(3, 9)
    assert announced(m.section.outgoing(full=False)) == {
        "d": DIGEST,
        "size": len(DATA),
        "cs": CS,
        "add": [[3, 3], [9, 9]],
    }
    m.section.failed()
    m.chunks(4)
    again = announced(m.section.outgoing(full=False))
    assert again is not None and again["add"] == [[3, 4], [9, 9]]
    m.section.incoming({})
    # a new tracker starts empty: everything again
    everything = announced(m.section.outgoing(full=True))
    assert everything is not None and everything["add"] == [[0, 5], [9, 9]] and everything["filling"]


async def test_complete_and_dropped_blobs_are_announced_once(members: list[Member]) -> None:
    m = members[0]
    m.chunks(*range(10))
    m.section.outgoing(full=True)
    m.section.incoming({})
    m.store.partials.complete(DIGEST)
    m.section.changed(DIGEST)
    assert announced(m.section.outgoing(full=False)) == {
        "d": DIGEST,
        "size": len(DATA),
        "cs": CS,
        "complete": True,
    }
    m.section.incoming({})
    assert announced(m.section.outgoing(full=False)) is None
    m.section.incoming({})
    m.store.delete(DIGEST)
    m.section.changed(DIGEST)
    assert announced(m.section.outgoing(full=False)) == {
        "d": DIGEST,
        "size": len(DATA),
        "cs": CS,
        "drop": True,
    }
    m.section.incoming({})
    assert announced(m.section.outgoing(full=True)) is None


async def test_a_blob_that_arrives_by_other_means_is_found_by_the_rescan(
    members: list[Member], clock: Clock
) -> None:
    m = members[0]
    m.section.outgoing(full=True)
    m.section.incoming({})
    m.store.partials.claim(OTHER_DIGEST, len(OTHER))
    m.store.partials.put_chunks(OTHER_DIGEST, [(i, OTHER[i * CS : (i + 1) * CS]) for i in range(3)])
    m.store.partials.complete(OTHER_DIGEST)
    assert announced(m.section.outgoing(full=False), OTHER_DIGEST) is None  # not looked at yet
    m.section.incoming({})
    clock.now += m.section.rescan_interval
    assert announced(m.section.outgoing(full=False), OTHER_DIGEST) == {
        "d": OTHER_DIGEST,
        "size": len(OTHER),
        "cs": CS,
        "complete": True,
    }


async def test_tracking_follows_the_answers(members: list[Member], clock: Clock) -> None:
    s = members[0].section
    assert not s.tracking() and not members[0].engine.coordination.tracking()
    s.outgoing(full=True)
    s.incoming({})
    assert s.tracking()
    s.outgoing(full=False)
    s.failed()
    assert s.tracking()  # one failed sync is a blip
    s.outgoing(full=False)
    s.failed()
    assert not s.tracking()
    s.outgoing(full=False)
    s.incoming({})
    assert s.tracking()
    clock.now += s.stale_after
    assert not s.tracking()


async def test_a_slow_tracker_is_not_a_gone_one(members: list[Member], clock: Clock) -> None:
    """Past `stale_after` from the last answer, a sync still on its way (not failed, sent a moment
    ago) keeps the member tracked: on a crowded host the tracker answers late, and striping the
    origin meanwhile fetches runs the tracker leased to others. Only that sync waiting
    `stale_after` itself, or two failures, end the tracking."""
    s = members[0].section
    s.outgoing(full=True)
    s.incoming({})
    clock.now += s.stale_after - 0.1
    s.outgoing(full=False)  # sent just before the answer went stale
    clock.now += 0.2
    assert s.tracking()  # stale since the last answer, but the sync in flight is 0.2 s old
    clock.now += s.stale_after
    assert not s.tracking()  # that sync itself has waited `stale_after`
    s.incoming({})  # it came back after all
    assert s.tracking()


class PatientLink:
    """A control plane whose syncs may wait `patience` seconds for their answer."""

    def __init__(self, patience: float) -> None:
        self.waits = patience

    def sync_soon(self) -> None:
        """Nothing to hurry."""

    def patience(self) -> float:
        return self.waits


async def test_a_sync_counts_as_on_its_way_for_as_long_as_the_control_plane_lets_it_wait(
    members: list[Member], clock: Clock
) -> None:
    """The learned sync timeout (`peer.policy.timeout`) reaches 4 s on a loaded site, past
    `stale_after` (3 s). A sync that may still be answered must keep the engine tracked until its
    own timeout: before it fails, the tracker's leases still stand, and striping the origin
    meanwhile fetches runs leased to others."""
    s = members[0].section
    link = PatientLink(s.stale_after + 2.0)
    s.link = link
    s.outgoing(full=True)
    s.incoming({})
    clock.now += s.stale_after
    s.outgoing(full=False)  # sent when the answer went stale; may wait stale_after + 2 s
    clock.now += s.stale_after + 1.9
    assert s.tracking()  # past stale_after, within the sync's own timeout
    clock.now += 0.2
    assert not s.tracking()  # its timeout is over and no answer came: a stopped loop
    link.waits = 0.5  # a short timeout never shortens `stale_after`
    s.outgoing(full=False)
    clock.now += s.stale_after - 0.1
    assert s.tracking()


async def test_the_tracker_answers_with_holders_that_become_the_engines_views(
    members: list[Member], clock: Clock
) -> None:
    tracker = IndexTracker(IndexConfig(), Random(0))
    a, b, c = members
    a.chunks(0, 1, 2, 3)
    b.chunks(0, 7)
    c.chunks()
    for i, m in enumerate(members):
        tracker.handle(f"id{i}", m.section.outgoing(full=True), clock.now)
        m.section.incoming({})
    # c asks for the holders of the blob, as a download would
    payload = c.section.outgoing(full=False)
    assert payload is not None
    payload["query"] = [DIGEST]
    reply = tracker.handle("id2", payload, clock.now)
    holders = {h["url"]: h for h in reply["holders"][DIGEST]}
    assert set(holders) == {"http://10.0.0.1:5381", "http://10.0.0.2:5381"}
    assert base64.b64decode(holders["http://10.0.0.1:5381"]["have"]) == b"\x0f\x00"
    c.section.incoming(reply)
    views = c.engine.views[DIGEST]
    assert views["http://10.0.0.2:5381"].has(7) and not views["http://10.0.0.2:5381"].has(1)
    assert tracker.index.filling(DIGEST) == {"id0", "id1", "id2"}
    tracker.forget("id0")
    assert tracker.index.holdings(DIGEST, "id0") is None


async def test_a_lease_request_is_granted_to_the_download(members: list[Member], clock: Clock) -> None:
    """The tracker's side of a lease request, and the lease answer parsed back. (The
    member holds a chunk already: the blob would be adopted, no leases for a second; that window
    has its own cases in tests/peer/policy/test_index.py.)"""
    tracker = IndexTracker(IndexConfig(adopt_wait=0.0), Random(0))
    m = members[0]
    m.chunks(0)
    payload = m.section.outgoing(full=True)
    assert payload is not None
    payload["lease"] = [{"d": DIGEST, "want": [4], "max": 2}]
    reply = tracker.handle("id0", payload, clock.now)
    assert reply["leases"] == {DIGEST: {"first": 4, "last": 5}}
    m.section.incoming(reply)  # no download of that blob here: the lease is ignored
    again = tracker.handle("id0", {"lease": [{"d": DIGEST, "want": [], "max": 32}]}, clock.now)
    assert again["leases"] == {DIGEST: {"first": 1, "last": 3}}  # stops at the held and leased chunks
    released = tracker.handle("id0", {"done": [{"d": DIGEST, "first": 4, "last": 5}]}, clock.now)
    assert released == {}
    assert [(le.first, le.last) for le in tracker.index.leases(DIGEST, clock.now)] == [(1, 3)]


@pytest.mark.parametrize(
    "payload",
    [
        None,
        [],
        "x",
        {"announce": "x"},
        {"announce": [1, {"d": "sha256:zz", "size": 1, "cs": 1}, {"d": DIGEST, "size": "1", "cs": 1}]},
        {"announce": [{"d": DIGEST, "size": 10, "cs": 1, "add": [[1]]}]},
        {"lease": [{"d": DIGEST}], "done": [{"d": 1}], "query": [1, None], "replicas": [{}]},
        {"url": 5, "announce": [{"d": DIGEST, "size": 10, "cs": 1, "fetching": "x"}]},
    ],
)
def test_malformed_payloads_change_nothing(payload: Any) -> None:
    tracker = IndexTracker()
    reply = tracker.handle("bad", payload, 0.0)
    assert reply in (None, {}, {"leases": {}})
    assert tracker.index.size_of(DIGEST) is None


async def test_a_blob_deleted_and_fetched_again_between_syncs_is_dropped_then_announced(
    members: list[Member],
) -> None:
    tracker = IndexTracker()
    m = members[0]
    m.chunks(*range(10))
    m.store.partials.complete(DIGEST)
    tracker.handle("id0", m.section.outgoing(full=True), 0.0)
    m.section.incoming({})
    assert tracker.index.replicas(DIGEST) == 1
    m.store.delete(DIGEST)  # nobody told the section
    m.chunks(2)
    m.section.changed(DIGEST)
    payload = m.section.outgoing(full=False)
    assert payload is not None
    mine = [a for a in payload["announce"] if a["d"] == DIGEST]
    assert [("drop" in a, a.get("add")) for a in mine] == [(True, None), (False, [[2, 2]])]
    tracker.handle("id0", payload, 1.0)
    assert tracker.index.replicas(DIGEST) == 0
    assert tracker.index.holdings(DIGEST, "id0") == 0b100


async def test_ranges_beyond_the_cap_go_in_the_next_sync(
    members: list[Member], monkeypatch: pytest.MonkeyPatch
) -> None:
    from peer.control import index_sections

    monkeypatch.setattr(index_sections, "MAX_RANGES", 2)
    m = members[0]
    m.chunks(0, 2, 4, 6)
    first = announced(m.section.outgoing(full=True))
    assert first is not None and first["add"] == [[0, 0], [2, 2]]
    m.section.incoming({})
    second = announced(m.section.outgoing(full=False))
    assert second is not None and second["add"] == [[4, 4], [6, 6]]


async def test_the_tracker_side_counts_the_other_complete_holders_for_popularity(
    members: list[Member], clock: Clock
) -> None:
    """`IndexTracker` is the popularity section's `ReplicaCounts`: the replicas a member is told
    of are the other members holding the blob whole, as they announced it."""
    tracker = IndexTracker(IndexConfig(), Random(1))
    popularity = PopularityTracker(replicas=tracker)
    for i, m in enumerate(members):
        m.chunks(*range(10) if i < 2 else (0,))
        if i < 2:
            m.store.partials.complete(DIGEST)
        tracker.handle(f"n{i}", m.section.outgoing(full=True), clock.now)
    counts = [tracker.complete_holders(DIGEST, f"n{i}") for i in range(3)]
    assert counts == [1, 1, 2]
    assert tracker.complete_holders(OTHER_DIGEST, "n0") == 0
    answer = popularity.handle("n2", {"counts": {}, "ask": [DIGEST]}, clock.now)
    assert answer is not None and answer["replicas"] == {DIGEST: 2}
    tracker.forget("n0")
    assert tracker.complete_holders(DIGEST, "n2") == 1
