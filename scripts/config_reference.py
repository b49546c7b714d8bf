#!/usr/bin/env python3
"""Write docs/config-reference.md from the daemon's config schema (kernel/config.py).

    .venv/bin/python scripts/config_reference.py          # rewrite the reference
    .venv/bin/python scripts/config_reference.py --check  # exit 1 if it is out of date

Each key's type and default come from the `Config` dataclasses (what the loader enforces), its
description from the comments above it in `DEFAULT_TOML` (what `peersync config-defaults`
prints). A key of the schema without a description there, or a described key the schema does
not have, is an error: the reference cannot drift from the code. tests/kernel/test_config_reference.py
runs `--check`'s comparison in the suite.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernel import config  # noqa: E402  (the path above first)

OUT = ROOT / "docs" / "config-reference.md"

HEADER = """\
# Configuration reference

<!-- Generated from kernel/config.py by scripts/config_reference.py: edit the schema and its
     DEFAULT_TOML comments, then run the script. tests/kernel/test_config_reference.py fails when
     this file is out of date. -->

The daemon reads one TOML file (`peersync daemon --config FILE`); every key is optional, and an
unknown key or a value of the wrong type stops the daemon with a message naming the key.
`peersync config-defaults` prints the defaults with these descriptions. Command-line flags win
over the file: `--root`, `--socket`, `--metrics-listen` (`[admin] listen`).
"""


def descriptions() -> dict[str, str]:
    """"table.key" (or "key" at the top) -> the comment lines above it in DEFAULT_TOML."""
    out: dict[str, str] = {}
    table, comment = "", []
    for raw in config.DEFAULT_TOML.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            comment.append(line.lstrip("# ").rstrip())
        elif line.startswith("["):
            table = line.strip("[]")
            if "." in table:  # a sub-table ([origin.auth]): its comment describes it as a key
                out[table] = " ".join(comment)
            comment = []
        elif "=" in line:
            key = line.split("=", 1)[0].strip()
            out[f"{table}.{key}" if table else key] = " ".join(comment)
            comment = []
        else:
            comment = [] if not line else comment
    return out


def _type(f: dataclasses.Field[Any]) -> str:
    return str(f.type).replace("dict[str, dict[str, str]]", "table").replace("list[str]", "list of strings")


def _default(value: Any) -> str:
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, dict):
        return "`{}` (none)"
    return f"`{json.dumps(value)}`"


def render() -> str:
    described = descriptions()
    defaults = tomllib.loads(config.DEFAULT_TOML)
    used: set[str] = set()
    top: list[str] = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    sections: list[str] = []
    default = config.Config()
    for f in dataclasses.fields(config.Config):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
            for sub in dataclasses.fields(value):
                name = f"{f.name}.{sub.name}"
                if not described.get(name):
                    raise SystemExit(f"config key {name} has no description in DEFAULT_TOML")
                used.add(name)
                schema_default = _plain(getattr(value, sub.name))
                if defaults[f.name].get(sub.name, schema_default) != schema_default:
                    raise SystemExit(f"config key {name}: DEFAULT_TOML's default differs from the schema's")
                rows.append(f"| `{sub.name}` | {_type(sub)} | {_default(getattr(value, sub.name))} "
                            f"| {_cell(described[name])} |")
            sections += [f"## [{f.name}]", "", *rows, ""]
        else:
            if not described.get(f.name):
                raise SystemExit(f"config key {f.name} has no description in DEFAULT_TOML")
            used.add(f.name)
            top.append(f"| `{f.name}` | {_type(f)} | {_default(value)} | {_cell(described[f.name])} |")
    extra = set(described) - used - {"origin.auth"}
    if extra:
        raise SystemExit(f"DEFAULT_TOML describes keys the schema does not have: {sorted(extra)}")
    auth = described.get("origin.auth", "")
    return "\n".join([HEADER, "## Top level", "", *top, "", *sections,
                      "## [origin.auth]", "", auth, ""])


def _cell(text: str) -> str:
    """A description as one Markdown table cell."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run scripts/config_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
