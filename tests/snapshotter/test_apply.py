"""snapshotter.apply: layers unpacked into overlayfs upper dirs exactly as containerd 1.6 does.

The conformance image (testbed.images) is applied layer by layer and the mounted overlay
is compared with the expected rootfs; targeted cases pin whiteouts, replacement, mkparent, tar
format corners, errors, containment of hostile entries and bounded memory. The last test applies
crafted layers with the real containerd 1.6 and with apply_layer and compares the uppers exactly.
Hostile entries aim at a sentinel directory next to the upper dir, never at the host's files.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import tarfile
import threading
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from kernel.errors import FailedPrecondition, InvalidArgument
from snapshotter.apply import Applied, Lowers, apply_layer
from testbed.images import (
    add_entries,
    compare_manifests,
    expected_manifest,
    snapshot_tree,
)
from testbed.images import test_image_layers as conformance_layers

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="applying layers needs root (chown, mknod)")

TAR = "application/vnd.oci.image.layer.v1.tar"
GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MEDIA = {"gzip": GZIP, "zstd": ZSTD, "tar": TAR}
MTIME = 1_700_000_000
NS = 1_000_000_000


# --- crafting layers ----------------------------------------------------------------------------

KINDS = {
    "file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE, "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE, "global": tarfile.XGLTYPE,
}  # fmt: skip


def member(
    name: str,
    kind: str = "file",
    data: bytes = b"",
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime: int = MTIME,
    linkname: str = "",
    pax: dict[str, str] | None = None,
    fmt: int = tarfile.PAX_FORMAT,
    dev: tuple[int, int] = (0, 0),
) -> bytes:
    """One raw tar member (header blocks + padded data), so formats can be mixed freely."""
    info = tarfile.TarInfo(name)
    info.type = KINDS[kind]
    info.mode, info.uid, info.gid, info.mtime, info.linkname = mode, uid, gid, mtime, linkname
    info.uname = info.gname = ""
    info.devmajor, info.devminor = dev
    info.size = len(data) if kind == "file" else 0
    info.pax_headers = dict(pax or {})
    raw = info.tobuf(fmt, "utf-8", "surrogateescape")
    return raw + data + bytes(-len(data) % 512) if kind == "file" else raw


def retype(raw: bytes, typeflag: bytes) -> bytes:
    """The member with another typeflag in its (last) header block, checksum fixed."""
    block = bytearray(raw[:512])
    block[156:157] = typeflag
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\x00 " % sum(block)
    return bytes(block) + raw[512:]


def archive(*members: bytes, end: bool = True, trailing: bytes = b"") -> bytes:
    return b"".join(members) + (bytes(1024) if end else b"") + trailing


def compress(raw: bytes, kind: str) -> bytes:
    if kind == "gzip":
        return gzip.compress(raw, compresslevel=1, mtime=0)
    if kind == "zstd":
        return zstandard.ZstdCompressor(level=1).compress(raw)
    return raw


def entries_tar(entries: list[Any]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        add_entries(tar, entries)
    return out.getvalue()


def apply(raw: bytes, upper: Path, parents: list[Path] | None = None, kind: str = "gzip") -> Applied:
    upper.mkdir(parents=True, exist_ok=True)
    return apply_layer(io.BytesIO(compress(raw, kind)), MEDIA[kind], upper, parents or [])


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def overlay_mount(tmp_path: Path) -> Iterator[Any]:
    """mount(uppers) -> read-only overlay of the uppers (last = topmost); unmounted at the end."""
    mounted: list[Path] = []

    def mount(uppers: list[Path]) -> Path:
        target = tmp_path / f"mnt{len(mounted)}"
        target.mkdir()
        lower = ":".join(str(u) for u in reversed(uppers))
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lower}", str(target)], check=True
        )
        mounted.append(target)
        return target

    try:
        yield mount
    finally:
        for target in mounted:
            subprocess.run(["umount", str(target)], check=False)


# --- the conformance image through overlayfs ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["gzip", "zstd", "tar"])
def test_conformance_image_matches_expected_rootfs(tmp_path: Path, overlay_mount: Any, kind: str) -> None:
    layers = conformance_layers()
    uppers: list[Path] = []
    for i, spec in enumerate(layers):
        raw = entries_tar(spec)
        applied = apply(raw, tmp_path / f"upper{i}", list(reversed(uppers)), kind)
        assert applied == Applied(sha(raw), len(raw))
        uppers.append(tmp_path / f"upper{i}")
    mnt = overlay_mount(uppers)
    assert compare_manifests(expected_manifest(layers), snapshot_tree(mnt)) == []


# --- whiteouts, replacement, missing parents -------------------------------------------------------


def test_whiteouts_become_char_devices_and_opaque_xattrs(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    apply(archive(member("d/", "dir"), member("d/a", data=b"a"), member("f", data=b"f")), lower)
    layer = archive(
        member(".wh.f", uid=7, gid=8),
        member("d/.wh..wh..opq"),
        member("d/new", data=b"new"),
        member("gone/.wh.x"),  # the parent is created (mkparent) to hold the whiteout
    )
    upper = tmp_path / "upper"
    apply(layer, upper, [lower])
    st = os.lstat(upper / "f")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and (st.st_uid, st.st_gid) == (7, 8)
    assert stat.S_IMODE(st.st_mode) == 0
    assert os.getxattr(upper / "d", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(upper / "d")) == ["new"]
    assert stat.S_ISCHR(os.lstat(upper / "gone" / "x").st_mode)
    assert not any(name.startswith(".wh.") for _, dirs, files in os.walk(upper) for name in dirs + files)


def test_without_parents_whiteouts_delete_like_containerds_bind_mount_apply(tmp_path: Path) -> None:
    """containerd mounts a parentless snapshot as a bind mount and applies without the overlay
    conversion: a whiteout removes, an opaque marker removes what this layer did not unpack."""
    layer = archive(
        member("x", data=b"x"),
        member(".wh.x"),
        member(".wh.never-existed"),
        member("d/", "dir"),
        member("d/kept", data=b"k"),
        member("d/.wh..wh..opq"),
    )
    upper = tmp_path / "upper"
    apply(layer, upper)
    assert sorted(os.listdir(upper)) == ["d"]
    assert os.listdir(upper / "d") == ["kept"]
    assert "trusted.overlay.opaque" not in os.listxattr(upper / "d")


def test_later_entries_replace_earlier_ones(tmp_path: Path) -> None:
    layer = archive(
        member("a", data=b"first"),
        member("a", data=b"second", mode=0o600),
        member("b", data=b"file"),
        member("b/", "dir", mode=0o701),  # file -> directory
        member("b/c", data=b"c"),
        member("c/", "dir"),
        member("c/child", data=b"child"),
        member("c", data=b"now a file"),  # directory (with a child) -> file
        member("s", "symlink", linkname="a"),
        member("s", data=b"symlink -> file"),
        member("m/", "dir", mode=0o700),
        member("m/keep", data=b"k"),
        member("m/", "dir", mode=0o750, uid=3),  # dir over dir: metadata replaced, children kept
    )
    upper = tmp_path / "upper"
    apply(layer, upper)
    assert (upper / "a").read_bytes() == b"second" and stat.S_IMODE(os.lstat(upper / "a").st_mode) == 0o600
    assert stat.S_ISDIR(os.lstat(upper / "b").st_mode) and (upper / "b" / "c").read_bytes() == b"c"
    assert stat.S_IMODE(os.lstat(upper / "b").st_mode) == 0o701
    assert stat.S_ISREG(os.lstat(upper / "c").st_mode) and (upper / "c").read_bytes() == b"now a file"
    assert stat.S_ISREG(os.lstat(upper / "s").st_mode) and (upper / "s").read_bytes() == b"symlink -> file"
    st = os.lstat(upper / "m")
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o750, 3) and os.listdir(upper / "m") == ["keep"]


def test_missing_parents_copy_attributes_from_the_nearest_parent_layer(tmp_path: Path) -> None:
    far, near = tmp_path / "far", tmp_path / "near"
    apply(archive(member("p/", "dir", mode=0o700), member("p/q/", "dir", mode=0o700)), far)
    apply(
        archive(member("p/q/", "dir", mode=0o2711, uid=12, gid=34, pax={"SCHILY.xattr.user.k": "v"})),
        near,
        [far],
    )
    os.setxattr(near / "p" / "q", "trusted.overlay.opaque", b"y")  # never copied up
    upper = tmp_path / "upper"
    apply(archive(member("p/q/r/file", data=b"deep")), upper, [near, far])
    q = os.lstat(upper / "p" / "q")
    assert (stat.S_IMODE(q.st_mode), q.st_uid, q.st_gid) == (0o2711, 12, 34)  # from `near`
    assert os.getxattr(upper / "p" / "q", "user.k") == b"v"
    assert "trusted.overlay.opaque" not in os.listxattr(upper / "p" / "q")
    p = os.lstat(upper / "p")  # `near` has p only because mkparent made it there: copied from `far`
    assert stat.S_IMODE(p.st_mode) == 0o700
    r = os.lstat(upper / "p" / "q" / "r")  # in no parent: 0755 root (group: inherited from setgid q)
    assert (stat.S_IMODE(r.st_mode), r.st_uid, r.st_gid) == (0o755, 0, 34)


# --- metadata -----------------------------------------------------------------------------------------


def test_metadata_modes_owners_times_xattrs_and_special_files(tmp_path: Path) -> None:
    cap = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0).decode("utf-8", "surrogateescape")
    layer = archive(
        member("suid", data=b"#!/bin/sh\n", mode=0o4755, uid=1000, gid=1000),  # chown must not drop it
        member("hard", "hardlink", linkname="suid", mode=0o4750, uid=1000, gid=1000),  # link header wins
        member("nanos", data=b"n", pax={"mtime": "1700000002.987654321", "atime": "1800000000.5"}),
        member("old-atime", data=b"o", pax={"mtime": "1700000003", "atime": "1600000000"}),
        member("negative", data=b"n", pax={"mtime": "-5.25"}),
        member("huge", data=b"h", pax={"mtime": "99999999999999"}),
        member("big-ids", data=b"i", pax={"uid": "100000", "gid": "200000"}),
        member(
            "xattrs",
            data=b"x",
            pax={
                "SCHILY.xattr.user.a": "1",
                "SCHILY.xattr.security.capability": cap,
                "SCHILY.xattr.trusted.skip": "containerd never sets trusted.*",
                "SCHILY.xattr.user.empty": "",
            },
        ),  # fmt: skip
        member("link", "symlink", linkname="nowhere", uid=5, gid=6, mtime=MTIME + 7),
        member("fifo", "fifo", mode=0o620, pax={"SCHILY.xattr.user.x": "EPERM on a fifo: ignored"}),
        member("null", "char", mode=0o666, dev=(1, 3)),
        member("loop", "block", mode=0o660, dev=(7, 0)),
        member("dir/", "dir", mode=0o1777, mtime=MTIME + 100),
        member("dir/child", data=b"written after the dir's times were first set"),
    )
    upper = tmp_path / "upper"
    apply(layer, upper)

    def st(name: str) -> os.stat_result:
        return os.lstat(upper / name)

    assert (stat.S_IMODE(st("suid").st_mode), st("suid").st_uid) == (0o4750, 1000)
    assert st("suid").st_ino == st("hard").st_ino and st("suid").st_nlink == 2
    assert (st("nanos").st_mtime_ns, st("nanos").st_atime_ns) == (
        1_700_000_002_987_654_321,
        1_800_000_000_500_000_000,
    )
    assert st("old-atime").st_atime_ns == st("old-atime").st_mtime_ns == 1_700_000_003 * NS  # atime >= mtime
    assert st("negative").st_mtime_ns == 0 and st("huge").st_mtime_ns == 0  # containerd's boundTime
    assert (st("big-ids").st_uid, st("big-ids").st_gid) == (100000, 200000)
    assert os.getxattr(upper / "xattrs", "user.a") == b"1"
    assert os.getxattr(upper / "xattrs", "user.empty") == b""
    assert os.getxattr(upper / "xattrs", "security.capability") == cap.encode("utf-8", "surrogateescape")
    assert "trusted.skip" not in os.listxattr(upper / "xattrs")
    assert os.readlink(upper / "link") == "nowhere"
    assert (st("link").st_uid, st("link").st_gid, st("link").st_mtime_ns) == (5, 6, (MTIME + 7) * NS)
    assert stat.S_ISFIFO(st("fifo").st_mode) and stat.S_IMODE(st("fifo").st_mode) == 0o620
    assert stat.S_ISCHR(st("null").st_mode) and st("null").st_rdev == os.makedev(1, 3)
    assert stat.S_ISBLK(st("loop").st_mode) and st("loop").st_rdev == os.makedev(7, 0)
    assert stat.S_IMODE(st("dir").st_mode) == 0o1777 and st("dir").st_mtime_ns == (MTIME + 100) * NS


def test_tar_format_corners_as_gos_archive_tar_reads_them(tmp_path: Path) -> None:
    rega = retype(member("olddir/", fmt=tarfile.USTAR_FORMAT), b"\x00")  # NUL type + trailing slash = dir
    long_dir = "long/" + "n" * 120
    layer = archive(
        member(long_dir + "/gnu", data=b"gnu", fmt=tarfile.GNU_FORMAT),
        member("gnu-link", "symlink", linkname="t" * 150, fmt=tarfile.GNU_FORMAT),
        member(long_dir + "/pax", data=b"pax"),
        member("prefix/" + "q" * 90 + "/" + "r" * 90, data=b"ustar prefix", fmt=tarfile.USTAR_FORMAT),
        member("pax_global_header", "global", pax={"comment": "ignored"}),
        rega,
        member("unicode-\u00fc\u00f1", data=b"u"),
        member("bin\udcff", data=b"not utf-8"),
        member("./", "dir", mode=0o700),  # resolves to the root: skipped
        trailing=b"bytes after the end-of-archive blocks count in the diff_id",
    )
    upper = tmp_path / "upper"
    applied = apply(layer, upper, kind="tar")
    assert applied == Applied(sha(layer), len(layer))
    assert (upper / long_dir / "gnu").read_bytes() == b"gnu" and (
        upper / long_dir / "pax"
    ).read_bytes() == b"pax"
    assert os.readlink(upper / "gnu-link") == "t" * 150
    assert (upper / "prefix" / ("q" * 90) / ("r" * 90)).read_bytes() == b"ustar prefix"
    assert stat.S_ISDIR(os.lstat(upper / "olddir").st_mode)
    assert (upper / "unicode-\u00fc\u00f1").read_bytes() == b"u"
    assert os.path.exists(os.fsencode(upper) + b"/bin\xff")
    assert not (upper / "pax_global_header").exists()
    assert stat.S_IMODE(os.lstat(upper).st_mode) != 0o700


@pytest.mark.parametrize("kind", ["tar", "gzip"])
def test_diff_id_covers_everything_after_the_end_of_the_archive(tmp_path: Path, kind: str) -> None:
    """containerd hashes the stream to EOF: several chunks of trailing data here."""
    raw = archive(member("f", data=b"f"), trailing=os.urandom(3 << 20))
    assert apply(raw, tmp_path / "upper", kind=kind) == Applied(sha(raw), len(raw))
    assert os.listdir(tmp_path / "upper") == ["f"]


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar makes the sparse archive")
def test_pax_sparse_files_are_expanded(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.seek(3 << 20)
        f.write(b"middle")
        f.seek(9 << 20)
        f.write(b"end")
    expected = (src / "sparse").read_bytes()
    for version in ("0.1", "1.0"):
        out = tmp_path / f"s{version}.tar"
        subprocess.run(
            [
                "tar",
                "--format=posix",
                "-S",
                f"--sparse-version={version}",
                "-cf",
                str(out),
                "-C",
                str(src),
                "sparse",
            ],
            check=True,
        )
        upper = tmp_path / f"upper{version}"
        apply(out.read_bytes(), upper)
        assert (upper / "sparse").read_bytes() == expected
        assert os.lstat(upper / "sparse").st_blocks * 512 < 1 << 20  # the holes stay holes


# --- errors -------------------------------------------------------------------------------------------


def test_diff_id_mismatch_is_failed_precondition(tmp_path: Path) -> None:
    raw = archive(member("f", data=b"x"))
    wrong = "sha256:" + "0" * 64
    with pytest.raises(FailedPrecondition) as exc:
        apply_layer(io.BytesIO(compress(raw, "gzip")), GZIP, tmp_path, expected_diff_id=wrong)
    assert wrong in str(exc.value) and sha(raw) in str(exc.value)
    upper = tmp_path / "ok"
    upper.mkdir()
    assert apply_layer(
        io.BytesIO(compress(raw, "gzip")), GZIP, upper, expected_diff_id=sha(raw)
    ).diff_id == sha(raw)


def test_unknown_media_type_is_invalid_argument(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="media type"):
        apply_layer(io.BytesIO(b""), "application/vnd.oci.image.layer.v1.tar+bzip2", tmp_path)
    with pytest.raises(InvalidArgument, match="media type"):
        apply_layer(io.BytesIO(b""), "application/octet-stream", tmp_path)


@pytest.mark.parametrize(
    "media_type",
    [
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    ],
)
def test_compressed_media_types_are_sniffed_like_containerd(tmp_path: Path, media_type: str) -> None:
    """containerd's DecompressStream looks at the magic number, not at the media type's suffix."""
    raw = archive(member("f", data=b"x" * 3000))
    for i, kind in enumerate(("gzip", "zstd", "tar")):
        upper = tmp_path / f"u{i}"
        upper.mkdir()
        assert apply_layer(io.BytesIO(compress(raw, kind)), media_type, upper).diff_id == sha(raw)
        assert (upper / "f").read_bytes() == b"x" * 3000


@pytest.mark.parametrize(
    "blob",
    [
        pytest.param(lambda gz: gz[: len(gz) // 2], id="gzip-truncated"),
        pytest.param(lambda gz: gz[:-3], id="gzip-trailer-cut"),
        pytest.param(lambda gz: gz[:40] + bytes(b ^ 0x55 for b in gz[40:80]) + gz[80:], id="gzip-corrupt"),
        pytest.param(lambda gz: gz + b"junk after the gzip member", id="gzip-trailing-junk"),
        pytest.param(lambda gz: gz[:10], id="gzip-header-only"),
    ],
)
def test_corrupt_gzip_is_invalid_argument(tmp_path: Path, blob: Any) -> None:
    raw = archive(member("f", data=os.urandom(20000)), member("g", data=b"g" * 50000))
    threads = threading.active_count()
    with pytest.raises(InvalidArgument):
        apply_layer(io.BytesIO(blob(compress(raw, "gzip"))), GZIP, tmp_path)
    assert threading.active_count() == threads  # the decompressing thread is gone


def test_multi_member_gzip_is_read_to_the_end(tmp_path: Path) -> None:
    raw = archive(member("a", data=b"a" * 5000), member("b", data=b"b" * 5000))
    blob = gzip.compress(raw[:3000]) + gzip.compress(raw[3000:])
    applied = apply_layer(io.BytesIO(blob), GZIP, tmp_path)
    assert applied.diff_id == sha(raw) and (tmp_path / "b").read_bytes() == b"b" * 5000


def test_zstd_frames_truncation_and_skippable_frames(tmp_path: Path) -> None:
    raw = archive(member("a", data=os.urandom(300_000)), member("b", data=b"b" * 100_000))
    cctx = zstandard.ZstdCompressor(level=1, write_checksum=True)
    skippable = struct.pack("<II", 0x184D2A5E, 5) + b"12345"
    blob = skippable + cctx.compress(raw[:150_000]) + skippable + cctx.compress(raw[150_000:])
    upper = tmp_path / "ok"
    upper.mkdir()
    assert apply_layer(io.BytesIO(blob), ZSTD, upper).diff_id == sha(raw)
    for i, bad in enumerate((blob[:-1], blob[: len(blob) - 1000], blob + b"junk")):
        upper = tmp_path / f"bad{i}"
        upper.mkdir()
        with pytest.raises(InvalidArgument):  # python-zstandard alone would hide a cut frame
            apply_layer(io.BytesIO(bad), ZSTD, upper)


@pytest.mark.parametrize(
    ("raw", "ok"),
    [
        pytest.param(archive(member("a", data=b"x" * 700)), True, id="complete"),
        pytest.param(archive(member("a", data=b"x" * 700), end=False), True, id="eof-at-header"),
        pytest.param(archive(member("a", data=b"x" * 700))[: 512 + 800], True, id="eof-in-padding"),
        pytest.param(archive(member("a", data=b"x"), end=False) + bytes(512), True, id="one-zero-block"),
        pytest.param(archive(member("a", data=b"x" * 700))[: 512 + 300], False, id="eof-in-data"),
        pytest.param(archive(member("a", data=b"x" * 700))[:200], False, id="eof-in-header"),
        pytest.param(member("a", data=b"x") + bytes(512) + member("b"), False, id="data-after-zero-block"),
        pytest.param(b"\x01" * 512, False, id="bad-checksum"),
        pytest.param(b"", True, id="empty"),
    ],
)
def test_where_a_tar_stream_may_end(tmp_path: Path, raw: bytes, ok: bool) -> None:
    """Go's tar reader (so containerd) accepts an EOF at a header or in padding; not elsewhere."""
    blob = compress(raw, "gzip")  # a valid gzip around a cut tar: only the tar decides
    if ok:
        assert apply_layer(io.BytesIO(blob), GZIP, tmp_path).diff_id == sha(raw)
    else:
        with pytest.raises(InvalidArgument, match="invalid layer tar"):
            apply_layer(io.BytesIO(blob), GZIP, tmp_path)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(archive(member("a", data=b"f"), member("a/b", data=b"c")), id="child-of-a-file"),
        pytest.param(archive(member("x", "hardlink", linkname="missing")), id="hardlink-to-nothing"),
        pytest.param(
            archive(member("d/", "dir"), member("x", "hardlink", linkname="d")), id="hardlink-to-dir"
        ),
        pytest.param(archive(member("d/", "dir"), member("d/.wh..")), id="invalid-whiteout"),
        pytest.param(
            archive(
                member("l1", "symlink", linkname="l2"), member("l2", "symlink", linkname="l1"), member("l1/x")
            ),
            id="symlink-loop",
        ),  # fmt: skip
        pytest.param(
            archive(retype(member("c", data=b"x", fmt=tarfile.USTAR_FORMAT), b"V")), id="unhandled-type"
        ),
        pytest.param(
            archive(retype(member("s", data=b"x", fmt=tarfile.USTAR_FORMAT), b"S")), id="old-gnu-sparse"
        ),
    ],
)
def test_layers_containerd_refuses_are_invalid_argument(tmp_path: Path, raw: bytes) -> None:
    with pytest.raises(InvalidArgument):
        apply(raw, tmp_path / "upper")


