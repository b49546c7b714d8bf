"""Daemon configuration: a TOML file with documented defaults, overridden by CLI flags.

Every key is optional; an unknown key or a value of the wrong type is an error that names the
key, so a typo in an operator's config never silently falls back to a default. The defaults are
what `peersync config-defaults` prints (see `DEFAULT_TOML`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from kernel.errors import InvalidArgument

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_D = TypeVar("_D", bound="DataclassInstance")

MIB = 1 << 20
PEER_CHOICES = ("bound", "ewma", "random")  # [peer] choice (peer.policy.choice.Rule)

DEFAULT_TOML = """\
# PeerSync daemon configuration (all keys optional; these are the defaults).

# Where blobs, snapshots and metadata live. Needs a filesystem that supports overlayfs upper dirs.
root = "/var/lib/peersync"
# The unix socket that containerd's proxy_plugins connect to.
socket = "/run/peersync/peersync.sock"

[log]
# debug, info, warning, error
level = "info"
# "console" for people, "json" for log collectors, "auto": console when the log stream (stderr)
# is a terminal, JSON otherwise (under systemd, in a container, into a file)
format = "auto"

[store]
# Blobs are cut into chunks of this many bytes: the unit of integrity checks and of peer exchange.
# 1 MiB was chosen by measurement (bench/chunksize.py, see bench/RESULTS.md).
chunk_size = 1048576

[snapshotter]
# Unpack layers in the daemon when containerd names the snapshot it wants by its chain ID (the
# remote-snapshot handshake: CRI's pulls, containerd's client `Pull(WithPullUnpack)` as nerdctl
# and Go programs make them, containerd 1.7/2.x's unpacker): the layer streams from peers into the
# snapshot as it downloads, instead of containerd reading it back through 32 KiB Read RPCs.
# Which layer a chain ID is made of comes from the manifests and configs the daemon has seen.
# `ctr images pull` of containerd 1.6 never names the snapshot: see containerd_address below.
unpack_layers = true
# Layers of the same image unpacked ahead of containerd's Prepares, at once (each as soon as its
# blob streams in; the one containerd waits for always runs besides). 0 unpacks one at a time.
unpack_ahead = 2
# Layer blobs downloaded at once ahead of the daemon's unpack, in image order; a blob being read
# always downloads. The origin striping between nodes is sensitive to it (bench/RESULTS.md).
prefetch_layers = 2
# containerd's own socket, for the clients that apply layers themselves (`ctr images pull` of
# containerd 1.6: it asks containerd's metadata for each layer's chain ID and reads the blob back
# through 32 KiB Read RPCs when there is none). With an address, the daemon prepares such an
# image's chains through containerd itself, as containerd's unpacker would, and unpacks them
# while the blobs arrive; the client then finds every layer committed. "" leaves those clients
# to apply the layers themselves. It must be the containerd whose proxy plugins use this daemon.
containerd_address = ""
# The name containerd's config gives this daemon's snapshot proxy plugin (what
# `ctr images pull --snapshotter` names).
containerd_snapshotter = "peersync"
# Seconds such a client's unpack waits, at most, for the daemon to commit the image's chains.
client_unpack_wait = 600.0

[peer]
# Where the peer exchange listens (other nodes fetch chunks here); "" disables it.
listen = "0.0.0.0:5381"
# The URL other nodes reach this one at; default: https://<listen> (http:// when [tls] insecure)
# with the host's address.
advertise = ""
# A fixed list of the other nodes of the site, "host:port". Not needed on one LAN segment, where
# nodes find each other by DNS-SD over multicast DNS ([discovery]); it keeps working beside it.
peers = []
# Addresses ("host:port") of a few nodes of a routed site (where multicast does not reach): a new
# node asks them who the site's members and tracker are, then learns the rest from the tracker.
bootstrap = []
# This node's own subnets (CIDR, e.g. ["10.20.0.0/16"]): peers inside them are preferred when
# choosing whom to ask for a chunk. Empty: the /24 (IPv4) or /64 (IPv6) around this node's address.
subnets = []
# How peers are chosen per chunk: "bound" (the smallest predicted upper bound on response time,
# learned online). "ewma" (the rule before it) and "random" are baselines for benchmarks only.
choice = "bound"

