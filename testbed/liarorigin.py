"""A registry that lies about blob sizes, for tests: a reverse proxy in front of a real registry.

    with lying_origin(registry, mode="head") as liar:
        ref = f"{liar.address}/repo:tag"   # pull through it, with the daemon's mirror in front

It relays every request to the real registry and passes the answers through unchanged, except
the declared size of blobs:
- `head`: a blob HEAD answers `Content-Length: HUGE` (1 TiB), the hostile HEAD that once made a
  daemon create a 1 TiB sparse partial file; GETs are honest;
- `range`: blob GETs declare the total as HUGE too (`Content-Range: bytes a-b/HUGE`, or the
  Content-Length of a whole-blob 200), bytes unchanged: a registry serving something other than
  the blob its manifest describes.
It counts the lies it told (`lies`). Plain HTTP on 127.0.0.1, a thread per request.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from testbed.registry import Registry

HUGE = 1 << 40
_BLOB = re.compile(r"^/v2/.+/blobs/sha256:[0-9a-f]{64}$")
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


@dataclass
class LyingOrigin:
    """The running proxy: where it listens, and what it did."""

    host: str
    port: int
    mode: str
    lies: int = 0
    requests: list[tuple[str, str]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _handler(upstream: Registry, state: LyingOrigin) -> type[BaseHTTPRequestHandler]:
    class Relay(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            return

        def do_HEAD(self) -> None:
            self._relay()

        def do_GET(self) -> None:
            self._relay()

        def _relay(self) -> None:
            path = self.path.split("?", 1)[0]
            state.requests.append((self.command, path))
            conn = http.client.HTTPConnection(upstream.address, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            conn.request(self.command, self.path, headers=headers)
            resp = conn.getresponse()
            out = {k: v for k, v in resp.getheaders() if k.lower() not in _HOP}
            length = resp.getheader("Content-Length")
            blob = bool(_BLOB.match(path)) and resp.status in (200, 206)
            declared = length
            if blob and self.command == "HEAD" and state.mode == "head":
                declared = str(HUGE)
                state.lies += 1
            if blob and self.command == "GET" and state.mode == "range":
                if resp.status == 206 and "Content-Range" in out:
                    out["Content-Range"] = out["Content-Range"].rsplit("/", 1)[0] + f"/{HUGE}"
                    state.lies += 1
                elif resp.status == 200:
                    declared = str(HUGE)  # a whole blob of HUGE bytes, it says, and then ends
                    state.lies += 1
            self.send_response(resp.status)
            for key, value in out.items():
                self.send_header(key, value)
            if declared is not None:
                self.send_header("Content-Length", declared)
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command == "GET":
                while chunk := resp.read(64 << 10):
                    self.wfile.write(chunk)
            conn.close()
            self.close_connection = True

    return Relay


@contextlib.contextmanager
def lying_origin(upstream: Registry, mode: str) -> Iterator[LyingOrigin]:
    """A lying proxy for `upstream` on a free loopback port, for the block's duration."""
    if mode not in ("head", "range"):
        raise ValueError(f"mode must be head or range, got {mode!r}")
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    state = LyingOrigin("127.0.0.1", server.server_address[1], mode)
    server.RequestHandlerClass = _handler(upstream, state)
    thread = threading.Thread(target=server.serve_forever, name="lying origin", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


__all__ = ["HUGE", "LyingOrigin", "lying_origin"]
