"""Snapshot metadata in LMDB: plain functions run inside a transaction the caller opened.

This is containerd's `snapshots/storage` (bolt.go) for our LMDB home. The caller decides what
commits together and does all filesystem work; nothing here touches the disk outside LMDB:

    with meta.txn(write=True) as txn:
        snap = storage.create_snapshot(txn, meta, Kind.ACTIVE, key, parent, labels)
        ...  # build <root>/snapshots/<snap.id>, then the block commits

Layout (schema version 1, see `kernel.store.meta`):
- db `snapshots`: key = the snapshot's key or name (UTF-8, as the client sent it: an opaque
  string, never a path), value = JSON `{"id", "kind", "parent", "labels", "created",
  "updated", "size", "inodes"}`; timestamps in Unix nanoseconds (UTC); size and inodes are the
  usage measured at Commit (0 for active and view snapshots).
- db `snapshot_children`: key = `"<parent id>\\0<child id>"`, value = the child's key. A
  prefix seek on `"<id>\\0"` answers "has children?" without a scan, as containerd's `parents`
  bucket does. Ids (not names) keep the key short and stable when a child is committed.
- ids come from `meta.next_id(txn, "snapshot")`; they are never reused once committed, so a
  directory named by an id that is not in `snapshots` is garbage.

Bounds (`kernel.limits`): labels as containerd's metadata store bounds them (each key and value
together at most 4096 bytes) and at most 64 KiB encoded per snapshot, checked on create, commit and
update (InvalidArgument, nothing written); a key longer than containerd could send is
InvalidArgument wherever it is named. A record an older version stored beyond the label bounds is
reported without the labels over them, so it never breaks a walk of the whole store.

Errors follow containerd: an unknown key is NotFound; a missing parent is NotFound and a
parent that is not committed is InvalidArgument (CreateSnapshot); a duplicate key or commit
name is AlreadyExists; Commit of a non-active and Mounts of a committed snapshot are
FailedPrecondition; removing a snapshot with children is FailedPrecondition.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import lmdb
import structlog

from kernel import limits
from kernel.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from kernel.store.meta import Meta, dumps, loads
from snapshotter.filters import compile_filters

__all__ = [
    "Kind",
    "Info",
    "Usage",
    "Snapshot",
    "create_snapshot",
    "get_info",
    "get_snapshot",
    "commit_active",
    "remove",
    "update_info",
    "walk_info",
    "id_map",
]

log = structlog.get_logger(__name__)

EPOCH = datetime.fromtimestamp(0, UTC)
ID_COUNTER = "snapshot"
_SEP = b"\x00"


class Kind(enum.IntEnum):
    """The lifecycle state of a snapshot; the numbers are the proto's."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclass
class Info:
    """What a client may know about a snapshot (containerd's snapshots.Info)."""

    name: str
    parent: str = ""
    kind: Kind = Kind.UNKNOWN
    created: datetime = EPOCH
    updated: datetime = EPOCH
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Usage:
    """Bytes on disk (512-byte blocks, as `du`) and distinct inodes of a snapshot's own layer."""

    size: int = 0
    inodes: int = 0


@dataclass(frozen=True)
class Snapshot:
    """An active or view snapshot resolved for mounting: its id and its parents' ids, nearest first."""

    id: str
    kind: Kind
    parent_ids: tuple[str, ...] = ()


def create_snapshot(
    txn: lmdb.Transaction,
    meta: Meta,
    kind: Kind,
    key: str,
    parent: str = "",
    labels: Mapping[str, str] | None = None,
) -> Snapshot:
    """Insert an active or view snapshot on a committed parent ("" = none)."""
    if kind not in (Kind.ACTIVE, Kind.VIEW):
        raise InvalidArgument(f"snapshot kind {kind.name} invalid; only ACTIVE or VIEW can be created")
    parent_record = _require_parent(txn, meta, parent) if parent else None
    encoded = _encode_new_key(meta, key)
    if txn.get(encoded, db=_db(meta)) is not None:
        raise AlreadyExists(f"snapshot {key!r} already exists")
    snap_id = meta.next_id(txn, ID_COUNTER)
    now = time.time_ns()
    record = {"id": snap_id, "kind": int(kind), "parent": parent, "labels": _clean(labels, key)}
    record |= {"created": now, "updated": now, "size": 0, "inodes": 0}
    _put(txn, meta, encoded, record)
    if parent_record is None:
        return Snapshot(str(snap_id), kind)
    _link_child(txn, meta, parent_record["id"], snap_id, key)
    return Snapshot(str(snap_id), kind, tuple(_parent_ids(txn, meta, parent_record)))


def get_info(txn: lmdb.Transaction, meta: Meta, key: str) -> tuple[str, Info, Usage]:
    """The id, Info and recorded Usage of any snapshot."""
    record = _require(txn, meta, key)
    return str(record["id"]), _info(key, record), Usage(record["size"], record["inodes"])


