"""Which peers are on this node's own subnet: the same-subnet preference of peer choice.

A peer on our subnet is reached without crossing a router: one switch hop, no shared routed link
between sites or floors, no other site's traffic. Measurements already show a remote peer's extra
round trip and lower throughput once we have asked it a few times; the preference is for the time
before that (new peers, stale evidence) and for near-ties, where it keeps chunks off links between
subnets that other traffic needs. `choice` multiplies a remote peer's score by `REMOTE_FACTOR`.

A node's subnets are the configured ones (`[peer] subnets`, CIDR), or else the /24 (IPv4) or /64
(IPv6) around its own advertised address: the common case of one L2 segment per site. A peer is
on our subnet when its URL's host is an address inside one of them; a host name (not an address)
or a node without a known address of its own is *unknown*, and gets no preference either way.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

REMOTE_FACTOR = 1.5  # a peer off our subnet must predict this much better to be chosen
DEFAULT_PREFIX_V4 = 24
DEFAULT_PREFIX_V6 = 64
MAX_SEEN = 65536  # peer URLs whose answer a `Locality` remembers (then it starts over)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def host_address(url: str) -> Address | None:
    """The IP address in `url`'s host ("http://10.0.0.5:5381", "10.0.0.5:5381", "[fd00::5]:5381"),
    or None for a host name or something unparsable."""
    try:
        host = urlsplit(url if "://" in url else f"//{url}").hostname
    except ValueError:
        return None
    if not host:
        return None
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@dataclass(frozen=True)
class Locality:
    """This node's subnets, and the question asked of each peer URL."""

    networks: tuple[Network, ...] = field(default=())
    # peer URL -> `same`'s answer: every planning round asks it of every candidate, and parsing
    # the URL was a fifth of the scale simulator's time at 1,000 nodes (a node asks of its peers)
    _seen: dict[str, bool | None] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def of(cls, self_url: str, subnets: Sequence[str] = ()) -> Locality:
        """The configured `subnets` (CIDR strings, host bits allowed), or else the default-sized
        subnet around `self_url`'s address; no networks at all when neither is known."""
        if subnets:
            return cls(tuple(ipaddress.ip_network(s, strict=False) for s in subnets))
        address = host_address(self_url)
        if address is None or address.is_unspecified:
            return cls()
        prefix = DEFAULT_PREFIX_V4 if address.version == 4 else DEFAULT_PREFIX_V6
        return cls((ipaddress.ip_network(f"{address}/{prefix}", strict=False),))

    def same(self, peer_url: str) -> bool | None:
        """True if `peer_url`'s host is on one of our subnets, False if it is an address outside
        them all, None when we cannot tell (host name, or no subnets of our own)."""
        if peer_url in self._seen:
            return self._seen[peer_url]
        address = host_address(peer_url)
        if address is None or not self.networks:
            answer = None
        else:
            answer = any(address.version == n.version and address in n for n in self.networks)
        if len(self._seen) >= MAX_SEEN:
            self._seen.clear()
        self._seen[peer_url] = answer
        return answer

    def factor(self, peer_url: str) -> float:
        """What a peer's score is multiplied by: `REMOTE_FACTOR` off our subnets, else 1."""
        return REMOTE_FACTOR if self.same(peer_url) is False else 1.0
