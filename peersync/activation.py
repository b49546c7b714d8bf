"""systemd socket activation: take the listening socket systemd holds for us (`peersync.socket`).

With activation the socket outlives the daemon: during a restart containerd's connections wait in
the kernel's backlog instead of being refused, so containerd does not fall into its reconnect
backoff (measured without it: about a second of UNAVAILABLE after every restart).
Protocol (sd_listen_fds(3)): LISTEN_PID is our pid, LISTEN_FDS the count, fds start at 3.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from kernel.errors import FailedPrecondition

SD_LISTEN_FDS_START = 3


def inherited_socket(expected: Path) -> socket.socket | None:
    """The listening unix socket systemd passed for `expected`, or None without activation.

    The environment variables are removed so that child processes do not take them for theirs."""
    pid, count = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    if pid is None or count is None or pid != str(os.getpid()):
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if int(count) != 1:
        raise FailedPrecondition(f"systemd passed {count} sockets; peersync takes exactly one")
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise FailedPrecondition("the socket systemd passed is not a unix stream socket")
    bound = sock.getsockname()
    if bound != str(expected):
        raise FailedPrecondition(
            f"systemd passed socket {bound!r} but the daemon is configured for {expected}"
        )
    sock.setblocking(False)
    return sock
