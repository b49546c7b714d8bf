"""Real, small sections for the control plane's tests: what a concern riding on the sync message
does, recorded so a test can check what crossed (no mocks: these are whole implementations of
`MemberSection` and `TrackerSection`)."""

from __future__ import annotations

from typing import Any


class Notes:
    """A member side that announces a growing list of notes: everything on a full sync, only the
    new ones otherwise, and again whatever a failed sync carried."""

    def __init__(self, name: str = "notes") -> None:
        self.name = name
        self.notes: list[str] = []
        self._sent = 0  # notes the tracker has
        self._carried = 0  # notes in the sync in flight
        self.fulls = 0
        self.answers: list[Any] = []
        self.failures = 0

    def add(self, note: str) -> None:
        self.notes.append(note)

    def outgoing(self, full: bool) -> Any | None:
        if full:
            self.fulls += 1
            self._sent = 0
        new = self.notes[self._sent :]
        self._carried = len(self.notes)
        if not full and not new:
            return None
        return {"full": full, "notes": new}

    def incoming(self, reply: Any | None) -> None:
        self._sent = self._carried
        self.answers.append(reply)

    def failed(self) -> None:
        self.failures += 1


class Board:
    """The tracker side: every member's notes, answered with how many notes the site holds."""

    def __init__(self, name: str = "notes") -> None:
        self.name = name
        self.by_member: dict[str, list[str]] = {}
        self.resets = 0
        self.forgotten: list[str] = []

    def handle(self, member: str, payload: Any, now: float) -> Any | None:
        notes = self.by_member.setdefault(member, [])
        if payload["full"]:
            notes.clear()
        notes.extend(payload["notes"])
        return {"site_notes": sum(len(n) for n in self.by_member.values())}

    def forget(self, member: str) -> None:
        self.forgotten.append(member)
        self.by_member.pop(member, None)

    def reset(self) -> None:
        self.resets += 1
        self.by_member.clear()


class Broken:
    """A section whose every method raises: the sync must go on without it."""

    def __init__(self, name: str = "broken") -> None:
        self.name = name

    def outgoing(self, full: bool) -> Any | None:
        raise RuntimeError("outgoing")

    def incoming(self, reply: Any | None) -> None:
        raise RuntimeError("incoming")

    def failed(self) -> None:
        raise RuntimeError("failed")

    def handle(self, member: str, payload: Any, now: float) -> Any | None:
        raise RuntimeError("handle")

    def forget(self, member: str) -> None:
        raise RuntimeError("forget")

    def reset(self) -> None:
        raise RuntimeError("reset")