def test_whiteout_of_an_entry_of_the_same_layer_fails_as_in_containerd(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    apply(archive(member("x", data=b"x")), lower)
    with pytest.raises(InvalidArgument, match="exists"):  # mknod: EEXIST
        apply(archive(member("x", data=b"new"), member(".wh.x")), tmp_path / "upper", [lower])


def test_reader_errors_pass_through_unchanged(tmp_path: Path) -> None:
    class Broken(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, b: Any) -> int:
            raise ConnectionResetError(errno.ECONNRESET, "peer went away")

    with pytest.raises(ConnectionResetError):
        apply_layer(Broken(), GZIP, tmp_path)  # type: ignore[arg-type]


# --- containment -------------------------------------------------------------------------------------


def _fingerprint(path: Path) -> list[tuple[Any, ...]]:
    """Everything about a tree that an escaping entry could change."""
    rows = []
    for p in sorted([path, *path.rglob("*")]):
        st = os.lstat(p)
        xattrs = sorted(os.listxattr(p, follow_symlinks=False))
        content = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
        rows.append((str(p), st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_mtime_ns, xattrs, content))
    return rows


def test_hostile_entries_stay_inside_the_upper_dir(tmp_path: Path) -> None:
    """Every trick aims at `sentinel` (a sibling of the upper dirs): a broken applier would damage
    only that, and the test would see it. /etc/passwd is only named by a hardlink whose header
    repeats its current owner, mode and times, so even a broken applier could not change them."""
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "file").write_bytes(b"precious")
    rel = str(sentinel).lstrip("/")
    passwd = os.stat("/etc/passwd")
    passwd_before = (passwd, hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest())
    before = _fingerprint(sentinel)
    hostile = archive(
        member("../sentinel/dotdot", data=b"pwned"),
        member("../../../../../../../" + rel + "/deep-dotdot", data=b"pwned"),
        member("/" + rel + "/absolute", data=b"pwned"),
        member("rootlink", "symlink", linkname="/"),
        member("rootlink/" + rel + "/through-root-link", data=b"pwned"),
        member("sentlink", "symlink", linkname=str(sentinel)),
        member("sentlink/through-abs-link", data=b"pwned", mode=0o777),
        member("uplink", "symlink", linkname="../../../.."),
        member("uplink/sentinel/through-up-link", data=b"pwned"),
        member("chain1", "symlink", linkname="chain2/sentinel"),
        member("chain2", "symlink", linkname=".."),
        member("chain1/through-chain", data=b"pwned"),
        member("sentlink/", "dir", mode=0o777),  # replaces the link itself, not its target
        member("../sentinel/.wh.file"),
        member("../sentinel/.wh..wh..opq"),
        member("uplink/sentinel/.wh..wh..opq"),
        member("ok-target", data=b"inside"),
        member("hl-in", "hardlink", linkname="../ok-target"),
    )
    hardlinks = [
        "../sentinel/file",
        str(sentinel / "file"),
        "sentlink/file",
        "rootlink/" + rel + "/file",
        "/etc/passwd",
    ]
    for parents in ([], [tmp_path / "base"]):
        (tmp_path / "base").mkdir(exist_ok=True)
        upper = tmp_path / f"upper-{len(parents)}"
        try:
            apply(hostile, upper, parents)
        finally:  # checked even if a broken applier stops half-way
            assert _fingerprint(sentinel) == before, "an entry escaped the upper dir"
        assert (upper / rel / "absolute").read_bytes() == b"pwned"  # clamped into the upper dir
        assert (upper / "sentinel" / "dotdot").exists() and (upper / "ok-target").read_bytes() == b"inside"
        assert os.lstat(upper / "hl-in").st_ino == os.lstat(upper / "ok-target").st_ino
        for i, target in enumerate(hardlinks):
            st = passwd_before[0]
            pax = {"mtime": f"{st.st_mtime_ns // NS}.{st.st_mtime_ns % NS:09d}"}
            pax["atime"] = f"{st.st_atime_ns // NS}.{st.st_atime_ns % NS:09d}"
            link = member("x", "hardlink", linkname=target, mode=st.st_mode & 0o7777, uid=st.st_uid,
                          gid=st.st_gid, pax=pax)  # fmt: skip
            links = [
                member("rootlink", "symlink", linkname="/"),
                member("sentlink", "symlink", linkname=str(sentinel)),
            ]
            with pytest.raises(InvalidArgument, match="No such file"):  # resolved in the upper dir: absent
                apply(archive(*links, link), tmp_path / f"hl-{len(parents)}-{i}", parents)
    assert _fingerprint(sentinel) == before
    passwd = os.stat("/etc/passwd")
    assert (passwd, hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()) == passwd_before


