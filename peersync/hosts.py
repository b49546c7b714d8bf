"""Put PeerSync's registry mirror into containerd's hosts.toml files, and take it out again.

containerd reads `<dir>/<registry>/hosts.toml` (`_default/hosts.toml` is the catch-all; `ctr`
takes `--hosts-dir`, CRI `config_path`): an optional top-level `server` (the upstream, tried
last) and `[host."URL"]` tables, tried in file order, so our mirror goes first. containerd appends
`?ns=<registry>` to mirror requests, so one mirror endpoint serves every registry.

We never rewrite a user's file: our entry is a block of text between two marker comments,
inserted before the user's first table (and the comments right above it) or appended, and taken
out again byte for byte:

    # peersync-managed-begin [flags] -- managed by `peersync hosts`: edits inside are lost
    [host."http://127.0.0.1:5380"]
      capabilities = ["pull", "resolve"]
    # peersync-managed-end

Flags on the begin line: `created` (the file did not exist: the block also holds `server`, and
`remove` deletes the file if nothing else is left in it) and `eol` (the user's file did not end
with a newline: we added one, and `remove` takes it away again). Every result is parsed back with
tomllib and must equal the user's own settings (server, other hosts in their order, every key of
them) plus our host, first; otherwise nothing is written. A file that is not valid TOML is never
touched. Writes are atomic (temp file, fsync, rename, fsync dir) and keep the file's mode (and
owner, when permitted); a symlinked hosts.toml is updated at its target.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kernel.config import MirrorConfig
from kernel.errors import FailedPrecondition, InvalidArgument, NotFound
from kernel.store.fsutil import fsync_dir

DEFAULT_DIR = Path(MirrorConfig().hosts_dir)  # where the mirror also looks for what it serves
# Where the daemon's mirror listens by default ([mirror] listen): the entry must point at it.
DEFAULT_MIRROR = f"http://{MirrorConfig().listen}"
CAPABILITIES = ("pull", "resolve")
BEGIN = "# peersync-managed-begin"
END = "# peersync-managed-end"
_NOTE = "-- managed by `peersync hosts`: edits inside are lost"
_FLAGS = frozenset({"created", "eol"})
_REGISTRY_RE = re.compile(r"^(_default|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{1,5})?)$")


@dataclass(frozen=True)
class Change:
    """What `install` or `remove` did to one registry's hosts.toml."""

    registry: str
    path: Path
    action: str  # created, added, replaced, unchanged, removed, deleted, absent


# -- public API --------------------------------------------------------------------------------


def install(registry: str, mirror: str = DEFAULT_MIRROR, hosts_dir: Path = DEFAULT_DIR) -> Change:
    """Make `mirror` the first host of `registry`'s hosts.toml (creating the file if needed)."""
    mirror = check_mirror(mirror)
    path = hosts_path(hosts_dir, registry)
    text = _read(path)
    new = install_text(text, registry, mirror)
    if new == text:
        return Change(registry, path, "unchanged")
    action = "created" if text is None else "replaced" if find_block(text) else "added"
    _write(path, new)
    return Change(registry, path, action)


def remove(registry: str, hosts_dir: Path = DEFAULT_DIR) -> Change:
    """Take our block out of `registry`'s hosts.toml, restoring the user's bytes exactly."""
    path = hosts_path(hosts_dir, registry)
    text = _read(path)
    if text is None or find_block(text) is None:
        return Change(registry, path, "absent")
    new = remove_text(text)
    if new is None and path.is_symlink():
        new = ""  # a link someone made to our file: keep the link, empty its target
    if new is None:
        path.unlink()
        fsync_dir(path.parent)
        with contextlib.suppress(OSError):  # the directory is ours too if nothing else is in it
            path.parent.rmdir()
        return Change(registry, path, "deleted")
    _write(path, new)
    return Change(registry, path, "removed")


def managed(hosts_dir: Path = DEFAULT_DIR) -> list[str]:
    """The registries whose hosts.toml holds our block (for `remove --all`)."""
    out: list[str] = []
    if not hosts_dir.is_dir():
        return out
    for entry in sorted(hosts_dir.iterdir()):
        path = entry / "hosts.toml"
        if _REGISTRY_RE.match(entry.name) and path.is_file():
            with contextlib.suppress(OSError, UnicodeDecodeError):
                if BEGIN in path.read_text(encoding="utf-8"):
                    out.append(entry.name)
    return out


def default_server(registry: str) -> str | None:
    """containerd's default upstream of a registry (none for the `_default` catch-all)."""
    if registry == "_default":
        return None
    return "https://registry-1.docker.io" if registry == "docker.io" else f"https://{registry}"