def get_snapshot(txn: lmdb.Transaction, meta: Meta, key: str) -> Snapshot:
    """An active or view snapshot with its parent chain; committed ones cannot be mounted."""
    record = _require(txn, meta, key)
    kind = Kind(record["kind"])
    if kind not in (Kind.ACTIVE, Kind.VIEW):
        raise FailedPrecondition(f"snapshot {key!r} is {kind.name.lower()}, not active or view")
    if not record["parent"]:
        return Snapshot(str(record["id"]), kind)
    parent = _get(txn, meta, record["parent"])
    if parent is None:
        raise NotFound(f"parent {record['parent']!r} of snapshot {key!r} does not exist")
    return Snapshot(str(record["id"]), kind, tuple(_parent_ids(txn, meta, parent)))


def commit_active(
    txn: lmdb.Transaction,
    meta: Meta,
    key: str,
    name: str,
    usage: Usage,
    labels: Mapping[str, str] | None = None,
) -> str:
    """Turn active `key` into committed `name` (same id, same parent, new labels); returns the id."""
    encoded_name = _encode_new_key(meta, name)
    if txn.get(encoded_name, db=_db(meta)) is not None:
        raise AlreadyExists(f"committed snapshot {name!r} already exists")
    record = _require(txn, meta, key)
    if record["kind"] != Kind.ACTIVE:
        raise FailedPrecondition(f"snapshot {key!r} is {Kind(record['kind']).name.lower()}, not active")
    now = time.time_ns()
    record |= {"kind": int(Kind.COMMITTED), "labels": _clean(labels, name), "created": now, "updated": now}
    record |= {"size": usage.size, "inodes": usage.inodes}
    txn.delete(_encode(key), db=_db(meta))
    _put(txn, meta, encoded_name, record)
    if record["parent"]:
        parent = _get(txn, meta, record["parent"])
        if parent is None:
            raise NotFound(f"missing parent {record['parent']!r} of snapshot {key!r}")
        _link_child(txn, meta, parent["id"], record["id"], name)
    return str(record["id"])


def remove(txn: lmdb.Transaction, meta: Meta, key: str) -> tuple[str, Kind]:
    """Delete a snapshot that has no children; returns its id and kind for the caller's cleanup."""
    record = _require(txn, meta, key)
    if _has_children(txn, meta, record["id"]):
        raise FailedPrecondition(f"cannot remove snapshot {key!r}: it has children")
    if record["parent"]:
        parent = _get(txn, meta, record["parent"])
        if parent is None:
            raise NotFound(f"parent {record['parent']!r} of snapshot {key!r} does not exist")
        txn.delete(_child_key(parent["id"], record["id"]), db=meta.db("snapshot_children"))
    txn.delete(_encode(key), db=_db(meta))
    return str(record["id"]), Kind(record["kind"])


