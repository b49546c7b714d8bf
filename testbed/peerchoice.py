"""Peer choice on an emulated site: one node downloads a blob that several serving peers hold, their
links shaped to different rates with tbf, and what the downloader's engine did with each chunk.

    with Site(nodes=4, uplink_mbit=None) as site:
        site.start_registry()
        pc = PeerChoiceSite(site, blob_mib=64, rates=[200, 200, 20], cache=Path("/tmp/pc-image"))
        pc.seed()
        run = pc.download("bound")                                       # steady state
        run = pc.download("bound", SlowDown(peer=0, at_fraction=0.3, mbit=20))
        run.share(pc.urls[2]), run.chunk_quantile(0.99), run.loss_seconds(0.1)

Node n0 downloads; nodes n1.. serve, one per entry of `rates` (Mbit/s, both ways of the node's
link: `Site.set_node_rate`, tbf only). Everything is a real process: every node runs
`peersync daemon`; the serving nodes fetch the blob from the site registry first (through their own
mirror, before their links are shaped); the downloader is a fresh daemon for every download (empty
store, nothing measured yet), configured with `[peer] choice` = the policy under test and the
serving nodes as its peers, and it is asked for the blob through its mirror, as containerd would.
What each chunk request did comes from its `GET /peersync/v1/transfers` (`peer.engine.TransferRecord`),
taken after the download; the engine's clock is CLOCK_MONOTONIC, the same as this process's, so the
moment a link was slowed can be placed among them.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.images import BuiltImage, build_sized_image
from testbed.netns import REGISTRY_IP, REGISTRY_PORT, Site, SiteNode
from testbed.peersyncd import PeerSyncDaemon, start_peersync

PEER_PORT = 5381
MIRROR = "127.0.0.1:5380"
REGISTRY = f"{REGISTRY_IP}:{REGISTRY_PORT}"
REPO = "bench/peerchoice"
MIB = 1 << 20


def _get(url: str, timeout: float = 30.0, accept: str | None = None) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        body: bytes = resp.read()
    return body


def _wait(node: SiteNode, url: str, timeout: float = 60.0) -> bytes:
    """The body of `url` fetched inside `node`'s namespace, retried until it answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return node.call(_get, url)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@dataclass(frozen=True)
class SlowDown:
    """Drop serving peer `peer`'s link to `mbit` once the downloader's engine has `at_fraction` of
    the blob (its `peer_bytes` counter, polled: the engine runs ahead of the mirror's reader)."""

    peer: int
    at_fraction: float
    mbit: float