def hosts_path(hosts_dir: Path, registry: str) -> Path:
    if not _REGISTRY_RE.match(registry):
        raise InvalidArgument(f"invalid registry host {registry!r}: want host[:port] or _default")
    return Path(hosts_dir) / registry / "hosts.toml"


def check_mirror(mirror: str) -> str:
    """The mirror URL, validated (http or https, a host, no query or fragment)."""
    parts = urlsplit(mirror)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment \
            or any(c in mirror for c in "\"\\\n\r\t "):
        raise InvalidArgument(f"invalid mirror URL {mirror!r}: want http(s)://host[:port][/path]")
    return mirror.rstrip("/")


# -- the text transformations (pure) ----------------------------------------------------------


def install_text(text: str | None, registry: str, mirror: str) -> str:
    """`text` (None: no file) with our block for `mirror` in place, validated."""
    if text is None:
        server = default_server(registry)
        return _block(mirror, ["created"], server)
    _parse(text, "existing file")
    span = find_block(text)
    if span is not None:
        start, end, flags = span
        created = "created" in flags
        new = text[:start] + _block(mirror, flags, default_server(registry) if created else None) + text[end:]
        user_text = _cut(text, start, end, flags)
    else:
        created = False
        user_text = text
        user_hosts = _parse(text, "existing file").get("host", {})
        if isinstance(user_hosts, dict) and mirror in user_hosts:
            raise FailedPrecondition(f"hosts.toml already has its own [host.{json.dumps(mirror)}] entry; "
                                     "remove it or choose another --mirror")
        pos = _insertion_point(text)
        flags = []
        prefix = ""
        if pos == len(text) and text and not text.endswith("\n"):
            flags, prefix = ["eol"], "\n"
        new = text[:pos] + prefix + _block(mirror, flags, None) + text[pos:]
    _check_install(new, user_text, mirror, default_server(registry) if created else None)
    return new


def remove_text(text: str) -> str | None:
    """`text` without our block (None: the file was ours alone, delete it), validated."""
    before = _parse(text, "existing file")
    span = find_block(text)
    if span is None:
        return text
    start, end, flags = span
    ours = _parse(text[start:end], "peersync block")
    new = _cut(text, start, end, flags)
    if "created" in flags:
        if not new.strip():
            return None
        if "server" in ours:  # the user added to a file we created: keep its upstream
            new = new[:start] + f"server = {json.dumps(ours['server'])}\n" + new[start:]
    after = _parse(new, "result")
    if _view(after, set(), False) != _view(before, set(ours.get("host", {})), False):
        raise FailedPrecondition("taking the peersync block out would change the user's settings "
                                 "(was the file edited inside the block?); edit it by hand")
    return new


def find_block(text: str) -> tuple[int, int, list[str]] | None:
    """(start, end, flags) of our block: from its begin line to the end of its end line."""
    begins = [m.start() for m in re.finditer(rf"(?m)^{re.escape(BEGIN)}\b", text)]
    if not begins:
        return None
    if len(begins) > 1:
        raise FailedPrecondition("hosts.toml holds more than one peersync block; edit it by hand")
    start = begins[0]
    line_end = text.find("\n", start)
    end_match = re.compile(rf"(?m)^{re.escape(END)}[ \t]*(\r?\n|$)").search(text, start)
    if line_end < 0 or end_match is None:
        raise FailedPrecondition("hosts.toml has a peersync begin marker without its end marker; "
                                 "edit it by hand")
    head = text[start + len(BEGIN):line_end].split("--", 1)[0].split()
    flags = [f for f in head if f in _FLAGS]
    return start, end_match.end(), flags


# -- helpers -----------------------------------------------------------------------------------


def _block(mirror: str, flags: list[str], server: str | None) -> str:
    head = " ".join([BEGIN, *sorted(set(flags) & _FLAGS), _NOTE])
    body = f"server = {json.dumps(server)}\n\n" if server else ""
    caps = ", ".join(json.dumps(c) for c in CAPABILITIES)
    body += f"[host.{json.dumps(mirror)}]\n  capabilities = [{caps}]\n"
    return f"{head}\n{body}{END}\n"


def _cut(text: str, start: int, end: int, flags: list[str]) -> str:
    """`text` without the block (and without the newline we added before it, if we did)."""
    if "eol" in flags and start > 0 and text[start - 1] == "\n":
        start -= 1
    return text[:start] + text[end:]


