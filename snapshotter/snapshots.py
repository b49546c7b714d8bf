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

Remote snapshots (`snapshotter.remote`): given a `LayerSource`, a `prepare` that names the
committed snapshot it wants (`containerd.io/snapshot.ref=<chain ID>`, with or without CRI's labels
naming the layer) may build that layer itself. The source says which layer the chain ID is made of
on the parent's chain (the parent snapshot's chain is read from its `snapshot.ref` label, or its
name when containerd named it by the chain ID; a parent of another chain never gets the layer). The
blob is streamed into an unpacking directory (`snapshotter.apply`, diff ID checked), which becomes
an active snapshot under `key` as usual, then committed as `<chain ID>` with the label
`peersync.io/unpacked-layer=<digest>`, and the answer is AlreadyExists, which tells containerd to
use the committed snapshot instead of fetching and applying the layer. The image's next layers are
unpacked ahead meanwhile, several at once (`snapshotter.unpacker`), and only become snapshots when
their Prepares come. If a committed snapshot of that chain on that parent exists (ours, or one
another namespace's unpack labelled), the answer is AlreadyExists at once. If the layer cannot be
provided, or unpacking fails, `prepare` proceeds as without labels: containerd then fetches and
applies the layer itself. Removing the last snapshot unpacked from a blob releases the blob.
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
from kernel.logging import in_transfer
from kernel.store.fsutil import fsync_dir
from kernel.store.meta import Meta
from snapshotter import remote, storage
from snapshotter.remote import Layer, LayerSource
from snapshotter.storage import Info, Kind, Snapshot, Usage
from snapshotter.unpacker import Unpacker

__all__ = ["Snapshotter", "Mount", "Info", "Kind", "Usage", "disk_usage", "supports_index_off"]

log = structlog.get_logger(__name__)

NEW_PREFIX = "new-"  # a snapshot directory being built (never referenced by metadata)
UNPACKING_DIR = "unpacking"  # under the root: layers unpacked ahead, not snapshots yet (`unpacker`)
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
    `layers`, if given, lets `prepare` unpack layers itself (see "Remote snapshots" above), with
    up to `unpack_ahead` of an image's next layers unpacked before containerd asks for them."""

    def __init__(
        self,
        root: Path,
        meta: Meta,
        *,
        index_off: bool | None = None,
        layers: LayerSource | None = None,
        unpack_ahead: int = 2,
    ) -> None:
        self.root = Path(root).absolute()
        self.meta = meta
        self.snapshots_dir = self.root / "snapshots"
        self.snapshots_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.index_off = supports_index_off() if index_off is None else index_off
        self.layers = layers
        self.unpack_ahead = unpack_ahead
        self._unpacker: Unpacker | None = None
        self._target_locks: dict[str, asyncio.Lock] = {}

    @property
    def unpacker(self) -> Unpacker:
        """The layer jobs (made on first use: it needs the running event loop)."""
        if self._unpacker is None:
            assert self.layers is not None
            self._unpacker = Unpacker(
                self.root / UNPACKING_DIR,
                self.layers,
                self._lowers_of,
                self._unpacked_ahead_dropped,
                concurrency=self.unpack_ahead,
            )
        return self._unpacker

    def unpacks_running(self) -> int:
        """Layers the daemon is unpacking right now (0 before the first)."""
        return self._unpacker.running if self._unpacker is not None else 0

    async def close(self) -> None:
        """Stop unpacking ahead (what is staged is deleted; nothing committed is touched)."""
        if self._unpacker is not None:
            await self._unpacker.close()
            self._unpacker = None

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
        target = labels[remote.REF_LABEL]
        lock = self._target_locks.setdefault(target, asyncio.Lock())
        try:
            with in_transfer(chain=target):
                async with lock:
                    return await self._provide_locked(key, parent, labels, target)
        finally:
            if not lock.locked() and self._target_locks.get(target) is lock:
                del self._target_locks[target]

    async def _provide_locked(self, key: str, parent: str, labels: Mapping[str, str], target: str) -> bool:
        assert self.layers is not None
        if self._committed_on(target, parent):
            return True
        parent_chain = self._chain_of(parent)
        if parent_chain is None:
            log.info("layer not provided: the parent's chain is unknown", target=target, parent=parent)
            return False
        layer = await self.layers.describe(target, parent_chain, labels)
        if layer is None:
            return False
        await self._plan_ahead(target, layer, labels)
        try:
            staged = await self.unpacker.take(target, parent_chain, layer)
        except Exception as exc:
            _unpack_failed(layer, target, exc)
            return False
        await asyncio.to_thread(self._create_snapshot, Kind.ACTIVE, key, parent, labels, staged)
        try:
            await self.commit(target, key, {**labels, remote.UNPACKED_LABEL: layer.digest})
        except AlreadyExists:  # committed under that name meanwhile (not through us: we hold the lock)
            await self._discard(key)
            return self._committed_on(target, parent)
        except Exception as exc:
            _unpack_failed(layer, target, exc)
            await self._discard(key)
            return False
        finally:
            self.unpacker.committed()
        log.info("unpacked layer", layer=layer.digest, target=target, size=layer.size)
        return True

    async def _plan_ahead(self, target: str, layer: Layer, labels: Mapping[str, str]) -> None:
        """Queue the image's next layers for unpacking ahead, and their blobs for download."""
        assert self.layers is not None
        planned = await self.layers.plan(target, labels)
        jobs: list[tuple[str, str, Layer]] = []
        digests = [layer.digest]
        for step in planned:
            if self.unpacker.known(step.chain) or self._chain_committed(step.chain):
                continue
            ahead = await self.layers.describe(step.chain, step.parent, {})
            if ahead is None:
                continue  # containerd will apply that one itself; the ones above may still be ours
            jobs.append((step.chain, step.parent, ahead))
            digests.append(ahead.digest)
        self.layers.prefetch(digests)
        if self.unpack_ahead > 0:
            self.unpacker.schedule(jobs)

    def _committed_on(self, name: str, parent: str) -> bool:
        """Whether a committed snapshot of chain `name` on exactly `parent` exists where containerd's
        metadata looks for it after AlreadyExists: labelled `snapshot.ref=name` (ours are named
        `name` too; another namespace's unpack has a name of its own)."""
        with self.meta.txn() as txn:
            for info in storage.walk_info(txn, self.meta, ()):
                if (
                    info.kind is Kind.COMMITTED
                    and info.parent == parent
                    and info.labels.get(remote.REF_LABEL) == name
                ):
                    return True
        return False

    def _chain_committed(self, chain: str) -> bool:
        """Whether any committed snapshot holds `chain` (nothing to unpack ahead for it)."""
        return self._committed_of(chain) is not None

    def _committed_of(self, chain: str) -> str | None:
        """The name of a committed snapshot holding `chain`, if any."""
        with self.meta.txn() as txn:
            for info in storage.walk_info(txn, self.meta, ()):
                if info.kind is Kind.COMMITTED and remote.chain_of(info.name, info.labels) == chain:
                    return info.name
        return None

    def _chain_of(self, parent: str) -> str | None:
        """The chain ID of committed snapshot `parent` ("" for no parent; None if unknown)."""
        if not parent:
            return ""
        try:
            with self.meta.txn() as txn:
                _, info, _ = storage.get_info(txn, self.meta, parent)
        except NotFound:
            return None
        if info.kind is not Kind.COMMITTED:
            return None
        return remote.chain_of(info.name, info.labels)

    def _lowers_of(self, chain: str) -> list[Path] | None:
        """The upper dirs of a committed snapshot of `chain` and its parents, nearest first."""
        name = self._committed_of(chain)
        if name is None:
            return None
        lowers = []
        with self.meta.txn() as txn:
            while name:
                snap_id, info, _ = storage.get_info(txn, self.meta, name)
                lowers.append(self._upper(snap_id))
                name = info.parent
        return lowers

    async def _unpacked_ahead_dropped(self, digest: str) -> None:
        """A layer unpacked ahead expired unclaimed: release its blob unless a snapshot uses it."""
        if self.layers is not None and not await self._unpacked_from(digest):
            await self.layers.release(digest)

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
        self,
        kind: Kind,
        key: str,
        parent: str,
        labels: Mapping[str, str] | None,
        prepared: Path | None = None,
    ) -> Snapshot:
        """Record and build a snapshot in one write transaction; see "crash safety" above.

        `prepared` is a directory already holding `fs` and `work` (a layer unpacked ahead, on the
        same filesystem) to rename into place instead of a new empty one; it is consumed either way."""
        tmp: Path | None = prepared
        final: Path | None = None
        try:
            with self.meta.txn(write=True) as txn:
                if tmp is None:
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


def _unpack_failed(layer: Layer, target: str, exc: BaseException) -> None:
    log.warning(
        "unpacking a layer in the daemon failed; containerd will fetch and apply it",
        layer=layer.digest,
        target=target,
        error=f"{type(exc).__name__}: {exc}",
    )


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
