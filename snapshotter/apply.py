"""Unpack one image layer into an overlayfs upper directory exactly as containerd 1.6 would.

Why: containerd's builtin applier reads a layer through the content store in 32 KiB Read RPCs;
unpacking it in the daemon (remote-snapshot style) removes that round trip from every pull. The
result must be indistinguishable from containerd's (`diff/apply` -> `archive.Apply`), so this is a
port of its semantics, not a generic tar extractor:

- the blob is decompressed like containerd's `compression.DecompressStream` (the compressed
  media types are sniffed by magic number; multi-member gzip and multi-frame zstd are read to
  the end) and the tar is parsed with the rules of Go's `archive/tar` (PAX, GNU long names, PAX
  sparse files, base-256 numbers, where a stream may legally end);
- every path is resolved like continuity's `fs.RootPath`: symlinks are followed but clamped to
  the upper dir, so no entry can create, change or link anything outside it;
- with parents (an overlay mount in containerd) whiteouts become 0/0 character devices and
  opaque markers `trusted.overlay.opaque=y`, and missing parent directories copy their
  attributes from the nearest parent layer (`WithParents`); without parents (containerd's bind
  mount of the first layer) whiteouts delete, as the naive applier does;
- metadata is applied in containerd's order (lchown, xattrs, chmod, times) and directory times
  are set once every entry is written.

The diff_id is the sha256 of the whole uncompressed stream, trailing data included, as containerd
computes it. Decompression runs in a helper thread while this one hashes, parses and writes (zlib,
zstd, sha256 and write all release the GIL); memory stays at a few 1 MiB chunks whatever the layer.
gzip is inflated by ISA-L (`isal`) when it is installed: 1.6-3x zlib's speed on this hardware
(bench/inflate.py, bench/RESULTS.md), the same bytes out, the same errors for corrupt input.

The parent layers are read only to copy the attributes of a missing parent directory
(`WithParents`), which well-formed layers rarely need. So a layer can be unpacked before its
parents are complete: given `Lowers`, the applier asks for their directories only at the first
entry that needs them, and waits there (`snapshotter.unpacker` unpacks an image's layers at once).
"""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import re
import shutil
import stat
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Protocol

import zstandard

from kernel.errors import FailedPrecondition, InvalidArgument

# The gzip inflater in use. ISA-L's has zlib's API and output and is 1.6-3x faster here
# (bench/inflate.py); zlib stays the fallback where isal has no wheel. Tests set it to compare.
INFLATE: ModuleType
try:
    from isal import isal_zlib

    INFLATE = isal_zlib
except ImportError:  # pragma: no cover
    INFLATE = zlib

__all__ = ["Applied", "INFLATE", "Lowers", "apply_layer", "MEDIA_TYPES"]

CHUNK = 1 << 20  # decompressed bytes per chunk (and per write for big files)
GZIP_INPUT = 256 << 10  # compressed bytes fed to zlib per call
QUEUE_DEPTH = 2  # chunks in flight between the decompressing thread and the writer
ZSTD_MAX_WINDOW = 1 << 29  # klauspost/compress's default limit, which containerd uses
MAX_SPECIAL_FILE = 1 << 20  # Go's limit for PAX records and GNU long names
MAX_SYMLINKS = 255  # continuity's bound on links walked while resolving one path

# media type -> "tar" (read as is) or "detect" (containerd sniffs gzip / zstd / plain tar)
MEDIA_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "tar",
    "application/vnd.oci.image.layer.v1.tar+gzip": "detect",
    "application/vnd.oci.image.layer.v1.tar+zstd": "detect",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "detect",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "detect",
    "application/vnd.docker.image.rootfs.diff.tar": "detect",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "detect",
    "application/vnd.docker.image.rootfs.foreign.diff.tar": "detect",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "detect",
}

# errors of the machine rather than of the layer: passed through untouched
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.ENOMEM, errno.EMFILE, errno.ENFILE,
}  # fmt: skip


class Reader(Protocol):
    """What a layer is read from: any binary file object (a file, `remote.BlobReader`). Only
    `read(n)` is called; None (a raw stream with nothing ready) counts as the end, as b"" does."""

    def read(self, n: int, /) -> bytes | None: ...


@dataclass(frozen=True)
class Lowers:
    """Parent layers that may not be complete yet: `wait()` blocks until they are and returns their
    directories, nearest first. The applier calls it at most once, from the applying thread, and
    only if an entry needs a parent directory copied up (an error it raises is the apply's)."""

    wait: Callable[[], Sequence[Path]]


@dataclass(frozen=True)
class Applied:
    diff_id: str  # "sha256:<hex>" of the whole uncompressed tar stream (read to EOF)
    size: int  # uncompressed bytes


def apply_layer(
    reader: Reader,
    media_type: str,
    upper: Path,
    parents: Sequence[Path] | Lowers = (),
    expected_diff_id: str | None = None,
) -> Applied:
    """Unpack a layer blob into the empty directory `upper`, as containerd 1.6 does for overlayfs.

    reader yields the layer blob as stored in the registry (compressed per media_type); it is
    read from a helper thread, and an error it raises is raised here unchanged.
    parents: the lower layers' directories, nearest first (used like containerd's WithParents),
    or `Lowers` to be asked for them when first needed (a layer with parents, not yet complete).
    Raises InvalidArgument for an unknown media type, a corrupt blob or tar, or a layer that
    containerd would refuse to apply (e.g. a hardlink to a missing file), and FailedPrecondition
    when the diff_id is not `expected_diff_id`. The caller removes `upper` after any error.
    """
    mode = MEDIA_TYPES.get(media_type)
    if mode is None:
        raise InvalidArgument(f"unsupported layer media type {media_type!r}")
    if not os.path.isdir(upper):
        raise FailedPrecondition(f"upper directory {upper} does not exist")
    applier = _Applier(Path(upper), parents)
    with _Pipeline(lambda: _decompressed(_checked_reads(reader), mode)) as pipe:
        try:
            applier.apply(_TarReader(_Input(pipe.chunks())))
            pipe.drain()  # containerd hashes what follows the end of the archive too
        except _TarError as e:
            raise InvalidArgument(f"invalid layer tar: {e}") from None
        except _SourceError as e:
            raise e.error from None
    diff_id = "sha256:" + pipe.digest.hexdigest()
    if expected_diff_id is not None and diff_id != expected_diff_id:
        raise FailedPrecondition(f"layer diff_id is {diff_id}, expected {expected_diff_id}")
    return Applied(diff_id, pipe.size)


