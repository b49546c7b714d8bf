"""Which missing chunks go to which peer this round.

Order: chunks a reader is blocked on (`wanted`: its range plus `READ_AHEAD` chunks) first, since
a lazy read (containerd unpacking while the blob streams in) stalls on exactly those; then rarest
first (fewest holders), since a chunk only one peer holds is the one most likely to become
unavailable or to bottleneck the swarm, while a common chunk can be had from anyone later; then by
index, so the order is total and a blob fills roughly front to back.

Limits: the blob's window (`window.window`, about the bandwidth-delay product) and the engine-wide
cap on requests in flight over all blobs (bounded buffer memory on a small node). Both count
requests already in flight, hedges included, and hedges obey them too (`Slots.hedge_room`). So that
a window full of new requests never leaves a straggler unhedged, new requests stop `reserve`
requests short of either limit (`hedging.RESERVE`, one by default; never below one request): that
room is for hedges. A chunk already in flight (to a peer or in an origin run) is not scheduled again
here; a second request for a straggler is `hedging`'s decision.

Which peer each chunk goes to is the caller's `choose` (normally a `choice.Picker`), so chunk
order and peer choice can change independently.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass

READ_AHEAD = 2  # chunks past a reader's range that are wanted too: the next read's, before it asks

Choose = Callable[[Sequence[str]], str | None]


@dataclass(frozen=True)
class Slots:
    """How many more peer requests may start: the blob's window and the engine-wide cap."""

    window: int  # this blob's window
    flights: int  # this blob's peer requests in flight (a hedged chunk counts twice)
    inflight: int  # peer requests in flight over all blobs
    max_inflight: int  # ... and the cap on those
    reserve: int = 0  # room under both limits that new requests leave for hedges

    def fetch_room(self) -> int:
        """How many new (unhedged) requests may start: up to `reserve` short of both limits, but
        never kept below one request by the reserve."""
        window = max(min(self.window, 1), self.window - self.reserve)
        cap = max(min(self.max_inflight, 1), self.max_inflight - self.reserve)
        return max(0, min(window - self.flights, cap - self.inflight))

    def hedge_room(self, started: int = 0) -> int:
        """How many hedges may start after `started` new requests did: whatever both limits
        still allow, reserve included."""
        return max(0, min(self.window - self.flights, self.max_inflight - self.inflight) - started)


@dataclass(frozen=True, slots=True)
class Fetch:
    """Ask `peer` for chunk `index`."""

    index: int
    peer: str


def wanted_chunks(offset: int, size: int, chunk_size: int, nchunks: int) -> range:
    """The chunks a read of `size` bytes at `offset` needs, plus `READ_AHEAD` chunks after them
    (never past the blob's last chunk). An empty read still wants the chunk at `offset`."""
    first = offset // chunk_size
    last = max(first, (offset + max(size, 1) - 1) // chunk_size)
    return range(first, min(last + 1 + READ_AHEAD, nchunks))


def peer_order(
    missing: Sequence[int], holders: Mapping[int, Sequence[str]], wanted: Set[int], busy: Set[int]
) -> list[int]:
    """The missing chunks some peer holds and nobody is fetching yet, in the order they should be
    requested: wanted first, then rarest first, then by index."""
    todo = [i for i in missing if holders.get(i) and i not in busy]
    todo.sort(key=lambda i: (i not in wanted, len(holders[i]), i))
    return todo


def schedule(
    missing: Sequence[int],
    holders: Mapping[int, Sequence[str]],
    wanted: Set[int],
    busy: Set[int],
    slots: Slots,
    choose: Choose,
) -> list[Fetch]:
    """This round's peer requests, in the order they should start: `peer_order` cut off where the
    blob's window or the engine-wide cap is full. `busy` is the chunks already in flight (peer or
    origin). `choose` is called once per chunk that gets a request, in order; a chunk for which it
    returns None is skipped and takes no slot. At most `slots.fetch_room()` requests."""
    fetches: list[Fetch] = []
    room = slots.fetch_room()
    for i in peer_order(missing, holders, wanted, busy):
        if len(fetches) >= room:
            break
        peer = choose(holders[i])
        if peer:
            fetches.append(Fetch(i, peer))
    return fetches
