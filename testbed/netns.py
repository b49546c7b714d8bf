"""An emulated edge site on one machine: nodes on a LAN, a shaped uplink, a registry across the WAN.

Topology (every box is a network namespace named `<prefix>-<role>`; nothing is created in the root
namespace: no links, no addresses, no routes, so parallel sites can reuse the same addresses):

    <p>-n0  eth0 10.231.1.11 ─┐
    <p>-n1  eth0 10.231.1.12 ─┤  <p>-lan: bridge br0          <p>-wan: bridge br0
    ...                        ├─ ports n0, n1, ..., rtr       ports rtr, reg
                               │                                  │        │
    <p>-rtr  lan0 10.231.1.1 ──┘  wan0 10.231.2.1 ══ uplink ═════┘        └── <p>-reg eth0 10.231.2.10
             (ip_forward=1 here only)                                          docker-registry :5000

`partition(nodes)` moves those nodes' bridge ports to a second bridge (br1) in `<p>-lan`, cutting the
LAN in two with every link still up; `heal()` moves them back.

The uplink is the veth pair `<p>-rtr:wan0` <-> `<p>-wan:rtr`; each end has a `tbf` root qdisc
(egress of wan:rtr shapes WAN->LAN, egress of rtr:wan0 shapes LAN->WAN), so both directions are
limited to `uplink_mbit`; `set_uplink()` changes both mid-run. With `lan_mbit`, node links are
shaped the same way (node eth0 egress and the bridge port's egress); `set_node_rate()` shapes one
node's link (both ways), mid-run too. IPv6 is disabled in every
namespace so router solicitations and neighbour discovery do not add noise to the counters.

Counters come from `/proc/thread-self/net/dev` opened once per namespace by a thread that joined it
(`/sys/class/net` would show the root namespace's devices under `nsenter --net`, which does not
remount /sys). Processes run under `nsenter --net=/var/run/netns/NS --` (not `ip netns exec`, which
remounts /sys and hides the cgroup mounts from runc). Python code can run inside a namespace with
`site.call(ns, fn)`: a fresh thread setns()es into it, so sockets it creates belong there.

Pushing: the root namespace has no route into the site, so `site.push_image()` runs skopeo under
`nsenter --net` of the registry namespace to REGISTRY_IP:5000 (a local address there: the bytes go
over that namespace's loopback, never over the uplink, and the pushed reference is the one nodes pull).

Teardown (on any exit, and `cleanup_prefix()` for leftovers of a crashed run): services and spawned
processes are stopped by PID, any process still inside one of the site's namespaces (found with
`ip netns pids`) is SIGKILLed by PID, then the namespaces are deleted, which destroys their veths and
bridges. Auto-generated prefixes are `pst<creator pid>x<n>`; a new Site also removes the namespaces of
auto-named sites whose creator PID is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .containerd import Containerd, containerd_base, start_containerd
from .images import BuiltImage
from .peersyncd import PeerSyncDaemon, start_peersync
from .pki import SiteCA
from .procs import ManagedProcess, run_checked
from .registry import Registry, start_registry

T = TypeVar("T")

NETNS_DIR = Path("/var/run/netns")
LAN_PREFIX = "10.231.1"
WAN_PREFIX = "10.231.2"
ROUTER_LAN_IP = f"{LAN_PREFIX}.1"
ROUTER_WAN_IP = f"{WAN_PREFIX}.1"
REGISTRY_IP = f"{WAN_PREFIX}.10"
REGISTRY_PORT = 5000
FIRST_NODE_HOST = 11
MAX_NODES = 200
AUTO_PREFIX_FAMILY = "pst"
_AUTO_PREFIX = re.compile(rf"^{AUTO_PREFIX_FAMILY}(\d+)x\d+$")
_PREFIX_OK = re.compile(r"^[a-z][a-z0-9]{0,23}$")
_ROLE = r"(?:lan|wan|rtr|reg|n\d+)"
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_counter = itertools.count()

UPLINK_IF_ROUTER = "wan0"  # in <p>-rtr: rx = WAN->LAN bytes, tx = LAN->WAN bytes
UPLINK_IF_WAN = "rtr"  # in <p>-wan: the other end of the uplink veth pair
REQUIRED_TOOLS = ("ip", "tc", "nsenter", "sysctl")


class SiteError(RuntimeError):
    """Setting up or tearing down the emulated site failed."""


# ---------------------------------------------------------------------------------------------------
# Namespace primitives
# ---------------------------------------------------------------------------------------------------


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def nsenter_prefix(name: str) -> list[str]:
    """Command prefix that runs a program in network namespace `name` and nothing else (exec, no fork)."""
    return ["nsenter", f"--net={netns_path(name)}", "--"]


def call_in_netns(name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `fn(*args, **kwargs)` in a fresh thread that joined network namespace `name`; return its result.

    setns(CLONE_NEWNET) is per thread, so the caller stays where it is. Sockets created by `fn`
    belong to that namespace for their whole life, even when used from other threads later.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({name}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(fn(*args, **kwargs))
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def list_netns() -> list[str]:
    """Names of all named network namespaces (`ip netns list`)."""
    out = run_checked(["ip", "netns", "list"])
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(name: str) -> list[int]:
    """PIDs of processes whose network namespace is `name`."""
    try:
        out = run_checked(["ip", "netns", "pids", name], timeout=30)
    except Exception:  # namespace already gone
        return []
    return [int(p) for p in out.split() if p.isdigit()]


def _kill_and_delete(names: Sequence[str]) -> list[str]:
    """SIGKILL every process inside `names` (by PID), delete the namespaces; return problems."""
    problems = []
    for _ in range(3):
        pids = [pid for name in names for pid in netns_pids(name) if pid != os.getpid()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    for name in names:
        if not netns_path(name).exists():
            continue
        try:
            run_checked(["ip", "netns", "del", name], timeout=30)
        except Exception as exc:  # report all, keep going
            problems.append(f"ip netns del {name}: {exc}")
    return problems


def cleanup_prefix(prefix: str) -> list[str]:
    """Remove every namespace of site `prefix` (a crashed run's leftovers); return the names removed."""
    pattern = re.compile(rf"^{re.escape(prefix)}-{_ROLE}$")
    names = [n for n in list_netns() if pattern.match(n)]
    problems = _kill_and_delete(names)
    if problems:
        raise SiteError("; ".join(problems))
    return names


def cleanup_stale_sites() -> list[str]:
    """Remove namespaces of auto-named sites whose creating process no longer exists."""
    removed = []
    prefixes = {n.split("-", 1)[0] for n in list_netns() if "-" in n}
    for prefix in sorted(prefixes):
        match = _AUTO_PREFIX.match(prefix)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            removed += cleanup_prefix(prefix)
    return removed


def missing_tools() -> str | None:
    """Why a Site cannot be built here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing tools: {', '.join(missing)} (apt-get install iproute2 util-linux procps)"
    return None


# ---------------------------------------------------------------------------------------------------
# Traffic counters and the uplink sampler
# ---------------------------------------------------------------------------------------------------


class NetDevReader:
    """Byte counters of every interface in one namespace, from /proc/thread-self/net/dev.

    The file is opened once by a thread inside the namespace; re-reading it (pread from 0) always
    reports that namespace. The open file pins the namespace, so `close()` it before deleting it.
    """

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self._lock = threading.Lock()
        self._fd: int | None = call_in_netns(
            netns, lambda: os.open("/proc/thread-self/net/dev", os.O_RDONLY | os.O_CLOEXEC)
        )

    def read(self) -> dict[str, tuple[int, int]]:
        """{interface: (rx_bytes, tx_bytes)}."""
        with self._lock:
            if self._fd is None:
                raise SiteError(f"counters of {self.netns} are closed")
            chunks, offset = [], 0
            while chunk := os.pread(self._fd, 65536, offset):
                chunks.append(chunk)
                offset += len(chunk)
        out = {}
        for line in b"".join(chunks).decode().splitlines()[2:]:
            name, _, rest = line.partition(":")
            fields = rest.split()
            out[name.strip()] = (int(fields[0]), int(fields[8]))
        return out

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


@dataclass(frozen=True)
class Sample:
    """Cumulative uplink counters at monotonic time `t`."""

    t: float
    down_bytes: int  # WAN -> LAN
    up_bytes: int  # LAN -> WAN


class UplinkSampler:
    """Background thread recording the uplink's cumulative byte counters every `interval` seconds."""

    def __init__(self, reader: Callable[[], tuple[int, int]], interval: float = 0.1) -> None:
        self._read = reader
        self.interval = interval
        self._samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="uplink-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.sample_now()
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def sample_now(self) -> Sample | None:
        """Take one sample now (None if the counters cannot be read, e.g. during teardown)."""
        try:
            down, up = self._read()
        except Exception:  # the site is going away; keep what we have
            return None
        sample = Sample(time.monotonic(), down, up)
        with self._lock:
            self._samples.append(sample)
        return sample

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def samples(self, since: float | None = None) -> list[Sample]:
        with self._lock:
            return [s for s in self._samples if since is None or s.t >= since]

    def series(self, since: float | None = None, direction: str = "down") -> list[tuple[float, float]]:
        """[(t, Mbit/s over the interval ending at t)] for `direction` "down" (WAN->LAN) or "up"."""
        samples = self.samples(since)
        out = []
        for a, b in itertools.pairwise(samples):
            dt = b.t - a.t
            if dt > 0:
                delta = (b.down_bytes - a.down_bytes) if direction == "down" else (b.up_bytes - a.up_bytes)
                out.append((b.t, delta * 8 / dt / 1e6))
        return out

    def peak_mbit(self, since: float | None = None, window: float = 0.5, direction: str = "down") -> float:
        """Highest average Mbit/s over any `window`-second span of samples (0.0 with too few)."""
        samples = self.samples(since)
        best, j = 0.0, 0
        for i, end in enumerate(samples):
            while j < i and end.t - samples[j + 1].t >= window:
                j += 1
            start = samples[j]
            dt = end.t - start.t
            if i > j and dt > 0:
                delta = (
                    end.down_bytes - start.down_bytes
                    if direction == "down"
                    else end.up_bytes - start.up_bytes
                )
                best = max(best, delta * 8 / dt / 1e6)
        return best


# ---------------------------------------------------------------------------------------------------
# The site
# ---------------------------------------------------------------------------------------------------


@dataclass
class SiteNode:
    """One edge node: a namespace with one LAN interface (eth0) and a default route via the router."""

    site: Site
    index: int
    netns: str
    ip: str
    workdir: Path
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @property
    def name(self) -> str:
        return f"n{self.index}"

    @property
    def prefix(self) -> list[str]:
        return nsenter_prefix(self.netns)

    def spawn(
        self, args: Sequence[str], log_path: Path | None = None, env: Mapping[str, str] | None = None
    ) -> ManagedProcess:
        log = log_path or self.workdir / f"{Path(str(args[0])).name}.log"
        return self.site.spawn(self.netns, args, log, env)

    def run(self, *args: str, timeout: float = 120.0) -> str:
        return self.site.run(self.netns, args, timeout=timeout)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return call_in_netns(self.netns, fn, *args, **kwargs)

    def start_containerd(
        self, extra_config: str | Mapping[str, Any] | None = None, **kwargs: Any
    ) -> Containerd:
        """A private containerd (and thus its shims and containers) inside this node's namespace.

        Its unix socket is reachable from the root namespace, so `ctr` helpers work unchanged.
        Stopped with the node (`stop_services()`) or the site.
        """
        logs = Path(tempfile.mkdtemp(prefix="containerd-", dir=self.workdir))
        kwargs.setdefault("base", containerd_base(self.site.scratch))  # on the run's filesystem
        cm = start_containerd(logs, extra_config=extra_config, prefix=self.prefix, **kwargs)
        return self.stack.enter_context(cm)

    def start_peersync(
        self, *args: str, workdir: Path | None = None, config: str | None = None, python: str | None = None
    ) -> PeerSyncDaemon:
        """`peersync daemon` inside this node's namespace; stopped with the node or the site. A
        config without `[tls]` gets a certificate for this node's address from the site's CA."""
        work = workdir or Path(tempfile.mkdtemp(prefix=f"peersync-{self.name}-", dir=self.workdir))
        daemon = start_peersync(
            work, *args, prefix=self.prefix, config=config, python=python, site=self.site.pki, addresses=[self.ip]
        )
        return self.stack.enter_context(daemon)

    def stop_services(self) -> None:
        """Stop this node's containerd/peersync (reverse start order)."""
        self.stack.close()

    def rx_bytes(self) -> int:
        return self.site.link_bytes(self.netns, "eth0")[0]

    def tx_bytes(self) -> int:
        return self.site.link_bytes(self.netns, "eth0")[1]


class Site:
    """N nodes on a LAN, a router with a tbf-shaped uplink, and a registry namespace on the WAN side.

    with Site(nodes=3, uplink_mbit=50) as site:
        site.start_registry()
        ref = site.push_image(image, "repo")
        ctrd = site.nodes[0].start_containerd()
        ctrd.pull(ref)
        print(site.uplink_bytes(), site.sampler.peak_mbit())
    """

    def __init__(
        self,
        nodes: int = 3,
        uplink_mbit: float | None = 100.0,
        lan_mbit: float | None = None,
        burst_bytes: int | None = None,
        latency_ms: float = 50.0,
        prefix: str | None = None,
        workdir: Path | None = None,
        sample_interval: float = 0.1,
        scratch: Path | None = None,
    ) -> None:
        """`burst_bytes` defaults to max(32 KiB, 5 ms at the rate); `latency_ms` bounds the tbf queue.
        `scratch` is a short directory on the filesystem the run's containerds keep their roots
        on (`testbed.scratchfs`; default /tmp).

        An explicit `prefix` (lowercase letters/digits) is cleaned up first if a crashed run left it;
        without one, a unique `pst<pid>x<n>` is used.
        """
        if not 1 <= nodes <= MAX_NODES:
            raise ValueError(f"nodes must be 1..{MAX_NODES}")
        if prefix is not None and not _PREFIX_OK.match(prefix):
            raise ValueError(f"prefix {prefix!r}: lowercase letters and digits, starting with a letter")
        self.prefix = prefix or f"{AUTO_PREFIX_FAMILY}{os.getpid()}x{next(_counter)}"
        self.node_count = nodes
        self.uplink_mbit = uplink_mbit or 0.0  # 0: unshaped, as set_uplink keeps it
        self.lan_mbit = lan_mbit
        self.burst_bytes = burst_bytes
        self.latency_ms = latency_ms
        self.sample_interval = sample_interval
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="site-"))
        self.scratch = scratch or Path("/tmp")
        self.nodes: list[SiteNode] = []
        self.registry: Registry | None = None
        self._stack = contextlib.ExitStack()
        self._procs: list[ManagedProcess] = []
        self._readers: dict[str, NetDevReader] = {}
        self._readers_lock = threading.Lock()
        self.sampler = UplinkSampler(self._uplink_counters, sample_interval)
        self._split: set[int] = set()  # node indices on the second bridge (partition())
        self._started = False
        self._pki: SiteCA | None = None
        self._pki_lock = threading.Lock()

    @property
    def pki(self) -> SiteCA:
        """This site's CA (made with `peersync site init` on first use, in the site's workdir):
        daemons started on its nodes get their certificates from it."""
        with self._pki_lock:
            if self._pki is None:
                self._pki = SiteCA(self.workdir / "pki", name=self.prefix)
            return self._pki

    # --- names ---------------------------------------------------------------------------------

    def ns(self, role: str) -> str:
        """Namespace name of `role`: lan, wan, rtr, reg, or n<i>."""
        return f"{self.prefix}-{role}"

    @property
    def lan_ns(self) -> str:
        return self.ns("lan")

    @property
    def wan_ns(self) -> str:
        return self.ns("wan")

    @property
    def router_ns(self) -> str:
        return self.ns("rtr")

    @property
    def registry_ns(self) -> str:
        return self.ns("reg")

    @property
    def registry_ip(self) -> str:
        return REGISTRY_IP

    @property
    def namespaces(self) -> list[str]:
        return [self.lan_ns, self.wan_ns, self.router_ns, self.registry_ns] + [
            self.ns(f"n{i}") for i in range(self.node_count)
        ]

    # --- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> Site:
        self.start()
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        problems = self.close()
        if problems and exc is None:
            raise SiteError("teardown: " + "; ".join(problems))

    def start(self) -> Site:
        reason = missing_tools()
        if reason:
            raise SiteError(reason)
        with contextlib.suppress(Exception):
            cleanup_stale_sites()
        cleanup_prefix(self.prefix)
        self._started = True
        try:
            self._build()
            self.sampler.start()
        except BaseException:
            self.close()
            raise
        return self

    def _ip(self, ns: str, *args: str) -> None:
        run_checked(["ip", "-n", ns, *args], timeout=30)

    def _build(self) -> None:
        for name in self.namespaces:
            run_checked(["ip", "netns", "add", name])
            self._sysctl(name, "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
            self._ip(name, "link", "set", "lo", "up")
        lan, wan, rtr, reg = self.lan_ns, self.wan_ns, self.router_ns, self.registry_ns
        for bridge_ns in (lan, wan):
            self._ip(
                bridge_ns, "link", "add", "br0", "type", "bridge", "forward_delay", "0", "stp_state", "0"
            )
            self._ip(bridge_ns, "link", "set", "br0", "up")
        # Router: lan0 on the LAN bridge, wan0 = the uplink into the WAN bridge.
        self._veth(rtr, "lan0", lan, "rtr", bridge_side=lan)
        self._veth(rtr, UPLINK_IF_ROUTER, wan, UPLINK_IF_WAN, bridge_side=wan)
        self._ip(rtr, "addr", "add", f"{ROUTER_LAN_IP}/24", "dev", "lan0")
        self._ip(rtr, "addr", "add", f"{ROUTER_WAN_IP}/24", "dev", UPLINK_IF_ROUTER)
        self._sysctl(rtr, "net.ipv4.ip_forward=1")
        # Registry host on the WAN.
        self._veth(reg, "eth0", wan, "reg", bridge_side=wan)
        self._ip(reg, "addr", "add", f"{REGISTRY_IP}/24", "dev", "eth0")
        self._ip(reg, "route", "add", "default", "via", ROUTER_WAN_IP)
        # Nodes on the LAN.
        for i in range(self.node_count):
            ns, ip = self.ns(f"n{i}"), f"{LAN_PREFIX}.{FIRST_NODE_HOST + i}"
            self._veth(ns, "eth0", lan, f"n{i}", bridge_side=lan)
            self._ip(ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            self._ip(ns, "route", "add", "default", "via", ROUTER_LAN_IP)
            work = self.workdir / f"n{i}"
            work.mkdir(parents=True, exist_ok=True)
            self.nodes.append(SiteNode(self, i, ns, ip, work))
            if self.lan_mbit:
                self._shape(ns, "eth0", self.lan_mbit)
                self._shape(lan, f"n{i}", self.lan_mbit)
        self.set_uplink(self.uplink_mbit)
        self._wait_links_up()

    def _wait_links_up(self, timeout: float = 10.0) -> None:
        """Wait until every link reports operstate UP.

        veth carrier changes reach the qdisc layer through linkwatch, which batches them for up to a
        second; until then a port with a non-default qdisc (our tbf) drops what it should send.
        """
        deadline = time.monotonic() + timeout
        while True:
            down = []
            for ns in self.namespaces:
                links = json.loads(run_checked(["ip", "-n", ns, "-j", "link", "show"], timeout=30))
                down += [f"{ns}:{link['ifname']}" for link in links if link.get("operstate") == "DOWN"]
            if not down:
                return
            if time.monotonic() > deadline:
                raise SiteError(f"links not up after {timeout:.0f}s: {down}")
            time.sleep(0.05)

    def _veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str, bridge_side: str | None = None) -> None:
        """A veth pair created directly inside the two namespaces (never visible in the root one)."""
        self._ip(ns_a, "link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)
        if bridge_side == ns_b:
            self._ip(ns_b, "link", "set", if_b, "master", "br0")
        self._ip(ns_a, "link", "set", if_a, "up")
        self._ip(ns_b, "link", "set", if_b, "up")

    def _sysctl(self, ns: str, *settings: str) -> None:
        run_checked([*nsenter_prefix(ns), "sysctl", "-q", "-w", *settings])

    def _tbf_args(self, mbit: float) -> list[str]:
        rate_bytes = mbit * 1e6 / 8
        burst = self.burst_bytes or max(32 * 1024, int(rate_bytes * 0.005))
        return [
            "tbf",
            "rate",
            f"{int(mbit * 1000)}kbit",
            "burst",
            str(burst),
            "latency",
            f"{self.latency_ms}ms",
        ]

    def _shape(self, ns: str, ifname: str, mbit: float | None) -> None:
        if mbit:
            cmd = ["tc", "-n", ns, "qdisc", "replace", "dev", ifname, "root", *self._tbf_args(mbit)]
            run_checked(cmd, timeout=30)
        else:
            with contextlib.suppress(Exception):
                run_checked(["tc", "-n", ns, "qdisc", "del", "dev", ifname, "root"], timeout=30)

    def partition(self, nodes: Sequence[int]) -> None:
        """Cut the LAN in two: the ports of `nodes` (indices) move from the LAN bridge to a second
        bridge, br1, in the same namespace. Each side keeps its own broadcast domain (ARP, mDNS)
        and its links stay up; the side without the router loses the uplink too. `heal()` undoes it.
        """
        lan = self.lan_ns
        if not self._split:
            with contextlib.suppress(Exception):
                self._ip(lan, "link", "del", "br1")
            self._ip(lan, "link", "add", "br1", "type", "bridge", "forward_delay", "0", "stp_state", "0")
            self._ip(lan, "link", "set", "br1", "up")
        for i in nodes:
            self._ip(lan, "link", "set", f"n{i}", "master", "br1")
            self._split.add(i)

    def heal(self) -> None:
        """Join the two sides of a `partition()` again: every node port back on br0."""
        for i in sorted(self._split):
            self._ip(self.lan_ns, "link", "set", f"n{i}", "master", "br0")
        self._split.clear()
        with contextlib.suppress(Exception):
            self._ip(self.lan_ns, "link", "del", "br1")

    def set_node_rate(self, index: int, mbit: float | None) -> None:
        """Shape node `index`'s LAN link to `mbit` Mbit/s both ways (its eth0 egress: what it sends;
        the bridge port's egress: what it receives), mid-run if need be; None or 0: unshaped. Peers
        of different speeds on one LAN, or one that slows down while others download from it."""
        node = self.nodes[index]
        self._shape(node.netns, "eth0", mbit)
        self._shape(self.lan_ns, node.name, mbit)

    def set_uplink(self, mbit: float | None) -> None:
        """Shape both directions of the uplink to `mbit` Mbit/s (None or 0: unshaped), mid-run."""
        self._shape(self.wan_ns, UPLINK_IF_WAN, mbit)  # WAN -> LAN
        self._shape(self.router_ns, UPLINK_IF_ROUTER, mbit)  # LAN -> WAN
        self.uplink_mbit = mbit or 0.0

    def qdisc(self, ns: str, ifname: str) -> str:
        """`tc qdisc show` for one interface (for checks and reports)."""
        return run_checked(["tc", "-n", ns, "qdisc", "show", "dev", ifname]).strip()

    def close(self) -> list[str]:
        """Tear everything down; safe to call twice and after a failed start. Returns problems."""
        problems: list[str] = []
        if not self._started:
            return problems
        for node in reversed(self.nodes):
            try:
                node.stop_services()
            except Exception as exc:  # keep tearing down
                problems.append(f"{node.name} services: {exc}")
        try:
            self._stack.close()
        except Exception as exc:
            problems.append(f"site services: {exc}")
        for proc in reversed(self._procs):
            try:
                proc.stop(timeout=5)
            except Exception as exc:
                problems.append(f"{proc.args[:4]}: {exc}")
        self.sampler.stop()
        with self._readers_lock:
            for reader in self._readers.values():
                reader.close()
            self._readers.clear()
        problems += _kill_and_delete(self.namespaces)
        left = [n for n in self.namespaces if netns_path(n).exists()]
        if left:
            problems.append(f"namespaces left: {left}")
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self._started = False
        return problems

    # --- processes -----------------------------------------------------------------------------

    def spawn(
        self, ns: str, args: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
    ) -> ManagedProcess:
        """Start `args` in namespace `ns` (full name, e.g. `site.registry_ns`); stopped by PID on teardown."""
        proc = ManagedProcess([*nsenter_prefix(ns), *args], log_path, env)
        self._procs.append(proc)
        return proc.start()

    def run(
        self, ns: str, args: Sequence[str], timeout: float = 120.0, input_bytes: bytes | None = None
    ) -> str:
        """Run a short command in namespace `ns`; stdout, or CommandError with stderr."""
        return run_checked([*nsenter_prefix(ns), *args], timeout=timeout, input_bytes=input_bytes)

    def call(self, ns: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run Python `fn` in namespace `ns` (see `call_in_netns`)."""
        return call_in_netns(ns, fn, *args, **kwargs)

    # --- registry ------------------------------------------------------------------------------

    def start_registry(self, **kwargs: Any) -> Registry:
        """docker-registry in the registry namespace on REGISTRY_IP:5000 (kwargs: auth, proxy_remote)."""
        if self.registry is not None:
            raise SiteError("registry already started")
        cm = start_registry(
            self.workdir / "registry",
            host=REGISTRY_IP,
            port=REGISTRY_PORT,
            prefix=nsenter_prefix(self.registry_ns),
            run_probe=lambda check: call_in_netns(self.registry_ns, check),
            **kwargs,
        )
        self.registry = self._stack.enter_context(cm)
        return self.registry

    def push_image(self, image: BuiltImage, repo: str, tag: str | None = None) -> str:
        """Copy an OCI layout into the site registry (skopeo inside the registry namespace); return the ref.

        The traffic stays on the registry namespace's loopback: it never touches the uplink counters.
        """
        if self.registry is None:
            raise SiteError("start_registry() first")
        ref = self.registry.ref(repo, tag or image.tag)
        args = [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--quiet",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ]
        if self.registry.credentials is not None:
            args += ["--dest-creds", self.registry.credentials.colon]
        self.run(self.registry_ns, [*args, f"oci:{image.layout}:{image.tag}", f"docker://{ref}"], timeout=600)
        return ref

    # --- counters ------------------------------------------------------------------------------

    def _reader(self, ns: str) -> NetDevReader:
        with self._readers_lock:
            if not self._started:
                raise SiteError("site is not running")
            if ns not in self._readers:
                self._readers[ns] = NetDevReader(ns)
            return self._readers[ns]

    def link_bytes(self, ns: str, ifname: str) -> tuple[int, int]:
        """(rx_bytes, tx_bytes) of interface `ifname` in namespace `ns` since the site was built."""
        return self._reader(ns).read()[ifname]

    def _uplink_counters(self) -> tuple[int, int]:
        return self.link_bytes(self.router_ns, UPLINK_IF_ROUTER)

    def uplink_bytes(self) -> int:
        """Bytes (Ethernet frames) that crossed the uplink from WAN to LAN since the site was built."""
        return self._uplink_counters()[0]

    def uplink_bytes_up(self) -> int:
        """Bytes that crossed the uplink from LAN to WAN (requests, ACKs, uploads)."""
        return self._uplink_counters()[1]

    def lan_bytes(self) -> int:
        """Bytes all nodes received on their LAN interface: from peers plus what the router forwarded.

        Peer-to-peer traffic alone is about `lan_bytes() - lan_bytes_from_router()`.
        """
        return sum(self.link_bytes(node.netns, "eth0")[0] for node in self.nodes)

    def lan_bytes_from_router(self) -> int:
        """Bytes the router sent onto the LAN (uplink traffic on its way to nodes, plus ICMP etc.)."""
        return self.link_bytes(self.router_ns, "lan0")[1]

    # --- measurements --------------------------------------------------------------------------

    def timed_transfer(
        self, src_ns: str, src_ip: str, dst_ns: str, nbytes: int, timeout: float = 120.0
    ) -> float:
        """Send `nbytes` over one TCP connection from `src_ns` (listening on src_ip) to `dst_ns`.

        Returns the seconds from connect to the last byte received (incompressible payload, sent
        from a socket created in src_ns, received by a socket created in dst_ns).
        """
        listener = self.call(src_ns, socket.create_server, (src_ip, 0))
        listener.settimeout(timeout)
        port = listener.getsockname()[1]
        payload = os.urandom(1 << 20)
        errors: list[BaseException] = []

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                with conn:
                    left = nbytes
                    while left > 0:
                        n = min(left, len(payload))
                        conn.sendall(payload[:n])
                        left -= n
            except BaseException as exc:  # reported below
                errors.append(exc)

        sender = threading.Thread(target=serve, daemon=True)
        sender.start()
        try:
            sock = self.call(dst_ns, socket.create_connection, (src_ip, port), timeout)
            with sock:
                started = time.monotonic()
                got = 0
                while got < nbytes:
                    chunk = sock.recv(1 << 20)
                    if not chunk:
                        break
                    got += len(chunk)
                elapsed = time.monotonic() - started
        finally:
            sender.join(timeout=timeout)
            listener.close()
        if errors:
            raise SiteError(f"transfer sender failed: {errors[0]!r}")
        if got != nbytes:
            raise SiteError(f"transfer received {got} of {nbytes} bytes")
        return elapsed


def site_processes_alive(pids: Sequence[int]) -> list[int]:
    """The PIDs among `pids` that still exist (not counting zombies), for teardown checks."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if state != "Z":
            alive.append(pid)
    return alive


__all__ = [
    "LAN_PREFIX",
    "REGISTRY_IP",
    "REGISTRY_PORT",
    "ROUTER_LAN_IP",
    "ROUTER_WAN_IP",
    "WAN_PREFIX",
    "NetDevReader",
    "Sample",
    "Site",
    "SiteError",
    "SiteNode",
    "UplinkSampler",
    "call_in_netns",
    "cleanup_prefix",
    "cleanup_stale_sites",
    "list_netns",
    "missing_tools",
    "netns_pids",
    "nsenter_prefix",
    "site_processes_alive",
]
