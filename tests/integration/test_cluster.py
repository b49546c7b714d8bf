"""A 4-node edge site in network namespaces behind a tbf-shaped uplink: the issue-3 acceptance tests.

Every node runs its own containerd and peersync daemon; the registry sits across the uplink.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from testbed import gotools
from testbed.cluster import Cluster, ClusterNode
from testbed.images import BuiltImage, build_sized_image, compare_manifests, snapshot_tree
from testbed.netns import Site, missing_tools

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
if missing_tools():
    pytestmark.append(pytest.mark.skip(reason=missing_tools()))

UPLINK_MBIT = 80


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    return build_sized_image(tmp_path_factory.mktemp("cluster-image"), 24 << 20, layers=4, tag="cluster")


@pytest.fixture
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with Site(nodes=4, uplink_mbit=UPLINK_MBIT, workdir=tmp_path_factory.mktemp("site")) as s:
        s.start_registry()
        yield s


def check_node(cnode, ref: str, image: BuiltImage) -> None:
    assert cnode.daemon.corrupt_blobs() == []
    assert image.expected is not None
    with cnode.containerd.mount_image(ref, snapshotter=cnode.snapshotter) as rootfs:
        assert compare_manifests(image.expected, snapshot_tree(rootfs)) == []


def test_simultaneous_pulls_cross_the_uplink_about_once(site: Site, image: BuiltImage) -> None:
    ref = site.push_image(image, "edge/app")
    cluster = Cluster(site, mode="full")
    before = site.uplink_bytes()
    started = time.monotonic()
    times = cluster.pull_all(ref)
    uplink = site.uplink_bytes() - before
    size = image.compressed_size
    print(
        f"\n4 pulls: {[round(t, 2) for t in times]} s, uplink {uplink / size:.3f}x the image "
        f"({size} B), peak {site.sampler.peak_mbit(since=started):.1f} Mbit/s"
    )
    for cnode in cluster.nodes:
        print(cnode.node.name, cnode.stats())
    assert uplink <= 1.15 * size
    for cnode in cluster.nodes:
        assert cnode.run(ref, ("sh", "-c", "ls /payload | wc -l")).strip() == "4"
        check_node(cnode, ref, image)


@pytest.mark.skipif(gotools.missing_requirements() is not None, reason=gotools.missing_requirements() or "")
def test_go_client_pulls_cross_the_uplink_about_once_and_the_daemons_unpack_every_layer(
    site: Site, image: BuiltImage
) -> None:
    """`Cluster(client="go")` (the testbed's `--client go`): every node pulls at once with
    containerd's Go client as nerdctl does (chain IDs only), from inside its own namespace through
    its mirror; each daemon unpacks every layer, so containerd fetches and applies none."""
    ref = site.push_image(image, "edge/app")
    cluster = Cluster(site, mode="full", client="go")
    before = site.uplink_bytes()
    cluster.pull_all(ref)
    uplink = site.uplink_bytes() - before
    print(f"\n4 Go-client pulls: uplink {uplink / image.compressed_size:.3f}x the image")
    assert uplink <= 1.15 * image.compressed_size
    for cnode in cluster.nodes:
        (pulled,) = cnode.go_pulls
        assert (pulled.image, pulled.target) == (ref, image.manifest.digest)
        assert (pulled.layers, pulled.fetched_layers, pulled.applied_layers) == (len(image.layers), 0, 0)
        assert cnode.containerd.is_unpacked(ref, cnode.snapshotter)
        assert cnode.run(ref, ("sh", "-c", "ls /payload | wc -l")).strip() == "4"
        check_node(cnode, ref, image)


def test_killing_a_serving_peer_mid_pull(site: Site, image: BuiltImage) -> None:
    """SIGKILL one node's daemon while all four pull: the other three still end with a correct image."""
    from concurrent.futures import ThreadPoolExecutor

    ref = site.push_image(image, "edge/app")
    cluster = Cluster(site, mode="full")
    victim, survivors = cluster.nodes[0], cluster.nodes[1:]
    before = site.uplink_bytes()
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(n.pull, ref) for n in cluster.nodes]
        deadline = time.monotonic() + 60
        # kill once the site has pulled a good part of the image (the victim is serving chunks by then)
        while site.uplink_bytes() - before < 0.4 * image.compressed_size:
            assert time.monotonic() < deadline, "the pull never got going"
            time.sleep(0.02)
        victim.daemon.kill()
        with pytest.raises(Exception):  # noqa: B017 - the victim's own pull loses its plugin
            futures[0].result(timeout=120)
        for f in futures[1:]:
            f.result(timeout=180)
    for cnode in survivors:
        stats = cnode.stats()
        assert stats["corrupt_chunks"] == 0
        assert cnode.run(ref, ("sh", "-c", "ls /payload | wc -l")).strip() == "4"
        check_node(cnode, ref, image)


