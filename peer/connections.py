"""Counting the connections a node's HTTP clients open.

Over mutual TLS every new connection is a full TLS 1.3 handshake (no resumption: see
`peer.tls`), a few milliseconds of CPU on each side against a fraction of one for a request on a
warm connection (bench/RESULTS.md, "Mutual TLS between the nodes"). So how many a node opens is
what the connection pools' keep-alive has to hold down, and the counter makes it visible:
`/peersync/v1/stats` carries `connections_opened` (the data plane's session: chunk exchange and
the origin) and `control.connections_opened` (the control plane's own session).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import aiohttp


class ConnectionCount:
    """The connections one `aiohttp.ClientSession` opened; give it `trace()` at creation."""

    def __init__(self) -> None:
        self.opened = 0

    def trace(self) -> aiohttp.TraceConfig:
        """A trace config that adds one per connection the session establishes (TCP connect and,
        with an SSL context, the handshake done); reused pooled connections are not counted."""
        trace = aiohttp.TraceConfig()

        async def opened(_session: aiohttp.ClientSession, _ctx: SimpleNamespace, _params: Any) -> None:
            self.opened += 1

        trace.on_connection_create_end.append(opened)
        trace.freeze()
        return trace
