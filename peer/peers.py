"""Where peers come from. The engine asks a `PeerSource` for the current peer list each time it
plans; a static list from the config is the first source, automatic discovery plugs in later."""

from __future__ import annotations

from typing import Protocol


class PeerSource(Protocol):
    """The other nodes of the site, as base URLs (`https://10.0.0.12:5381`)."""

    def peers(self) -> list[str]: ...


def peer_url(address: str, scheme: str = "https") -> str:
    """A base URL for a configured peer address: "host:port" gets this node's `scheme` (https
    with site certificates, http in insecure mode, `peer.tls`); a URL keeps its own."""
    return (address if "://" in address else f"{scheme}://{address}").rstrip("/")


class StaticPeers:
    """A fixed list (config `peer.peers`), minus this node's own address."""

    def __init__(self, addresses: list[str], self_url: str = "", scheme: str = "https") -> None:
        urls = [peer_url(a, scheme) for a in addresses]
        self._urls = [u for u in urls if u != self_url.rstrip("/")]

    def peers(self) -> list[str]:
        return list(self._urls)
