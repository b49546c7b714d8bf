"""`testbed.containerd.with_setting`: a key put into a daemon config's table, whatever the text has."""

from __future__ import annotations

import tomllib

from testbed.containerd import with_setting

LINE = 'containerd_address = "/tmp/ctrd-x/containerd.sock"'


def test_a_config_without_the_table_gets_it_at_the_end() -> None:
    text = with_setting('[peer]\nlisten = "1.2.3.4:5"', "snapshotter", LINE)
    parsed = tomllib.loads(text)
    assert parsed["snapshotter"]["containerd_address"] == "/tmp/ctrd-x/containerd.sock"
    assert parsed["peer"]["listen"] == "1.2.3.4:5"


def test_a_config_with_the_table_gets_the_key_inside_it_once() -> None:
    texts = (
        "[snapshotter]\nunpack_ahead = 4\n[peer]\npeers = []\n",
        "[peer]\npeers = []\n[snapshotter]\nunpack_ahead = 4\n",
    )
    for text in texts:
        parsed = tomllib.loads(with_setting(text, "snapshotter", LINE))
        assert parsed["snapshotter"] == {
            "unpack_ahead": 4,
            "containerd_address": "/tmp/ctrd-x/containerd.sock",
        }
        assert parsed["peer"] == {"peers": []}


def test_an_empty_config_and_a_lookalike_table() -> None:
    assert tomllib.loads(with_setting("", "snapshotter", LINE))["snapshotter"]["containerd_address"]
    parsed = tomllib.loads(with_setting("[snapshotter.x]\na = 1\n", "snapshotter", LINE))
    assert parsed["snapshotter"]["x"] == {"a": 1} and "containerd_address" in parsed["snapshotter"]
