"""The operator's surface against running daemons, after real pulls: every CLI command (its
`--json` parsed), the admin socket's access rules, `/metrics` matching what the mirror, the
exchange and the origin moved, and a transfer id on the log lines of a pull.

Two nodes on loopback: A pulls an image through its mirror from the registry (mirror-only mode:
containerd's own overlayfs), B, which lists A as its peer, pulls the same image and gets every
blob byte from A. Each daemon is started by the test and stopped by its PID.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from peersync import __version__
from peersync.admin.client import AdminClient
from peersync.admin.metrics import METRICS
from testbed.images import BuiltImage, build_sized_image, push_image
from testbed.opsnode import OpsNode as Node
from testbed.opsnode import blob_sizes, cli, metric, parse_metrics, start_node
from testbed.registry import Registry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MIB = 1 << 20


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> list[tuple[BuiltImage, str]]:
    out = []
    for i in range(2):
        built = build_sized_image(tmp_path_factory.mktemp(f"ops-{i}"), 3 * MIB, layers=2, tag=f"ops{i}",
                                  seed=4200 + i)
        out.append((built, push_image(built, registry, f"peersync/ops{i}")))
    return out


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, registry: Registry,
         images: list[tuple[BuiltImage, str]]) -> Iterator[tuple[Node, Node]]:
    work = tmp_path_factory.mktemp("admin-site")
    image, ref = images[0]
    with start_node(work / "a", registry.address) as a:
        a.pull(ref)
        with start_node(work / "b", registry.address, peers=[a.peer]) as b:
            b.pull(ref)
            yield a, b


def test_metrics_after_real_pulls_match_what_moved(site: tuple[Node, Node],
                                                    images: list[tuple[BuiltImage, str]]) -> None:
    a, b = site
    sizes = blob_sizes(images[0][0])
    total = sum(sizes.values())
    ma, mb = a.scrape(), b.scrape()
    # A: everything from the origin, all of it to its containerd through the mirror
    assert metric(ma, "peersync_bytes_total", source="origin", direction="in") == total
    assert metric(ma, "peersync_bytes_total", source="peer", direction="in") == 0
    assert metric(ma, "peersync_bytes_total", source="local", direction="out") == total
    # B: everything from A, nothing from the origin; A sent at least that (a hedge sends twice)
    assert metric(mb, "peersync_bytes_total", source="peer", direction="in") == total
    assert metric(mb, "peersync_bytes_total", source="origin", direction="in") == 0
    assert metric(mb, "peersync_bytes_total", source="local", direction="out") == total
    assert metric(ma, "peersync_bytes_total", source="peer", direction="out") >= total
    # one latency observation per chunk stored, by source
    chunks = sum(-(-s // MIB) for s in sizes.values())
    assert metric(ma, "peersync_chunk_seconds_count", source="origin") == chunks
    assert metric(mb, "peersync_chunk_seconds_count", source="peer") == chunks
    assert metric(mb, "peersync_chunk_seconds_count", source="origin") == 0
    # the cache holds the blobs and the manifest; the control plane elected one tracker of two
    assert metric(ma, "peersync_cache_bytes", kind="complete") >= total
    assert metric(ma, "peersync_tracker") + metric(mb, "peersync_tracker") <= 1
    assert metric(ma, "peersync_members") >= 1
    assert metric(ma, "peersync_downloads_in_flight") == 0
    assert metric(ma, "peersync_unpacks_in_flight") == 0
    assert metric(ma, "peersync_info", version=__version__) == 1
    # every series is one METRICS names (the dashboard's test relies on that list)
    names = {name for name, _ in ma} | {name for name, _ in mb}
    assert names <= METRICS, names - METRICS
    # the same registry on the admin socket
    on_socket = parse_metrics(AdminClient(a.admin).text("/metrics"))
    assert metric(on_socket, "peersync_bytes_total", source="origin", direction="in") == total


def test_metrics_listener_is_loopback_and_socket_is_root_only(site: tuple[Node, Node]) -> None:
    a, _ = site
    assert a.metrics.startswith("127.0.0.1:")
    mode = a.admin.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    denied = cli("status", "--admin-socket", str(a.admin), check=False, user=65534)
    assert denied.returncode == 1
    assert denied.stderr.count("\n") == 1 and "permission denied" in denied.stderr


def test_cli_status_peers_version(site: tuple[Node, Node]) -> None:
    a, b = site
    st = a.json("status")
    assert st["version"] == __version__ and st["url"] == a.peer
    assert st["control"]["role"] in ("tracker", "member", "electing")
    assert st["cache"]["used"] > 0 and st["cache"]["budget"] is None
    assert st["transfers"]["downloads"] == []
    assert "role" in a.cli("status").stdout  # the table
    peers = b.json("peers")
    row = next(p for p in peers["peers"] if p["url"] == a.peer)
    assert row["throughput"] > 0 and row["rtt"] > 0 and row["state"] == "ok"
    assert row["chunks"] > 0 and row["p99"] is not None and row["p99"] >= row["rtt"]
    assert row["score"] > 0 and peers["chunk_size"] == MIB
    assert a.peer in b.cli("peers").stdout
    assert a.json("version") == {"cli": __version__, "daemon": __version__}


def test_cli_cache_ls_pin_unpin_evict_gc(site: tuple[Node, Node],
                                         images: list[tuple[BuiltImage, str]]) -> None:
    a, _ = site
    layer = images[0][0].layers[-1].descriptor.digest
    ls = a.json("cache", "ls")
    assert ls["blobs"]["complete"] >= len(blob_sizes(images[0][0]))
    assert a.json("cache", "pin", layer) == {"digest": layer, "changed": True}
    assert layer in a.json("cache", "ls")["pins"]
    refused = a.cli("cache", "evict", layer, check=False)  # pinned: protected
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert a.json("cache", "unpin", layer) == {"digest": layer, "changed": True}
    assert layer not in a.json("cache", "ls")["pins"]
    size = images[0][0].layers[-1].descriptor.size
    assert a.json("cache", "evict", layer) == {"digest": layer, "freed": size}
    assert f"sha256:{layer[7:]}" not in a.daemon.blob_files()
    gc = a.json("cache", "gc")
    assert set(gc) == {"forgotten", "evicted", "freed"}
    assert "budget" in a.cli("cache", "ls").stdout


def test_cli_prefetch_brings_an_image_into_the_store(site: tuple[Node, Node],
                                                     images: list[tuple[BuiltImage, str]]) -> None:
    _, b = site
    image, ref = images[1]
    out = b.json("prefetch", ref)
    (row,) = out["images"]
    assert row["image"] == ref and row["done"] and "error" not in row
    assert row["done_bytes"] == row["total"] == sum(blob_sizes(image).values()) + image.manifest.size
    assert set(blob_sizes(image)) <= b.daemon.blob_files()
    again = b.cli("prefetch", ref)  # the progress bars (on stderr), everything here already
    assert again.returncode == 0 and ref in again.stderr and not again.stdout
    bad = b.cli("prefetch", f"{ref.rsplit(':', 1)[0]}:no-such-tag", "--json", check=False)
    assert bad.returncode == 1 and json.loads(bad.stdout)["images"][0]["error"]


def test_cli_says_in_one_line_when_the_daemon_is_not_running(tmp_path: Path) -> None:
    cfg = tmp_path / "peersync.toml"
    cfg.write_text(f'socket = "{tmp_path}/peersync.sock"\n')  # the admin socket would be beside it
    for args in (["status"], ["peers"], ["cache", "ls"], ["prefetch", "busybox"]):
        proc = cli(*args, "--config", str(cfg), check=False)
        assert proc.returncode == 1, args
        assert proc.stderr.count("\n") == 1 and "not running" in proc.stderr, proc.stderr
        assert f"{tmp_path}/admin.sock" in proc.stderr
    version = json.loads(cli("version", "--admin-socket", str(tmp_path / "none.sock"), "--json").stdout)
    assert version == {"cli": __version__, "daemon": None}


def test_every_log_line_of_a_pull_carries_a_transfer_id(site: tuple[Node, Node]) -> None:
    a, _ = site
    lines = [json.loads(line) for line in a.daemon.process.log_path.read_text().splitlines()
             if line.startswith("{")]
    assert lines, "the daemon's log is not JSON although its stderr is a file"
    fetches = [rec for rec in lines if rec.get("event") == "origin fetch"]
    assert fetches and all(rec.get("transfer") for rec in fetches)
    blob_paths = {rec["path"] for rec in fetches}
    assert all(p.startswith("/v2/") and "/blobs/" in p for p in blob_paths)
    assert len({rec["transfer"] for rec in lines if rec.get("transfer")}) >= 2