[site]
# Nodes of other sites on the same LAN are ignored. The same file on every node is enough.
name = "default"
# Tracker election preference: higher first, then link speed, CPUs, memory, uptime, node id
# (docs/control-plane.md). A negative value means this node never becomes the tracker.
tracker_priority = 0

[discovery]
# Find the site's other nodes by DNS-SD (service _peersync._tcp) over multicast DNS.
mdns = true
# Interfaces (names or addresses) multicast DNS speaks on; empty: the interface holding the
# [peer] listen address (every interface when it listens on a wildcard address).
interfaces = []

[tls]
# Site membership (docs/tls.md): every peer exchange, tracker and discovery request on [peer]
# listen is mutual TLS, and a node proves it belongs to the site with a certificate from the site's
# CA. `peersync site init --dir DIR` makes the CA (keep DIR off the nodes); `peersync site issue
# NODE --dir DIR --ip ADDR --out /etc/peersync/tls` writes a node's three files where these
# defaults look for them. The site CA's certificate (several, concatenated, while a CA is rotated):
ca = "/etc/peersync/tls/ca.crt"
# This node's certificate (its addresses as SANs).
cert = "/etc/peersync/tls/node.crt"
# This node's private key (mode 0600).
key = "/etc/peersync/tls/node.key"
# Without usable certificates the daemon neither serves peers nor asks them: containerd and the
# mirror keep working (from the origin), and the log and the control plane's status say why.
# true: plain HTTP on the peer port, no authentication at all: any host that reaches it reads
# every blob this node holds, private ones included. For labs only; logged as a warning.
insecure = false

[cache]
# Disk budget for the store: bytes with a unit ("20GiB", "500MB") or a share of the filesystem
# holding the root ("80%"). Blobs containerd references, blobs that back snapshots, pinned blobs
# and downloads in flight are never evicted; cache-only blobs (fetched for the mirror or for
# peers, or deleted by containerd) go by popularity, recency and how many other nodes hold them.
# A download that cannot fit even then is refused, saying so. "" means no budget.
budget = "80%"
# Eviction starts above high_watermark x budget ...
high_watermark = 0.95
# ... and stops below low_watermark x budget.
low_watermark = 0.85

[mirror]
# The registry mirror for containerd's hosts.toml; keep it on loopback. "" disables it.
listen = "127.0.0.1:5380"
# Registry assumed when a request carries no ?ns= (Docker's registry-mirrors).
default_registry = "docker.io"
# Seconds a tag's resolution is reused; tags are always re-resolved at the origin after this.
tag_ttl = 2.0
# The registries the mirror serves (?ns=), besides default_registry, those named in [origin]
# (plain_http, auth) and those whose hosts.toml under hosts_dir holds the mirror (`peersync hosts
# install`; "_default" names no registry). Any other ?ns= is refused with 403, no connection made.
registries = []
# containerd's hosts.toml directory, read for the registries whose hosts.toml names this mirror.
hosts_dir = "/etc/containerd/certs.d"
# Seconds a local client's credentials, shown good at the origin for a manifest or blob, are
# trusted before they are checked again (docs/security.md).
access_ttl = 30.0

[admin]
# The admin socket the `peersync` CLI talks to (status, peers, cache, prefetch, seed export):
# a unix socket of mode 0600, so only root (the daemon's user) may use it. "" means admin.sock
# beside `socket` (/run/peersync/admin.sock).
socket = ""
# Where Prometheus scrapes /metrics over TCP. Loopback by default (an agent on the host scrapes
# it); the Helm chart passes the node's own address (`--metrics-listen`). "" disables it.
listen = "127.0.0.1:5382"

[origin]
# Registries reached over plain HTTP instead of HTTPS ("host:port").
plain_http = []
# Credentials per registry host: [origin.auth."registry.example.com"] username = "..." password = "..."
[origin.auth]