def _parse(text: str, what: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FailedPrecondition(f"{what} is not valid TOML ({exc}); not touching it") from None


def _view(parsed: dict[str, Any], without_hosts: set[str], drop_server: bool) -> list[Any]:
    """A comparable form of a hosts.toml: top-level keys, then the hosts in file order."""
    top = {k: v for k, v in parsed.items() if k != "host" and not (drop_server and k == "server")}
    hosts = parsed.get("host", {})
    pairs = [(k, v) for k, v in hosts.items() if k not in without_hosts] if isinstance(hosts, dict) else hosts
    return [top, pairs]


def _check_install(new: str, user_text: str, mirror: str, our_server: str | None) -> None:
    parsed = _parse(new, "result")
    user = _parse(user_text, "existing file")
    hosts = parsed.get("host", {})
    first = next(iter(hosts), None) if isinstance(hosts, dict) else None
    if first != mirror or hosts[mirror] != {"capabilities": list(CAPABILITIES)}:
        raise FailedPrecondition(f"cannot place the mirror {mirror} first in this hosts.toml without "
                                 "changing it (hosts defined with dotted keys?); add it by hand")
    if our_server is not None and parsed.get("server") != our_server:
        raise FailedPrecondition("the server line of the peersync-created file changed; edit it by hand")
    if _view(parsed, {mirror}, our_server is not None) != _view(user, set(), False):
        raise FailedPrecondition("inserting the mirror would change the user's settings; add it by hand")


def _insertion_point(text: str) -> int:
    """Before the first table header and the comment lines directly above it; else the end."""
    lines = list(_logical_lines(text))
    for n, (_, kind) in enumerate(lines):
        if kind == "table":
            while n > 0 and lines[n - 1][1] == "comment":
                n -= 1
            return lines[n][0]
    return len(text)


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(offset, kind) of every line that starts outside strings and brackets; kind is table,
    comment, blank or other. A small TOML scanner: enough to find where tables begin."""
    i, n, depth, at_start = 0, len(text), 0, True
    while i < n:
        if at_start and depth == 0:
            j = i
            while j < n and text[j] in " \t":
                j += 1
            c = text[j] if j < n else "\n"
            kind = {"[": "table", "#": "comment", "\n": "blank", "\r": "blank"}.get(c, "other")
            yield i, kind
            at_start = False
        c = text[i]
        if c == "#":
            nl = text.find("\n", i)
            i = n if nl < 0 else nl
            continue
        if c in "\"'":
            i = _skip_string(text, i)
            continue
        if c in "[{":
            depth += 1
        elif c in "]}":
            depth = max(0, depth - 1)
        elif c == "\n" and depth == 0:
            at_start = True
        i += 1


def _skip_string(text: str, i: int) -> int:
    """The index just past the string starting at `i`."""
    quote = text[i]
    escapes = quote == '"'
    if text.startswith(quote * 3, i):
        k = i + 3
        while k < len(text):
            if escapes and text[k] == "\\":
                k += 2
            elif text.startswith(quote * 3, k):
                end = k + 3
                while end < len(text) and text[end] == quote and end - k < 5:
                    end += 1  # up to two quotes may close the content: """a""""
                return end
            else:
                k += 1
        return len(text)
    k = i + 1
    while k < len(text) and text[k] not in (quote, "\n"):
        k += 2 if escapes and text[k] == "\\" else 1
    return k + 1


def _read(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise FailedPrecondition(f"{path} is a directory") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise FailedPrecondition(f"{path} is not UTF-8 text; not touching it") from None


def _target(path: Path) -> Path:
    """Where to write: the target of a symlinked hosts.toml, so the link stays a link."""
    return path.resolve() if path.is_symlink() else path


def _write(path: Path, text: str) -> None:
    """Atomically replace (or create) `path`, keeping its mode and, if we may, its owner."""
    target = _target(path)
    try:
        st: os.stat_result | None = target.stat()
    except FileNotFoundError:
        st = None
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd, tmp = tempfile.mkstemp(prefix=".hosts.toml.", suffix=".peersync", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fchmod(f.fileno(), st.st_mode & 0o7777 if st else 0o644)
            if st is not None:
                with contextlib.suppress(PermissionError):
                    os.fchown(f.fileno(), st.st_uid, st.st_gid)
            os.fsync(f.fileno())
        os.rename(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def remove_all(hosts_dir: Path = DEFAULT_DIR) -> list[Change]:
    """`remove` for every registry that holds our block."""
    if not Path(hosts_dir).is_dir():
        raise NotFound(f"hosts directory {hosts_dir} does not exist")
    return [remove(registry, hosts_dir) for registry in managed(hosts_dir)]


__all__ = [
    "DEFAULT_DIR",
    "DEFAULT_MIRROR",
    "Change",
    "check_mirror",
    "default_server",
    "find_block",
    "hosts_path",
    "install",
    "install_text",
    "managed",
    "remove",
    "remove_all",
    "remove_text",
]
