#!/usr/bin/env python3
"""Plug PeerSync into a host's containerd without clobbering anything: the Kubernetes init step,
and the checks the Debian package's postinst prints.

    containerd-setup.py install [--host-root /host] [--cri auto|always|never] [--registry R ...] ...
    containerd-setup.py check   [--host-root /] [--config FILE] [--dropin FILE]
    containerd-setup.py remove  [--host-root /host] ...

`install` (idempotent; run on every start of the DaemonSet's pod):
1. `peersync hosts install` makes the mirror the first host of each registry's hosts.toml, merging
   into the files that are there (the daemon's own code, `peersync/hosts.py`).
2. `peersync containerd-config [--cri]` renders the drop-in, written to conf.d/peersync.toml
   (atomically, only when it changed; a file of that name that we did not write is never replaced).
3. `imports = ["<conf.d>/*.toml"]` is added to config.toml only if no import covers the drop-in: a
   line inserted before the first table, checked by parsing the result back (the old settings plus
   `imports`, nothing else). An `imports` list that exists but misses the drop-in is not edited.
containerd reads its config at start only: the drop-in takes effect at its next restart (hosts.toml
changes at the next pull).

CRI: containerd 1.6/1.7 replace a plugin's whole section with an imported file's (`mergeConfig` in
services/server/config), so a drop-in with `[plugins."io.containerd.grpc.v1.cri".*]` tables hides
every CRI setting of config.toml (cni dirs, sandbox_image, runtimes, SystemdCgroup). With `--cri
auto` the CRI tables go into the drop-in only when config.toml (and what it imports) sets nothing
for CRI; otherwise the keys that would be hidden are printed with the three lines to add by hand.

Runs with the interpreter that has `peersync` (the image's, or /opt/peersync/bin/python3); only the
standard library besides the `peersync` command.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import glob
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

CRI = "io.containerd.grpc.v1.cri"
MARKER = "# peersync-managed: written by containerd-setup.py on each start; edits are lost"
CRI_KEYS = (
    f'[plugins."{CRI}".containerd]  snapshotter = "peersync", disable_snapshot_annotations = false',
    f'[plugins."{CRI}".registry]    config_path = "<hosts dir>"',
)


class SetupError(Exception):
    """Something we will not do without an operator (the message says what to do instead)."""


# -- reading containerd's config ---------------------------------------------------------------


def load_toml(path: Path) -> dict[str, Any] | None:
    """The parsed file, or None if it does not exist."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SetupError(f"{path} is not valid TOML ({exc}); not touching it") from None


def _dotted(table: dict[str, Any], prefix: str) -> list[str]:
    out: list[str] = []
    for key, value in table.items():
        name = f"{prefix}.{key}" if prefix else key
        out += _dotted(value, name) if isinstance(value, dict) and value else [name]
    return out


def imported_files(config: Path, root: Path, exclude: Path | None = None) -> list[Path]:
    """Host paths of what `config` imports, recursively, in containerd's order (globs sorted)."""
    seen: list[Path] = []
    pending = [config]
    while pending:
        current = pending.pop(0)
        data = load_toml(root / _rel(current)) or {}
        for pattern in data.get("imports", []):
            pattern = pattern if os.path.isabs(pattern) else str(current.parent / pattern)
            for match in sorted(glob.glob(str(root / _rel(Path(pattern))))):
                host = Path("/") / Path(match).relative_to(root)
                if host not in seen and host != config and host != exclude:
                    seen.append(host)
                    pending.append(host)
    return seen


def cri_settings(config: Path, root: Path, exclude: Path | None = None) -> dict[str, list[str]]:
    """CRI keys set by config.toml and the files it imports (but `exclude`): file -> dotted keys."""
    found: dict[str, list[str]] = {}
    for path in [config, *imported_files(config, root, exclude)]:
        data = load_toml(root / _rel(path)) or {}
        section = data.get("plugins", {}).get(CRI)
        if isinstance(section, dict) and section:
            found[str(path)] = _dotted(section, "")
    return found


def import_covers(config: Path, root: Path, dropin: Path) -> bool:
    """True if config.toml (version 2) imports `dropin` through one of its `imports` patterns."""
    data = load_toml(root / _rel(config)) or {}
    for pattern in data.get("imports", []):
        pattern = pattern if os.path.isabs(pattern) else str(config.parent / pattern)
        pattern = os.path.normpath(pattern)
        if os.path.dirname(pattern) == str(dropin.parent) and fnmatch.fnmatchcase(
            dropin.name, os.path.basename(pattern)
        ):
            return True
    return False


# -- writing -----------------------------------------------------------------------------------


def _rel(path: Path) -> Path:
    return Path(str(path).lstrip("/"))


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Replace `path` (its mode kept if it exists) via a temp file, fsync and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        mode = path.stat().st_mode & 0o7777
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def with_import(text: str | None, pattern: str) -> str:
    """config.toml's text with `imports = [pattern]` added (it must have no `imports` yet)."""
    line = f'imports = ["{pattern}"]\n'
    if text is None or not text.strip():
        return f"version = 2\n{line}"
    before = tomllib.loads(text)
    if before.get("version") != 2:
        raise SetupError("config.toml is not `version = 2`: containerd reads imports only in version 2")
    match = re.search(r"(?m)^[ \t]*\[", text)
    pos = match.start() if match else len(text)
    while pos > 0:  # keep the comment lines that sit right above the first table with it
        prev = text.rfind("\n", 0, pos - 1) + 1
        if not text[prev:pos].lstrip().startswith("#"):
            break
        pos = prev
    prefix = "" if pos == 0 or text[pos - 1] == "\n" else "\n"
    new = text[:pos] + prefix + line + text[pos:]
    after = tomllib.loads(new)
    if after.pop("imports", None) != [pattern] or after != before:
        raise SetupError("adding `imports` to config.toml would change other settings; add it by hand")
    return new


