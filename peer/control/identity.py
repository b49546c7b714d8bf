"""Who this node is: its id, kept across restarts, and the record it announces to the site.

The node id is 16 random bytes in hex, made on first start and kept in `<root>/node-id`, so a
node keeps its place in the member table (and the tracker's index) across daemon restarts, and
a replaced disk is a new node. The record's capacity fields feed the election's rank
(`peer.policy.election.rank_key`): CPUs this process may use, memory, and the speed of the
link that holds the node's address (ethtool, asked through a socket of the node's own network
namespace: `/sys/class/net` would describe the host's interfaces under `nsenter --net`).
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import socket
import struct
import time
from pathlib import Path

import ifaddr
import structlog

from kernel.config import Config
from peer.policy.membership import NODE_ID, Member

log = structlog.get_logger(__name__)

_SIOCETHTOOL = 0x8946
_ETHTOOL_GSET = 0x00000001
_SPEED_UNKNOWN = 0xFFFFFFFF


def node_id(root: Path) -> str:
    """This node's id, from `<root>/node-id`; made (and kept, atomically) on first use."""
    path = root / "node-id"
    with contextlib.suppress(FileNotFoundError):
        text = path.read_text().strip()
        if NODE_ID.fullmatch(text):
            return text
        log.warning("node-id file unreadable; making a new id", path=str(path))
    new = os.urandom(16).hex()
    tmp = root / f".node-id.{os.getpid()}"
    root.mkdir(parents=True, exist_ok=True)
    tmp.write_text(new + "\n")
    os.replace(tmp, path)
    return new


def interface_of(address: str) -> str | None:
    """The name of the interface holding IPv4 `address`, or None."""
    for adapter in ifaddr.get_adapters():
        if any(isinstance(ip.ip, str) and ip.ip == address for ip in adapter.ips):
            return str(adapter.nice_name)
    return None


def link_mbit(ifname: str) -> int:
    """The link speed of `ifname` in Mbit/s (ethtool's ETHTOOL_GSET), 0 when unknown."""
    cmd = array.array("B", struct.pack("=I", _ETHTOOL_GSET) + bytes(40))
    address, _ = cmd.buffer_info()
    ifreq = struct.pack("16sP16x", ifname.encode()[:15], address)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            fcntl.ioctl(s.fileno(), _SIOCETHTOOL, ifreq)
    except OSError:
        return 0
    speed_lo, speed_hi = struct.unpack_from("=H", cmd, 12)[0], struct.unpack_from("=H", cmd, 28)[0]
    speed = speed_hi << 16 | speed_lo
    return 0 if speed in (0, _SPEED_UNKNOWN, 0xFFFF) else speed


def mem_mib() -> int:
    """Total memory in MiB (`/proc/meminfo`), 0 when unknown."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 0


def cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except OSError:
        return os.cpu_count() or 0


def local_record(config: Config, node: str, url: str, started: float | None = None) -> Member:
    """This node's member record (`started`: now, in wall-clock seconds, unless given)."""
    host = url.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    ifname = interface_of(host)
    return Member(
        id=node,
        url=url,
        site=config.site.name,
        started=round(time.time() if started is None else started, 3),
        priority=config.site.tracker_priority,
        cpus=cpus(),
        mem_mib=mem_mib(),
        link_mbit=link_mbit(ifname) if ifname else 0,
    )
