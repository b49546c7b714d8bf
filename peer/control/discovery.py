"""Where the addresses of the site's other nodes come from (docs/control-plane.md, "Discovery").

Three sources, merged into one candidate list (`Discovery.candidates()`):

- the static `[peer] peers` list (as before the control plane existed);
- `[peer] bootstrap`: addresses of a few nodes of a routed site, where multicast does not reach;
- DNS-SD over multicast DNS with `zeroconf`: every node registers an instance
  `<node id>._peersync._tcp.local.` whose TXT record carries `v=1`, `site`, `id`, `url` and the
  fields the election ranks by (`pri`, `started`, `cpus`, `mem`, `link`), and browses the same
  service type. A node of another site (TXT `site`) is ignored. With the rank fields in TXT, a
  site that boots together can rank its nodes before anyone has been asked anything.

Discovery only proposes addresses; membership decides who is alive.

Where multicast DNS speaks (`mdns_addresses`): the addresses named by `[discovery] interfaces`
(interface names or IPv4 addresses); by default the interface holding the `[peer] listen`
address, or every interface when the daemon listens on a wildcard address. IPv4 only.
`beyond_loopback` says, from the config alone, whether a daemon would multicast anywhere but
on loopback: the test harness refuses to start such a daemon outside a test network namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Callable

import ifaddr
import structlog
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from kernel.config import Config, hostport
from peer.policy.membership import Member

log = structlog.get_logger(__name__)

SERVICE = "_peersync._tcp.local."
TXT_VERSION = "1"
_WILDCARDS = ("", "0.0.0.0", "::")


def peer_urls(addresses: list[str]) -> list[str]:
    """`host:port` (or URL) entries as base URLs."""
    urls = [a if "://" in a else f"http://{a}" for a in addresses]
    return [u.rstrip("/") for u in urls]


def _is_ipv4(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 4
    except ValueError:
        return False


def _ipv4_of(ifname: str) -> list[str]:
    return [
        str(ip.ip)
        for adapter in ifaddr.get_adapters()
        if adapter.nice_name == ifname
        for ip in adapter.ips
        if isinstance(ip.ip, str)
    ]


def mdns_addresses(config: Config) -> list[str]:
    """The IPv4 addresses multicast DNS speaks on (empty: it is off, or nowhere to speak)."""
    if not config.discovery.mdns or not config.peer.listen:
        return []
    found: list[str] = []
    if config.discovery.interfaces:
        for entry in config.discovery.interfaces:
            addresses = [entry] if _is_ipv4(entry) else _ipv4_of(entry)
            if not addresses:
                log.warning("discovery interface has no IPv4 address; skipped", interface=entry)
            found += addresses
    else:
        host, _port = hostport(config.peer.listen)
        if host in _WILDCARDS:
            found = [str(ip.ip) for a in ifaddr.get_adapters() for ip in a.ips if isinstance(ip.ip, str)]
        else:
            with contextlib.suppress(OSError):
                found = [host if _is_ipv4(host) else socket.gethostbyname(host)]
    return list(dict.fromkeys(found))


def beyond_loopback(config: Config) -> list[str]:
    """What, besides loopback, this config's multicast DNS would speak on, judged from the
    config alone (interfaces that appear later included): empty when mDNS is off or confined to
    loopback (`lo`, 127.0.0.0/8)."""
    if not config.discovery.mdns or not config.peer.listen:
        return []
    if config.discovery.interfaces:
        entries = config.discovery.interfaces
    else:
        host, _port = hostport(config.peer.listen)
        if host in _WILDCARDS:
            return [f"every interface ([peer] listen = {config.peer.listen!r} is a wildcard)"]
        entries = [host]
    return [e for e in entries if e != "lo" and not (_is_ipv4(e) and ipaddress.ip_address(e).is_loopback)]


def txt_record(me: Member) -> dict[str, str]:
    """The TXT properties this node registers."""
    return {
        "v": TXT_VERSION,
        "site": me.site,
        "id": me.id,
        "url": me.url,
        "pri": str(me.priority),
        "started": repr(me.started),
        "cpus": str(me.cpus),
        "mem": str(me.mem_mib),
        "link": str(me.link_mbit),
    }


def parse_txt(properties: dict[bytes, bytes | None]) -> tuple[str, str, Member | None] | None:
    """(site, url, record or None) from another node's TXT properties, None if unusable."""
    props = {k.decode(errors="replace"): (v or b"").decode(errors="replace") for k, v in properties.items()}
    if props.get("v") != TXT_VERSION or not props.get("url") or not props.get("site"):
        return None
    record: Member | None = None
    with contextlib.suppress(ValueError, KeyError):
        record = Member.from_wire(
            {
                "id": props["id"],
                "url": props["url"],
                "site": props["site"],
                "started": float(props["started"]),
                "priority": int(props["pri"]),
                "cpus": int(props["cpus"]),
                "mem_mib": int(props["mem"]),
                "link_mbit": int(props["link"]),
            }
        )
    return props["site"], props["url"].rstrip("/"), record