# ---------------------------------------------------------------------------------------------------
# Decompression (containerd's compression.DecompressStream)
# ---------------------------------------------------------------------------------------------------


class _SourceError(Exception):
    """An error of the caller's reader, carried unchanged through the tar parser."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _checked_reads(reader: Reader) -> Callable[[int], bytes]:
    def read(n: int) -> bytes:
        try:
            return reader.read(n) or b""
        except Exception as e:
            raise _SourceError(e) from e

    return read


def _decompressed(read: Callable[[int], bytes], mode: str) -> Iterator[bytes]:
    """The uncompressed layer in chunks of at most CHUNK bytes."""
    if mode == "detect":
        head = _peek(read, 10)
        kind = _detect(head)
        if kind == "gzip":
            yield from _gunzip(read, head)
            return
        if kind == "zstd":
            yield from _unzstd(read, head)
            return
        if head:
            yield head
    while chunk := read(CHUNK):
        yield chunk


def _peek(read: Callable[[int], bytes], n: int) -> bytes:
    head = b""
    while len(head) < n and (more := read(n - len(head))):
        head += more
    return head


def _detect(head: bytes) -> str:
    """containerd's DetectCompression: gzip or zstd (also a leading skippable frame) by magic."""
    if head.startswith(b"\x1f\x8b\x08"):
        return "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    if len(head) >= 8 and int.from_bytes(head[:4], "little") & 0xFFFFFFF0 == 0x184D2A50:
        return "zstd"
    return "tar"


def _gunzip(read: Callable[[int], bytes], data: bytes) -> Iterator[bytes]:
    """Every gzip member to the end, as Go's multistream gzip.Reader (trailing junk is an error)."""
    lib = INFLATE
    d = lib.decompressobj(wbits=31)
    try:
        while True:
            if not data:
                data = read(GZIP_INPUT)
                if not data:
                    raise InvalidArgument("corrupt gzip layer: unexpected end of data")
            out = d.decompress(data, CHUNK)
            data = d.unconsumed_tail
            if out:
                yield out
            if d.eof:
                data = d.unused_data or read(GZIP_INPUT)
                if not data:
                    return
                d = lib.decompressobj(wbits=31)
    except lib.error as e:
        raise InvalidArgument(f"corrupt gzip layer: {e}") from None


def _unzstd(read: Callable[[int], bytes], head: bytes) -> Iterator[bytes]:
    """Every zstd frame to the end; a frame cut short is an error (python-zstandard hides it)."""
    source = _ZstdSource(read, head)
    dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    # zstandard only calls source.read(n); its stubs ask for a whole IO[bytes].
    reader = dctx.stream_reader(source, read_size=GZIP_INPUT, read_across_frames=True)  # type: ignore[arg-type]
    try:
        while out := reader.read(CHUNK):
            yield out
    except zstandard.ZstdError as e:
        raise InvalidArgument(f"corrupt zstd layer: {e}") from None
    if not source.frames.complete():
        raise InvalidArgument("corrupt zstd layer: unexpected end of data")


class _ZstdSource:
    """The compressed input of the zstd reader, watched by a frame tracker on the way through."""

    def __init__(self, read: Callable[[int], bytes], head: bytes) -> None:
        self._read, self._head = read, head
        self.frames = _ZstdFrames()

    def read(self, n: int = -1) -> bytes:
        data, self._head = self._head, b""
        if not data:
            data = self._read(n if n > 0 else CHUNK)
        self.frames.feed(data)
        return data