# --- streaming ----------------------------------------------------------------------------------------


class _Zeros(io.RawIOBase):
    """A 64 MiB file's tar member, generated as it is read (so the test holds no copy of it)."""

    def __init__(self, size: int) -> None:
        header = tarfile.TarInfo("big")
        header.size, header.mtime, header.mode = size, MTIME, 0o644
        self.header = header.tobuf(tarfile.PAX_FORMAT)
        self.left = size
        self.tail = bytes(-size % 512) + bytes(1024)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b)
        if self.header:
            n = min(len(view), len(self.header))
            view[:n], self.header = self.header[:n], self.header[n:]
            return n
        if self.left:
            n = min(len(view), self.left)
            view[:n] = bytes(n)
            self.left -= n
            return n
        n = min(len(view), len(self.tail))
        view[:n], self.tail = self.tail[:n], self.tail[n:]
        return n


@pytest.mark.parametrize("kind", ["tar", "gzip", "zstd"])
def test_a_64_mib_file_is_applied_with_bounded_memory(tmp_path: Path, kind: str) -> None:
    size = 64 << 20
    if kind == "tar":
        source: io.RawIOBase = _Zeros(size)
    else:  # compress chunk by chunk: the blob is tiny, the uncompressed stream is not
        out = io.BytesIO()
        zeros = io.BufferedReader(_Zeros(size), 1 << 20)
        if kind == "gzip":
            co = zlib.compressobj(1, wbits=31)
            while chunk := zeros.read(1 << 20):
                out.write(co.compress(chunk))
            out.write(co.flush())
        else:
            with zstandard.ZstdCompressor(level=1).stream_writer(out, closefd=False) as w:
                while chunk := zeros.read(1 << 20):
                    w.write(chunk)
        source = io.BytesIO(out.getvalue())
    tracemalloc.start()
    try:
        applied = apply_layer(source, MEDIA[kind], tmp_path)  # type: ignore[arg-type]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert os.lstat(tmp_path / "big").st_size == size and applied.size > size
    assert peak < 12 << 20, f"peak {peak / 2**20:.1f} MiB for a 64 MiB file"