@dataclass
class Run:
    """One download: the policy, how long the blob took to stream, and every chunk request."""

    policy: str
    seconds: float
    size: int
    urls: list[str]  # the serving peers, in `rates` order
    transfers: list[dict[str, Any]]
    peers: dict[str, dict[str, Any]]
    counters: dict[str, Any]
    slowed: str | None = None
    changed_at: float | None = None  # when the slow-down took effect (CLOCK_MONOTONIC)

    def stored(self) -> list[dict[str, Any]]:
        """The requests whose bytes were stored: one per chunk."""
        return [t for t in self.transfers if t["chunk_seconds"] is not None]

    def share(self, url: str, since: float | None = None, until: float | None = None) -> float:
        """The share of the stored chunks `url` delivered, among those stored in [since, until)."""
        got = [
            t
            for t in self.stored()
            if (since is None or t["ended"] >= since) and (until is None or t["ended"] < until)
        ]
        return sum(1 for t in got if t["peer"] == url) / max(len(got), 1)

    def chunk_quantile(self, q: float) -> float:
        """The `q`-quantile of chunk latency: from a chunk's first request to its bytes stored."""
        values = sorted(float(t["chunk_seconds"]) for t in self.stored())
        return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0

    def launch_share(self, url: str) -> float:
        """The share of all chunk requests (hedges included) that went to `url`."""
        return sum(1 for t in self.transfers if t["peer"] == url) / max(len(self.transfers), 1)

    def launches(self, hedges: bool = True) -> list[tuple[float, str]]:
        """(when, peer) of every request (or only first requests, without `hedges`), in launch
        order."""
        return sorted((t["started"], t["peer"]) for t in self.transfers if hedges or not t["hedge"])

    def loss_seconds(self, threshold: float | None = None, window: float = 1.0) -> float | None:
        """How long after the slow-down the slowed peer's share of the chunks first asked in any
        `window` seconds (hedges, a second request for a straggler, do not count: that is hedging's
        choice, not peer choice's) was at or above `threshold` for the last time: from then on it
        never got that much again. `threshold` defaults to half its share of the chunks before the slow-down
        (it "lost its share" once it keeps below half of it). Only whole windows count (the last
        second of a download, with few requests left, would make one probe look like a share).
        None without a slow-down; 0 if it never had that much after it."""
        if self.changed_at is None or self.slowed is None:
            return None
        if threshold is None:
            threshold = self.share(self.slowed, until=self.changed_at) / 2
        after = [(t, p) for t, p in self.launches(hedges=False) if t >= self.changed_at]
        last = 0.0
        for i, (start, _) in enumerate(after):
            if start + window > after[-1][0]:
                break
            inside = [p for t, p in after[i:] if t < start + window]
            if sum(p == self.slowed for p in inside) / len(inside) >= threshold:
                last = start + window - self.changed_at
        return last

    def summary(self) -> dict[str, Any]:
        """The figures a report shows, as plain values."""
        out: dict[str, Any] = {
            "policy": self.policy,
            "seconds": round(self.seconds, 3),
            "chunks": len(self.stored()),
            "requests": len(self.transfers),
            "hedges": sum(1 for t in self.transfers if t["hedge"]),
            "p50": round(self.chunk_quantile(0.5), 4),
            "p99": round(self.chunk_quantile(0.99), 4),
            "shares": {u: round(self.share(u), 4) for u in self.urls},
            "origin_bytes": self.counters.get("origin_bytes"),
        }
        if self.changed_at is not None and self.slowed is not None:
            out["share_before"] = round(self.share(self.slowed, until=self.changed_at), 4)
            out["share_after_1s"] = round(self.share(self.slowed, since=self.changed_at + 1.0), 4)
            out["loss_seconds"] = self.loss_seconds()
        return out


