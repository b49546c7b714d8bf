"""peer.policy.subnet: which peers are on this node's subnet (the same-subnet preference)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peer.policy.subnet import REMOTE_FACTOR, Locality, host_address

ME = "http://10.0.0.100:5381"


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("http://10.0.0.5:5381", "10.0.0.5"),
        ("10.0.0.5:5381", "10.0.0.5"),
        ("http://[fd00::5]:5381", "fd00::5"),
        ("https://10.1.2.3", "10.1.2.3"),
        ("http://node-7.site:5381", None),  # a host name: we cannot tell without resolving it
        ("", None),
        ("http://[::1", None),  # unparsable
    ],
)
def test_host_address(url: str, address: str | None) -> None:
    got = host_address(url)
    assert (str(got) if got is not None else None) == address


@pytest.mark.parametrize(
    ("peer", "same"),
    [
        ("http://10.0.0.5:5381", True),
        ("http://10.0.0.255:5381", True),
        ("http://10.0.1.5:5381", False),  # the next /24
        ("http://192.168.0.5:5381", False),
        ("http://[fd00::5]:5381", False),  # another family is another network
        ("http://peer.example:5381", None),
    ],
)
def test_the_default_subnet_is_the_slash_24_around_our_address(peer: str, same: bool | None) -> None:
    assert Locality.of(ME).same(peer) is same


def test_ipv6_defaults_to_a_slash_64() -> None:
    loc = Locality.of("http://[fd00:1:2:3::10]:5381")
    assert loc.same("http://[fd00:1:2:3:ffff::1]:5381") is True
    assert loc.same("http://[fd00:1:2:4::1]:5381") is False


def test_configured_subnets_replace_the_default() -> None:
    loc = Locality.of(ME, ["10.0.0.0/16", "172.16.5.7/24"])
    assert loc.same("http://10.0.200.1:1") is True
    assert loc.same("http://172.16.5.99:1") is True  # host bits allowed in the config
    assert loc.same("http://10.1.0.1:1") is False


@pytest.mark.parametrize("me", ["", "http://self", "http://0.0.0.0:5381", "http://node-1:5381"])
def test_without_an_address_of_our_own_nothing_is_known(me: str) -> None:
    loc = Locality.of(me)
    assert loc.networks == ()
    assert loc.same("http://10.0.0.5:5381") is None
    assert loc.factor("http://10.0.0.5:5381") == 1.0


def test_only_a_peer_known_to_be_remote_pays_the_factor() -> None:
    loc = Locality.of(ME)
    assert loc.factor("http://10.0.0.5:5381") == 1.0
    assert loc.factor("http://peer.example:5381") == 1.0
    assert loc.factor("http://10.9.9.9:5381") == REMOTE_FACTOR > 1.0


@given(st.ip_addresses(v=4), st.integers(8, 30))
def test_same_means_inside_one_of_the_networks(address: ipaddress.IPv4Address, prefix: int) -> None:
    net = ipaddress.ip_network(f"10.0.0.0/{prefix}", strict=False)
    loc = Locality((net,))
    assert loc.same(f"http://{address}:1") is (address in net)


def test_a_remembered_answer_is_the_same_and_the_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import peer.policy.subnet as subnet

    monkeypatch.setattr(subnet, "MAX_SEEN", 3)
    loc = Locality.of(ME)
    urls = ["http://10.0.0.5:5381", "http://10.9.9.9:5381", "http://peer.example:5381", "http://10.0.0.6:1"]
    first = [loc.same(u) for u in urls]
    assert first == [True, False, None, True]
    assert [loc.same(u) for u in reversed(urls)] == list(reversed(first))
    assert len(loc._seen) <= 3
    assert loc == Locality.of(ME)  # what it remembers is not part of its value
