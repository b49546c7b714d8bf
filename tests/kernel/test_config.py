import tomllib
from pathlib import Path

import pytest

from kernel import config
from kernel.errors import InvalidArgument


def test_default_toml_documents_the_defaults() -> None:
    parsed = config._build(config.Config, tomllib.loads(config.DEFAULT_TOML), "defaults")
    assert parsed == config.Config()


def test_no_file_means_defaults() -> None:
    assert config.load(None) == config.Config()


def test_file_values_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        'root = "/srv/ps"\n[store]\nchunk_size = 4194304\n[log]\nformat = "json"\n'
        "[snapshotter]\nunpack_layers = false\n"
    )
    cfg = config.load(path)
    assert cfg.snapshotter.unpack_layers is False
    assert config.Config().snapshotter.unpack_layers is True
    assert cfg.root == Path("/srv/ps")
    assert cfg.store.chunk_size == 4 << 20
    assert cfg.log.format == "json"
    assert cfg.log.level == "info"
    cfg = cfg.with_overrides(root=Path("/x"), socket=None)
    assert cfg.root == Path("/x") and cfg.socket == config.Config().socket


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rot = '/x'\n", "unknown key 'rot'"),
        ("[store]\nchunksize = 1\n", "unknown key 'chunksize'"),
        ("[store]\nchunk_size = '1M'\n", "chunk_size must be of type int"),
        ("[store]\nchunk_size = 1000\n", "power of two"),
        ("[log]\nlevel = 'loud'\n", "log.level"),
        ("store = 3\n", "must be a table"),
        ("[snapshotter]\nunpack_layers = 1\n", "unpack_layers must be true or false"),
        ("[store]\nchunk_size = true\n", "chunk_size must be of type int"),
        ("root = ''\n", "non-empty path"),
        ("[grpc]\nread_message_size = 16\n", "read_message_size"),
        ("root = \n", "not valid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(InvalidArgument, match=message):
        config.load(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="cannot read config"):
        config.load(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20GiB", config.Budget(bytes=20 << 30)),
        ("20G", config.Budget(bytes=20 << 30)),
        ("500MB", config.Budget(bytes=500_000_000)),
        ("1.5 TiB", config.Budget(bytes=3 << 39)),
        ("1048576", config.Budget(bytes=1 << 20)),
        ("80%", config.Budget(fraction=0.8)),
        ("", config.Budget()),
    ],
)
def test_budget_forms(text: str, expected: config.Budget) -> None:
    assert config.parse_budget(text) == expected


@pytest.mark.parametrize("text", ["0%", "120%", "abc%", "5XB", "-1", "0", "GiB"])
def test_bad_budgets_are_refused_naming_the_key(tmp_path: Path, text: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'[cache]\nbudget = "{text}"\n')
    with pytest.raises(InvalidArgument, match=r"cache\.budget"):
        config.load(path)


def test_budget_share_follows_the_filesystem() -> None:
    assert config.parse_budget("50%").bytes_for(1000) == 500
    assert config.parse_budget("1KiB").bytes_for(10) == 1024
    assert config.parse_budget("").bytes_for(1000) is None


@pytest.mark.parametrize(
    ("toml", "match"),
    [
        ('[cache]\nlow_watermark = 0.9\nhigh_watermark = 0.8\n', "watermarks"),
        ('[site]\nname = "Not OK"\n', r"site\.name"),
        ('[peer]\nbootstrap = ["nohost"]\n', r"peer\.bootstrap"),
        ('[peer]\nsubnets = ["10.0.0.0/33"]\n', r"peer\.subnets"),
        ('[peer]\nchoice = "fastest"\n', r"peer\.choice"),
        ("[discovery]\nmdns = 1\n", "true or false"),
    ],
)
def test_control_plane_keys_are_validated(tmp_path: Path, toml: str, match: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(InvalidArgument, match=match):
        config.load(path)


def test_config_text_parses_like_a_file_and_names_where_it_came_from(tmp_path: Path) -> None:
    text = '[site]\nname = "plant-7"\n'
    (tmp_path / "c.toml").write_text(text)
    assert config.loads(text) == config.load(tmp_path / "c.toml")
    with pytest.raises(InvalidArgument, match="inline: site: unknown key 'nmae'"):
        config.loads('[site]\nnmae = "x"\n', where="inline")
    with pytest.raises(InvalidArgument, match="config inline is not valid TOML"):
        config.loads("[site", where="inline")
