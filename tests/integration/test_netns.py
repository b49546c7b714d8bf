"""The emulated edge site (testbed/netns.py): real namespaces, a tbf-shaped uplink, real pulls.

Three nodes pull and run the conformance image from a registry across a 50 Mbit/s uplink with
containerd's builtin stores (containerd, ctr and the shims all inside the node namespaces); the
uplink counters must show one copy per node; tbf must really limit a bulk transfer and follow
`set_uplink`; teardown (including of a crashed run's leftovers) must leave nothing behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from testbed.images import TEST_IMAGE_REPO, BuiltImage
from testbed.netns import (
    REGISTRY_IP,
    Site,
    cleanup_prefix,
    cleanup_stale_sites,
    list_netns,
    missing_tools,
    netns_pids,
    site_processes_alive,
)
from testbed.procs import run_checked

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]
UPLINK_MBIT = 50
TRANSFER_BYTES = 12 * 1000 * 1000

if missing_tools():
    pytestmark.append(pytest.mark.skip(reason=missing_tools()))


def root_links() -> set[str]:
    """Interface names in the root namespace (the site must never add any)."""
    out = run_checked(["ip", "-o", "link", "show"])
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with Site(nodes=3, uplink_mbit=UPLINK_MBIT, workdir=tmp_path_factory.mktemp("site")) as s:
        s.start_registry()
        yield s


@pytest.fixture(scope="module")
def site_image_ref(site: Site, test_image: BuiltImage) -> str:
    return site.push_image(test_image, TEST_IMAGE_REPO)


def test_addresses_and_names(site: Site) -> None:
    assert site.registry_ip == REGISTRY_IP
    assert [n.ip for n in site.nodes] == ["10.231.1.11", "10.231.1.12", "10.231.1.13"]
    assert set(site.namespaces) <= set(list_netns())
    assert all(n.netns.startswith(site.prefix + "-") for n in site.nodes)
    for ns, dev in ((site.wan_ns, "rtr"), (site.router_ns, "wan0")):
        assert "tbf" in site.qdisc(ns, dev) and "50Mbit" in site.qdisc(ns, dev)


def test_nodes_pull_and_run_through_the_uplink(
    site: Site, site_image_ref: str, test_image: BuiltImage
) -> None:
    """Each node pulls once over the shaped uplink (builtin stores) and runs the image with runc."""
    daemons = [node.start_containerd() for node in site.nodes]
    before_up, before_lan = site.uplink_bytes(), site.lan_bytes()
    started = time.monotonic()
    with ThreadPoolExecutor(len(daemons)) as pool:
        list(pool.map(lambda d: d.pull(site_image_ref), daemons))
    pull_seconds = time.monotonic() - started
    time.sleep(2 * site.sample_interval)
    uplink = site.uplink_bytes() - before_up
    lan = site.lan_bytes() - before_lan
    size = test_image.compressed_size
    print(
        f"\n3 pulls in {pull_seconds:.2f}s: uplink {uplink} B = {uplink / size:.3f}x the image "
        f"({size} B), LAN {lan} B, peak {site.sampler.peak_mbit(since=started):.1f} Mbit/s"
    )
    assert 3 * size <= uplink <= 3.5 * size
    assert lan >= uplink  # everything from the WAN reached the nodes across the LAN bridge
    for node, daemon in zip(site.nodes, daemons, strict=True):
        assert daemon.process.pid in netns_pids(node.netns), "containerd must live in the node namespace"
        assert daemon.run(site_image_ref) == test_image.expected_output


def test_tbf_limits_the_uplink_and_follows_set_uplink(site: Site) -> None:
    """A bulk WAN->LAN transfer takes at least ~70% of size/rate; a higher rate makes it faster."""
    node = site.nodes[0]
    ideal = {}
    took = {}
    try:
        for mbit in (UPLINK_MBIT, 4 * UPLINK_MBIT):
            site.set_uplink(mbit)
            assert f"{mbit}Mbit" in site.qdisc(site.wan_ns, "rtr")
            assert f"{mbit}Mbit" in site.qdisc(site.router_ns, "wan0")
            ideal[mbit] = TRANSFER_BYTES * 8 / (mbit * 1e6)
            took[mbit] = site.timed_transfer(site.registry_ns, REGISTRY_IP, node.netns, TRANSFER_BYTES)
            print(
                f"\n{mbit} Mbit/s: {took[mbit]:.3f}s (ideal {ideal[mbit]:.3f}s), "
                f"goodput {TRANSFER_BYTES * 8 / took[mbit] / 1e6:.1f} Mbit/s "
                f"= {ideal[mbit] / took[mbit]:.1%} of the rate"
            )
            assert took[mbit] >= 0.7 * ideal[mbit]
        fast, slow = took[4 * UPLINK_MBIT], took[UPLINK_MBIT]
        assert fast < slow / 2, f"set_uplink({4 * UPLINK_MBIT}) did not speed up the uplink: {took}"
        # LAN->WAN is shaped too (the router's end of the uplink).
        site.set_uplink(UPLINK_MBIT)
        up = site.timed_transfer(node.netns, node.ip, site.registry_ns, TRANSFER_BYTES // 2)
        assert up >= 0.7 * ideal[UPLINK_MBIT] / 2
    finally:
        site.set_uplink(UPLINK_MBIT)


def test_teardown_leaves_nothing(tmp_path: Path, test_image: BuiltImage) -> None:
    links_before = root_links()
    with Site(nodes=2, uplink_mbit=1000, lan_mbit=1000, workdir=tmp_path) as s:
        names = list(s.namespaces)
        s.start_registry()
        ref = s.push_image(test_image, TEST_IMAGE_REPO)
        ctrd = s.nodes[0].start_containerd()
        ctrd.pull(ref)
        container = f"t-{uuid.uuid4().hex[:12]}"
        ctrd.ctr("run", "-d", ref, container, "sleep", "600")  # left running on purpose
        task_pid = int(ctrd.ctr("tasks", "ls").splitlines()[1].split()[1])
        peersync = s.nodes[1].start_peersync()
        sleeper = s.nodes[1].spawn(["sleep", "600"])
        assert "tbf" in s.qdisc(s.nodes[0].netns, "eth0") and "tbf" in s.qdisc(s.lan_ns, "n1")
        assert root_links() == links_before
        pids = {p for ns in names for p in netns_pids(ns)}
        pids |= {ctrd.process.pid, peersync.process.pid, sleeper.pid, task_pid}
        assert site_processes_alive(sorted(pids)) == sorted(pids)
        assert s.registry is not None
        pids.add(s.registry.process.pid)
        prefix = s.prefix
    assert not [n for n in list_netns() if n.startswith(prefix + "-")]
    assert site_processes_alive(sorted(pids)) == []
    assert root_links() == links_before


def _crash_a_site(tmp_path: Path, prefix: str) -> tuple[str, int]:
    """A child process builds a site, starts a process in it and dies by SIGKILL (no teardown)."""
    code = (
        "import os, signal, sys; from pathlib import Path; from testbed.netns import Site\n"
        "s = Site(nodes=1, prefix=sys.argv[1] or None, workdir=Path(sys.argv[2])).start()\n"
        "p = s.nodes[0].spawn(['sleep', '600'])\n"
        "print(s.prefix, p.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-c", code, prefix, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == -9, done.stderr
    name, pid = done.stdout.split()
    return name, int(pid)


def test_leftovers_of_a_crashed_run_are_cleaned(tmp_path: Path) -> None:
    prefix = f"pscrash{uuid.uuid4().hex[:6]}"
    name, pid = _crash_a_site(tmp_path / "explicit", prefix)
    assert name == prefix and site_processes_alive([pid]) == [pid]
    assert any(n.startswith(prefix + "-") for n in list_netns())
    # A new site with the same prefix starts cleanly over the leftovers.
    with Site(nodes=1, prefix=prefix, workdir=tmp_path / "again") as s:
        assert s.uplink_bytes() >= 0
    assert site_processes_alive([pid]) == []
    assert not any(n.startswith(prefix + "-") for n in list_netns())
    # An auto-named site whose creator died is swept by the next site (or cleanup_stale_sites()).
    auto, pid = _crash_a_site(tmp_path / "auto", "")
    assert auto.startswith("pst") and any(n.startswith(auto + "-") for n in list_netns())
    removed = cleanup_stale_sites()
    assert any(n.startswith(auto + "-") for n in removed)
    assert site_processes_alive([pid]) == []
    assert cleanup_prefix(auto) == []
