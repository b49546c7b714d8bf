"""The daemon's Prometheus metrics, read at scrape time from the counters its parts already keep.

One `CollectorRegistry` per daemon (never prometheus-client's global one: two daemons in one test
process, or a restart inside one, must not share or double-register series). Everything but the
chunk latencies is read when Prometheus scrapes, from the engine's `counters`, the bytes the
node's listeners `served`, the cache manager's `cache_status()`, the control plane's `status()`,
the snapshotter's unpacks and `kernel.errors.reported`; the latency histograms are fed by the
engine's `on_chunk` hook. docs/operations.md explains each series; `METRICS` lists the names
(the Grafana dashboard's test checks every expression against it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kernel import errors
from peer.node import PeerNode
from peersync import __version__

# chunk latencies: a LAN peer answers a 1 MiB chunk in milliseconds, a slow uplink in seconds
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# every series name this module exports (histograms and counters as Prometheus exposes them)
METRICS = frozenset({
    "peersync_info", "peersync_bytes_total", "peersync_chunk_seconds_bucket",
    "peersync_chunk_seconds_count", "peersync_chunk_seconds_sum", "peersync_chunk_seconds_created",
    "peersync_hedges_total",
    "peersync_corrupt_chunks_total", "peersync_dropped_peers_total", "peersync_peers_dropped",
    "peersync_origin_chunks_total", "peersync_cache_bytes", "peersync_cache_budget_bytes",
    "peersync_cache_high_watermark_bytes", "peersync_cache_low_watermark_bytes",
    "peersync_cache_blobs", "peersync_cache_evictions_total", "peersync_cache_evicted_bytes_total",
    "peersync_cache_refused_downloads_total", "peersync_tracker", "peersync_tracker_epoch",
    "peersync_elections_total", "peersync_members", "peersync_control_messages_total",
    "peersync_downloads_in_flight", "peersync_mirror_requests_in_flight",
    "peersync_unpacks_in_flight", "peersync_errors_total",
})


class DaemonMetrics:
    """The registry of one daemon: `registry` to expose, `observe_chunk` for the engine's hook."""

    def __init__(self, node: PeerNode, unpacks: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.chunk_seconds = Histogram(
            "peersync_chunk_seconds",
            "Seconds to receive one chunk, by source (peer: the request; origin: since the previous chunk)",
            ["source"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        for source in ("peer", "origin"):
            self.chunk_seconds.labels(source)  # present at 0 before the first chunk
        self.registry.register(_Snapshot(node, unpacks))

    def observe_chunk(self, source: str, seconds: float, _nbytes: int) -> None:
        self.chunk_seconds.labels(source).observe(seconds)


class _Snapshot(Collector):
    """The counters the daemon keeps anyway, as metric families at scrape time."""

    def __init__(self, node: PeerNode, unpacks: Callable[[], int]) -> None:
        self.node = node
        self.unpacks = unpacks

    def collect(self) -> Iterator[Metric]:
        yield from self._transfer()
        yield from self._cache()
        yield from self._control()
        info = GaugeMetricFamily("peersync_info", "The daemon's version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        errs = CounterMetricFamily(
            "peersync_errors", "Errors reported to callers, by where and class", labels=["where", "class"]
        )
        for (where, cls), n in sorted(errors.reported.counts.items()):
            errs.add_metric([where, cls], n)
        yield errs

    def _transfer(self) -> Iterator[Metric]:
        engine = self.node.engine
        if engine is None:
            return
        c = engine.counters
        moved = CounterMetricFamily(
            "peersync_bytes", "Blob bytes moved, by source and direction", labels=["source", "direction"]
        )
        moved.add_metric(["peer", "in"], c["peer_bytes"])
        moved.add_metric(["origin", "in"], c["origin_bytes"])
        moved.add_metric(["peer", "out"], self.node.served["peer"])
        moved.add_metric(["local", "out"], self.node.served["local"])
        yield moved
        for name, key, doc in (
            ("peersync_hedges", "hedges", "Chunk requests hedged to a second peer"),
            ("peersync_corrupt_chunks", "corrupt_chunks", "Chunks from peers that failed verification"),
            ("peersync_dropped_peers", "dropped_peers", "Times a peer was dropped (failures, bad data)"),
        ):
            yield CounterMetricFamily(name, doc, value=c[key])
        why = CounterMetricFamily(
            "peersync_origin_chunks", "Origin chunks fetched outside our own stripes, by why", labels=["why"]
        )
        for label in ("solo", "heir", "lease", "rescue"):
            why.add_metric([label], c[f"origin_{label}_chunks"])
        yield why
        now = time.monotonic()
        dropped = sum(1 for st in engine.stats.values() if not st.usable(now))
        yield GaugeMetricFamily("peersync_peers_dropped", "Peers being ignored right now", value=dropped)
        active = sum(1 for dl in engine.downloads.values() if not dl.task.done())
        yield GaugeMetricFamily("peersync_downloads_in_flight", "Blob downloads running", value=active)
        yield GaugeMetricFamily(
            "peersync_mirror_requests_in_flight",
            "Pull requests (manifests, blobs) being served by the mirror",
            value=self.node.mirror_inflight,
        )
        yield GaugeMetricFamily("peersync_unpacks_in_flight", "Layers being unpacked", value=self.unpacks())

    def _cache(self) -> Iterator[Metric]:
        st = self.node.cache.cache_status()
        usage = GaugeMetricFamily("peersync_cache_bytes", "Store bytes, by kind", labels=["kind"])
        for kind in ("complete", "partial", "ingest", "reserved"):
            usage.add_metric([kind], st["usage"][kind])
        yield usage
        for name, key, doc in (
            ("peersync_cache_budget_bytes", "budget", "The cache budget (absent: no budget)"),
            ("peersync_cache_high_watermark_bytes", "high_bytes", "Eviction starts above this"),
            ("peersync_cache_low_watermark_bytes", "low_bytes", "Eviction stops below this"),
        ):
            if st[key] is not None:
                yield GaugeMetricFamily(name, doc, value=st[key])
        blobs = GaugeMetricFamily("peersync_cache_blobs", "Blobs, by state", labels=["state"])
        for state, n in sorted(st["blobs"].items()):
            blobs.add_metric([state], n)
        yield blobs
        ev = st["evictions"]
        yield CounterMetricFamily("peersync_cache_evictions", "Blobs evicted", value=ev["count"])
        yield CounterMetricFamily("peersync_cache_evicted_bytes", "Bytes evicted", value=ev["bytes"])
        yield CounterMetricFamily(
            "peersync_cache_refused_downloads", "Downloads refused: no room", value=ev["refused_downloads"]
        )

    def _control(self) -> Iterator[Metric]:
        control = self.node.control
        if control is None:
            return
        st = control.status()
        yield GaugeMetricFamily("peersync_tracker", "1 while this node is its site's tracker",
                                value=1 if st["role"] == "tracker" else 0)
        epoch = st["tracker"]["epoch"] if st["tracker"] else 0
        yield GaugeMetricFamily("peersync_tracker_epoch", "Epoch of the tracker followed", value=epoch)
        yield CounterMetricFamily("peersync_elections", "Elections this node started", value=st["elections"])
        yield GaugeMetricFamily("peersync_members", "Members in this node's view, itself included",
                                value=len(st["members"]))
        messages = CounterMetricFamily(
            "peersync_control_messages", "Control messages, by kind and outcome", labels=["kind", "outcome"]
        )
        for key, n in sorted(st["messages"].items()):
            kind, _, outcome = key.rpartition("_")
            messages.add_metric([kind, outcome], n)
        yield messages
