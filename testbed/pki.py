"""Site certificates for the testbed, made with the operator's own commands.

    site = SiteCA(workdir / "site")                 # `peersync site init --dir ...`
    cert = site.issue("n1", out, ips=["10.0.0.2"])  # `peersync site issue n1 --dir ... --ip ...`
    config += cert.toml()                           # the daemon's [tls] section
    ctx = cert.client_context()                     # a test client that is a site member

The commands run through `peersync.cli.main`, the entry point of the installed `peersync` script,
in this process (a child Python per certificate costs about a second on a loaded 2-core machine,
and the testbed issues one per daemon it starts). `loopback_site()` is the one CA of every daemon
this process starts on the host's loopback (they are one site: they list each other as peers);
each network-namespace site (`netns.Site.pki`) has its own.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import shutil
import ssl
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kernel.config import TlsConfig
from peer.tls import client_context, server_context

_CLI_LOCK = threading.Lock()  # redirect_stdout swaps the process's sys.stdout
_LOOPBACK: SiteCA | None = None
_LOOPBACK_LOCK = threading.Lock()


class SiteCommandFailed(RuntimeError):
    """`peersync site ...` exited non-zero (its message is in the text)."""


def peersync_site(*argv: str) -> str:
    """Run `peersync site ARGV...` in this process; its output, or SiteCommandFailed."""
    from peersync import cli

    out, err = io.StringIO(), io.StringIO()
    with _CLI_LOCK, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["site", *argv])
    if rc != 0:
        raise SiteCommandFailed(f"peersync site {' '.join(argv)}: exit {rc}: {err.getvalue().strip()}")
    return out.getvalue()


@dataclass(frozen=True)
class NodeCert:
    """A node's three files, as `peersync site issue` writes them."""

    ca: Path
    cert: Path
    key: Path

    @property
    def config(self) -> TlsConfig:
        return TlsConfig(ca=self.ca, cert=self.cert, key=self.key)

    def toml(self) -> str:
        """The daemon's `[tls]` section for these files."""
        keys = (("ca", self.ca), ("cert", self.cert), ("key", self.key))
        return "[tls]\n" + "".join(f"{k} = {json.dumps(str(v))}\n" for k, v in keys)

    def client_context(self) -> ssl.SSLContext:
        """What a site member's client uses: this certificate shown, the server's verified."""
        return client_context(self.config)

    def server_context(self) -> ssl.SSLContext:
        return server_context(self.config)


class SiteCA:
    """A site CA in `directory` (made there unless one exists already)."""

    def __init__(self, directory: Path, name: str = "testbed") -> None:
        self.directory = directory
        self.name = name
        self._client: NodeCert | None = None
        self._lock = threading.Lock()
        if not (directory / "ca.crt").exists():
            peersync_site("init", "--dir", str(directory), "--name", name)

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    def issue(
        self, node: str, out: Path | None = None, ips: Sequence[str] = ("127.0.0.1",), dns: Sequence[str] = ()
    ) -> NodeCert:
        """A certificate for `node` at `ips` / `dns` in `out` (default: the site dir's), replaced
        if there is one."""
        out = out or self.directory / "nodes" / node
        args = ["issue", node, "--dir", str(self.directory), "--out", str(out), "--force"]
        args += [a for ip in ips for a in ("--ip", ip)] + [a for d in dns for a in ("--dns", d)]
        peersync_site(*args)
        return NodeCert(out / "ca.crt", out / "node.crt", out / "node.key")

    def client(self) -> NodeCert:
        """One certificate for the test's own clients (stats, status): a site member like any node."""
        with self._lock:
            if self._client is None:
                self._client = self.issue("testbed-client")
            return self._client


def loopback_site() -> SiteCA:
    """The site CA of every daemon this process runs on the host's loopback (removed at exit)."""
    global _LOOPBACK
    with _LOOPBACK_LOCK:
        if _LOOPBACK is None:
            directory = Path(tempfile.mkdtemp(prefix="peersync-site-"))
            atexit.register(shutil.rmtree, directory, True)
            _LOOPBACK = SiteCA(directory / "ca", name="loopback")
        return _LOOPBACK