class _ZstdFrames:
    """Walks zstd frame and block headers (RFC 8878) to tell whether the input ended between frames."""

    def __init__(self) -> None:
        self._want = 4  # bytes needed by the current state
        self._state = "magic"
        self._buf = b""
        self._checksum = False

    def complete(self) -> bool:
        return self._state == "magic" and not self._buf

    def feed(self, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            if self._state == "skip":
                step = min(self._want, len(data) - pos)
                self._want -= step
                pos += step
                if self._want == 0:
                    self._next_after_skip()
                continue
            take = min(self._want - len(self._buf), len(data) - pos)
            self._buf += data[pos : pos + take]
            pos += take
            if len(self._buf) == self._want:
                field, self._buf = self._buf, b""
                self._advance(field)

    def _advance(self, field: bytes) -> None:
        if self._state == "magic":
            magic = int.from_bytes(field, "little")
            if magic & 0xFFFFFFF0 == 0x184D2A50:
                self._state, self._want = "skippable", 4
            else:  # a bad magic is reported by the decoder itself
                self._state, self._want = "descriptor", 1
        elif self._state == "skippable":
            self._skip(int.from_bytes(field, "little"), then="magic")
        elif self._state == "descriptor":
            fhd = field[0]
            single = fhd >> 5 & 1
            self._checksum = bool(fhd >> 2 & 1)
            fcs = (1 if single else 0, 2, 4, 8)[fhd >> 6]
            rest = (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + fcs
            self._skip(rest, then="block")
        elif self._state == "block":
            header = int.from_bytes(field, "little")
            last, kind, size = header & 1, header >> 1 & 3, header >> 3
            after = "block" if not last else ("checksum" if self._checksum else "magic")
            self._skip(1 if kind == 1 else size, then=after)
        elif self._state == "checksum":
            self._state, self._want = "magic", 4

    def _skip(self, n: int, then: str) -> None:
        self._after = then
        self._state, self._want = "skip", n
        if n == 0:
            self._next_after_skip()

    def _next_after_skip(self) -> None:
        self._state = self._after
        self._want = {"magic": 4, "block": 3, "checksum": 4}[self._after]


class _Pipeline:
    """Runs decompression in a helper thread; hands chunks over a small queue and hashes them."""

    def __init__(self, produce: Callable[[], Iterator[bytes]]) -> None:
        self._produce = produce
        self._queue: queue.Queue[tuple[bytes | None, BaseException | None]] = queue.Queue(QUEUE_DEPTH)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="layer-decompress", daemon=True)
        self._done = False
        self.digest = hashlib.sha256()
        self.size = 0

    def __enter__(self) -> _Pipeline:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        while self._thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()

    def _run(self) -> None:
        try:
            for chunk in self._produce():
                if not self._put((chunk, None)):
                    return
            self._put((None, None))
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._put((None, e))

    def _put(self, item: tuple[bytes | None, BaseException | None]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def chunks(self) -> Iterator[bytes]:
        while not self._done:
            chunk, error = self._queue.get()
            if error is not None:
                self._done = True
                raise error
            if chunk is None:
                self._done = True
                return
            self.digest.update(chunk)  # here: the decompressing thread is the busier one
            self.size += len(chunk)
            yield chunk

    def drain(self) -> None:
        for _ in self.chunks():
            pass


# ---------------------------------------------------------------------------------------------------
# The tar stream (Go's archive/tar reader)
# ---------------------------------------------------------------------------------------------------


class _TarError(Exception):
    """The tar stream is malformed or cut short (Go's ErrHeader / ErrUnexpectedEOF)."""


class _Input:
    """Buffered reads over the chunk iterator, without copying file data."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""
        self._view = memoryview(self._buf)
        self._pos = 0

    def _refill(self) -> bool:
        for chunk in self._chunks:
            if chunk:
                self._buf, self._view, self._pos = chunk, memoryview(chunk), 0
                return True
        return False

    def read(self, n: int) -> bytes:
        """Up to n bytes; fewer only at the end of the stream."""
        pos = self._pos
        if len(self._buf) - pos >= n:
            self._pos = pos + n
            return self._buf[pos : pos + n]
        parts = []
        while n > 0:
            if self._pos == len(self._buf) and not self._refill():
                break
            part = self._buf[self._pos : self._pos + n]
            self._pos += len(part)
            n -= len(part)
            parts.append(part)
        return b"".join(parts)

    def views(self, n: int) -> Iterator[memoryview]:
        """The next n bytes as views of the chunks; stops early at the end of the stream."""
        while n > 0:
            if self._pos == len(self._buf) and not self._refill():
                return
            end = min(len(self._buf), self._pos + n)
            view = self._view[self._pos : end]
            n -= end - self._pos
            self._pos = end
            yield view

    def skip(self, n: int) -> int:
        """Discard up to n bytes; return how many were there."""
        if n <= len(self._buf) - self._pos:
            self._pos += n
            return n
        skipped = 0
        for view in self.views(n):
            skipped += len(view)
        return skipped


_ZERO_BLOCK = bytes(512)
_HIGH_BYTES = bytes(range(128))  # deleting these leaves the bytes >= 0x80
_INT = re.compile(rb"[+-]?[0-9]+")

REG, REGA, LNK, SYM, CHR, BLK, DIR, FIFO = b"0\x00123456"  # typeflags (ints)
_XHDR, _XGLOBAL, _LONGNAME, _LONGLINK, _OLDSPARSE = b"xgLKS"
MAX_SPARSE_ENTRIES = 1 << 20  # Go has no limit; ours keeps a hostile map from filling memory
_HEADER_ONLY = frozenset({LNK, SYM, CHR, BLK, DIR, FIFO})
_INT64_MAX = (1 << 63) - 1


class _Header:
    """One tar entry as Go's tar.Reader returns it; times in Unix nanoseconds."""

    __slots__ = (
        "name", "linkname", "typeflag", "mode", "uid", "gid", "size", "mtime", "atime",
        "devmajor", "devminor", "pax", "sparse",
    )  # fmt: skip
    name: bytes
    linkname: bytes
    typeflag: int  # one byte of the header (REG, DIR, ...)
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    atime: int | None
    devmajor: int
    devminor: int
    pax: dict[bytes, bytes]
    sparse: list[tuple[int, int]] | None

    def __init__(self) -> None:
        self.atime = None  # Go's zero time: not in the header
        self.devmajor = self.devminor = 0
        self.pax = {}
        self.sparse = None  # (offset, length) data fragments


class _TarReader:
    """Go's tar.Reader.Next(), over _Input. The applier consumes (or leaves) each entry's data."""

    def __init__(self, inp: _Input) -> None:
        self.inp = inp
        self.remaining = 0  # physical data bytes of the current entry not yet read
        self._pad = 0

    def next(self) -> _Header | None:
        """The next entry, or None at the end of the archive."""
        pax: dict[bytes, bytes] | None = None
        long_name = long_link = b""
        while True:
            if self.inp.skip(self.remaining) != self.remaining:
                raise _TarError("unexpected EOF in entry data")
            self.remaining = 0
            if self.inp.skip(self._pad) != self._pad:
                return None  # Go: EOF inside the padding ends the archive
            self._pad = 0
            hdr = self._read_header()
            if hdr is None:
                return None
            self._set_data(hdr)
            t = hdr.typeflag
            if t in (_XHDR, _XGLOBAL):
                pax = _parse_pax(self._read_special())
                if t == _XGLOBAL:
                    return self._global_header(hdr, pax)
                continue
            if t in (_LONGNAME, _LONGLINK):
                value = _cstring(self._read_special())
                if t == _LONGNAME:
                    long_name = value
                else:
                    long_link = value
                continue
            _merge_pax(hdr, pax or {})
            hdr.name = long_name or hdr.name
            hdr.linkname = long_link or hdr.linkname
            if hdr.typeflag == REGA:
                hdr.typeflag = DIR if hdr.name.endswith(b"/") else REG
            self._set_data(hdr)
            self._handle_sparse(hdr)
            return hdr

    def read_data(self, n: int) -> Iterator[memoryview]:
        """n bytes of the current entry's data as views; _TarError if the stream ends first."""
        if n > self.remaining:
            raise _TarError("sparse map refers to more data than the entry holds")
        self.remaining -= n
        got = 0
        for view in self.inp.views(n):
            got += len(view)
            yield view
        if got != n:
            raise _TarError("unexpected EOF in entry data")

    def _read_header(self) -> _Header | None:
        blk = self.inp.read(512)
        if not blk:
            return None
        if len(blk) < 512:
            raise _TarError("unexpected EOF in header")
        if blk == _ZERO_BLOCK:
            blk = self.inp.read(512)
            if not blk or blk == _ZERO_BLOCK:
                return None
            if len(blk) < 512:
                raise _TarError("unexpected EOF in header")
            raise _TarError("non-zero block after a zero block")
        return _parse_block(blk)

    def _set_data(self, hdr: _Header) -> None:
        """Go's handleRegularFile: header-only types have no data whatever their size says."""
        size = 0 if hdr.typeflag in _HEADER_ONLY else hdr.size
        if size < 0:
            raise _TarError(f"negative size in header of {hdr.name!r}")
        self.remaining = size
        self._pad = -size % 512

    def _read_special(self) -> bytes:
        if self.remaining > MAX_SPECIAL_FILE:
            raise _TarError("PAX header or GNU long name too long")
        data = self.inp.read(self.remaining)
        if len(data) != self.remaining:
            raise _TarError("unexpected EOF in extended header")
        self.remaining = 0
        return data

    def _global_header(self, hdr: _Header, pax: dict[bytes, bytes]) -> _Header:
        try:
            _merge_pax(hdr, pax)
        except _TarError:
            pass  # Go ignores mergePAX's error for a global header
        glob = _Header()
        glob.name, glob.linkname, glob.typeflag, glob.pax = hdr.name, b"", _XGLOBAL, pax
        glob.mode = glob.uid = glob.gid = glob.size = glob.mtime = 0
        return glob

    def _handle_sparse(self, hdr: _Header) -> None:
        if hdr.typeflag == _OLDSPARSE:
            raise _TarError("unhandled tar header type 83 (old GNU sparse file), as in containerd")
        sparse = self._pax_sparse_map(hdr)
        if sparse is None:
            return
        if hdr.typeflag in _HEADER_ONLY or not _valid_sparse(sparse, hdr.size):
            raise _TarError(f"invalid sparse map for {hdr.name!r}")
        if sum(length for _, length in sparse) != self.remaining:
            raise _TarError(f"sparse map of {hdr.name!r} does not match its data")
        hdr.sparse = sparse

    def _pax_sparse_map(self, hdr: _Header) -> list[tuple[int, int]] | None:
        """Go's readGNUSparsePAXHeaders (GNU sparse formats 0.0, 0.1 and 1.0)."""
        pax = hdr.pax
        major, minor = pax.get(b"GNU.sparse.major", b""), pax.get(b"GNU.sparse.minor", b"")
        if major == b"0" and minor in (b"0", b"1"):
            v1 = False
        elif major == b"1" and minor == b"0":
            v1 = True
        elif major or minor:
            return None  # an unknown version: Go treats the entry as a plain file
        elif pax.get(b"GNU.sparse.map"):
            v1 = False
        else:
            return None
        if name := pax.get(b"GNU.sparse.name"):
            hdr.name = name
        if size := pax.get(b"GNU.sparse.size") or pax.get(b"GNU.sparse.realsize"):
            hdr.size = _parse_int(size)
        return self._sparse_map_v1() if v1 else _sparse_map_v0(pax)

    def _sparse_map_v1(self) -> list[tuple[int, int]]:
        """Format 1.0: newline-separated decimals in whole blocks at the start of the data."""
        tokens: list[bytes] = []
        partial = b""

        def need(count: int) -> None:
            nonlocal partial
            while len(tokens) < count:
                blk = b"".join(self.read_data(512)) if self.remaining >= 512 else None
                if blk is None:
                    raise _TarError("unexpected EOF in sparse map")
                *done, partial = (partial + blk).split(b"\n")
                tokens.extend(done)

        need(1)
        count = _parse_int(tokens[0])
        if count < 0 or count > MAX_SPARSE_ENTRIES:
            raise _TarError("invalid or oversized sparse map")
        need(1 + 2 * count)
        values = [_parse_int(t) for t in tokens[1 : 1 + 2 * count]]
        return list(zip(values[0::2], values[1::2], strict=True))


def _sparse_map_v0(pax: dict[bytes, bytes]) -> list[tuple[int, int]]:
    count = _parse_int(pax.get(b"GNU.sparse.numblocks", b""))
    fields = pax.get(b"GNU.sparse.map", b"").split(b",")
    if fields == [b""]:
        fields = []
    if count < 0 or len(fields) != 2 * count:
        raise _TarError("invalid sparse map")
    values = [_parse_int(f) for f in fields]
    return list(zip(values[0::2], values[1::2], strict=True))


def _valid_sparse(sparse: list[tuple[int, int]], size: int) -> bool:
    """Go's validateSparseEntries: in order, not overlapping, inside the file."""
    if size < 0:
        return False
    end = 0
    for offset, length in sparse:
        if offset < 0 or length < 0 or offset > _INT64_MAX - length:
            return False
        if offset + length > size or end > offset:
            return False
        end = offset + length
    return True


def _cstring(b: bytes) -> bytes:
    """Go's parseString: up to the first NUL."""
    nul = b.find(0)
    return b if nul < 0 else b[:nul]


def _parse_octal(b: bytes) -> int:
    b = b.strip(b" \x00")
    if not b:
        return 0
    s = _cstring(b)
    if not s or s.strip(b"01234567"):
        raise _TarError(f"invalid octal number {b!r}")
    value = int(s, 8)
    if value >= 1 << 64:
        raise _TarError(f"octal number out of range {b!r}")
    return value - (1 << 64) if value >= 1 << 63 else value


def _parse_numeric(b: bytes) -> int:
    """Go's parseNumeric: base-256 (two's complement) when the top bit is set, else octal."""
    digits = b.strip(b" \x00")
    if not digits.translate(None, b"01234567"):  # the usual field: octal digits only (or none)
        return int(digits, 8) if digits else 0
    if b[0] & 0x80:
        negative = bool(b[0] & 0x40)
        raw = bytes(c ^ 0xFF for c in b) if negative else b
        value = int.from_bytes(bytes([raw[0] & 0x7F]) + raw[1:], "big")
        if value >> 63:
            raise _TarError("base-256 number out of range")
        return ~value if negative else value
    return _parse_octal(b)


def _parse_int(b: bytes) -> int:
    """Go's strconv.ParseInt(s, 10, 64)."""
    if b.isdigit() and len(b) < 19:
        return int(b)
    if not _INT.fullmatch(b):
        raise _TarError(f"invalid number {b!r}")
    value = int(b)
    if not -(1 << 63) <= value <= _INT64_MAX:
        raise _TarError(f"number out of range {b!r}")
    return value


def _parse_pax_time(b: bytes) -> int:
    """Go's parsePAXTime, in nanoseconds (sub-nanosecond digits truncated)."""
    secs, dot, frac = b.partition(b".")
    seconds = _parse_int(secs)
    if not frac:
        return seconds * 1_000_000_000
    if not frac.isdigit():
        raise _TarError(f"invalid PAX time {b!r}")
    nanos = int(frac[:9].ljust(9, b"0"))
    return seconds * 1_000_000_000 + (-nanos if secs.startswith(b"-") else nanos)


def _parse_block(blk: bytes) -> _Header:
    """Go's readHeader: checksum, format, and the V7/USTAR/STAR/GNU fields."""
    hdr = _Header()
    fast = _CANONICAL_NUMBERS.match(blk, 100)
    if fast:  # numbers as Go, GNU tar and Python write them: zero-padded octal, NUL-terminated
        hdr.mode, hdr.uid, hdr.gid, hdr.size, mtime, chksum = (int(g, 8) for g in fast.groups())
    else:
        hdr.mode, hdr.uid, hdr.gid, hdr.size, mtime = _numbers(blk, _V7_NUMBERS)
        chksum = _parse_octal(blk[148:156])
    if chksum != _unsigned_sum(blk):
        high = len(blk[:148].translate(None, _HIGH_BYTES)) + len(blk[156:].translate(None, _HIGH_BYTES))
        if chksum != _unsigned_sum(blk) - 256 * high:
            raise _TarError("invalid tar header checksum")
    hdr.typeflag = blk[156]
    hdr.name = _cstring(blk[0:100])
    hdr.linkname = _cstring(blk[157:257])
    hdr.mtime = mtime * 1_000_000_000
    magic, version = blk[257:263], blk[263:265]
    if magic == b"ustar\x00" or (magic == b"ustar " and version == b" \x00"):
        devices = blk[329:345]
        if devices not in _ZERO_DEVICES:
            hdr.devmajor, hdr.devminor = _numbers(blk, _DEVICE_NUMBERS)
        prefix = b""
        if magic == b"ustar\x00" and blk[508:512] == b"tar\x00":  # STAR
            prefix = _cstring(blk[345:476])
            hdr.atime = _parse_numeric(blk[476:488]) * 1_000_000_000
            _parse_numeric(blk[488:500])  # ctime: unused, but must parse
        elif magic == b"ustar\x00":
            prefix = _cstring(blk[345:500])
        else:
            prefix = _gnu_times(hdr, blk)
        if prefix:
            hdr.name = prefix + b"/" + hdr.name
    return hdr


_CANONICAL_NUMBERS = re.compile(
    rb"([0-7]{7})\x00([0-7]{7})\x00([0-7]{7})\x00([0-7]{11})\x00([0-7]{11})\x00([0-7]{6})\x00 "
)  # mode uid gid size mtime chksum at offset 100
_ZERO_DEVICES = (b"0000000\x000000000\x00", bytes(16))
_V7_NUMBERS = ((100, 108), (108, 116), (116, 124), (124, 136), (136, 148))  # mode uid gid size mtime
_DEVICE_NUMBERS = ((329, 337), (337, 345))


def _numbers(blk: bytes, fields: tuple[tuple[int, int], ...]) -> list[int]:
    """Several numeric fields at once: int() directly when they hold only octal digits, spaces
    and NULs in the usual places (the common case), else Go's parseNumeric field by field."""
    start, end = fields[0][0], fields[-1][1]
    if not blk[start:end].translate(None, b"01234567 \x00"):
        try:
            return [int(blk[a:b].strip(b" \x00") or b"0", 8) for a, b in fields]
        except ValueError:
            pass  # a space or NUL inside a field
    return [_parse_numeric(blk[a:b]) for a, b in fields]


def _unsigned_sum(blk: bytes) -> int:
    """Sum of the block's bytes, the checksum field counted as spaces. adler32's low half is
    1 + the byte sum mod 65521, exact for 256 bytes (at most 65280): much faster than sum()."""
    total = (zlib.adler32(blk[:256]) & 0xFFFF) + (zlib.adler32(blk[256:]) & 0xFFFF) - 2
    return total - sum(blk[148:156]) + 8 * 0x20


def _gnu_times(hdr: _Header, blk: bytes) -> bytes:
    """GNU atime; a header written by pre-1.8 Go has a USTAR prefix there instead (golang #12594)."""
    try:
        if blk[345]:
            hdr.atime = _parse_numeric(blk[345:357]) * 1_000_000_000
        if blk[357]:
            _parse_numeric(blk[357:369])
    except _TarError:
        hdr.atime = None
        prefix = _cstring(blk[345:500])
        return prefix if prefix.isascii() else b""
    return b""


def _parse_pax(buf: bytes) -> dict[bytes, bytes]:
    """Go's parsePAX: "<len> <key>=<value>\\n" records; GNU sparse 0.0 pairs become a map."""
    records: dict[bytes, bytes] = {}
    sparse: list[bytes] = []
    while buf:
        space = buf.find(b" ")
        if space < 0 or not _INT.fullmatch(buf[:space]):
            raise _TarError("invalid PAX record")
        n = int(buf[:space])
        if n < 5 or n > len(buf) or space + 1 >= n - 1 or buf[n - 1 : n] != b"\n":
            raise _TarError("invalid PAX record")
        key, eq, value = buf[space + 1 : n - 1].partition(b"=")
        buf = buf[n:]
        if not eq or not key:
            raise _TarError("invalid PAX record")
        if b"\x00" in (value if key in (b"path", b"linkpath", b"uname", b"gname") else key):
            raise _TarError("invalid PAX record")
        if key in (b"GNU.sparse.offset", b"GNU.sparse.numbytes"):
            wanted = b"GNU.sparse.offset" if len(sparse) % 2 == 0 else b"GNU.sparse.numbytes"
            if key != wanted or b"," in value:
                raise _TarError("invalid GNU sparse PAX record")
            sparse.append(value)
        else:
            records[key] = value
    if sparse:
        records[b"GNU.sparse.map"] = b",".join(sparse)
    return records


def _merge_pax(hdr: _Header, pax: dict[bytes, bytes]) -> None:
    """Go's mergePAX: PAX records override the header fields (an empty value keeps the field)."""
    for key, value in pax.items():
        if not value:
            continue
        if key == b"path":
            hdr.name = value
        elif key == b"linkpath":
            hdr.linkname = value
        elif key == b"uid":
            hdr.uid = _parse_int(value)
        elif key == b"gid":
            hdr.gid = _parse_int(value)
        elif key == b"mtime":
            hdr.mtime = _parse_pax_time(value)
        elif key == b"atime":
            hdr.atime = _parse_pax_time(value)
        elif key == b"ctime":
            _parse_pax_time(value)
        elif key == b"size":
            hdr.size = _parse_int(value)
    hdr.pax = pax


# ---------------------------------------------------------------------------------------------------
# Paths (Go's path/filepath and continuity's fs.RootPath), all bytes
# ---------------------------------------------------------------------------------------------------


def _clean(p: bytes) -> bytes:
    """Go's filepath.Clean."""
    if p and p[0] not in b"./" and p[-1] != 0x2F and b"//" not in p and b"/." not in p:
        return p  # already clean: the common case
    rooted = p.startswith(b"/")
    out: list[bytes] = []
    for part in p.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if out and out[-1] != b"..":
                out.pop()
            elif not rooted:
                out.append(part)
            continue
        out.append(part)
    joined = b"/".join(out)
    return b"/" + joined if rooted else (joined or b".")


def _join(*parts: bytes) -> bytes:
    """Go's filepath.Join: non-empty parts joined with "/", then cleaned ("" if none)."""
    kept = [p for p in parts if p]
    return _clean(b"/".join(kept)) if kept else b""


def _split(p: bytes) -> tuple[bytes, bytes]:
    """Go's filepath.Split: (directory with its trailing slash, last element)."""
    i = p.rfind(b"/") + 1
    return p[:i], p[i:]


class _Resolver:
    """continuity's fs.RootPath for one root: symlinks are followed, but never out of the root.

    A port of its algorithm (lexical "..", re-walk until no link is followed), except that every
    lstat goes through directories already known to be real, so a symlink never leads the
    lookup out of the root where continuity would consult the host.
    """

    def __init__(self, root: bytes) -> None:
        self.root = root
        self.real_dirs: set[bytes] = set()  # virtual paths known to be real directories

    def forget(self) -> None:
        self.real_dirs.clear()

    def root_path(self, path: bytes) -> bytes:
        if not path:
            return self.root
        links = [0]
        while True:
            before = links[0]
            path = self._walk_links(path, links)
            if before == links[0]:
                rooted = _join(b"/", path)
                if rooted == path:
                    return self.root if rooted == b"/" else self.root + rooted
                path = rooted

    def _walk_links(self, path: bytes, links: list[int]) -> bytes:
        """One pass over the components, left to right (continuity's recursive walkLinks)."""
        parts = path.split(b"/")
        if path.startswith(b"/"):
            current, parts = b"/", parts[1:]
        else:
            current, parts = self._walk_link(parts[0], links)[0], parts[1:]
        for part in parts:
            if not part:
                continue
            target, is_link = self._walk_link(_join(current, part), links)
            if not is_link or target.startswith(b"/"):
                current = target
            else:
                current = _join(current, target)
        return current

    def _walk_link(self, path: bytes, links: list[int]) -> tuple[bytes, bool]:
        if links[0] > MAX_SYMLINKS:
            raise OSError(errno.ELOOP, "too many links")
        path = _join(b"/", path)
        if path == b"/":
            return path, False
        found = self.lstat(path)
        if found is None or not stat.S_ISLNK(found[0].st_mode):
            return path, False
        links[0] += 1
        return os.readlink(found[1]), True

    def lstat(self, vpath: bytes) -> tuple[os.stat_result, bytes] | None:
        """lstat of a clean absolute virtual path, with the real path it was found at."""
        slash = vpath.rfind(b"/")
        parent = vpath[:slash]
        real_parent: bytes | None = self.root + parent
        if slash > 0 and parent not in self.real_dirs:
            real_parent = self._real_dir(parent)
        if real_parent is None:
            return None
        real = real_parent + vpath[slash:]
        try:
            st = os.lstat(real)
        except FileNotFoundError:
            return None
        if stat.S_ISDIR(st.st_mode) and real_parent == self.root + parent:
            self.real_dirs.add(vpath)
        return st, real

    def _real_dir(self, vdir: bytes) -> bytes | None:
        """The real directory behind vdir, every component checked (None if one is missing)."""
        current = b""
        for part in vdir[1:].split(b"/"):
            current += b"/" + part
            if current in self.real_dirs:
                continue
            try:
                st = os.lstat(self.root + current)
            except FileNotFoundError:
                return None
            if stat.S_ISLNK(st.st_mode):
                return self._kernel_walk(vdir)
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", self.root + current)
            self.real_dirs.add(current)
        return self.root + vdir

    def _kernel_walk(self, vdir: bytes) -> bytes | None:
        """vdir resolved as the kernel resolves a path's directories, but with the root as "/".

        Only reached through a link target whose own directories are symlinks, where continuity's
        lstat lets the kernel follow them (possibly out of the root); here they stay inside it.
        """
        real: list[bytes] = []
        pending = vdir.split(b"/")[::-1]
        links = 0
        while pending:
            part = pending.pop()
            if part in (b"", b"."):
                continue
            if part == b"..":
                if real:
                    real.pop()
                continue
            path = self.root + b"".join(b"/" + p for p in real) + b"/" + part
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return None
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > 40:  # the kernel's MAXSYMLINKS
                    raise OSError(errno.ELOOP, "too many levels of symbolic links", path)
                target = os.readlink(path)
                if target.startswith(b"/"):
                    real = []
                pending.extend(target.split(b"/")[::-1])
            elif stat.S_ISDIR(st.st_mode):
                real.append(part)
            else:
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", path)
        return self.root + b"".join(b"/" + p for p in real)


# ---------------------------------------------------------------------------------------------------
# Applying entries (containerd's archive.applyNaive + createTarFile + OverlayConvertWhiteout)
# ---------------------------------------------------------------------------------------------------

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
XATTR_PREFIX = b"SCHILY.xattr."
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DEVICE_TYPES = {CHR: stat.S_IFCHR, BLK: stat.S_IFBLK, FIFO: stat.S_IFIFO}
_MIN_TIME, _MAX_TIME = 0, _INT64_MAX  # containerd's boundTime, in ns


class _Applier:
    """Applies tar entries to the upper dir with containerd's semantics."""

    def __init__(self, upper: Path, parents: Sequence[Path] | Lowers) -> None:
        self.root = _root_bytes(upper)
        self.fs = _Resolver(self.root)
        # containerd: an overlay mount; no parents is a bind mount
        self.overlay = isinstance(parents, Lowers) or bool(parents)
        self._lowers = parents
        self._parents: list[_Resolver] | None = None
        self.dir_cache: dict[bytes, bytes] = {}  # tar directory part -> resolved existing dir
        self.unpacked: set[bytes] = set()
        self.dirs: list[tuple[bytes, int, int]] = []  # (clean name, atime, mtime), set at the end

    def apply(self, tar: _TarReader) -> None:
        self.tar = tar
        while (hdr := tar.next()) is not None:
            self._guarded(hdr.name, self._entry, hdr)
        for name, atime, mtime in self.dirs:
            self._guarded(name, self._set_dir_times, name, atime, mtime)

    def _guarded(self, name: bytes, fn: Callable[..., None], *args: object) -> None:
        """Report a filesystem error as the layer's fault, unless the machine is to blame."""
        try:
            fn(*args)
        except OSError as e:
            if e.errno in _ENVIRONMENT_ERRNOS:
                raise
            shown = name.decode(errors="backslashreplace")
            raise InvalidArgument(f"cannot apply layer entry {shown!r}: {e.strerror or e}") from e

    # --- one entry ---------------------------------------------------------------------------------

    def _entry(self, hdr: _Header) -> None:
        name = _clean(hdr.name)
        dir_part, base = _split(name)
        parent = self._parent_dir(dir_part)
        path = parent + b"/" + base if base not in (b"", b".", b"..") else parent
        if path == self.root:
            return  # containerd: "resolved to root"
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parent, base, hdr)
            return
        try:
            existing = os.lstat(path)
        except OSError:
            existing = None
        if existing is not None and not (stat.S_ISDIR(existing.st_mode) and hdr.typeflag == DIR):
            self._remove_all(path, existing)
            existing = None
        self._create(path, hdr, existing)
        if hdr.typeflag == DIR:
            self.dirs.append((name, _bound(_latest(hdr.atime, hdr.mtime)), _bound(hdr.mtime)))
        self.unpacked.add(path)

    def _parent_dir(self, dir_part: bytes) -> bytes:
        """The real directory an entry goes in, created (mkparent) if missing."""
        cached = self.dir_cache.get(dir_part)
        if cached is not None:
            return cached
        parent = self.fs.root_path(dir_part)
        if parent != self.root:
            self._mkparent(parent)
        self.dir_cache[dir_part] = parent
        return parent

    def _whiteout(self, parent: bytes, base: bytes, hdr: _Header) -> None:
        target = base[len(WHITEOUT_PREFIX) :]
        if base != OPAQUE_MARKER and target in (b"", b".", b".."):
            raise OSError(errno.EINVAL, f"invalid whiteout name {base!r}")
        if not self.overlay:
            self._naive_whiteout(parent, base, target)
        elif base == OPAQUE_MARKER:
            os.setxattr(parent, b"trusted.overlay.opaque", b"y")
        else:
            path = parent + b"/" + target
            os.mknod(path, stat.S_IFCHR, 0)
            os.chown(path, _id(hdr.uid), _id(hdr.gid), follow_symlinks=False)

    def _naive_whiteout(self, parent: bytes, base: bytes, target: bytes) -> None:
        """Without overlay, a whiteout deletes; an opaque marker deletes what this layer did not add."""
        if base != OPAQUE_MARKER:
            path = parent + b"/" + target
            try:
                self._remove_all(path, os.lstat(path))
            except FileNotFoundError:
                pass
            return
        os.lstat(parent)
        pending = [parent]
        while pending:
            directory = pending.pop()
            try:
                names = os.listdir(directory)
            except FileNotFoundError:
                continue
            for child in sorted(names):
                path = directory + b"/" + child
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                if path not in self.unpacked:
                    self._remove_all(path, st)
                elif stat.S_ISDIR(st.st_mode):
                    pending.append(path)

    def _remove_all(self, path: bytes, st: os.stat_result) -> None:
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)
        if stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode):
            self.dir_cache.clear()  # cached resolutions may have gone through it
            self.fs.forget()

    def _create(self, path: bytes, hdr: _Header, existing: os.stat_result | None) -> None:
        t = hdr.typeflag
        if t == REG:
            self._create_file(path, hdr)
            return
        if t == DIR:
            if existing is None:
                os.mkdir(path, 0o700)
        elif t in _DEVICE_TYPES:
            device = os.makedev(hdr.devmajor & 0xFFFFFFFF, hdr.devminor & 0xFFFFFFFF)
            os.mknod(path, (hdr.mode & 0o7777) | _DEVICE_TYPES[t], device)
        elif t == LNK:
            os.link(self._hardlink_target(hdr.linkname), path, follow_symlinks=False)
        elif t == SYM:
            os.symlink(hdr.linkname, path)
        elif t == _XGLOBAL:
            return  # containerd: "PAX Global Extended Headers found and ignored"
        else:
            raise OSError(errno.EINVAL, f"unhandled tar header type {t}")
        os.chown(path, _id(hdr.uid), _id(hdr.gid), follow_symlinks=False)
        self._set_xattrs(path, hdr)
        if t != SYM and (t != LNK or not stat.S_ISLNK(os.lstat(path).st_mode)):
            os.chmod(path, hdr.mode & 0o7777)  # no lchmod: never the symlink's target
        times = (_bound(_latest(hdr.atime, hdr.mtime)), _bound(hdr.mtime))
        os.utime(path, ns=times, follow_symlinks=False)

    def _create_file(self, path: bytes, hdr: _Header) -> None:
        fd = os.open(path, _OPEN_FLAGS, 0o600)
        try:
            if hdr.sparse is None:
                self._copy(fd, hdr.size)
            else:
                for offset, length in hdr.sparse:
                    os.lseek(fd, offset, os.SEEK_SET)
                    self._copy(fd, length)
                os.ftruncate(fd, hdr.size)
            os.fchown(fd, _id(hdr.uid), _id(hdr.gid))  # clears setuid/setgid: chmod comes after
            self._set_xattrs(fd, hdr)
            os.fchmod(fd, hdr.mode & 0o7777)
            os.utime(fd, ns=(_bound(_latest(hdr.atime, hdr.mtime)), _bound(hdr.mtime)))
        finally:
            os.close(fd)

    def _copy(self, fd: int, n: int) -> None:
        for view in self.tar.read_data(n):
            while view:
                view = view[os.write(fd, view) :]

    def _set_xattrs(self, target: bytes | int, hdr: _Header) -> None:
        """PAX SCHILY.xattr.* records. As containerd 1.6 (since 1.6.9): trusted.* is skipped, and
        so is an attribute the filesystem does not support or (EPERM) a user.* one on an inode
        that cannot carry it (neither a regular file nor a directory)."""
        for key, value in hdr.pax.items():
            if not key.startswith(XATTR_PREFIX):
                continue
            attr = key[len(XATTR_PREFIX) :]
            if attr.startswith(b"trusted."):
                continue
            try:
                if isinstance(target, int):
                    os.setxattr(target, attr, value)
                else:
                    os.setxattr(target, attr, value, follow_symlinks=False)
            except OSError as e:
                if e.errno == errno.ENOTSUP:
                    continue
                if e.errno == errno.EPERM and attr.startswith(b"user.") and not isinstance(target, int):
                    mode = os.lstat(target).st_mode
                    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                        continue
                raise

    def _hardlink_target(self, linkname: bytes) -> bytes:
        """containerd's hardlinkRootPath: the directory resolved in the root, the name not followed."""
        dir_part, base = _split(linkname)
        parent = self.fs.root_path(dir_part)
        target = _join(parent, base)
        return target if target.startswith(self.root) else self.root

    def _set_dir_times(self, name: bytes, atime: int, mtime: int) -> None:
        """containerd resolves the name again, following a final symlink too."""
        dir_part, base = _split(name)
        parent = self.dir_cache.get(dir_part)
        path = parent + b"/" + base if parent is not None else None
        if path is None or stat.S_ISLNK(os.lstat(path).st_mode):
            path = self.fs.root_path(name)
        os.utime(path, ns=(atime, mtime), follow_symlinks=False)

    # --- missing parents ---------------------------------------------------------------------------

    def _parent_layers(self) -> list[_Resolver]:
        """The parents' resolvers, asking `Lowers` (and waiting for them) the first time only."""
        if self._parents is None:
            lowers = self._lowers.wait() if isinstance(self._lowers, Lowers) else self._lowers
            self._parents = [_Resolver(_root_bytes(p)) for p in lowers]
        return self._parents

    def _mkparent(self, path: bytes) -> None:
        """containerd's mkparent: create missing dirs, copying attributes from the parent layers."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if stat.S_ISDIR(st.st_mode):
                return
            raise NotADirectoryError(errno.ENOTDIR, "mkparent: not a directory", path)
        slash = path.rfind(b"/")
        if slash > len(self.root):
            self._mkparent(path[:slash])
        try:
            os.mkdir(path, 0o755)
            os.chmod(path, 0o755)
        except OSError:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise
            return
        relative = path[len(self.root) :]
        for lower in self._parent_layers():
            source = lower.root_path(relative)
            try:
                st = os.lstat(source)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                _copy_dir_info(st, path)
                _copy_up_xattrs(path, source)
            break


def _copy_dir_info(st: os.stat_result, path: bytes) -> None:
    try:
        os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
    except PermissionError:
        mine = os.lstat(path)
        if (mine.st_uid, mine.st_gid) != (st.st_uid, st.st_gid):
            raise
    os.chmod(path, stat.S_IMODE(st.st_mode))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _copy_up_xattrs(dst: bytes, src: bytes) -> None:
    """Non-trusted xattrs of the parent layer's directory (containerd's copyUpXAttrs)."""
    skip = (errno.ENOTSUP, errno.ENODATA)
    try:
        names = os.listxattr(src, follow_symlinks=False)
    except OSError as e:
        if e.errno in skip:
            return
        raise
    for attr in names:
        if attr.startswith("trusted."):
            continue
        try:
            value = os.getxattr(src, attr, follow_symlinks=False)
            os.setxattr(dst, attr, value, os.XATTR_CREATE, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (*skip, errno.EEXIST):
                raise


def _root_bytes(path: Path) -> bytes:
    root = os.fsencode(os.path.abspath(path))
    if root == b"/":
        raise InvalidArgument("refusing to apply a layer to /")
    return root


def _id(value: int) -> int:
    """A uid/gid as the kernel sees Go's int: the low 32 bits, all ones meaning "unchanged"."""
    value &= 0xFFFFFFFF
    return -1 if value == 0xFFFFFFFF else value


def _latest(atime: int | None, mtime: int) -> int:
    return mtime if atime is None or atime < mtime else atime


def _bound(t: int) -> int:
    """containerd's boundTime: times a Go time cannot give in Unix nanoseconds become the epoch."""
    return t if _MIN_TIME <= t <= _MAX_TIME else _MIN_TIME
