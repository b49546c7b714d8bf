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