# --- against the real containerd 1.6 ----------------------------------------------------------------


def _differential_layers(sparse: bytes) -> list[bytes]:
    cap = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0).decode("utf-8", "surrogateescape")
    first = archive(
        member("./", "dir", mode=0o700),
        member(
            "base/",
            "dir",
            mode=0o711,
            uid=5,
            gid=6,
            pax={"SCHILY.xattr.user.k": "v", "mtime": "1700000001.5"},
        ),
        member("base/sub/", "dir", mode=0o750),
        member(
            "base/sub/f",
            data=b"hello",
            mode=0o4755,
            uid=1000,
            gid=1000,
            pax={"SCHILY.xattr.security.capability": cap, "SCHILY.xattr.trusted.t": "no"},
        ),  # fmt: skip
        member("times", data=b"t", pax={"mtime": "1700000002.987654321", "atime": "1800000000.5"}),
        member("negative", data=b"n", pax={"mtime": "-5.25"}),
        member("link-to-sub", "symlink", linkname="base/sub"),
        member("link-to-sub/through", data=b"through"),
        member("root-link", "symlink", linkname="/"),
        member("root-link/etc/contained", data=b"c"),
        member("../../escape", data=b"e"),
        member("hl", "hardlink", linkname="base/sub/f", mode=0o4755, uid=1000, gid=1000),
        member("hl-sym", "hardlink", linkname="link-to-sub"),
        member("dev/fifo", "fifo", mode=0o620, pax={"SCHILY.xattr.user.x": "1"}),
        member("dev/null", "char", mode=0o666, dev=(1, 3)),
        member("long/" + "n" * 120, data=b"gnu", fmt=tarfile.GNU_FORMAT),
        member("g", "global", pax={"comment": "c"}),
        member("dup", data=b"1"),
        member("dup/", "dir"),
        member("gone", data=b"g"),
        member(".wh.gone"),
        member("deep/a/b", data=b"mkparent"),
        trailing=b"after the end",
    )
    second = archive(
        member(".wh.escape"),
        member("base/.wh.sub"),
        member("etc/.wh..wh..opq"),
        member("etc/new", data=b"new"),
        member("base/deep/file", data=b"copies base's attributes"),
        member("link-to-sub/z", data=b"a dir in this upper, attributes from the lower link's target"),
        member("dup/", "dir", mode=0o711, uid=3, gid=4),
    )
    third = archive(member("base/deep/more", data=b"m"), member(".wh.dup"), end=False) + sparse
    return [first, second, third]


