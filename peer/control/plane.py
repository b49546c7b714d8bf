"""The control plane as the rest of `peer/` sees it: one `ControlPlane` per node.

`peer.node.PeerNode` builds it (when the peer exchange listens), mounts its routes on the peer
port, hands it to the engine as the engine's `PeerSource`, and starts it. It offers:

- `members()` / `member(id)`: the other members alive in this node's view (`Member` records:
  id, url, site, started, priority, cpus, mem_mib, link_mbit);
- `peers()` (the engine's `PeerSource`): the static `[peer] peers` list plus every member in
  this node's view, tracker or not. The whole list, the same on every node once membership has
  converged: without a tracker the engine polls only the other members of its group
  (`peer.policy.fanout`, at most `fanout`), and the groups agree only if every node deals them
  from the same list (docs/control-plane.md, "No tracker");
- `untracked()`: the static entries that are no member; their holdings are in no candidate set,
  so the engine polls them directly even while a tracker answers;
- `role` ("tracker", "member", "electing", or "disabled" when this node has no usable site
  certificate: then the plane never starts, asks nobody and names no peer), `tracker` (a
  `TrackerRef`: `.id`, `.url`, `.epoch`, `.record`; None while electing), `node_id`, `me` (this
  node's record);
- `register(member_section, tracker_section)`: a concern that rides on the sync message
  (`peer.control.sections`); `wake()`: sync (or hold the next election round) now;
  `set_busy(bool)`: the engine says whether downloads run (syncs every 0.25 s, else 1 s);
- `status()`: a JSON-compatible dict for `peersync status`, also served at
  `GET /peersync/v1/control/status` (on the peer port to site members, and on the loopback mirror
  listener to local callers, so the status says why even when the peer port is closed):

      id            this node's id (32 hex digits, kept in <root>/node-id)
      site          [site] name
      url           where other nodes reach this one
      role          "tracker" | "member" | "electing" | "disabled" (no site certificate:
                    the peer side is off, `transport.reason` says why)
      transport     how this node speaks to peers (`peer.tls.PeerTransport.status`): mode
                    ("mtls" | "insecure" | "disabled"), scheme, reason (disabled: why;
                    insecure: the warning), warnings, certificate (subject, issuer,
                    not_after, expires_in_days, addresses)
      tracker       {"id", "url", "epoch"} of the tracker followed (this node when it is
                    tracker), or null while electing
      epoch_seen    the highest tracker epoch this node has seen
      members       [{"id", "url", "rank" (0 = best for election), "priority", "started"
                    (unix seconds), "last_heard" (seconds ago: on the tracker, since the
                    member's last sync; on a member, since the tracker last vouched for it),
                    "self" (bool)}], best rank first, this node included
      direct_peers  the member URLs the engine polls directly when it has no tracker: the
                    other members of this node's group (`peer.policy.fanout` over the
                    members, at most `fanout`); while a tracker answers it polls only
                    `untracked()` (static peers that are no member)
      messages      control messages by kind since start: sync_sent, sync_failed,
                    sync_received, whois_sent, whois_failed, whois_received, tracker_sent,
                    tracker_failed, tracker_received (a member sends one sync per interval
                    whatever the site's size; the tracker receives one per member)
      elections     elections this node started (trackers lost)
      claims        times this node became tracker
      busy          whether the engine has downloads running
      uptime        seconds since the control plane started
      mdns          whether multicast DNS runs
      candidates    addresses discovery proposes (static, bootstrap, mDNS)
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog
from aiohttp import web

from kernel.config import Config
from peer.control.client import ControlClient, Counters
from peer.control.discovery import Discovery
from peer.control.identity import local_record, node_id
from peer.control.member import ControlConfig, MemberAgent
from peer.control.sections import MemberSection, Sections, TrackerSection
from peer.control.tracker import routes
from peer.policy.election import TrackerRef
from peer.policy.fanout import fanout
from peer.policy.membership import Member
from peer.tls import PeerTransport, plain

log = structlog.get_logger(__name__)


class ControlPlane:
    """Discovery, membership, tracker election and the sync transport of one node.

    Lifecycle: build, mount `routes()`, `await start()`, `await stop()` (tells the tracker this
    node leaves, says goodbye on multicast DNS).

    `transport` (`peer.tls.load`) gives the client context its messages go out with; without
    one they are plain HTTP (in-process tests of other concerns). A disabled transport makes a
    dormant plane: `start()` only logs, nothing is discovered, asked or announced, and
    `status()` says why (the node keeps its id and record for the status)."""

    def __init__(
        self,
        config: Config,
        url: str,
        tunables: ControlConfig | None = None,
        transport: PeerTransport | None = None,
    ) -> None:
        self.config = config
        self.tunables = tunables or ControlConfig()
        self.transport = transport or plain()
        self.node_id = node_id(config.root)
        self.me = local_record(config, self.node_id, url)
        self.sections = Sections()
        self.counters = Counters()
        self.client = ControlClient(
            config.site.name,
            self.counters,
            self.tunables.probe_timeout,
            ssl=self.transport.client,
        )
        self.discovery = Discovery(config, self.me, on_change=self._discovered)
        self.agent = MemberAgent(
            self.me, self.sections, self.discovery, self.client, self.counters, self.tunables
        )
        self._task: asyncio.Task[None] | None = None

    def _discovered(self) -> None:
        self.agent.discovered()

    def routes(self) -> web.RouteTableDef:
        """`/peersync/v1/control/{sync,whois,tracker,status}` (see `peer.control.tracker`)."""
        return routes(self.agent, self.status)

    async def start(self) -> None:
        if not self.transport.enabled:
            log.error("control plane off: this node has no usable site certificate", id=self.node_id)
            return
        await self.discovery.start()
        self._task = asyncio.create_task(self.agent.run(), name="control plane")
        log.info("control plane up", id=self.node_id, site=self.me.site, url=self.me.url)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.agent.leave()
        await self.discovery.stop()
        await self.client.close()

    # -- what the rest of peer/ uses --------------------------------------------------------

    @property
    def role(self) -> str:
        """ "tracker", "member", "electing", or "disabled" (no usable site certificate)."""
        return self.agent.role if self.transport.enabled else "disabled"

    @property
    def tracker(self) -> TrackerRef | None:
        """The tracker this node follows (itself, when it is tracker); None while electing."""
        return self.agent.following

    def members(self) -> list[Member]:
        """The other members alive in this node's view."""
        return self.agent.members()

    def member(self, node: str) -> Member | None:
        """The record of member `node` (this node included), or None."""
        return self.agent.table().get(node)

    def peers(self) -> list[str]:
        """The engine's `PeerSource`: the static list plus every member (the engine bounds what
        it polls; see the module docstring)."""
        if not self.transport.enabled:
            return []
        urls = [*self.discovery.static, *self.agent.member_urls()]
        return [u for u in dict.fromkeys(urls) if u != self.me.url]

    def untracked(self) -> list[str]:
        """The static `[peer] peers` entries that are no member (a node without the control
        plane, or one not met yet): the tracker's candidate sets say nothing of what they hold,
        so the engine polls them directly even while a tracker answers."""
        members = set(self.agent.member_urls())
        return [u for u in self.discovery.static if u not in members and u != self.me.url]

    def register(self, member_section: MemberSection, tracker_section: TrackerSection) -> None:
        """Ride on the sync message (`peer.control.sections`); one name per concern."""
        self.sections.add(member_section, tracker_section)
        self.agent.section_added(member_section.name)

    def wake(self) -> None:
        """Sync now (a section has something that should not wait for the next interval)."""
        self.agent.wake()

    def sync_patience(self) -> float:
        """How long the next sync may wait for its answer before it counts as failed."""
        return self.agent.sync_patience()

    def set_busy(self, busy: bool) -> None:
        """The engine has downloads running (True) or none (False)."""
        self.agent.set_busy(busy)

    def status(self) -> dict[str, Any]:
        """This node's control-plane state (keys in the module docstring)."""
        status = {**self.agent.status(), "role": self.role, "transport": self.transport.status()}
        status["direct_peers"] = fanout(self.peers(), self.me.url, self.tunables.fanout)
        return status