class Discovery:
    """Candidate addresses from the static list, the bootstrap list and multicast DNS.

    Lifecycle: `await start()` (registers and browses when mDNS is on), `await stop()` (says
    goodbye). `on_change` is called when mDNS finds or loses a node."""

    def __init__(self, config: Config, me: Member, on_change: Callable[[], None] | None = None) -> None:
        self.me = me
        self.static = [u for u in peer_urls(config.peer.peers) if u != me.url]
        self.bootstrap = [u for u in peer_urls(config.peer.bootstrap) if u != me.url]
        self.addresses = mdns_addresses(config)
        self._on_change = on_change
        self._found: dict[str, tuple[str, Member | None]] = {}  # mDNS instance name -> (url, record)
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def mdns(self) -> bool:
        """Whether multicast DNS runs."""
        return self._zc is not None

    def candidates(self) -> dict[str, Member | None]:
        """Every proposed address (base URL) with the record mDNS announced for it, if any."""
        out: dict[str, Member | None] = dict.fromkeys([*self.static, *self.bootstrap])
        for url, record in self._found.values():
            if url != self.me.url:
                out[url] = record or out.get(url)
        return out

    async def start(self) -> None:
        if not self.addresses:
            log.info("multicast DNS off", mdns_interfaces=self.addresses)
            return
        self._zc = AsyncZeroconf(interfaces=list(self.addresses), ip_version=IPVersion.V4Only)
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE, handlers=[self._changed])
        task = asyncio.create_task(self._register(), name="mdns register")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        log.info("multicast DNS on", addresses=self.addresses)

    def _info(self) -> AsyncServiceInfo:
        host, _, port = self.me.url.split("://", 1)[-1].rpartition(":")
        host = host.strip("[]")
        packed = [socket.inet_aton(a) for a in ([host] if _is_ipv4(host) else self.addresses)]
        return AsyncServiceInfo(
            SERVICE,
            f"{self.me.id}.{SERVICE}",
            addresses=packed,
            port=int(port),
            properties=txt_record(self.me),
            server=f"peersync-{self.me.id}.local.",
        )

    async def _register(self) -> None:
        assert self._zc is not None
        try:
            announced = await self._zc.async_register_service(self._info())  # after probing
            await announced
        except Exception as exc:  # a name clash or a closed socket: discovery of us fails, not the daemon
            log.warning("multicast DNS registration failed", error=str(exc) or type(exc).__name__)

    def _changed(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if name == f"{self.me.id}.{SERVICE}":
            return
        if state_change is ServiceStateChange.Removed:
            if self._found.pop(name, None) is not None and self._on_change:
                self._on_change()
            return
        task = asyncio.create_task(self._resolve(name), name="mdns resolve")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, name: str) -> None:
        if self._zc is None:
            return
        info = AsyncServiceInfo(SERVICE, name)
        try:
            if not await info.async_request(self._zc.zeroconf, 3000):
                return
        except Exception as exc:  # zeroconf closing, or a malformed answer
            log.debug("multicast DNS resolution failed", name=name, error=str(exc))
            return
        parsed = parse_txt(info.properties)
        if parsed is None:
            return
        site, url, record = parsed
        if site != self.me.site or url == self.me.url:
            return  # another site on the same LAN, or ourselves under an old name
        known = self._found.get(name)
        self._found[name] = (url, record)
        if known != (url, record):
            log.info("discovered", url=url, id=record.id if record else None)
            if self._on_change:
                self._on_change()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._browser is not None:
            with contextlib.suppress(Exception):
                await self._browser.async_cancel()
            self._browser = None
        if self._zc is not None:
            with contextlib.suppress(Exception):
                await self._zc.async_close()  # goodbye packets: others drop us at once
            self._zc = None