def _describe(root: Path) -> dict[str, dict[str, Any]]:
    """lstat everything before reading anything (reads move atimes)."""
    out: dict[str, dict[str, Any]] = {}
    inodes: dict[int, list[str]] = {}
    for p in sorted(root.rglob("*")):
        st = os.lstat(p)
        link = stat.S_ISLNK(st.st_mode)
        names = [] if link else os.listxattr(p, follow_symlinks=False)
        out[str(p.relative_to(root))] = {
            "mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "rdev": st.st_rdev,
            "mtime": st.st_mtime_ns, "atime": st.st_atime_ns,
            "size": None if stat.S_ISDIR(st.st_mode) else st.st_size,
            "target": os.readlink(p) if link else None,
            "xattrs": {a: os.getxattr(p, a, follow_symlinks=False) for a in names},
        }  # fmt: skip
        inodes.setdefault(st.st_ino, []).append(str(p.relative_to(root)))
    for name, row in out.items():
        if stat.S_ISREG(row["mode"]):
            row["sha"] = hashlib.sha256((root / name).read_bytes()).hexdigest()
    for names in inodes.values():
        for name in names:
            out[name]["links"] = names
    return out


def _differences(theirs: dict[str, Any], ours: dict[str, Any], started_ns: int) -> list[str]:
    diffs = [f"only containerd: {p}" for p in sorted(theirs.keys() - ours.keys())]
    diffs += [f"only ours: {p}" for p in sorted(ours.keys() - theirs.keys())]
    for path in sorted(theirs.keys() & ours.keys()):
        for key, value in theirs[path].items():
            if key in ("mtime", "atime") and value >= started_ns and ours[path][key] >= started_ns:
                continue  # both set by the kernel during the apply
            if key == "atime" and stat.S_ISDIR(theirs[path]["mode"]) and value >= started_ns:
                continue  # containerd reads the tree after the apply (usage at Commit)
            if value != ours[path][key]:
                diffs.append(f"{path}: {key} containerd={value!r} ours={ours[path][key]!r}")
    return diffs