def elected(cluster: Cluster, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Wait until the site has one tracker that every node follows and every node sees all the
    others; the nodes' control-plane statuses then."""
    deadline = time.monotonic() + timeout
    while True:
        views = [n.control() for n in cluster.nodes]
        trackers = {v["tracker"]["id"] if v["tracker"] else None for v in views}
        roles = [v["role"] for v in views]
        if (
            roles.count("tracker") == 1
            and len(trackers) == 1
            and None not in trackers
            and all(len(v["members"]) == len(cluster.nodes) for v in views)
        ):
            return views
        assert time.monotonic() < deadline, [(v["role"], len(v["members"])) for v in views]
        time.sleep(0.2)


def leased(nodes: list[ClusterNode]) -> dict[str, int]:
    """The site's origin chunks by why they were fetched, and the `/have` polls: the tracker
    path leases every origin chunk and polls nobody."""
    keys = ("origin_lease_chunks", "origin_rescue_chunks", "origin_solo_chunks", "leases")
    stats = [n.stats() for n in nodes]
    return {k: sum(int(s.get(k, 0)) for s in stats) for k in keys}


@pytest.mark.parametrize("stagger", [0.0, 1.0], ids=["burst", "staggered"])
def test_a_site_that_names_no_peers_crosses_the_uplink_once_under_the_trackers_leases(
    site: Site, image: BuiltImage, stagger: float
) -> None:
    """Identical configs naming no peer: the nodes meet by mDNS, elect a tracker, and every origin
    chunk is fetched under its lease, once, whether the nodes pull together or one after another
    (1 s apart: each arrives while the others are mid-image). Every node runs the image."""
    ref = site.push_image(image, "edge/app")
    cluster = Cluster(site, mode="full", discovery=True)
    elected(cluster)
    before = site.uplink_bytes()
    times = cluster.pull_all(ref, stagger=stagger)
    uplink = site.uplink_bytes() - before
    size = image.compressed_size
    why = leased(cluster.nodes)
    print(
        f"\n{'staggered' if stagger else 'burst'}: {[round(t, 2) for t in times]} s, "
        f"uplink {uplink / size:.3f}x the image, origin chunks {why}"
    )
    assert uplink <= (1.05 if stagger else 1.1) * size
    assert why["origin_lease_chunks"] > 0 and why["origin_rescue_chunks"] == 0
    assert why["origin_solo_chunks"] == 0, "no origin chunk was fetched without the tracker"
    for cnode in cluster.nodes:
        assert cnode.run(ref, ("sh", "-c", "ls /payload | wc -l")).strip() == "4"
        check_node(cnode, ref, image)


def test_the_tracker_dies_mid_pull_on_a_site_that_names_no_peers(site: Site, image: BuiltImage) -> None:
    """Every node has the same config naming no peer (they meet by mDNS); SIGKILL the tracker
    while all four pull: the three others elect a new tracker and end with a correct image, and
    the uplink still carries about one image (the new tracker adopts the origin runs in flight
    from the members' full announcements; only the dead node's unshared chunks are lost)."""
    from concurrent.futures import ThreadPoolExecutor

    ref = site.push_image(image, "edge/app")
    cluster = Cluster(site, mode="full", discovery=True)
    views = elected(cluster)
    victim, dead = next(
        (n, v["id"]) for n, v in zip(cluster.nodes, views, strict=True) if v["role"] == "tracker"
    )
    survivors = [n for n in cluster.nodes if n is not victim]
    before = site.uplink_bytes()
    with ThreadPoolExecutor(4) as pool:
        futures = {n.node.name: pool.submit(n.pull, ref) for n in cluster.nodes}
        deadline = time.monotonic() + 60
        while site.uplink_bytes() - before < 0.4 * image.compressed_size:
            assert time.monotonic() < deadline, "the pull never got going"
            time.sleep(0.02)
        victim.daemon.kill()
        killed = time.monotonic()
        with pytest.raises(Exception):  # noqa: B017 - the victim's own pull loses its plugin
            futures[victim.node.name].result(timeout=120)
        for n in survivors:
            futures[n.node.name].result(timeout=180)
    views = [n.control() for n in survivors]
    (new,) = [v for v in views if v["role"] == "tracker"]
    assert all(v["tracker"]["id"] == new["id"] for v in views)
    assert all(dead not in {m["id"] for m in v["members"]} for v in views)
    uplink = site.uplink_bytes() - before
    print(
        f"\nsurvivors done {time.monotonic() - killed:.1f} s after the kill; new tracker {new['url']}; "
        f"uplink {uplink / image.compressed_size:.3f}x the image, origin chunks {leased(survivors)}"
    )
    assert uplink <= 1.3 * image.compressed_size
    for cnode in survivors:
        assert cnode.stats()["corrupt_chunks"] == 0
        assert cnode.run(ref, ("sh", "-c", "ls /payload | wc -l")).strip() == "4"
        check_node(cnode, ref, image)


def test_a_partition_and_its_healing_mid_pull_on_a_site_that_names_no_peers(
    site: Site, image: BuiltImage
) -> None:
    """Cut the LAN in two while all four pull (the side without the router loses the uplink too),
    hold it while each side elects its own tracker, heal: one tracker again, every pull succeeds
    with a correct image, and nothing is corrupt."""
    from concurrent.futures import ThreadPoolExecutor

    ref = site.push_image(image, "edge/app")
    cluster = Cluster(site, mode="full", discovery=True)
    elected(cluster)
    before = site.uplink_bytes()
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(n.pull, ref) for n in cluster.nodes]
        deadline = time.monotonic() + 60
        while site.uplink_bytes() - before < 0.3 * image.compressed_size:
            assert time.monotonic() < deadline, "the pull never got going"
            time.sleep(0.02)
        site.partition([2, 3])
        cut = time.monotonic()
        deadline = cut + 20
        while True:  # each side has a tracker of its own
            views = [n.control() for n in cluster.nodes]
            sides = (views[:2], views[2:])
            if all(sum(v["role"] == "tracker" for v in side) == 1 for side in sides):
                break
            assert time.monotonic() < deadline, [v["role"] for v in views]
            time.sleep(0.2)
        print(f"\none tracker per side {time.monotonic() - cut:.1f} s after the cut")
        site.heal()
        healed = time.monotonic()
        for f in futures:
            f.result(timeout=240)
    views = elected(cluster, timeout=20)
    print(
        f"pulls done and one tracker again {time.monotonic() - healed:.1f} s after healing; "
        f"uplink {(site.uplink_bytes() - before) / image.compressed_size:.3f}x the image"
    )
    assert len({v["tracker"]["id"] for v in views}) == 1
    for cnode in cluster.nodes:
        assert cnode.stats()["corrupt_chunks"] == 0
        assert cnode.run(ref, ("sh", "-c", "ls /payload | wc -l")).strip() == "4"
        check_node(cnode, ref, image)