def update_info(txn: lmdb.Transaction, meta: Meta, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
    """Change labels only: `labels` replaces all, `labels.<k>` sets or (if absent/empty) drops one.

    No field paths replaces all labels. Any other path is InvalidArgument; nothing is written then."""
    record = _require(txn, meta, info.name)
    labels = limits.kept_labels(record["labels"])[0]  # what a client saw is what an update starts from
    for path in fieldpaths or ("labels",):
        if path.startswith("labels."):
            label = path.removeprefix("labels.")
            labels[label] = info.labels.get(label, "")
        elif path == "labels":
            labels = dict(info.labels)
        else:
            raise InvalidArgument(f"cannot update {path!r} field on snapshot {info.name!r}")
    record["labels"] = _clean(labels, info.name)
    record["updated"] = max(time.time_ns(), record["updated"])
    _put(txn, meta, _encode(info.name), record)
    return _info(info.name, record)


def walk_info(txn: lmdb.Transaction, meta: Meta, filters: Sequence[str] = ()) -> Iterator[Info]:
    """Every snapshot matching containerd filters (on name, parent, kind, labels), in key order.

    The filters are parsed before the first item, so bad syntax fails even on an empty store."""
    match = compile_filters(filters)
    return (info for info in _all_infos(txn, meta) if match(_filter_view(info)))


def id_map(txn: lmdb.Transaction, meta: Meta) -> dict[str, str]:
    """Every id in use, mapped to its snapshot's key: what Cleanup must keep on disk."""
    cursor = txn.cursor(db=_db(meta))
    return {str(loads(bytes(raw))["id"]): bytes(raw_key).decode() for raw_key, raw in cursor}


# --- helpers -------------------------------------------------------------------------------------


# LMDB keys and values are wrapped in bytes(): lmdb's stubs type the transactions Meta.txn yields
# as returning bytes | memoryview (memoryview only with buffers=True, which Meta never uses), and
# bytes() of a bytes object is that same object, so this costs nothing and stays right either way.


def _db(meta: Meta) -> Any:
    return meta.db("snapshots")


def _encode(key: str) -> bytes:
    return key.encode("utf-8", errors="surrogatepass")


def _encode_new_key(meta: Meta, key: str) -> bytes:
    """The LMDB key for a snapshot about to be created; LMDB refuses empty and over-long keys."""
    encoded = _encode(key)
    limit = meta.env.max_key_size()
    if not encoded:
        raise InvalidArgument("snapshot key must not be empty")
    if len(encoded) > limit:
        raise InvalidArgument(f"snapshot key is {len(encoded)} bytes; at most {limit} are supported")
    return encoded


def _get(txn: lmdb.Transaction, meta: Meta, key: str) -> dict[str, Any] | None:
    encoded = _encode(key)
    if len(encoded) > limits.REF_MAX_BYTES:
        raise InvalidArgument(f"snapshot key is {len(encoded)} bytes; containerd's keys take at most "
                              f"{limits.REF_MAX_BYTES}")
    if not encoded or len(encoded) > meta.env.max_key_size():
        return None  # cannot have been stored
    raw = txn.get(encoded, db=_db(meta))
    return None if raw is None else loads(bytes(raw))


def _require(txn: lmdb.Transaction, meta: Meta, key: str) -> dict[str, Any]:
    record = _get(txn, meta, key)
    if record is None:
        raise NotFound(f"snapshot {key!r} does not exist")
    return record


def _require_parent(txn: lmdb.Transaction, meta: Meta, parent: str) -> dict[str, Any]:
    record = _get(txn, meta, parent)
    if record is None:
        raise NotFound(f"missing parent {parent!r}")
    if record["kind"] != Kind.COMMITTED:
        raise InvalidArgument(f"parent {parent!r} is not a committed snapshot")
    return record


def _put(txn: lmdb.Transaction, meta: Meta, encoded: bytes, record: dict[str, Any]) -> None:
    txn.put(encoded, dumps(record), db=_db(meta))


def _parent_ids(txn: lmdb.Transaction, meta: Meta, parent: dict[str, Any]) -> list[str]:
    """The ids from `parent` down to the base layer, nearest first."""
    ids = [str(parent["id"])]
    while parent["parent"]:
        name = parent["parent"]
        next_parent = _get(txn, meta, name)
        if next_parent is None:
            raise NotFound(f"missing parent {name!r} in chain")
        parent = next_parent
        ids.append(str(parent["id"]))
    return ids


def _child_key(parent_id: int, child_id: int) -> bytes:
    return str(parent_id).encode() + _SEP + str(child_id).encode()


def _link_child(txn: lmdb.Transaction, meta: Meta, parent_id: int, child_id: int, child: str) -> None:
    txn.put(_child_key(parent_id, child_id), _encode(child), db=meta.db("snapshot_children"))


def _has_children(txn: lmdb.Transaction, meta: Meta, snap_id: int) -> bool:
    prefix = str(snap_id).encode() + _SEP
    cursor = txn.cursor(db=meta.db("snapshot_children"))
    return cursor.set_range(prefix) and bytes(cursor.key()).startswith(prefix)


def _clean(labels: Mapping[str, str] | None, key: str) -> dict[str, str]:
    """Labels as stored: containerd drops empty values instead of storing them; InvalidArgument
    beyond the bounds (`kernel.limits.check_labels`)."""
    cleaned = {k: v for k, v in (labels or {}).items() if v != ""}
    limits.check_labels(cleaned, f"snapshot {limits.short(key, 100)!r}")
    return cleaned


def _info(key: str, record: Mapping[str, Any]) -> Info:
    labels, dropped = limits.kept_labels(record["labels"])
    if dropped:
        log.warning("snapshot labels over the bounds left out (stored by an older version)",
                    key=limits.short(key, 100), dropped=dropped)
    return Info(
        name=key,
        parent=record["parent"],
        kind=Kind(record["kind"]),
        created=_datetime(record["created"]),
        updated=_datetime(record["updated"]),
        labels=labels,
    )


def _datetime(ns: int) -> datetime:
    seconds, rest = divmod(ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, UTC).replace(microsecond=rest // 1000)


def _all_infos(txn: lmdb.Transaction, meta: Meta) -> Iterable[Info]:
    for raw_key, raw in txn.cursor(db=_db(meta)):
        yield _info(bytes(raw_key).decode("utf-8", errors="surrogatepass"), loads(bytes(raw)))


def _filter_view(info: Info) -> dict[str, Any]:
    """The fields containerd's snapshot adaptor exposes to filters."""
    kind = info.kind.name.lower() if info.kind is not Kind.UNKNOWN else None
    return {"name": info.name, "parent": info.parent, "kind": kind, "labels": info.labels}
