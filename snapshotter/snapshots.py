"""The snapshotter: containerd's overlayfs snapshotter, served to containerd as a proxy plugin.

Vocabulary
----------
A *snapshot* is a filesystem tree that containerd mounts. It has a kind:

- ACTIVE: writable, made by `prepare(key, parent)`. The caller mounts it, writes into it (unpacks a
  layer, runs a container), then either `commit`s or `remove`s it.
- VIEW: read-only, made by `view(key, parent)`; mounted like an active one, never committed.
- COMMITTED: read-only and immutable, made only by `commit(name, key)`. Only committed
  snapshots can be parents.

*key* names an active or view snapshot; *name* names a committed one; both live in one namespace
and are opaque strings (containerd sends `"<namespace>/<seq>/<key>"`; a key may look like a path,
`../../x`, and it never reaches the filesystem: directories are named by numeric ids).
*parent* is the committed snapshot a new one starts from ("" for none). Active snapshots never
turn into committed ones in place: `commit` makes a new committed snapshot `name` from the
active `key` (same directory, same parent) and `key` disappears.

Worked examples (what containerd does)
--------------------------------------
Import the first layer of an image::

    mounts = await sn.prepare("default/1/extract-1 sha256:L1", "")    # bind mount of an empty dir
    # mount, untar layer 1 into it, unmount
    await sn.commit("default/2/sha256:L1", "default/1/extract-1 sha256:L1")

The next layer stacks on the first::

    mounts = await sn.prepare("default/3/extract-2 sha256:L2", "default/2/sha256:L1")
    # overlay: upperdir = the new dir, lowerdir = L1's dir; untar layer 2, unmount
    await sn.commit("default/4/sha256:L2", "default/3/extract-2 sha256:L2")

Run a container on the image: `prepare("default/5/ctr", "default/4/sha256:L2")` gives an overlay
with `lowerdir=<L2>:<L1>` (nearest parent first); `view("default/6/ro", "default/4/sha256:L2")`
gives a read-only mount of the same tree. When the container goes, containerd `remove`s its
key; when the image goes, it removes `L2` then `L1` (children before parents) and calls
`cleanup`.

Methods and their failures (the errors are `kernel.errors`, mapped to gRPC codes once)
-----------------------------------------------------------------------------------------
- `prepare` / `view(key, parent="", labels=None) -> list[Mount]`: parent missing -> NotFound;
  parent not committed -> InvalidArgument; key taken -> AlreadyExists; empty or over-long key
  (LMDB: 511 bytes) -> InvalidArgument.
- `mounts(key)`: the same mounts again; unknown -> NotFound; committed -> FailedPrecondition.
- `commit(name, key, labels=None)`: key unknown -> NotFound; name taken -> AlreadyExists; key not
  active -> FailedPrecondition. Labels are replaced, not inherited. Usage is measured here.
- `remove(key)`: unknown -> NotFound; has children -> FailedPrecondition. The metadata goes first;
  the directory is deleted right after, and a failure there is only logged (`cleanup` retries).
- `stat(key) -> Info`, `usage(key) -> Usage`: unknown -> NotFound. Usage of an active snapshot is
  measured now (512-byte blocks and distinct inodes of its upper dir, as containerd's
  `fs.DiskUsage`); a committed one reports what was measured at commit; a view reports zero.
- `update(info, fieldpaths=()) -> Info`: labels only. `labels` replaces them all, `labels.<k>`
  sets one (or drops it when `info.labels` lacks it); no paths replaces all; any other path ->
  InvalidArgument; unknown name -> NotFound. Labels with empty values are never stored.
- `walk(filters=()) -> list[Info]`: containerd filter syntax (`snapshotter.filters`) on `name`,
  `parent`, `kind` (`active`/`view`/`committed`) and `labels."<k>"`; bad syntax -> InvalidArgument.
- `cleanup()`: deletes every directory under `snapshots/` that no snapshot record references.

Mounts (exactly as containerd's overlay snapshotter)
----------------------------------------------------
No parent: `bind` of the snapshot's `fs` with `rw` (active) or `ro` (view) and `rbind`. A view with
one parent: `bind` of the parent's `fs`, `ro,rbind`. Otherwise `overlay` (source "overlay") with
`index=off` when the kernel has the parameter, then for an active snapshot `workdir=` and
`upperdir=`, then `lowerdir=` of the parents' `fs` dirs, nearest first, `:`-joined.

Disk layout and crash safety
----------------------------
`<root>/snapshots/<id>/fs` (+ `work` for active snapshots); LMDB in `kernel.store.meta`.
A new snapshot is built as `snapshots/new-*` and renamed to `snapshots/<id>` inside the write
transaction that creates its record, just before that transaction commits (containerd's
order). Whatever step a crash interrupts:

    crash before the rename      -> `new-*` dir, no record          -> cleanup deletes it
    crash after rename, before   -> `<id>` dir, no record; the id   -> the next prepare that gets
      the commit                    was never handed out              the id replaces it; cleanup
                                                                      deletes it meanwhile
    crash after the commit       -> record and `<id>` dir: done

So no record ever lacks its directory, and every stray directory is one that `cleanup` finds.
`remove` commits the metadata first and then deletes `<id>` (a crash in between leaves an
unreferenced `<id>`); `commit` changes metadata only. `cleanup` holds the write lock while it
picks garbage and renames it to `rm-*`, so no prepare can be half-way through, and an id it
found unused can be handed out again at once without losing the new directory.

Remote snapshots (`snapshotter.remote`): given a `LayerSource`, a `prepare` that carries the CRI
labels naming a layer (`containerd.io/snapshot.ref=<chain ID>` and `.../cri.layer-digest`) builds
that layer itself: an active snapshot under `key` as usual, the blob streamed into it
(`snapshotter.apply`, diff ID checked), then committed as `<chain ID>` with the label
`peersync.io/unpacked-layer=<digest>`, and the answer is AlreadyExists, which tells containerd to
use the committed snapshot instead of fetching and applying the layer. If the snapshot already
exists the answer is AlreadyExists at once. If the layer cannot be provided, or unpacking fails,
the active snapshot is removed and `prepare` proceeds as without labels: containerd then fetches
and applies the layer itself. Removing the last snapshot unpacked from a blob releases the blob.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from kernel.errors import AlreadyExists, NotFound, Unavailable
from kernel.store.fsutil import fsync_dir
from kernel.store.meta import Meta
from snapshotter import remote, storage
from snapshotter.apply import apply_layer
from snapshotter.remote import Layer, LayerSource
from snapshotter.storage import Info, Kind, Snapshot, Usage

__all__ = ["Snapshotter", "Mount", "Info", "Kind", "Usage", "disk_usage", "supports_index_off"]

log = structlog.get_logger(__name__)

NEW_PREFIX = "new-"  # a snapshot directory being built (never referenced by metadata)
REMOVING_PREFIX = "rm-"  # garbage renamed by cleanup, deleted right after
BLOCK_UNIT = 512  # st_blocks counts 512-byte units
_INDEX_PARAMETER = Path("/sys/module/overlay/parameters/index")


@dataclass(frozen=True)
class Mount:
    """One mount for containerd (`containerd.types.Mount`; the target is the caller's)."""

    type: str
    source: str
    options: tuple[str, ...] = ()


class Snapshotter:
    """containerd's overlay snapshotter over `<root>/snapshots` and the LMDB in `meta`.

    `index_off` adds `index=off` to overlay mounts; None detects it as containerd does.
    `layers`, if given, lets `prepare` unpack layers itself (see "Remote snapshots" above)."""

    def __init__(
        self, root: Path, meta: Meta, *, index_off: bool | None = None, layers: LayerSource | None = None
    ) -> None:
        self.root = Path(root).absolute()
        self.meta = meta
        self.snapshots_dir = self.root / "snapshots"
        self.snapshots_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.index_off = supports_index_off() if index_off is None else index_off
        self.layers = layers

    async def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        """Create an active snapshot on `parent` and return how to mount it."""
        if self.layers is not None and labels is not None and remote.wants_layer(labels):
            target = labels[remote.REF_LABEL]
            if await self._provide(key, parent, labels):
                raise AlreadyExists(f"target snapshot {target!r}: provided by peersync")
        return await self._create(Kind.ACTIVE, key, parent, labels)

    async def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        """Create a read-only view of `parent` and return how to mount it."""
        return await self._create(Kind.VIEW, key, parent, labels)

    async def mounts(self, key: str) -> list[Mount]:
        """The mounts of an active or view snapshot, again."""
        with self.meta.txn() as txn:
            snap = storage.get_snapshot(txn, self.meta, key)
        return self._mounts(snap)

    async def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        """Make committed `name` from active `key`, measuring its usage first (outside the lock)."""
        with self.meta.txn() as txn:
            snap_id, info, _ = storage.get_info(txn, self.meta, key)
        usage = Usage()
        if info.kind is Kind.ACTIVE:
            usage = await asyncio.to_thread(disk_usage, self._upper(snap_id))
        await asyncio.to_thread(self._commit_metadata, name, key, snap_id, usage, labels)

    async def remove(self, key: str) -> None:
        """Forget `key`, then delete its directory (leftovers are cleanup's)."""
        snap_id, layer = await asyncio.to_thread(self._remove_metadata, key)
        await asyncio.to_thread(_remove_tree, self._dir(snap_id))
        if layer and self.layers is not None and not await self._unpacked_from(layer):
            await self.layers.release(layer)

    async def stat(self, key: str) -> Info:
        with self.meta.txn() as txn:
            _, info, _ = storage.get_info(txn, self.meta, key)
        return info

    async def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        """Change the labels of `info.name` (see the module docstring for the mask rules)."""
        return await asyncio.to_thread(self._update_metadata, info, tuple(fieldpaths))

    async def walk(self, filters: Sequence[str] = ()) -> list[Info]:
        """Every snapshot matching any of `filters` (containerd syntax), in key order."""
        with self.meta.txn() as txn:
            return list(storage.walk_info(txn, self.meta, filters))

    async def usage(self, key: str) -> Usage:
        with self.meta.txn() as txn:
            snap_id, info, usage = storage.get_info(txn, self.meta, key)
        if info.kind is Kind.ACTIVE:
            return await asyncio.to_thread(disk_usage, self._upper(snap_id))
        return usage

    async def cleanup(self) -> None:
        """Delete directories that no snapshot references: crash leftovers and failed removals."""
        doomed = await asyncio.to_thread(self._claim_garbage)
        for path in doomed:
            await asyncio.to_thread(_remove_tree, path)

    # --- remote snapshots

    async def _provide(self, key: str, parent: str, labels: Mapping[str, str]) -> bool:
        """Build the layer snapshot the labels ask for; True if it now exists (see module doc)."""
        assert self.layers is not None
        target = labels[remote.REF_LABEL]
        if self._committed_on(target, parent):
            return True
        layer = await self.layers.describe(target, labels)
        if layer is None:
            return False
        self.layers.prefetch(remote.upcoming(labels))
        snap = await asyncio.to_thread(self._create_snapshot, Kind.ACTIVE, key, parent, labels)
        try:
            await self._unpack(snap, layer)
            await self.commit(target, key, {**labels, remote.UNPACKED_LABEL: layer.digest})
        except AlreadyExists:  # another prepare for the same target committed first
            await self._discard(key)
            return self._committed_on(target, parent)
        except Exception as exc:
            log.warning(
                "unpacking a layer in the daemon failed; containerd will fetch and apply it",
                layer=layer.digest,
                target=target,
                error=f"{type(exc).__name__}: {exc}",
            )
            await self._discard(key)
            return False
        log.info("unpacked layer", layer=layer.digest, target=target, size=layer.size)
        return True

    async def _unpack(self, snap: Snapshot, layer: Layer) -> None:
        """Stream the blob into the snapshot's upper dir in a worker thread."""
        assert self.layers is not None
        reader = remote.BlobReader(self.layers, layer, asyncio.get_running_loop())
        parents = [self._upper(parent_id) for parent_id in snap.parent_ids]
        await asyncio.to_thread(
            apply_layer, reader, layer.media_type, self._upper(snap.id), parents, layer.diff_id
        )

    def _committed_on(self, name: str, parent: str) -> bool:
        """Whether committed snapshot `name` exists on exactly `parent`."""
        try:
            with self.meta.txn() as txn:
                _, info, _ = storage.get_info(txn, self.meta, name)
        except NotFound:
            return False
        return info.kind is Kind.COMMITTED and info.parent == parent

    async def _discard(self, key: str) -> None:
        try:
            await self.remove(key)
        except Exception as exc:  # cleanup (or containerd's GC) gets it later
            log.warning("could not remove a failed unpack snapshot", key=key, error=str(exc))

    async def _unpacked_from(self, layer: str) -> bool:
        """Whether any snapshot left was unpacked from blob `layer`."""
        with self.meta.txn() as txn:
            return any(
                i.labels.get(remote.UNPACKED_LABEL) == layer for i in storage.walk_info(txn, self.meta, ())
            )

    # --- metadata transactions (each runs whole in one worker thread: LMDB write locks are per thread)

    def _create_snapshot(
        self, kind: Kind, key: str, parent: str, labels: Mapping[str, str] | None
    ) -> Snapshot:
        """Record and build a snapshot in one write transaction; see "crash safety" above."""
        tmp: Path | None = None
        final: Path | None = None
        try:
            with self.meta.txn(write=True) as txn:
                tmp = _make_temp_dir(self.snapshots_dir, kind)
                snap = storage.create_snapshot(txn, self.meta, kind, key, parent, labels)
                if snap.parent_ids:
                    _copy_owner(self._upper(snap.parent_ids[0]), tmp / "fs")
                final = self._dir(snap.id)
                _discard_stale(final)
                _rename(tmp, final)
                tmp = None
                _sync_dir(self.snapshots_dir)
        except Exception:
            # `final` exists here only if the commit itself failed: its id was never handed out.
            for leftover in (tmp, final):
                if leftover is not None:
                    _remove_tree(leftover)
            raise
        return snap

    def _commit_metadata(
        self, name: str, key: str, snap_id: str, usage: Usage, labels: Mapping[str, str] | None
    ) -> None:
        with self.meta.txn(write=True) as txn:
            current_id, _, _ = storage.get_info(txn, self.meta, key)
            if current_id != snap_id:
                raise Unavailable(f"snapshot {key!r} was replaced while its usage was measured; retry")
            storage.commit_active(txn, self.meta, key, name, usage, labels)

    def _remove_metadata(self, key: str) -> tuple[str, str]:
        """Forget `key`; its directory id and the layer it was unpacked from ("" if none)."""
        with self.meta.txn(write=True) as txn:
            _, info, _ = storage.get_info(txn, self.meta, key)
            snap_id, _ = storage.remove(txn, self.meta, key)
        return snap_id, info.labels.get(remote.UNPACKED_LABEL, "")

    def _update_metadata(self, info: Info, fieldpaths: tuple[str, ...]) -> Info:
        with self.meta.txn(write=True) as txn:
            return storage.update_info(txn, self.meta, info, fieldpaths)

    def _claim_garbage(self) -> list[Path]:
        """Rename unreferenced directories to `rm-*` under the write lock; return them for deletion.

        Holding the lock means no create is between its temp dir and its commit, and a renamed-away
        id is free to be handed out again the moment the lock is released."""
        doomed = []
        with self.meta.txn(write=True) as txn:
            live = storage.id_map(txn, self.meta)
            for entry in sorted(os.scandir(self.snapshots_dir), key=lambda e: e.name):
                if entry.name in live:
                    continue
                path = Path(entry.path)
                if not entry.name.startswith(REMOVING_PREFIX):
                    target = path.with_name(f"{REMOVING_PREFIX}{entry.name}.{secrets.token_hex(4)}")
                    _rename(path, target)
                    path = target
                doomed.append(path)
        return doomed

    # --- paths and mounts

    async def _create(
        self, kind: Kind, key: str, parent: str, labels: Mapping[str, str] | None
    ) -> list[Mount]:
        snap = await asyncio.to_thread(self._create_snapshot, kind, key, parent, labels)
        return self._mounts(snap)

    def _dir(self, snap_id: str) -> Path:
        return self.snapshots_dir / snap_id

    def _upper(self, snap_id: str) -> Path:
        return self._dir(snap_id) / "fs"

    def _work(self, snap_id: str) -> Path:
        return self._dir(snap_id) / "work"

    def _mounts(self, snap: Snapshot) -> list[Mount]:
        if not snap.parent_ids:
            mode = "ro" if snap.kind is Kind.VIEW else "rw"
            return [Mount("bind", str(self._upper(snap.id)), (mode, "rbind"))]
        if snap.kind is Kind.VIEW and len(snap.parent_ids) == 1:
            return [Mount("bind", str(self._upper(snap.parent_ids[0])), ("ro", "rbind"))]
        options = ["index=off"] if self.index_off else []
        if snap.kind is Kind.ACTIVE:
            options += [f"workdir={self._work(snap.id)}", f"upperdir={self._upper(snap.id)}"]
        lowers = ":".join(str(self._upper(parent_id)) for parent_id in snap.parent_ids)
        options.append(f"lowerdir={lowers}")
        return [Mount("overlay", "overlay", tuple(options))]


def disk_usage(root: Path) -> Usage:
    """Blocks and distinct inodes under `root`, `root` included (continuity's fs.DiskUsage)."""
    seen: set[tuple[int, int]] = set()
    size = 0

    def account(st: os.stat_result) -> None:
        nonlocal size
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            size += st.st_blocks * BLOCK_UNIT

    account(os.lstat(root))
    pending = [os.fspath(root)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                account(entry.stat(follow_symlinks=False))
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
    return Usage(size=size, inodes=len(seen))


def supports_index_off() -> bool:
    """Whether the kernel knows overlay's `index` option (containerd then always passes index=off)."""
    return _INDEX_PARAMETER.exists()


# --- filesystem steps. Each is a module function so tests can inject a crash between any two.


def _make_temp_dir(snapshots_dir: Path, kind: Kind) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=NEW_PREFIX, dir=snapshots_dir))
    (tmp / "fs").mkdir(mode=0o755)
    if kind is Kind.ACTIVE:
        (tmp / "work").mkdir(mode=0o711)
    return tmp


def _copy_owner(source: Path, target: Path) -> None:
    """A child's upper dir belongs to whoever owns the parent's (containerd chowns the same way)."""
    st = os.stat(source)
    os.lchown(target, st.st_uid, st.st_gid)


def _discard_stale(path: Path) -> None:
    """Delete a directory left at a freshly allocated id by a transaction that never committed."""
    if os.path.lexists(path):
        log.warning("replacing stale snapshot directory", path=str(path))
        _remove_tree(path)


def _rename(source: Path, target: Path) -> None:
    os.rename(source, target)


# Make a rename durable before the metadata that points at it commits (a name of its own, so the
# crash tests can interrupt exactly this step).
_sync_dir = fsync_dir


def _remove_tree(path: Path) -> None:
    """Delete a directory (or stray file); failures are logged, since metadata already moved on."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, onerror=_ignore_missing)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("failed to remove snapshot directory; cleanup will retry", path=str(path), error=str(exc))


def _ignore_missing(
    function: object, path: str, exc_info: tuple[type[BaseException], BaseException, object]
) -> None:
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]
