"""The member table: who is in the site, when each member was last heard of, and what changed.

The tracker is the membership authority while there is one (docs/control-plane.md, "Membership"):
it keeps a `MemberTable` of every member that syncs with it, marks a member dead after
`member_timeout` seconds without a sync (`expire`), and answers each sync with the changes since
the version the member last saw (`delta_since`). Each member keeps a copy of the same class, fed
with those deltas (`apply`), for elections and for the fallback fan-out.

Versions. Every change (a member added, its record changed, a member removed) bumps `version`
by one. The table remembers, per member id, the version of its latest change, in change order
(a removed member leaves a tombstone), so the delta since version v is the tail of that log:
its cost is the number of changes, not the size of the site. Tombstones are kept for the last
`history` removals; a member further behind than that (or one that comes from another tracker,
whose versions mean nothing here) gets the whole table instead, as it does when the delta would
be longer than the table.

Records are what every member knows of every member (`Member`); they do not change during a
daemon's life, so a record that changes means the node restarted under the same id.

Which members a node asks directly when there is no tracker is not decided here: the engine
deals the whole member list into groups (`peer.policy.fanout`; docs/control-plane.md says why a
per-node choice, such as rendezvous hashing, makes stripe owners disagree).

Pure: time comes in as `now` (any monotonic clock, the caller's), nothing here does I/O.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

NODE_ID = re.compile(r"[0-9a-f]{32}")
_URL = re.compile(r"https?://[^\s/]+")
_SITE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


@dataclass(frozen=True)
class Member:
    """A member record: who a node is, where it is reached, and what the election ranks it by.

    `started` is the wall-clock second the daemon started (only ever compared, as "longer
    lived"); `priority` is `[site] tracker_priority` (< 0: never tracker); `cpus`, `mem_mib`
    and `link_mbit` are the node's capacity (0 when unknown)."""

    id: str
    url: str
    site: str
    started: float
    priority: int = 0
    cpus: int = 0
    mem_mib: int = 0
    link_mbit: int = 0

    def to_wire(self) -> dict[str, Any]:
        """The record as JSON-compatible values (sync replies, whois answers)."""
        return {
            "id": self.id,
            "url": self.url,
            "site": self.site,
            "started": self.started,
            "priority": self.priority,
            "cpus": self.cpus,
            "mem_mib": self.mem_mib,
            "link_mbit": self.link_mbit,
        }

    @classmethod
    def from_wire(cls, data: Any) -> Member:
        """Parse and check a record another node sent; ValueError names what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("a member record must be an object")
        node_id, url, site = data.get("id"), data.get("url"), data.get("site")
        if not isinstance(node_id, str) or not NODE_ID.fullmatch(node_id):
            raise ValueError(f"member id must be 32 hex digits, got {node_id!r}")
        if not isinstance(url, str) or not _URL.fullmatch(url):
            raise ValueError(f"member url must be http(s)://host:port, got {url!r}")
        if not isinstance(site, str) or not _SITE.fullmatch(site):
            raise ValueError(f"member site must be a site name, got {site!r}")
        started = data.get("started")
        if isinstance(started, bool) or not isinstance(started, int | float) or not math.isfinite(started):
            raise ValueError(f"member started must be a number, got {started!r}")
        ints = {}
        for key in ("priority", "cpus", "mem_mib", "link_mbit"):
            value = data.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or abs(value) >= 1 << 53:
                raise ValueError(f"member {key} must be an integer, got {value!r}")
            ints[key] = value
        return cls(node_id, url, site, float(started), **ints)


@dataclass(frozen=True)
class Delta:
    """What a member must change in its copy to reach the tracker's table at `version`: the
    whole table (`full`, in `add`), or the records added or changed and the ids removed."""

    version: int
    full: bool
    add: tuple[Member, ...] = ()
    remove: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        """{"v", "all": [...]} or {"v", "add": [...], "remove": [...]}."""
        if self.full:
            return {"v": self.version, "all": [m.to_wire() for m in self.add]}
        return {"v": self.version, "add": [m.to_wire() for m in self.add], "remove": list(self.remove)}

    @classmethod
    def from_wire(cls, data: Any) -> Delta:
        """Parse and check a delta from a sync reply; ValueError names what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("members must be an object")
        version = data.get("v")
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"members version must be a non-negative integer, got {version!r}")
        if "all" in data:
            records = data["all"]
            if not isinstance(records, list):
                raise ValueError("members.all must be a list")
            return cls(version, True, tuple(Member.from_wire(r) for r in records))
        add, remove = data.get("add", []), data.get("remove", [])
        if not isinstance(add, list) or not isinstance(remove, list):
            raise ValueError("members.add and members.remove must be lists")
        if not all(isinstance(i, str) and NODE_ID.fullmatch(i) for i in remove):
            raise ValueError("members.remove must list node ids")
        return cls(version, False, tuple(Member.from_wire(r) for r in add), tuple(remove))


