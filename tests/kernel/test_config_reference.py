"""docs/config-reference.md is generated from the config schema (scripts/config_reference.py):
it must be what the script makes of kernel/config.py now, and the script refuses a schema key
without a description."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from kernel import config

ROOT = Path(__file__).resolve().parents[2]


def generator() -> ModuleType:
    path = ROOT / "scripts" / "config_reference.py"
    spec = importlib.util.spec_from_file_location("config_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_reference_is_up_to_date() -> None:
    committed = (ROOT / "docs" / "config-reference.md").read_text()
    assert committed == generator().render(), "run scripts/config_reference.py and commit the result"


def test_every_key_of_the_schema_is_in_the_reference() -> None:
    text = (ROOT / "docs" / "config-reference.md").read_text()
    default = config.Config()
    for f in dataclasses.fields(config.Config):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            assert f"## [{f.name}]" in text
            for sub in dataclasses.fields(value):
                assert f"| `{sub.name}` |" in text, f"{f.name}.{sub.name}"
        else:
            assert f"| `{f.name}` |" in text


def test_an_undescribed_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = generator()
    undescribed = config.DEFAULT_TOML.replace("# debug, info, warning, error\n", "")
    monkeypatch.setattr(gen.config, "DEFAULT_TOML", undescribed)
    with pytest.raises(SystemExit, match="log.level has no description"):
        gen.render()
