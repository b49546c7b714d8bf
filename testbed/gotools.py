"""PeerSync's Go test tools (testbed/go/): built on demand, offline, from Debian's Go sources.

- `conformance`: containerd's own snapshots and content conformance suites
  (snapshots/testsuite, content/testsuite) run against real `peersync daemon`s through
  containerd's proxy clients; a `go test` binary, run under `go tool test2json`.
- `pull`: a client that pulls as nerdctl does for a snapshotter it does not know, and reports
  which layers containerd fetched and applied itself (see testbed/go/pull/main.go).

How the build works without a network: Debian packages containerd 1.6's sources
(golang-github-containerd-containerd-dev) and every dependency (other golang-*-dev packages)
under /usr/share/gocode/src, a GOPATH tree. In GOPATH mode (GO111MODULE=off) the go command
builds our packages, which live outside any GOPATH, against that tree, with no go.mod, no module
proxy and no downloads. The commands, from testbed/go/<tool>:

    GO111MODULE=off GOPATH=/usr/share/gocode GOPROXY=off GOFLAGS= CGO_ENABLED=0 \\
        GOCACHE=<repo>/.cache/go/build go test -c -o <bin> .      # conformance
    ... go build -o <bin> .                                         # pull

Binaries land in <repo>/.cache/go/bin (gitignored; PEERSYNC_GO_CACHE moves it), named by a
hash of their sources, the Go version and the Debian sources' version, so a binary is built once
and rebuilt only when one of those changes; Go's build cache makes a rebuild cheap.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .procs import CommandError, run_checked

REPO = Path(__file__).resolve().parents[1]
GO_SOURCES = Path(__file__).resolve().parent / "go"
DEBIAN_GOPATH = Path("/usr/share/gocode")
CONTAINERD_SOURCES = DEBIAN_GOPATH / "src" / "github.com" / "containerd" / "containerd"
CONTAINERD_SOURCES_PACKAGE = "golang-github-containerd-containerd-dev"
TOOLS = ("conformance", "pull")
# What the tools need: the go command and containerd's sources (with its suites).
REQUIRED = ("go", str(CONTAINERD_SOURCES / "snapshots" / "testsuite"))
APT_HINT = "apt-get install golang-go golang-github-containerd-containerd-dev (scripts/setup.sh does)"
BUILD_TIMEOUT = 900  # seconds  # a cold build of the conformance binary takes ~20 s of 2 cores


def missing_requirements() -> str | None:
    """Why the Go tools cannot be built here, or None when they can."""
    if shutil.which("go") is None:
        return f"Go is not installed ({APT_HINT})"
    if not (CONTAINERD_SOURCES / "snapshots" / "testsuite").is_dir():
        return f"containerd's Go sources are not under {DEBIAN_GOPATH} ({APT_HINT})"
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("PEERSYNC_GO_CACHE") or REPO / ".cache" / "go")


def go_env() -> dict[str, str]:
    """The environment of every go command: GOPATH mode over Debian's sources, nothing fetched."""
    env = dict(os.environ)
    env.update(
        GO111MODULE="off",
        GOPATH=str(DEBIAN_GOPATH),
        GOPROXY="off",
        GOFLAGS="",
        GOTOOLCHAIN="local",  # ignored by Go 1.19; stops a newer go from fetching a toolchain
        CGO_ENABLED="0",  # no C compiler needed
        GOCACHE=str(cache_dir() / "build"),
    )
    return env