# -- the commands ------------------------------------------------------------------------------


def _peersync(*args: str) -> str:
    done = subprocess.run(["peersync", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SetupError(f"peersync {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def install(args: argparse.Namespace) -> list[str]:
    root, config, dropin = args.host_root, args.config, args.dropin
    notes: list[str] = []
    if args.registry:
        out = _peersync("hosts", "install", "--dir", str(root / _rel(args.hosts_dir)),
                        "--mirror", args.mirror, *args.registry)
        notes += out.strip().splitlines()
    cri = args.cri == "always"
    if args.cri == "auto":
        hidden = cri_settings(config, root, exclude=dropin)
        cri = not hidden
        for path, keys in hidden.items():
            notes.append(f"CRI left out of the drop-in: {path} sets {', '.join(keys)}, which a drop-in "
                         "CRI section would hide (containerd replaces a plugin's whole section on import)")
        if hidden:
            notes.append(f"for kubelet's fast path add to {config} by hand: " + "; ".join(CRI_KEYS))
    render = ["containerd-config", "--socket", str(args.socket)]
    if cri:
        render += ["--cri", "--hosts-dir", str(args.hosts_dir)]
    text = f"{MARKER}\n{_peersync(*render)}"
    target = root / _rel(dropin)
    old = target.read_text(encoding="utf-8") if target.exists() else None
    if old is not None and not old.startswith(MARKER):
        raise SetupError(f"{dropin} exists and was not written by peersync; not replacing it")
    restart = False
    if old != text:
        write_atomic(target, text)
        notes.append(f"{dropin}: {'created' if old is None else 'updated'} (CRI {'on' if cri else 'off'})")
        restart = True
    if args.add_import:
        cfg = root / _rel(config)
        if not import_covers(config, root, dropin):
            current = cfg.read_text(encoding="utf-8") if cfg.exists() else None
            if current is not None and "imports" in tomllib.loads(current):
                raise SetupError(f"{config} has an `imports` list without {dropin.parent}/*.toml; "
                                 "add it to that list by hand")
            write_atomic(cfg, with_import(current, f"{dropin.parent}/*.toml"))
            notes.append(f"{config}: added imports = [\"{dropin.parent}/*.toml\"]")
            restart = True
    if restart:
        notes.append("containerd reads its config at start: restart containerd to load the drop-in")
    return notes


def check(args: argparse.Namespace) -> list[str]:
    """What an operator must still do, for the Debian package's postinst (never fails it)."""
    root, config, dropin = args.host_root, args.config, args.dropin
    notes: list[str] = []
    if not import_covers(config, root, dropin):
        notes.append(f"add this line to the top of {config} (config version 2), then restart containerd:")
        notes.append(f'  imports = ["{dropin.parent}/*.toml"]')
    dropin_data = load_toml(root / _rel(dropin)) or {}
    if CRI in dropin_data.get("plugins", {}):
        for path, keys in cri_settings(config, root, exclude=dropin).items():
            notes.append(f"warning: {dropin} sets the CRI plugin, so containerd ignores these CRI settings "
                         f"of {path}: {', '.join(keys)}")
            notes.append("  copy them into a file at that path or opt out of the CRI part "
                         "(see the comments in the drop-in)")
    return notes


def remove(args: argparse.Namespace) -> list[str]:
    """Undo `install` (by hand, when taking PeerSync off a node): hosts entries and our drop-in."""
    root, dropin = args.host_root, args.dropin
    hosts_dir = str(root / _rel(args.hosts_dir))
    notes = _peersync("hosts", "remove", "--all", "--dir", hosts_dir).strip().splitlines()
    target = root / _rel(dropin)
    if target.exists() and target.read_text(encoding="utf-8").startswith(MARKER):
        target.unlink()
        notes.append(f"{dropin}: removed; restart containerd (the imports line stays, it matches nothing)")
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(required=True, dest="command")
    for name in ("install", "check", "remove"):
        p = sub.add_parser(name)
        p.add_argument("--host-root", type=Path, default=Path("/"),
                       help="where the host's / is mounted (all other paths are the host's)")
        p.add_argument("--config", type=Path, default=Path("/etc/containerd/config.toml"))
        p.add_argument("--dropin", type=Path, default=Path("/etc/containerd/conf.d/peersync.toml"))
        p.add_argument("--hosts-dir", type=Path, default=Path("/etc/containerd/certs.d"))
    inst = sub.choices["install"]
    inst.add_argument("--socket", type=Path, default=Path("/run/peersync/peersync.sock"))
    inst.add_argument("--mirror", default="http://127.0.0.1:5380")
    inst.add_argument("--registry", action="append", default=[], help="registry host, or _default")
    inst.add_argument("--cri", choices=("auto", "always", "never"), default="auto")
    inst.add_argument("--add-import", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    try:
        notes = {"install": install, "check": check, "remove": remove}[args.command](args)
    except SetupError as exc:
        print(f"containerd-setup: {exc}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"peersync: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