@pytest.mark.integration
@pytest.mark.skipif(
    not (Path("/usr/bin/containerd").exists() and shutil.which("tar")), reason="needs containerd"
)
def test_same_upper_dirs_as_containerd(tmp_path: Path) -> None:
    from testbed.containerd import start_containerd

    src = tmp_path / "sparse-src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.seek(1 << 20)
        f.write(b"data")
    subprocess.run(
        ["tar", "--format=posix", "-S", "-cf", str(tmp_path / "s.tar"), "-C", str(src), "sparse"], check=True
    )
    layers = _differential_layers((tmp_path / "s.tar").read_bytes())
    layout = tmp_path / "layout"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes, media_type: str) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": "sha256:" + digest, "size": len(data)}

    descriptors = [put(compress(raw, "gzip"), GZIP) for raw in layers]
    rootfs = {"type": "layers", "diff_ids": [sha(raw) for raw in layers]}
    image_config = {"architecture": "amd64", "os": "linux", "config": {}, "rootfs": rootfs}
    config = put(json.dumps(image_config).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = put(
        json.dumps({"schemaVersion": 2, "config": config, "layers": descriptors}).encode(),
        "application/vnd.oci.image.manifest.v1+json",
    )
    manifest["annotations"] = {"org.opencontainers.image.ref.name": "v1"}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [manifest]}))
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    subprocess.run(["tar", "-cf", str(tmp_path / "image.tar"), "-C", str(layout), "."], check=True)

    started = time.time_ns()
    ours: list[Path] = []
    for i, raw in enumerate(layers):
        upper = tmp_path / f"ours{i}"
        upper.mkdir()
        blob = io.BytesIO(compress(raw, "gzip"))
        apply_layer(blob, GZIP, upper, list(reversed(ours)), expected_diff_id=sha(raw))
        ours.append(upper)
    with start_containerd(tmp_path) as ctrd:
        ctrd.ctr("images", "import", "--base-name", "example.com/apply", str(tmp_path / "image.tar"))
        snapshots = ctrd.root / "io.containerd.snapshotter.v1.overlayfs" / "snapshots"
        theirs = sorted((p / "fs" for p in snapshots.iterdir()), key=lambda p: int(p.parent.name))
        assert len(theirs) == len(layers)
        diffs = [
            f"layer {i}: {d}"
            for i, (t, o) in enumerate(zip(theirs, ours, strict=True))
            for d in _differences(_describe(t), _describe(o), started)
        ]
    assert diffs == []