def _source_key(tool: str) -> str:
    """Hash of the tool's sources, the Go version and the version of Debian's Go sources."""
    h = hashlib.sha256()
    h.update(run_checked(["go", "version"], env=go_env()).encode())
    h.update(_package_version(CONTAINERD_SOURCES_PACKAGE).encode())
    for path in sorted((GO_SOURCES / tool).rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(GO_SOURCES)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _package_version(package: str) -> str:
    try:
        return run_checked(["dpkg-query", "-W", "-f=${Version}", package])
    except (CommandError, FileNotFoundError):
        return ""


@contextlib.contextmanager
def _build_lock() -> Iterator[None]:
    """One build at a time across processes (concurrent test runs share the cache)."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build(tool: str) -> Path:
    """The tool's binary, built now if its sources changed since the last build."""
    if tool not in TOOLS:
        raise ValueError(f"unknown Go tool {tool!r} (one of {', '.join(TOOLS)})")
    reason = missing_requirements()
    if reason is not None:
        raise RuntimeError(reason)
    binary = cache_dir() / "bin" / f"{tool}-{_source_key(tool)}"
    with _build_lock():
        if binary.exists():
            return binary
        binary.parent.mkdir(parents=True, exist_ok=True)
        for old in binary.parent.glob(f"{tool}-*"):  # superseded builds of this tool
            old.unlink(missing_ok=True)
        tmp = binary.with_name(binary.name + ".tmp")
        command = ["go", "test", "-c"] if tool == "conformance" else ["go", "build"]
        command += ["-o", str(tmp), "."]
        done = subprocess.run(
            command,
            cwd=GO_SOURCES / tool,
            env=go_env(),
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
        )
        if done.returncode != 0:
            raise CommandError(command, done.returncode, done.stdout, done.stderr)
        tmp.rename(binary)
    return binary


# ---------------------------------------------------------------------------------------------------
# The conformance suites
# ---------------------------------------------------------------------------------------------------

SUITES = {"snapshots": "TestSnapshotter", "content": "TestContent"}
# A line of pkg/testutil.DumpDirOnFailure: "    helpers.go:66: drwxr-xr-x  4096 /tmp/..."
_DIR_LISTING = re.compile(r"^\s+helpers\.go:\d+: [-dlcbps][-rwxsStT]{9} ")


@dataclass
class SuiteRun:
    """The events of one `go test` run (test2json), by test name."""

    returncode: int
    events: list[dict[str, Any]] = field(default_factory=list)
    stderr: str = ""

    def outcomes(self, top: str) -> dict[str, str]:
        """Case (subtest of `top`) -> pass | fail | skip, for every case that finished."""
        prefix = top + "/"
        return {
            e["Test"][len(prefix) :]: e["Action"]
            for e in self.events
            if e.get("Test", "").startswith(prefix) and e["Action"] in ("pass", "fail", "skip")
        }

    def output(self, test: str, listings: bool = False) -> str:
        """What `test` printed (its t.Log lines, the suite's messages, daemon log tails); without
        `listings`, less the directory listing the suites dump on a failure (testutil)."""
        text = "".join(
            e.get("Output", "") for e in self.events if e.get("Test") == test and e["Action"] == "output"
        )
        if listings:
            return text
        return "".join(line for line in text.splitlines(keepends=True) if not _DIR_LISTING.match(line))

    def result(self, top: str) -> str | None:
        """pass | fail | skip of the top-level test, None if it never finished (a crash)."""
        for e in self.events:
            if e.get("Test") == top and e["Action"] in ("pass", "fail", "skip"):
                return str(e["Action"])
        return None

    def tail(self, max_chars: int = 6000) -> str:
        """The run's last output, for a failure message when a case never finished."""
        text = "".join(e.get("Output", "") for e in self.events if e["Action"] == "output")
        return (text + self.stderr)[-max_chars:]


def daemon_command() -> list[str]:
    """How the Go suites start `peersync daemon`: this interpreter, the source tree's CLI."""
    return [sys.executable, "-m", "peersync.cli"]


def run_suite(
    suite: str, workdir: Path, parallel: int = 2, timeout: float = 900.0, daemon: Sequence[str] | None = None
) -> SuiteRun:
    """Run one of containerd's suites (`snapshots` or `content`) against fresh daemons.

    The suites' temp dirs go under `workdir` (TMPDIR), the daemons' logs to `workdir/logs`.
    `parallel` caps the snapshot cases that run at once (each has its own daemon).
    """
    binary = build("conformance")
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    top = SUITES[suite]
    args = [
        "go", "tool", "test2json", "-t", str(binary),
        "-test.v", f"-test.run=^{top}$", f"-test.parallel={parallel}", "-test.timeout=30m",
        "-peersync.daemon", json.dumps(list(daemon or daemon_command())), "-peersync.logs", str(logs),
    ]  # fmt: skip
    env = go_env()
    env.update(TMPDIR=str(workdir), PYTHONPATH=str(REPO))
    done = subprocess.run(
        args, cwd=workdir, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )
    events = []
    for line in done.stdout.splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            events.append(json.loads(line))
    return SuiteRun(done.returncode, events, done.stderr)


# ---------------------------------------------------------------------------------------------------
# The pull client
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PullResult:
    image: str
    target: str
    seconds: float
    layers: int
    fetched_layers: int  # layers the client (containerd's pull) downloaded from the registry
    fetched: tuple[str, ...]
    applied_layers: int  # layers containerd's diff service applied (not unpacked by the snapshotter)
    applied: tuple[str, ...]


def go_pull(
    address: Path | str,
    namespace: str,
    snapshotter: str,
    hosts_dir: Path | str | None,
    ref: str,
    timeout: float = 600.0,
    env: Mapping[str, str] | None = None,
    prefix: Sequence[str] = (),
    plain_http: bool = False,
) -> PullResult:
    """Pull `ref` with the Go client (client.Pull, WithPullUnpack, no snapshotter info wrapper).

    `prefix` runs it under a command (`nsenter --net=...` on a testbed node: in containerd 1.6 the
    client process itself resolves and fetches, so it must reach the node's mirror); `plain_http`
    is ctr's flag of that name, for registries without a hosts.toml."""
    binary = build("pull")
    args = [*prefix, str(binary), "--address", str(address), "--namespace", namespace]
    args += ["--snapshotter", snapshotter]
    if hosts_dir is not None:
        args += ["--hosts-dir", str(hosts_dir)]
    if plain_http:
        args.append("--plain-http")
    out = run_checked([*args, "--json", ref], timeout=timeout, env=env)
    data = json.loads(out)
    return PullResult(
        data["image"], data["target"], data["seconds"], data["layers"],
        data["fetched_layers"], tuple(data["fetched"]), data["applied_layers"], tuple(data["applied"]),
    )  # fmt: skip


__all__ = [
    "PullResult",
    "REQUIRED",
    "SUITES",
    "SuiteRun",
    "build",
    "cache_dir",
    "go_env",
    "go_pull",
    "missing_requirements",
    "run_suite",
]
