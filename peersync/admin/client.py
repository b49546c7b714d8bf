"""The CLI's side of the admin socket: one HTTP request per call over the unix socket.

Every failure to reach the daemon is one `DaemonUnreachable` whose message is the one line the
CLI prints: the socket is missing (the daemon is not running, or another root or config is
meant), refused (a stale socket of a daemon that died), or not accessible (not root).
"""

from __future__ import annotations

import errno
import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kernel.errors import PeerSyncError

TIMEOUT = 30.0


class DaemonUnreachable(PeerSyncError):
    """The admin socket cannot be used: why, in one line."""


class AdminError(PeerSyncError):
    """The daemon answered with an error (its message)."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            raise DaemonUnreachable(_why(self.path, exc)) from exc
        self.sock = sock


def _why(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return f"the daemon is not running (no admin socket at {path}; --admin-socket or --config to name it)"
    if exc.errno == errno.ECONNREFUSED:
        return f"the daemon is not running (nothing answers on {path})"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"cannot use the admin socket {path}: permission denied (run as root)"
    return f"cannot reach the daemon at {path}: {exc.strerror}"


class AdminClient:
    """Calls on the admin API (`peersync.admin.server` lists them)."""

    def __init__(self, path: Path, timeout: float = TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout

    def get(self, route: str) -> Any:
        return self._json("GET", route)

    def post(self, route: str, body: dict[str, Any] | None = None) -> Any:
        return self._json("POST", route, body or {})

    def text(self, route: str) -> str:
        resp = self._request("GET", route)
        data = resp.read()
        self._check(resp, data)
        return data.decode()

    def lines(self, route: str, body: dict[str, Any], timeout: float | None = None) -> Iterator[Any]:
        """POST `body` now (so an unreachable daemon raises here); the JSON lines of the answer,
        as they arrive."""
        resp = self._request("POST", route, body, timeout)
        if resp.status != 200:
            self._check(resp, resp.read())

        def each() -> Iterator[Any]:
            while line := resp.readline():
                yield json.loads(line)

        return each()

    def stream(self, route: str, timeout: float | None = None) -> http.client.HTTPResponse:
        """GET `route` and hand back the response to read (a seed tar)."""
        resp = self._request("GET", route, None, timeout)
        if resp.status != 200:
            self._check(resp, resp.read())
        return resp

    def _json(self, method: str, route: str, body: dict[str, Any] | None = None) -> Any:
        resp = self._request(method, route, body)
        data = resp.read()
        self._check(resp, data)
        return json.loads(data)

    def _request(self, method: str, route: str, body: dict[str, Any] | None = None,
                 timeout: float | None = None) -> http.client.HTTPResponse:
        conn = _UnixConnection(self.path, self.timeout if timeout is None else timeout)
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        try:
            conn.request(method, route, body=payload, headers=headers)
            return conn.getresponse()
        except DaemonUnreachable:
            raise
        except (OSError, http.client.HTTPException) as exc:
            raise DaemonUnreachable(f"the daemon at {self.path} did not answer: {exc}") from exc

    @staticmethod
    def _check(resp: http.client.HTTPResponse, data: bytes) -> None:
        if resp.status == 200:
            return
        try:
            message = json.loads(data)["error"]
        except (ValueError, KeyError, TypeError):
            message = data.decode(errors="replace")[:300] or resp.reason
        raise AdminError(f"{message} (HTTP {resp.status})")