# --- unpacking before the parents are complete (apply.Lowers) ------------------------------------


def test_lowers_are_asked_for_only_when_a_parent_directory_is_missing(tmp_path: Path) -> None:
    base = tmp_path / "base"
    apply(archive(member("p/", "dir", mode=0o700), member("p/f", data=b"f")), base)
    asked: list[int] = []

    def wait() -> list[Path]:
        asked.append(1)
        return [base]

    complete = tmp_path / "complete"
    complete.mkdir()
    raw = archive(member("p/", "dir", mode=0o711), member("p/g", data=b"g"), member(".wh.x"))
    apply_layer(io.BytesIO(compress(raw, "gzip")), GZIP, complete, Lowers(wait))
    assert asked == []  # every entry's directory is in the layer itself: no waiting
    assert stat.S_ISCHR(os.lstat(complete / "x").st_mode)  # still an overlay layer (whiteout device)
    missing = tmp_path / "missing"
    missing.mkdir()
    deep = compress(archive(member("p/q/r", data=b"r")), "gzip")
    apply_layer(io.BytesIO(deep), GZIP, missing, Lowers(wait))
    assert asked == [1]  # asked once, at the first missing directory
    assert stat.S_IMODE(os.lstat(missing / "p").st_mode) == 0o700  # copied from the parent


