"""peer.control.discovery and peer.control.identity without the network: where multicast DNS
would speak, the TXT record's round trip, the candidate list from static and bootstrap
addresses, and the node id kept in <root>/node-id."""

from __future__ import annotations

from pathlib import Path

import pytest

from kernel.config import loads
from peer.control.discovery import Discovery, beyond_loopback, mdns_addresses, parse_txt, txt_record
from peer.control.identity import link_mbit, local_record, node_id
from peer.policy.membership import Member

ME = Member("ab" * 16, "http://10.0.0.1:5381", "default", 1700000000.125, 2, 4, 8192, 10000)


def config(peer: str = 'listen = "127.0.0.1:5381"', discovery: str = "") -> str:
    return f"[peer]\n{peer}\n[discovery]\n{discovery}\n"


@pytest.mark.parametrize(
    ("text", "exposed"),
    [
        (config(), []),
        (config(peer='listen = "127.0.0.2:5381"'), []),
        (config(discovery="mdns = false", peer='listen = "0.0.0.0:5381"'), []),
        (config(peer='listen = ""'), []),
        (config(discovery='interfaces = ["lo", "127.0.0.1"]', peer='listen = "0.0.0.0:5381"'), []),
        (config(peer='listen = "0.0.0.0:5381"'), ["every interface"]),
        (config(peer='listen = "10.0.0.1:5381"'), ["10.0.0.1"]),
        (config(discovery='interfaces = ["lo", "eth0"]'), ["eth0"]),
        (config(discovery='interfaces = ["192.168.1.5"]'), ["192.168.1.5"]),
    ],
)
def test_beyond_loopback_judges_from_the_config_alone(text: str, exposed: list[str]) -> None:
    found = beyond_loopback(loads(text))
    assert len(found) == len(exposed)
    for got, want in zip(found, exposed, strict=True):
        assert want in got


def test_mdns_speaks_on_the_interface_holding_the_listen_address() -> None:
    assert mdns_addresses(loads(config())) == ["127.0.0.1"]


def test_mdns_on_named_interfaces() -> None:
    assert mdns_addresses(loads(config(discovery='interfaces = ["lo"]'))) == ["127.0.0.1"]


def test_mdns_on_every_interface_for_a_wildcard_listener() -> None:
    assert "127.0.0.1" in mdns_addresses(loads(config(peer='listen = "0.0.0.0:5381"')))


def test_no_mdns_when_off_or_without_a_listener() -> None:
    assert mdns_addresses(loads(config(discovery="mdns = false"))) == []
    assert mdns_addresses(loads(config(peer='listen = ""'))) == []


def test_an_interface_without_an_ipv4_address_is_skipped() -> None:
    assert mdns_addresses(loads(config(discovery='interfaces = ["no-such-if0"]'))) == []


def test_the_txt_record_carries_the_whole_member_record() -> None:
    props = {k.encode(): v.encode() for k, v in txt_record(ME).items()}
    assert parse_txt(props) == ("default", ME.url, ME)


def test_a_txt_record_of_another_version_is_ignored() -> None:
    props = {k.encode(): v.encode() for k, v in txt_record(ME).items()}
    props[b"v"] = b"2"
    assert parse_txt(props) is None


def test_a_txt_record_without_rank_fields_still_proposes_its_address() -> None:
    assert parse_txt({b"v": b"1", b"site": b"default", b"url": b"http://10.0.0.9:5381/"}) == (
        "default",
        "http://10.0.0.9:5381",
        None,
    )


def test_candidates_are_the_static_and_bootstrap_addresses_but_never_this_node() -> None:
    text = (
        '[peer]\nlisten = "127.0.0.1:5381"\npeers = ["10.0.0.2:5381", "http://10.0.0.1:5381"]\n'
        'bootstrap = ["10.0.0.3:5381", "10.0.0.2:5381"]\n[discovery]\nmdns = false\n'
    )
    d = Discovery(loads(text), ME)
    assert d.candidates() == {"http://10.0.0.2:5381": None, "http://10.0.0.3:5381": None}
    assert d.static == ["http://10.0.0.2:5381"] and not d.mdns


def test_the_node_id_is_made_once_and_kept(tmp_path: Path) -> None:
    first = node_id(tmp_path)
    assert len(first) == 32 and int(first, 16) >= 0
    assert node_id(tmp_path) == first
    assert (tmp_path / "node-id").read_text().strip() == first


def test_an_unreadable_node_id_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "node-id").write_text("not an id\n")
    assert node_id(tmp_path) != "not an id" and len(node_id(tmp_path)) == 32


def test_the_local_record_carries_the_site_and_priority() -> None:
    cfg = loads('[site]\nname = "plant-7"\ntracker_priority = -1\n')
    record = local_record(cfg, "cd" * 16, "http://127.0.0.1:5381", started=1.0)
    assert (record.site, record.priority, record.started, record.url) == (
        "plant-7",
        -1,
        1.0,
        "http://127.0.0.1:5381",
    )
    assert record.cpus >= 1 and record.mem_mib > 0


def test_link_speed_of_an_unknown_interface_is_unknown() -> None:
    assert link_mbit("no-such-if0") == 0 and link_mbit("lo") == 0
