"""Where peers come from. The engine asks a `PeerSource` for the current peer list each time it
plans; a static list from the config is the first source, automatic discovery plugs in later."""

from __future__ import annotations

from typing import Protocol


class PeerSource(Protocol):
    """The other nodes of the site, as base URLs (`http://10.0.0.12:5381`)."""

    def peers(self) -> list[str]: ...


class StaticPeers:
    """A fixed list (config `peer.peers`), minus this node's own address."""

    def __init__(self, addresses: list[str], self_url: str = "") -> None:
        urls = [a if "://" in a else f"http://{a}" for a in addresses]
        self._urls = [u.rstrip("/") for u in urls if u.rstrip("/") != self_url.rstrip("/")]

    def peers(self) -> list[str]:
        return list(self._urls)