def test_layers_unpacked_at_once_match_layers_unpacked_in_turn(tmp_path: Path) -> None:
    """Each layer in its own thread from the start, its parents made known as they complete (as
    `snapshotter.unpacker` does): the same upper dirs as one layer after the other."""
    src = tmp_path / "sparse-src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.seek(1 << 20)
        f.write(b"data")
    subprocess.run(
        ["tar", "--format=posix", "-S", "-cf", str(tmp_path / "s.tar"), "-C", str(src), "sparse"], check=True
    )
    layers = _differential_layers((tmp_path / "s.tar").read_bytes())
    started = time.time_ns()
    in_turn: list[Path] = []
    for i, raw in enumerate(layers):
        upper = tmp_path / f"turn{i}"
        upper.mkdir()
        apply_layer(io.BytesIO(compress(raw, "gzip")), GZIP, upper, list(reversed(in_turn)), sha(raw))
        in_turn.append(upper)
    done = [threading.Event() for _ in layers]
    at_once = [tmp_path / f"once{i}" for i in range(len(layers))]
    errors: list[BaseException] = []

    def unpack(i: int) -> None:
        def wait() -> list[Path]:
            for event in done[:i]:
                event.wait()
            return list(reversed(at_once[:i]))

        try:
            at_once[i].mkdir()
            parents: list[Path] | Lowers = Lowers(wait) if i else []
            apply_layer(io.BytesIO(compress(layers[i], "gzip")), GZIP, at_once[i], parents, sha(layers[i]))
        except BaseException as exc:
            errors.append(exc)
        finally:
            done[i].set()

    threads = [threading.Thread(target=unpack, args=(i,)) for i in reversed(range(len(layers)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    diffs = [
        f"layer {i}: {d}"
        for i, (a, b) in enumerate(zip(in_turn, at_once, strict=True))
        for d in _differences(_describe(a), _describe(b), started)
    ]
    assert diffs == []


def test_isal_and_zlib_unpack_the_same_bytes_and_refuse_the_same_corruption(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import zlib

    from snapshotter import apply as apply_module

    if apply_module.INFLATE is zlib:
        pytest.skip("isal is not installed: zlib is the only inflater")
    raw = entries_tar(conformance_layers()[1])
    first = compress(raw, "gzip")
    blob = first + compress(b"second member", "gzip")
    results = []
    started = time.time_ns()
    for lib in (apply_module.INFLATE, zlib):
        monkeypatch.setattr(apply_module, "INFLATE", lib)
        upper = tmp_path / lib.__name__
        upper.mkdir()
        results.append((apply_layer(io.BytesIO(blob), GZIP, upper), _describe(upper)))
        crc = len(first) - 8  # the first member's CRC-32: only the inflater can notice
        corrupt = blob[:crc] + bytes([blob[crc] ^ 0xFF]) + blob[crc + 1 :]
        bad = tmp_path / f"{lib.__name__}-bad"
        bad.mkdir()
        with pytest.raises(InvalidArgument, match="corrupt gzip"):
            apply_layer(io.BytesIO(corrupt), GZIP, bad)
    (applied_a, tree_a), (applied_b, tree_b) = results
    assert applied_a == applied_b
    assert _differences(tree_a, tree_b, started) == []