class MemberTable:
    """Records and last-heard times of a site's members, versioned (see the module docstring)."""

    def __init__(self, history: int = 4096) -> None:
        """`history`: how many removals are remembered for deltas (older: a full table)."""
        self._records: dict[str, Member] = {}
        self._heard: dict[str, float] = {}
        self._log: OrderedDict[str, int] = OrderedDict()  # id -> version of its latest change, in order
        self._tombstones = 0  # ids in the log that are no longer members
        self._floor = 0  # a delta since a version below this cannot be built any more
        self._history = history
        self.version = 0

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._records

    def __iter__(self) -> Iterator[Member]:
        return iter(list(self._records.values()))

    def get(self, node_id: str) -> Member | None:
        """The record of `node_id`, or None if it is not a member."""
        return self._records.get(node_id)

    def records(self) -> list[Member]:
        """Every member's record, in no particular order."""
        return list(self._records.values())

    def last_heard(self, node_id: str) -> float | None:
        """When `node_id` was last heard of (the caller's clock), or None if it is not a member."""
        return self._heard.get(node_id)

    def heard(self, record: Member, now: float) -> bool:
        """`record`'s node is alive at `now`: add it, or update its record and last-heard time.
        True if the table changed (a new member, or a changed record)."""
        self._heard[record.id] = max(now, self._heard.get(record.id, now))
        if self._records.get(record.id) == record:
            return False
        if record.id not in self._records and record.id in self._log:
            self._tombstones -= 1  # a tombstone comes back to life
        self._records[record.id] = record
        self._changed(record.id)
        return True

    def touch(self, node_id: str, now: float) -> bool:
        """A known member is alive at `now` (its record unchanged); False if it is not a member."""
        if node_id not in self._records:
            return False
        self._heard[node_id] = max(now, self._heard[node_id])
        return True

    def remove(self, node_id: str) -> Member | None:
        """Drop `node_id` (dead, left, or unreachable); its record, or None if it was not a member."""
        record = self._records.pop(node_id, None)
        if record is None:
            return None
        self._heard.pop(node_id, None)
        self._tombstones += 1
        self._changed(node_id)
        self._prune()
        return record

    def expire(self, now: float, timeout: float, keep: Iterable[str] = ()) -> list[Member]:
        """Remove every member not heard of for more than `timeout` seconds at `now`, except
        the ids in `keep` (the tracker itself); the removed records, oldest-heard first."""
        spared = set(keep)
        dead = sorted((t, i) for i, t in self._heard.items() if now - t > timeout and i not in spared)
        return [r for _t, i in dead if (r := self.remove(i)) is not None]

    def delta_since(self, version: int) -> Delta:
        """What a member whose copy is at `version` must change to be at `self.version`."""
        if version < self._floor or version > self.version:
            return self.full()
        changed: list[str] = []
        for node_id, changed_at in reversed(self._log.items()):
            if changed_at <= version:
                break
            changed.append(node_id)
            if len(changed) > len(self._records):
                return self.full()  # the whole table is shorter
        changed.reverse()
        add = tuple(self._records[i] for i in changed if i in self._records)
        remove = tuple(i for i in changed if i not in self._records)
        return Delta(self.version, False, add, remove)

    def full(self) -> Delta:
        """The whole table as a delta."""
        return Delta(self.version, True, tuple(self._records.values()))

    def apply(self, delta: Delta, now: float) -> list[str]:
        """A member's copy adopts the tracker's `delta` (heard at `now`); the ids that left.

        The copy's version becomes the tracker's, so the next sync asks for what follows it."""
        if delta.full:
            keep = {m.id for m in delta.add}
            gone = [i for i in self._records if i not in keep]
        else:
            gone = [i for i in delta.remove if i in self._records]
        for node_id in gone:
            self.remove(node_id)
        for record in delta.add:
            self.heard(record, now)
        for record in self._records.values():
            self._heard[record.id] = max(now, self._heard[record.id])
        self.version = delta.version
        return gone

    def reset(self, records: Iterable[Member], now: float) -> None:
        """Start a new version history holding `records`, all heard at `now` (a new tracker
        seeds its table from its member copy; a member starts following a new tracker)."""
        self._records = {}
        self._heard = {}
        self._log = OrderedDict()
        self._tombstones = 0
        self._floor = 0
        self.version = 0
        for record in records:
            self.heard(record, now)

    def _changed(self, node_id: str) -> None:
        self.version += 1
        self._log[node_id] = self.version
        self._log.move_to_end(node_id)

    def _prune(self) -> None:
        """Forget the oldest changes while more than `history` tombstones are kept; a member
        whose copy predates what is forgotten gets the whole table."""
        while self._tombstones > self._history:
            node_id, changed_at = self._log.popitem(last=False)
            if node_id not in self._records:
                self._tombstones -= 1
            self._floor = changed_at