@dataclass
class PeerChoiceSite:
    """A downloader (n0) and serving peers (n1..) on `site` (see the module docstring)."""

    site: Site
    blob_mib: int
    rates: Sequence[float]
    cache: Path | None = None  # where the generated image is kept between runs
    image: BuiltImage | None = None
    digest: str = ""
    size: int = 0
    servers: list[PeerSyncDaemon] = field(default_factory=list)
    runs: int = 0

    @property
    def urls(self) -> list[str]:
        """The serving peers' URLs, in `rates` order."""
        return [f"http://{n.ip}:{PEER_PORT}" for n in self.site.nodes[1 : 1 + len(self.rates)]]

    def _config(self, node: SiteNode, peers: Sequence[str] = (), choice: str = "bound") -> str:
        return (
            f'[peer]\nlisten = "{node.ip}:{PEER_PORT}"\npeers = {json.dumps(list(peers))}\n'
            f'choice = "{choice}"\n'
            f'[mirror]\nlisten = "{MIRROR}"\n'
            f'[origin]\nplain_http = ["{REGISTRY}"]\n'
        )

    def _manifest_url(self) -> str:
        assert self.image is not None
        return f"http://{MIRROR}/v2/{REPO}/manifests/{self.image.tag}?ns={REGISTRY}"

    def _blob_url(self) -> str:
        return f"http://{MIRROR}/v2/{REPO}/blobs/{self.digest}?ns={REGISTRY}"

    def seed(self) -> None:
        """Build and push a one-layer image of `blob_mib` MiB, have every serving node fetch it
        whole (links unshaped), then shape each serving node's link to its rate."""
        if len(self.site.nodes) < 1 + len(self.rates):
            raise ValueError(f"the site needs {1 + len(self.rates)} nodes")
        work = self.cache or self.site.workdir / "image"
        self.image = build_sized_image(
            work, self.blob_mib * MIB, layers=1, tag="peerchoice", with_busybox=False
        )
        self.site.push_image(self.image, REPO)
        layer = self.image.layers[0].descriptor
        self.digest, self.size = layer.digest, layer.size
        for node in self.site.nodes[1 : 1 + len(self.rates)]:
            self.servers.append(node.start_peersync(config=self._config(node)))
            _wait(node, f"http://{node.ip}:{PEER_PORT}/peersync/v1/stats")
            # The manifest first, as a client pulls: the mirror stores a blob only at the size a
            # manifest named (a blob asked for cold is passed through from the origin, not kept).
            node.call(_get, self._manifest_url(), 60.0, self.image.manifest.media_type)
            body = node.call(_get, self._blob_url(), 600.0)
            if hashlib.sha256(body).hexdigest() != self.digest[7:]:
                raise RuntimeError(f"{node.name}: the seeded blob does not match its digest")
            view = f"http://{node.ip}:{PEER_PORT}/peersync/v1/blobs/{self.digest}"
            deadline = time.monotonic() + 60
            while not json.loads(_wait(node, view))["complete"]:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{node.name}: the blob never completed")
                time.sleep(0.1)
        self.shape()

    def shape(self) -> None:
        """Every serving node's link at its configured rate."""
        for i, mbit in enumerate(self.rates):
            self.site.set_node_rate(1 + i, mbit)

    def download(self, policy: str, slow_down: SlowDown | None = None, timeout: float = 600.0) -> Run:
        """One download of the blob by a fresh downloader choosing peers by `policy`; the links are
        reshaped to their rates afterwards."""
        node = self.site.nodes[0]
        self.runs += 1
        work = node.workdir / f"run{self.runs}-{policy}"
        config = self._config(node, self.urls, policy)
        changed: list[float] = []
        try:
            with start_peersync(work, prefix=node.prefix, config=config):
                api = f"http://{node.ip}:{PEER_PORT}/peersync/v1"
                _wait(node, f"{api}/stats")
                seconds = node.call(self._read, slow_down, changed, timeout, f"{api}/stats")
                transfers = json.loads(node.call(_get, f"{api}/transfers"))["transfers"]
                peers = json.loads(node.call(_get, f"{api}/peers"))
                counters = json.loads(node.call(_get, f"{api}/stats"))
        finally:
            if slow_down is not None:
                self.shape()
        slowed = self.urls[slow_down.peer] if slow_down is not None else None
        return Run(
            policy,
            seconds,
            self.size,
            self.urls,
            transfers,
            peers,
            counters,
            slowed,
            changed[0] if changed else None,
        )

    def _read(self, slow_down: SlowDown | None, changed: list[float], timeout: float, stats: str) -> float:
        """Stream the blob through the downloader's mirror (in its namespace), checking its digest;
        slow the chosen peer down on the way (a thread watching the engine's progress at `stats`).
        Returns the seconds the stream took."""
        assert self.image is not None
        _get(self._manifest_url(), timeout, self.image.manifest.media_type)  # names the blob's size
        started = time.monotonic()
        h = hashlib.sha256()
        got = 0
        done = threading.Event()
        shaper: threading.Thread | None = None
        if slow_down is not None:  # started from this thread, so it is in the downloader's namespace too
            shaper = threading.Thread(target=self._slow, args=(slow_down, changed, stats, done), daemon=True)
            shaper.start()
        try:
            with urllib.request.urlopen(self._blob_url(), timeout=timeout) as resp:
                while piece := resp.read(1 << 20):
                    h.update(piece)
                    got += len(piece)
        finally:
            done.set()
            if shaper is not None:
                shaper.join()
        seconds = time.monotonic() - started
        if got != self.size or h.hexdigest() != self.digest[7:]:
            raise RuntimeError(f"downloaded {got} bytes that do not match {self.digest}")
        return seconds

    def _slow(self, slow_down: SlowDown, changed: list[float], stats: str, done: threading.Event) -> None:
        """Once the engine has `at_fraction` of the blob from peers, cut the peer's rate."""
        while not done.is_set():
            if json.loads(_get(stats))["peer_bytes"] >= slow_down.at_fraction * self.size:
                self.site.set_node_rate(1 + slow_down.peer, slow_down.mbit)
                changed.append(time.monotonic())
                return
            done.wait(0.02)
