"""How a concern rides on the control plane's one periodic message (docs/control-plane.md, "Sync").

Every member sends the tracker one sync per interval. Membership and elections are the control
plane's own business; everything else that needs the tracker (the holdings index and origin
leases, site-wide popularity, replica counts) is a *section* of that message: a named part of
the request a member builds, answered by a named part of the reply the tracker builds. A concern
registers one member-side and one tracker-side object under the same name; the control plane
calls them each round and never looks inside their payloads (JSON-compatible values).

Why a seam: per-node control traffic stays one message per interval however many concerns ride
on it, and the concerns (in `peer/`, and their pure policy in `peer/policy/`) know nothing of
elections, epochs, retries or failover.

How the control plane calls them (`peer.control.member`, `peer.control.tracker`):

- Register both sides with `ControlPlane.register(member_section, tracker_section)`, on every
  node (any node may become tracker). Payloads travel as `sections: {name: payload}` in the
  sync request and reply.
- Each sync, `outgoing(full)` is asked of every member side; `full` is True on the first sync
  to a tracker (start-up, failover, a redirect), after the tracker asked for a resync (it had
  dropped this member), and for a section registered since the last sync. A section that sent
  something gets `incoming(answer)` (None when the tracker sent nothing back for it) or, if the
  sync did not reach a tracker that applied it, `failed()`; a section that sent None this
  round gets neither.
- The tracker calls `handle` for each section present in a request, in no particular order,
  and only for names it has registered (a section a newer member runs is ignored). A full sync
  from a member the tracker already knew first `forget`s that member in every section: a full
  announcement replaces what the tracker had. `forget` also runs when a member leaves (it said
  so on shutdown) or goes silent for `member_timeout`; `reset` when this node becomes tracker.
- The tracker's own node syncs its member sides with its tracker sides in-process, through the
  same calls: no concern needs a special case for "I am the tracker".
- Every call runs on the event loop, between awaits: keep them short, and raise nothing (a
  section that raises loses that round's answer, logged; the sync goes on).
- Sections that need the tracker's epoch (leases fenced by it), the member records (URLs of
  holders) or an early sync use `ControlPlane.tracker`, `.member(id)` / `.members()` and
  `.wake()`.
"""

from __future__ import annotations

from typing import Any, Protocol


class MemberSection(Protocol):
    """A concern's member side: what this node tells the tracker, and what it does with the answer."""

    name: str  # the key of this section in the sync request and reply

    def outgoing(self, full: bool) -> Any | None:
        """The payload for the next sync, or None to send nothing this round.

        `full` is True on the first sync to a tracker (after start-up or a failover): the new
        tracker starts empty, so the section sends its whole state, not only what changed."""
        ...

    def incoming(self, reply: Any | None) -> None:
        """The tracker's answer to what `outgoing` sent (None if it sent nothing back)."""
        ...

    def failed(self) -> None:
        """The sync carrying the last payload did not reach a tracker: whatever it announced must
        be sent again (the next `outgoing` should include it)."""
        ...


class TrackerSection(Protocol):
    """A concern's tracker side: soft state rebuilt from the members' syncs."""

    name: str

    def handle(self, member: str, payload: Any, now: float) -> Any | None:
        """Apply `member`'s payload (its node id) and return the reply payload for it."""
        ...

    def forget(self, member: str) -> None:
        """`member` left the site (dead or gone): drop everything it announced."""
        ...

    def reset(self) -> None:
        """This node has just become tracker: start from nothing (members re-announce in full)."""
        ...


class Sections:
    """The sections registered with one node's control plane, by name (see
    `ControlPlane.register`): the member side of each, and its tracker side."""

    def __init__(self) -> None:
        self.member: dict[str, MemberSection] = {}
        self.tracker: dict[str, TrackerSection] = {}

    def add(self, member: MemberSection, tracker: TrackerSection) -> None:
        """Register a concern; its two sides must carry the same, new, name."""
        if member.name != tracker.name:
            raise ValueError(f"section names differ: {member.name!r} (member) vs {tracker.name!r} (tracker)")
        if not member.name or member.name in self.member:
            raise ValueError(f"section {member.name!r} is empty or already registered")
        self.member[member.name] = member
        self.tracker[tracker.name] = tracker
