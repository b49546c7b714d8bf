"""The control plane's messages, as a client sends them, and the counters of every kind.

Three kinds (docs/control-plane.md): `sync` (member -> tracker, once per interval: the one
periodic message), `whois` (elections, start-up, reconciliation: "who are you, and who is
your tracker?", carrying the asker's record) and
`tracker` (a claimer tells the members it is tracker; rare). Each call has a short timeout and
returns None when the other side did not answer usefully (refused, timed out, another site, a
malformed answer): the member loop counts failures, it never waits on a dead node.

`Counters` counts each kind sent, failed and received, so the control cost per node can be
measured (`ControlPlane.status()["messages"]`, `/peersync/v1/stats`); a member sends one sync
per interval whatever the size of the site.

The control plane uses its own aiohttp session: a sync must not queue behind the chunk
transfers that fill the data plane's connection pool (a late sync looks like a dead tracker).
With site certificates its connections are mutual TLS (`ssl`, the client context of
`peer.tls`): this node's certificate presented, the other node's checked against the site CA.
A message's timeout then bounds the wait for its answer once the connection is up, and a new
connection's handshake gets `HANDSHAKE_TIMEOUT` of its own: it needs several turns of the other
node's event loop, so a busy node shakes hands slowly without being dead (a stopped one refuses
at once, and a warm connection, the usual case for syncs, needs no handshake).
"""

from __future__ import annotations

import json
import ssl as sslmod
from typing import Any

import aiohttp
import structlog

from peer.connections import ConnectionCount
from peer.policy.election import Answer, TrackerRef
from peer.policy.membership import Member

log = structlog.get_logger(__name__)

PREFIX = "/peersync/v1/control"
HANDSHAKE_TIMEOUT = 3.0
KINDS = ("sync", "whois", "tracker")
PROTOCOL = 1


class Counters:
    """Control messages by kind: sent, failed (no useful answer), received (served)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {
            f"{k}_{what}": 0 for k in KINDS for what in ("sent", "failed", "received")
        }
        self.connections = ConnectionCount()

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def snapshot(self) -> dict[str, int]:
        """The counts, and `connections_opened` by the control plane's session."""
        return {**self.counts, "connections_opened": self.connections.opened}


class ControlClient:
    """Sends control messages to other nodes of site `site` (see the module docstring)."""

    def __init__(
        self,
        site: str,
        counters: Counters,
        probe_timeout: float,
        ssl: sslmod.SSLContext | None = None,
    ) -> None:
        self.site = site
        self.counters = counters
        self.probe_timeout = probe_timeout
        self.ssl = ssl
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=128,
                limit_per_host=4,
                enable_cleanup_closed=True,
                ssl=self.ssl if self.ssl is not None else True,
            )
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, trace_configs=[self.counters.connections.trace()]
            )
        return self._session

    def _timeout(self, timeout: float) -> aiohttp.ClientTimeout:
        """`timeout` for the whole message over plain HTTP; over TLS, for the answer once
        connected (no read waits longer), the handshake bounded apart (module docstring)."""
        if self.ssl is None:
            return aiohttp.ClientTimeout(total=timeout)
        return aiohttp.ClientTimeout(total=None, connect=HANDSHAKE_TIMEOUT + timeout,
                                     sock_connect=HANDSHAKE_TIMEOUT, sock_read=timeout)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(self, kind: str, method: str, url: str, timeout: float, body: Any = None) -> Any | None:
        self.counters.add(f"{kind}_sent")
        try:
            async with self._http().request(
                method,
                f"{url}{PREFIX}/{kind}",
                json=body,
                timeout=self._timeout(timeout),
            ) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                data = json.loads(await resp.read())
            if not isinstance(data, dict) or data.get("site") != self.site:
                raise ValueError("not a node of this site")
            return data
        except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as exc:
            self.counters.add(f"{kind}_failed")
            log.debug("control message failed", kind=kind, url=url, error=str(exc) or type(exc).__name__)
            return None

    async def whois(self, url: str, me: Member, lost: str | None = None) -> Answer | None:
        """Ask the node at `url` who it is and which tracker it follows, telling it who asks
        (`me`). `lost` names the tracker this node just lost, so the asked node checks it at once."""
        body = {"v": PROTOCOL, "site": self.site, "record": me.to_wire(), "lost": lost}
        data = await self._call("whois", "POST", url, self.probe_timeout, body=body)
        if data is None:
            return None
        try:
            tracker = data.get("tracker")
            return Answer(
                Member.from_wire(data.get("record")),
                TrackerRef.from_wire(tracker) if tracker is not None else None,
                _int(data.get("epoch_seen")),
            )
        except ValueError as exc:
            self.counters.add("whois_failed")
            log.debug("malformed whois answer", url=url, error=str(exc))
            return None

    async def sync(self, url: str, body: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        """One sync with the tracker at `url`, waiting `timeout` for the answer (the member's
        learned timeout, `peer.policy.timeout`); the reply, or None."""
        reply: dict[str, Any] | None = await self._call(
            "sync", "POST", url, timeout, body={**body, "site": self.site}
        )
        return reply

    def patience(self, timeout: float) -> float:
        """The longest a message with answer timeout `timeout` can take before it has failed:
        over TLS a new connection's handshake is bounded apart (`_timeout`)."""
        return timeout if self.ssl is None else timeout + HANDSHAKE_TIMEOUT

    async def announce(self, url: str, tracker: TrackerRef) -> TrackerRef | None:
        """Tell the node at `url` that `tracker` is tracker; the tracker it follows afterwards."""
        body = {"site": self.site, "v": PROTOCOL, "tracker": tracker.to_wire()}
        data = await self._call("tracker", "POST", url, self.probe_timeout, body=body)
        if data is None or data.get("tracker") is None:
            return None
        try:
            return TrackerRef.from_wire(data["tracker"])
        except ValueError:
            self.counters.add("tracker_failed")
            return None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