[grpc]
# "h2": PeerSync's own HTTP/2 gRPC server (~5x less CPU per small Read than grpcio, see
# bench/RESULTS.md); "grpcio": grpcio's asyncio server. Both serve the same servicers.
implementation = "h2"
# Largest request message accepted from containerd (its own limit is 16 MiB).
max_receive_message_size = 16777216
# Largest data payload in one Read response message.
read_message_size = 1048576
"""


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "auto"


@dataclass(frozen=True)
class AdminConfig:
    socket: str = ""
    listen: str = "127.0.0.1:5382"


@dataclass(frozen=True)
class StoreConfig:
    chunk_size: int = 1 * MIB


@dataclass(frozen=True)
class SnapshotterConfig:
    unpack_layers: bool = True
    unpack_ahead: int = 2
    prefetch_layers: int = 2
    containerd_address: str = ""
    containerd_snapshotter: str = "peersync"
    client_unpack_wait: float = 600.0


@dataclass(frozen=True)
class GrpcConfig:
    implementation: str = "h2"
    max_receive_message_size: int = 16 * MIB
    read_message_size: int = 1 * MIB


@dataclass(frozen=True)
class PeerConfig:
    listen: str = "0.0.0.0:5381"
    advertise: str = ""
    peers: list[str] = field(default_factory=list)
    bootstrap: list[str] = field(default_factory=list)
    subnets: list[str] = field(default_factory=list)
    choice: str = "bound"


@dataclass(frozen=True)
class SiteConfig:
    name: str = "default"
    tracker_priority: int = 0


@dataclass(frozen=True)
class DiscoveryConfig:
    mdns: bool = True
    interfaces: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TlsConfig:
    ca: Path = Path("/etc/peersync/tls/ca.crt")
    cert: Path = Path("/etc/peersync/tls/node.crt")
    key: Path = Path("/etc/peersync/tls/node.key")
    insecure: bool = False


@dataclass(frozen=True)
class CacheConfig:
    budget: str = "80%"
    high_watermark: float = 0.95
    low_watermark: float = 0.85


@dataclass(frozen=True)
class MirrorConfig:
    listen: str = "127.0.0.1:5380"
    default_registry: str = "docker.io"
    tag_ttl: float = 2.0
    registries: list[str] = field(default_factory=list)
    hosts_dir: str = "/etc/containerd/certs.d"
    access_ttl: float = 30.0


@dataclass(frozen=True)
class OriginConfig:
    plain_http: list[str] = field(default_factory=list)
    auth: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    root: Path = Path("/var/lib/peersync")
    socket: Path = Path("/run/peersync/peersync.sock")
    log: LogConfig = field(default_factory=LogConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    snapshotter: SnapshotterConfig = field(default_factory=SnapshotterConfig)
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    peer: PeerConfig = field(default_factory=PeerConfig)
    mirror: MirrorConfig = field(default_factory=MirrorConfig)
    origin: OriginConfig = field(default_factory=OriginConfig)
    site: SiteConfig = field(default_factory=SiteConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)

    @property
    def admin_socket(self) -> Path:
        """The admin socket's path: `[admin] socket`, or admin.sock beside the plugins' socket
        (a directory systemd's socket unit or the daemon made; short, unlike some roots, and a
        unix socket's path must fit 107 bytes)."""
        return Path(self.admin.socket) if self.admin.socket else self.socket.parent / "admin.sock"

    def with_overrides(self, **changes: Any) -> Config:
        """A copy with the non-None keyword values replaced (CLI flags win over the file)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def with_admin_listen(config: Config, listen: str) -> Config:
    """A copy whose /metrics listens on `listen` (validated as `[admin] listen` is)."""
    admin = dataclasses.replace(config.admin, listen=listen)
    _validate(admin, "--metrics-listen")
    return dataclasses.replace(config, admin=admin)


def load(path: Path | None) -> Config:
    """Read a config file (None: the defaults), validating every key."""
    if path is None:
        return Config()
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise InvalidArgument(f"cannot read config {path}: {exc.strerror}") from exc
    return loads(text, where=str(path))


def loads(text: str, where: str = "config") -> Config:
    """Parse config TOML text, validating every key (`where` names it in errors)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"config {where} is not valid TOML: {exc}") from exc
    return _build(Config, data, where=where)


