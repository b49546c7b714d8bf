"""The traffic rule: no test, testbed helper or demo starts a daemon whose multicast DNS speaks on
one of the host's real interfaces. Daemons on the host run with mDNS off (or confined to
loopback); inside the network namespaces the tests create, mDNS runs as in production.

`testbed.peersyncd.start_peersync` refuses an unsafe config for a daemon in the host's
namespace before it writes or runs anything; these tests hold it to that, without starting a
daemon."""

from __future__ import annotations

from pathlib import Path

import pytest

from kernel.config import loads
from peer.control.discovery import beyond_loopback
from testbed.netns import nsenter_prefix
from testbed.peersyncd import (
    UnsafeDaemonConfig,
    check_host_config,
    in_test_namespace,
    loopback_config,
    start_peersync,
)

WILDCARD = '[peer]\nlisten = "0.0.0.0:5381"\n'  # the product default: mDNS on every interface
UNSAFE = [
    WILDCARD,
    '[peer]\nlisten = "10.0.0.5:5381"\n',
    '[peer]\nlisten = "127.0.0.1:5381"\n[discovery]\ninterfaces = ["eth0"]\n',
    '[peer]\nlisten = "127.0.0.1:5381"\n[discovery]\ninterfaces = ["lo", "192.168.1.2"]\n',
    "",  # no config at all: the defaults listen on 0.0.0.0
]
SAFE = [
    loopback_config(),
    loopback_config(plain_http=["127.0.0.1:5000"], peers=["127.0.0.1:1234"]),
    WILDCARD + "[discovery]\nmdns = false\n",
    '[peer]\nlisten = "127.0.0.1:5381"\n',  # mDNS on loopback only
    '[peer]\nlisten = "0.0.0.0:5381"\n[discovery]\ninterfaces = ["lo"]\n',
    '[peer]\nlisten = ""\n',  # no peer side, no control plane
]


@pytest.mark.parametrize("text", UNSAFE)
def test_a_config_that_would_multicast_on_the_host_is_refused(text: str) -> None:
    with pytest.raises(UnsafeDaemonConfig, match=r"\[discovery\] mdns = false"):
        check_host_config(text)


@pytest.mark.parametrize("text", SAFE)
def test_a_config_confined_to_loopback_or_without_mdns_is_accepted(text: str) -> None:
    check_host_config(text)


def test_loopback_config_turns_mdns_off() -> None:
    cfg = loads(loopback_config())
    assert cfg.discovery.mdns is False and beyond_loopback(cfg) == []


def test_start_peersync_refuses_before_writing_or_running_anything(tmp_path: Path) -> None:
    with pytest.raises(UnsafeDaemonConfig), start_peersync(tmp_path / "d", config=WILDCARD):
        pytest.fail("a daemon started")
    assert not (tmp_path / "d").exists()


def test_only_a_named_network_namespace_counts_as_a_test_namespace() -> None:
    assert in_test_namespace(nsenter_prefix("pst1x0-n0"))
    assert not in_test_namespace([])
    assert not in_test_namespace(["env", "FOO=1"])
    assert not in_test_namespace(["nsenter", "--net=/proc/1/ns/net", "--"])
