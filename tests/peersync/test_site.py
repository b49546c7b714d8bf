"""`peersync site init` and `peersync site issue`: the site CA and node certificates (peersync/site.py).

Driven through the command's own entry point (`cli.main`), as an operator runs it; the files it
writes are checked with `cryptography` and with the TLS stack the daemon uses (`ssl`)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from peersync import cli, site


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """The widest umask: tight modes must come from the code, not from the environment."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_init_makes_a_ca_that_can_only_sign_node_certificates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], loose_umask: None
) -> None:
    d = tmp_path / "site"
    rc, out, _ = run(capsys, "site", "init", "--dir", str(d), "--name", "plant-7")
    assert rc == 0 and "ca.key" in out
    assert mode(d / "ca.key") == 0o600 and mode(d / "ca.crt") == 0o644 and mode(d) == 0o700
    ca = cert(d / "ca.crt")
    ca.verify_directly_issued_by(ca)  # self-signed
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert "plant-7" in ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert datetime.timedelta(days=3649) < lifetime < datetime.timedelta(days=3651)
    key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), password=None)
    assert key.public_key() == ca.public_key()
    assert sorted(p.name for p in d.iterdir()) == ["ca.crt", "ca.key"], "a temporary file was left"


def test_init_never_replaces_a_ca_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "site"
    assert run(capsys, "site", "init", "--dir", str(d))[0] == 0
    before = (d / "ca.key").read_bytes(), (d / "ca.crt").read_bytes()
    rc, _, err = run(capsys, "site", "init", "--dir", str(d))
    assert rc == 2 and "exists already" in err and "--force" in err
    assert ((d / "ca.key").read_bytes(), (d / "ca.crt").read_bytes()) == before
    (d / "ca.crt").unlink()  # half a CA (a crash, a careless rm) is still not overwritten
    assert run(capsys, "site", "init", "--dir", str(d))[0] == 2
    assert (d / "ca.key").read_bytes() == before[0]
    assert run(capsys, "site", "init", "--dir", str(d), "--force")[0] == 0
    assert (d / "ca.key").read_bytes() != before[0]


def test_issue_signs_a_node_certificate_for_its_addresses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], loose_umask: None
) -> None:
    d, out = tmp_path / "site", tmp_path / "n1-files"
    run(capsys, "site", "init", "--dir", str(d), "--name", "lab")
    rc, text, err = run(
        capsys, "site", "issue", "n1", "--dir", str(d), "--out", str(out),
        "--ip", "10.0.0.12", "--ip", "fd00::12", "--dns", "N1.site.example",
    )
    assert rc == 0, err
    assert "/etc/peersync/tls" in text
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "node.crt", "node.key"]
    assert mode(out / "node.key") == 0o600 and mode(out / "node.crt") == 0o644 and mode(out) == 0o700
    assert (out / "ca.crt").read_bytes() == (d / "ca.crt").read_bytes()
    ca, node = cert(d / "ca.crt"), cert(out / "node.crt")
    node.verify_directly_issued_by(ca)
    assert node.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "n1"
    assert not node.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ekus = set(node.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert ekus == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    sans = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.12"), ipaddress.ip_address("fd00::12")
    ]
    assert sans.get_values_for_type(x509.DNSName) == ["n1.site.example"]
    lifetime = node.not_valid_after_utc - node.not_valid_before_utc
    assert datetime.timedelta(days=365) < lifetime < datetime.timedelta(days=366)
    # What the daemon does with them: one TLS context takes the chain and the CA.
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(out / "ca.crt"))
    ctx.load_cert_chain(out / "node.crt", out / "node.key")


def test_issue_writes_under_the_site_dir_by_default_and_never_replaces_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "site"
    run(capsys, "site", "init", "--dir", str(d))
    assert run(capsys, "site", "issue", "n2", "--dir", str(d), "--ip", "127.0.0.1")[0] == 0
    files = d / "nodes" / "n2"
    key = (files / "node.key").read_bytes()
    rc, _, err = run(capsys, "site", "issue", "n2", "--dir", str(d), "--ip", "127.0.0.1")
    assert rc == 2 and "exist already" in err and (files / "node.key").read_bytes() == key
    assert run(capsys, "site", "issue", "n2", "--dir", str(d), "--ip", "127.0.0.1", "--force")[0] == 0
    assert (files / "node.key").read_bytes() != key


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ip", "10.0.0.300"], "--ip '10.0.0.300' is not an IPv4 or IPv6 address"),
        (["--ip", "0.0.0.0"], "is not a node's address"),
        (["--ip", "10.0.0.1:5381"], "is not an IPv4 or IPv6 address"),
        (["--dns", "bad_name"], "--dns 'bad_name' is not a host name"),
        (["--dns", "*.example"], "is not a host name"),
        ([], "name the addresses other nodes reach it at"),
        (["--ip", "10.0.0.1", "--days", "0"], "at least one day"),
    ],
)
def test_issue_refuses_bad_addresses_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    d = tmp_path / "site"
    run(capsys, "site", "init", "--dir", str(d))
    rc, _, err = run(capsys, "site", "issue", "n1", "--dir", str(d), *args)
    assert rc == 2 and message in err, err
    assert not (d / "nodes").exists(), "nothing is written for a refused request"


def test_issue_without_a_ca_says_how_to_make_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "site", "issue", "n1", "--dir", str(tmp_path / "nowhere"), "--ip", "10.0.0.1")
    assert rc == 2 and "no site CA in" in err and "peersync site init --dir" in err


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden", "x" * 65])
def test_issue_refuses_a_node_name_that_is_no_file_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    d = tmp_path / "site"
    run(capsys, "site", "init", "--dir", str(d))
    rc, _, err = run(capsys, "site", "issue", name, "--dir", str(d), "--ip", "10.0.0.1")
    assert rc == 2 and "node name" in err
    assert not (tmp_path / "escape").exists()


def test_issue_refuses_a_ca_whose_key_is_not_its_own(tmp_path: Path) -> None:
    a, b = site.init_site(tmp_path / "a"), site.init_site(tmp_path / "b")
    a.key.write_bytes(b.key.read_bytes())
    with pytest.raises(site.FailedPrecondition, match="is not the key of"):
        site.issue_node(tmp_path / "a", "n1", tmp_path / "out", ["10.0.0.1"], [])


def test_a_node_certificate_never_outlives_its_ca(tmp_path: Path) -> None:
    site.init_site(tmp_path / "s", days=30)
    files = site.issue_node(tmp_path / "s", "n1", tmp_path / "out", ["10.0.0.1"], [], days=365)
    assert files.not_after == cert(tmp_path / "s" / "ca.crt").not_valid_after_utc
    assert cert(files.cert).not_valid_after_utc == files.not_after