def _build(cls: type[_D], data: dict[str, Any], where: str) -> _D:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise InvalidArgument(f"{where}: unknown key {key!r} (known: {', '.join(sorted(fields))})")
        kwargs[key] = _convert(fields[key], value, f"{where}: {key}")
    config = cls(**kwargs)
    _validate(config, where)
    return config


def _convert(f: dataclasses.Field[Any], value: Any, where: str) -> Any:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if dataclasses.is_dataclass(default) and not isinstance(default, type):  # a nested table
        if not isinstance(value, dict):
            raise InvalidArgument(f"{where} must be a table")
        return _build(type(default), value, where)
    if isinstance(default, Path):
        if not isinstance(value, str) or not value:
            raise InvalidArgument(f"{where} must be a non-empty path string")
        return Path(value)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, list):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidArgument(f"{where} must be a list of strings")
        return value
    if isinstance(default, dict):
        return _auth_table(value, where)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise InvalidArgument(f"{where} must be true or false, got {value!r}")
        return value
    if not isinstance(value, type(default)) or isinstance(value, bool):
        raise InvalidArgument(f"{where} must be of type {type(default).__name__}, got {value!r}")
    return value


def _auth_table(value: Any, where: str) -> dict[str, dict[str, str]]:
    ok = isinstance(value, dict) and all(
        isinstance(v, dict)
        and set(v) == {"username", "password"}
        and all(isinstance(x, str) for x in v.values())
        for v in value.values()
    )
    if not ok:
        raise InvalidArgument(f'{where} must map registry hosts to {{username = "...", password = "..."}}')
    table: dict[str, dict[str, str]] = value  # checked just above
    return table


def _validate(config: Any, where: str) -> None:
    if isinstance(config, LogConfig):
        if config.level not in ("debug", "info", "warning", "error"):
            raise InvalidArgument(f"{where}: log.level must be debug, info, warning or error")
        if config.format not in ("console", "json", "auto"):
            raise InvalidArgument(f"{where}: log.format must be console, json or auto")
    if isinstance(config, StoreConfig):
        if config.chunk_size < 4096 or config.chunk_size & (config.chunk_size - 1):
            raise InvalidArgument(f"{where}: store.chunk_size must be a power of two >= 4096")
    if isinstance(config, SnapshotterConfig):
        if not 0 <= config.unpack_ahead <= 16:
            raise InvalidArgument(f"{where}: snapshotter.unpack_ahead must be between 0 and 16")
        if not 1 <= config.prefetch_layers <= 64:
            raise InvalidArgument(f"{where}: snapshotter.prefetch_layers must be between 1 and 64")
        if config.containerd_address and not config.containerd_address.startswith("/"):
            raise InvalidArgument(f"{where}: snapshotter.containerd_address must be an absolute socket path")
        if not config.containerd_snapshotter:
            raise InvalidArgument(f"{where}: snapshotter.containerd_snapshotter must not be empty")
        if not 0 < config.client_unpack_wait <= 86400:
            raise InvalidArgument(f"{where}: snapshotter.client_unpack_wait must be in (0, 86400] seconds")
    listens = isinstance(config, PeerConfig | MirrorConfig | AdminConfig)
    if listens and config.listen and not _hostport(config.listen):
        raise InvalidArgument(f"{where}: listen must be host:port or empty, got {config.listen!r}")
    if isinstance(config, MirrorConfig) and not 0 < config.access_ttl <= 3600:
        raise InvalidArgument(f"{where}: mirror.access_ttl must be between 0 and 3600 seconds")
    if isinstance(config, PeerConfig):
        for address in config.bootstrap:
            if not _hostport(address.split("://", 1)[-1]):
                raise InvalidArgument(f"{where}: peer.bootstrap entries must be host:port, got {address!r}")
        for subnet in config.subnets:
            try:
                ipaddress.ip_network(subnet, strict=False)
            except ValueError:
                raise InvalidArgument(
                    f"{where}: peer.subnets entries must be CIDR networks, got {subnet!r}"
                ) from None
        if config.choice not in PEER_CHOICES:
            raise InvalidArgument(f"{where}: peer.choice must be one of {', '.join(PEER_CHOICES)}")
    if isinstance(config, SiteConfig) and not _SITE_NAME.fullmatch(config.name):
        raise InvalidArgument(
            f"{where}: site.name must be 1-63 lowercase letters, digits or '-', got {config.name!r}"
        )
    if isinstance(config, CacheConfig):
        parse_budget(config.budget, where=f"{where}: cache.budget")
        if not 0.0 < config.low_watermark < config.high_watermark <= 1.0:
            raise InvalidArgument(f"{where}: cache watermarks need 0 < low_watermark < high_watermark <= 1")
    if isinstance(config, GrpcConfig):
        if config.implementation not in ("h2", "grpcio"):
            raise InvalidArgument(f"{where}: grpc.implementation must be h2 or grpcio")
        if not 64 * 1024 <= config.read_message_size <= 4 * MIB:
            raise InvalidArgument(f"{where}: grpc.read_message_size must be between 64 KiB and 4 MiB")
        if config.max_receive_message_size < 4 * MIB:
            raise InvalidArgument(f"{where}: grpc.max_receive_message_size must be at least 4 MiB")


