"""`peersync hosts`: merging our mirror into containerd's hosts.toml files and taking it out.

The central property: install then remove gives back the user's exact bytes, whatever the file
held; and in between, the file parses to the user's settings plus our host, tried first."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pytest

from kernel.errors import FailedPrecondition, InvalidArgument
from peersync import cli, hosts

MIRROR = "http://127.0.0.1:5000"

USER_FILES = {
    "plain": '''server = "https://registry.example.com"

[host."https://mirror.corp:5000"]
  capabilities = ["pull", "resolve"]
  ca = "/etc/certs/corp.pem"
''',
    "rich": '''# Corporate registry setup -- do not remove
server = "https://registry.example.com"
skip_verify = false

# first the LAN cache
[host."https://cache.lan"]
  capabilities = ["pull"]
  skip_verify = true
  override_path = true
  client = [["/etc/c.cert", "/etc/c.key"]]
  [host."https://cache.lan".header]
    x-custom = ["a", "b"]

# then the DR site
[host."https://dr.example.com"]
  capabilities = ["pull", "resolve", "push"]
  ca = ["/a.pem",
        "/b.pem"]
''',
    "tricky strings": '''server = "https://r.example"
note = """
[host."http://fake"] inside a string
# not a comment
"""
other = \'\'\'[brackets] in a literal\'\'\'
arr = [
  "x", # a comment inside an array
  "]",
]

[host."https://a.example"]
  capabilities = ["pull"]
''',
    "server only, no newline at end": 'server = "https://r.example"',
    "empty": "",
    "comments only": "# nothing configured yet\n",
    "crlf": 'server = "https://r.example"\r\n\r\n[host."https://a.example"]\r\n  capabilities = ["pull"]\r\n',
    "hosts only": '[host."https://a.example"]\n  capabilities = ["pull"]\n',
}


def write(tmp_path: Path, registry: str, text: str) -> Path:
    path = tmp_path / registry / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode())
    return path


def host_order(path: Path) -> list[str]:
    return list(tomllib.loads(path.read_text()).get("host", {}))


@pytest.mark.parametrize("name", list(USER_FILES))
def test_round_trip_restores_exact_bytes(tmp_path: Path, name: str) -> None:
    original = USER_FILES[name]
    path = write(tmp_path, "registry.example.com", original)
    user = tomllib.loads(original)
    assert hosts.install("registry.example.com", MIRROR, tmp_path).action == "added"
    merged = tomllib.loads(path.read_text())
    assert host_order(path) == [MIRROR, *user.get("host", {})]  # ours first, theirs in their order
    assert merged["host"][MIRROR] == {"capabilities": ["pull", "resolve"]}
    del merged["host"][MIRROR]
    if not merged["host"]:
        del merged["host"]
    assert merged == user  # every user setting intact
    assert hosts.remove("registry.example.com", tmp_path).action == "removed"
    assert path.read_bytes() == original.encode()


def test_block_goes_before_comments_of_the_first_host(tmp_path: Path) -> None:
    path = write(tmp_path, "r.example", USER_FILES["rich"])
    hosts.install("r.example", MIRROR, tmp_path)
    text = path.read_text()
    assert text.index(hosts.END) < text.index("# first the LAN cache")
    assert text.index("skip_verify = false") < text.index(hosts.BEGIN)  # top-level keys stay above


def test_tables_in_strings_are_not_headers(tmp_path: Path) -> None:
    path = write(tmp_path, "r.example", USER_FILES["tricky strings"])
    hosts.install("r.example", MIRROR, tmp_path)
    text = path.read_text()
    assert text.index("]\n\n" + hosts.BEGIN) > text.index('"]",')  # after the multi-line array


def test_install_is_idempotent_and_mirror_change_replaces(tmp_path: Path) -> None:
    original = USER_FILES["plain"]
    path = write(tmp_path, "r.example", original)
    hosts.install("r.example", MIRROR, tmp_path)
    once = path.read_bytes()
    assert hosts.install("r.example", MIRROR, tmp_path).action == "unchanged"
    assert path.read_bytes() == once
    assert hosts.install("r.example", "http://10.0.0.2:6000/", tmp_path).action == "replaced"
    assert host_order(path) == ["http://10.0.0.2:6000", "https://mirror.corp:5000"]
    assert path.read_text().count(hosts.BEGIN) == 1
    hosts.remove("r.example", tmp_path)
    assert path.read_bytes() == original.encode()


def test_created_file_uses_default_upstream_and_is_deleted(tmp_path: Path) -> None:
    for registry, server in [("docker.io", "https://registry-1.docker.io"), ("ghcr.io", "https://ghcr.io"),
                             ("localhost:5001", "https://localhost:5001"), ("_default", None)]:
        assert hosts.install(registry, MIRROR, tmp_path).action == "created"
        path = tmp_path / registry / "hosts.toml"
        parsed = tomllib.loads(path.read_text())
        assert parsed.get("server") == server
        assert list(parsed["host"]) == [MIRROR]
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert hosts.install("docker.io", "http://127.0.0.1:7000", tmp_path).action == "replaced"
    assert tomllib.loads((tmp_path / "docker.io/hosts.toml").read_text())["server"] == \
        "https://registry-1.docker.io"
    assert hosts.managed(tmp_path) == ["_default", "docker.io", "ghcr.io", "localhost:5001"]
    changes = hosts.remove_all(tmp_path)
    assert {c.action for c in changes} == {"deleted"}
    assert list(tmp_path.iterdir()) == []  # the directories we made are gone too


def test_created_file_with_user_additions_keeps_them(tmp_path: Path) -> None:
    hosts.install("docker.io", MIRROR, tmp_path)
    path = tmp_path / "docker.io" / "hosts.toml"
    with path.open("a") as f:
        f.write('\n[host."https://their.mirror"]\n  capabilities = ["pull"]\n')
    assert host_order(path) == [MIRROR, "https://their.mirror"]
    assert hosts.remove("docker.io", tmp_path).action == "removed"
    parsed = tomllib.loads(path.read_text())
    assert parsed == {"server": "https://registry-1.docker.io",
                      "host": {"https://their.mirror": {"capabilities": ["pull"]}}}
    assert hosts.BEGIN not in path.read_text()


def test_other_files_in_the_directory_are_untouched(tmp_path: Path) -> None:
    path = write(tmp_path, "r.example", USER_FILES["plain"])
    (path.parent / "ca.crt").write_text("cert")
    hosts.install("r.example", MIRROR, tmp_path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ca.crt", "hosts.toml"]  # no temp files
    hosts.remove("r.example", tmp_path)
    assert (path.parent / "ca.crt").read_text() == "cert"


def test_mode_is_kept_and_symlinks_stay_links(tmp_path: Path) -> None:
    path = write(tmp_path, "r.example", USER_FILES["plain"])
    os.chmod(path, 0o600)
    hosts.install("r.example", MIRROR, tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    real = tmp_path / "managed-elsewhere.toml"
    real.write_text(USER_FILES["rich"])
    link = tmp_path / "s.example" / "hosts.toml"
    link.parent.mkdir()
    link.symlink_to(real)
    hosts.install("s.example", MIRROR, tmp_path)
    assert link.is_symlink() and hosts.BEGIN in real.read_text()
    hosts.remove("s.example", tmp_path)
    assert link.is_symlink() and real.read_text() == USER_FILES["rich"]


@pytest.mark.parametrize("text", [
    'server = "https://r.example\n',  # unterminated string
    "[host.\"a\"]\ncapabilities = [\"pull\"]\n[host.\"a\"]\n",  # duplicate table
    "\xff\xfe not utf-8",
])
def test_unparsable_file_is_not_touched(tmp_path: Path, text: str) -> None:
    path = tmp_path / "r.example" / "hosts.toml"
    path.parent.mkdir()
    raw = text.encode("latin-1") if text.startswith("\xff") else text.encode()
    path.write_bytes(raw)
    with pytest.raises(FailedPrecondition, match="not valid TOML|not UTF-8"):
        hosts.install("r.example", MIRROR, tmp_path)
    assert path.read_bytes() == raw
    assert list(path.parent.iterdir()) == [path]


def test_user_already_has_our_url(tmp_path: Path) -> None:
    original = f'[host."{MIRROR}"]\n  capabilities = ["pull"]\n'
    path = write(tmp_path, "r.example", original)
    with pytest.raises(FailedPrecondition, match="already has its own"):
        hosts.install("r.example", MIRROR, tmp_path)
    assert path.read_text() == original


def test_hosts_from_dotted_keys_refused(tmp_path: Path) -> None:
    """Where the block cannot go first without changing the file, nothing is written."""
    original = 'server = "https://r.example"\nhost."https://a.example".capabilities = ["pull"]\n'
    path = write(tmp_path, "r.example", original)
    with pytest.raises(FailedPrecondition):
        hosts.install("r.example", MIRROR, tmp_path)
    assert path.read_text() == original


def test_damaged_markers_are_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "r.example", USER_FILES["plain"])
    hosts.install("r.example", MIRROR, tmp_path)
    text = path.read_text()
    path.write_text(text.replace(hosts.END + "\n", ""))
    with pytest.raises(FailedPrecondition, match="without its end marker"):
        hosts.remove("r.example", tmp_path)
    path.write_text(text + text[text.index(hosts.BEGIN):text.index(hosts.END)] + hosts.END + "\n")
    with pytest.raises(FailedPrecondition):
        hosts.install("r.example", MIRROR, tmp_path)


def test_edits_inside_the_block_are_detected_on_remove(tmp_path: Path) -> None:
    hosts.install("r.example", MIRROR, tmp_path)
    path = tmp_path / "r.example" / "hosts.toml"
    path.write_text(path.read_text() + "skip_verify = true\n")  # lands in our host table
    before = path.read_bytes()
    with pytest.raises(FailedPrecondition, match="edit it by hand"):
        hosts.remove("r.example", tmp_path)
    assert path.read_bytes() == before


def test_remove_without_block_is_a_noop(tmp_path: Path) -> None:
    path = write(tmp_path, "r.example", USER_FILES["plain"])
    assert hosts.remove("r.example", tmp_path).action == "absent"
    assert hosts.remove("nothing.example", tmp_path).action == "absent"
    assert path.read_text() == USER_FILES["plain"]


@pytest.mark.parametrize("registry", ["", "../etc", "a/b", "-x", "docker.io:port"])
def test_invalid_registry(tmp_path: Path, registry: str) -> None:
    with pytest.raises(InvalidArgument):
        hosts.install(registry, MIRROR, tmp_path)


@pytest.mark.parametrize("mirror", ["127.0.0.1:5000", "ftp://x", "http://", "http://a/?q=1", 'http://a"b'])
def test_invalid_mirror(tmp_path: Path, mirror: str) -> None:
    with pytest.raises(InvalidArgument):
        hosts.install("r.example", mirror, tmp_path)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "quay.io", USER_FILES["rich"])
    broken = write(tmp_path, "broken.example", "server = ")
    assert cli.main(["hosts", "install", "--dir", str(tmp_path), "--mirror", "http://127.0.0.1:5999",
                     "docker.io", "quay.io", "broken.example"]) == 2
    out, err = capsys.readouterr()
    assert "docker.io: created" in out and "quay.io: added" in out
    assert "broken.example" in err and "not valid TOML" in err
    assert host_order(path)[0] == "http://127.0.0.1:5999"
    assert cli.main(["hosts", "remove", "--dir", str(tmp_path)]) == 2  # neither names nor --all
    assert cli.main(["hosts", "remove", "--dir", str(tmp_path), "--all"]) == 0
    out, _ = capsys.readouterr()
    assert "docker.io: deleted" in out and "quay.io: removed" in out
    assert path.read_text() == USER_FILES["rich"] and broken.read_text() == "server = "
    assert not (tmp_path / "docker.io").exists()


def test_default_mirror_is_where_the_daemon_listens_by_default() -> None:
    from kernel.config import Config

    assert hosts.DEFAULT_MIRROR == f"http://{Config().mirror.listen}"