_SITE_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgtp]?i?b?)", re.IGNORECASE)
_UNITS = {"": 1, "b": 1}
for _i, _p in enumerate("kmgtp", start=1):
    _UNITS[f"{_p}b"] = 1000**_i
    _UNITS[f"{_p}ib"] = _UNITS[f"{_p}i"] = _UNITS[_p] = 1024**_i


@dataclass(frozen=True)
class Budget:
    """A disk budget: a fixed number of bytes, or a share of the filesystem (`fraction`).

    Neither set means no budget. A share is resolved against the filesystem's size when the cache
    manager runs (`bytes_for`), so it follows a resized disk."""

    bytes: int | None = None
    fraction: float | None = None

    def bytes_for(self, filesystem_bytes: int) -> int | None:
        """The budget in bytes on a filesystem of `filesystem_bytes`; None when unlimited."""
        if self.bytes is not None:
            return self.bytes
        if self.fraction is not None:
            return int(filesystem_bytes * self.fraction)
        return None


def parse_budget(text: str, where: str = "budget") -> Budget:
    """"20GiB", "500MB", "1048576" (bytes) or "80%" (of the filesystem); "" for none.

    Units: k, M, G, T, P with B (powers of 1000) or iB (powers of 1024); a bare k/M/G/T/P means
    the binary unit, as operators usually mean it."""
    text = text.strip()
    if not text:
        return Budget()
    if text.endswith("%"):
        try:
            share = float(text[:-1])
        except ValueError:
            share = -1.0
        if not 0.0 < share <= 100.0:
            raise InvalidArgument(f"{where}: a share must be between 0% and 100%, got {text!r}")
        return Budget(fraction=share / 100.0)
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise InvalidArgument(
            f'{where}: want bytes with a unit ("20GiB", "500MB") or a share ("80%"), got {text!r}'
        )
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise InvalidArgument(f"{where}: must be more than 0 bytes, got {text!r}")
    return Budget(bytes=size)


def _hostport(text: str) -> tuple[str, int] | None:
    """("host", port) from "host:port" (IPv6 in brackets), or None."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536 or not host:
        return None
    return host.strip("[]"), int(port)


def hostport(text: str) -> tuple[str, int]:
    """Parse a validated listen address."""
    parsed = _hostport(text)
    if parsed is None:
        raise InvalidArgument(f"not a host:port address: {text!r}")
    return parsed
