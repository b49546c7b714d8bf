"""A site's certificates: `peersync site init` makes the site CA, `peersync site issue` a node's.

A site is the set of nodes that trust one CA (docs/tls.md). Every request on the peer port is
mutual TLS: a node serves only clients whose certificate the site CA signed, and asks only servers
whose certificate the site CA signed for the address it dialled. So the CA's private key *is*
site membership: whoever holds it can make members. Keep the site directory (`--dir`) on an
operator's machine, not on the nodes; a node gets only `ca.crt`, `node.crt` and `node.key`.

    init_site(DIR, name)             DIR/ca.key (0600), DIR/ca.crt (0644)
    issue_node(DIR, NODE, OUT, ...)  OUT/node.key (0600), OUT/node.crt, OUT/ca.crt (0644): the
                                     three files a node reads from /etc/peersync/tls by default

Choices, and why:
- ECDSA P-256 keys and SHA-256 signatures: small certificates and cheap handshakes on 2-core
  edge nodes, understood by every TLS stack.
- The CA is self-signed, valid 10 years, `BasicConstraints(ca, path_length=0)`: node
  certificates can never sign certificates of their own. It carries no name constraints: only
  PeerSync daemons trust it (they load it as their one trust anchor, never into a system store),
  so a constraint would protect nothing else, and a site's addresses change more often than its
  CA should.
- A node certificate is valid 1 year (`--days`), never beyond its CA, from 5 minutes in the past
  (edge clocks drift); it has both the server and the client EKU (every node is both) and the
  node's addresses as subject alternative names, which is what a peer dialling
  `https://ADDR:5381` checks. At least one address is required: a certificate no peer can match
  is useless.
- Files are written atomically (a temporary file with its final mode, fsync, rename, fsync of
  the directory), keys 0600 from the first byte. Nothing is ever replaced without `force`: a CA
  overwritten by mistake would cut every node of the site off at its next restart.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kernel.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from kernel.store.fsutil import fsync_dir

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
NODE_KEY = "node.key"
NODE_CERT = "node.crt"
CA_DAYS = 3650
NODE_DAYS = 365
BACKDATE = datetime.timedelta(minutes=5)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DNS = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


@dataclass(frozen=True)
class SiteFiles:
    """Where a site CA lives."""

    key: Path
    cert: Path


@dataclass(frozen=True)
class NodeFiles:
    """What a node needs (the `[tls]` keys `ca`, `cert`, `key`)."""

    ca: Path
    cert: Path
    key: Path
    not_after: datetime.datetime


def init_site(directory: Path, name: str = "default", force: bool = False, days: int = CA_DAYS) -> SiteFiles:
    """Make a site CA in `directory` (created 0700 if missing).

    Raises AlreadyExists when a CA (or half of one) is there and `force` is false, InvalidArgument
    for a bad name or lifetime."""
    if not _NAME.fullmatch(name):
        raise InvalidArgument(f"site name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    if days < 1:
        raise InvalidArgument(f"--days {days}: a CA must be valid at least one day")
    files = SiteFiles(directory / CA_KEY, directory / CA_CERT)
    present = [str(p) for p in (files.key, files.cert) if p.exists() or p.is_symlink()]
    if present and not force:
        raise AlreadyExists(
            f"a site CA exists already ({', '.join(present)}); replacing it cuts off every node it "
            "certified: pass --force to make a new one anyway"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "PeerSync"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"site {name}"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"PeerSync site {name} CA"),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _make_dir(directory)
    write_atomic(files.key, _key_pem(key), 0o600)
    write_atomic(files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return files


def _key_usage(signs_certificates: bool) -> x509.KeyUsage:
    """Digital signatures (the TLS 1.3 handshake's ECDSA) for every certificate; certificate and
    CRL signing for the CA's alone."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def issue_node(
    directory: Path,
    node: str,
    out: Path,
    ips: list[str],
    dns: list[str],
    force: bool = False,
    days: int = NODE_DAYS,
) -> NodeFiles:
    """Issue `node` a certificate from the site CA in `directory`, valid for addresses `ips` and
    names `dns`, into `out` (created 0700 if missing) with a copy of the CA certificate.

    Raises NotFound (no CA in `directory`), FailedPrecondition (an unusable or expired CA),
    InvalidArgument (bad name, address or lifetime; no address at all), AlreadyExists (files in
    `out` and no `force`)."""
    if not _NAME.fullmatch(node):
        raise InvalidArgument(f"node name {node!r}: use 1-64 letters, digits, '.', '_' or '-'")
    if days < 1:
        raise InvalidArgument(f"--days {days}: a certificate must be valid at least one day")
    sans: list[x509.GeneralName] = [x509.IPAddress(_ip(a)) for a in ips]
    sans += [x509.DNSName(_dns(d)) for d in dns]
    if not sans:
        raise InvalidArgument(
            f"node {node}: name the addresses other nodes reach it at (--ip ADDR, --dns NAME): "
            "peers check them against the certificate"
        )
    ca_key, ca_cert, ca_pem = load_site(directory)
    now = _now()
    not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    files = NodeFiles(out / CA_CERT, out / NODE_CERT, out / NODE_KEY, not_after)
    present = [str(p) for p in (files.ca, files.cert, files.key) if p.exists() or p.is_symlink()]
    if present and not force:
        raise AlreadyExists(f"{', '.join(present)} exist already: pass --force to replace them")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "PeerSync"),
                    *ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME),
                    x509.NameAttribute(NameOID.COMMON_NAME, node),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _make_dir(out)
    write_atomic(files.key, _key_pem(key), 0o600)
    write_atomic(files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    write_atomic(files.ca, ca_pem, 0o644)
    return files


def load_site(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, bytes]:
    """(CA key, CA certificate, the certificate's PEM) of the site CA in `directory`."""
    key_path, cert_path = directory / CA_KEY, directory / CA_CERT
    missing = [str(p) for p in (key_path, cert_path) if not p.exists()]
    if missing:
        raise NotFound(
            f"no site CA in {directory} ({', '.join(missing)} missing): "
            f"make one with `peersync site init --dir {directory}`"
        )
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        pem = cert_path.read_bytes()
        cert = x509.load_pem_x509_certificate(pem)
    except (OSError, ValueError, TypeError) as exc:
        raise FailedPrecondition(f"site CA in {directory} is unreadable: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise FailedPrecondition(f"{key_path} is not the key of {cert_path}")
    if cert.not_valid_after_utc <= _now():
        raise FailedPrecondition(
            f"the site CA {cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}: rotate it (docs/tls.md)"
        )
    return key, cert, pem


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write `path` whole or not at all, with `mode` from its first byte (never looser)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise FailedPrecondition(f"cannot write {path}: {exc.strerror}") from exc
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; never widened
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        raise FailedPrecondition(f"cannot write {path}: {exc.strerror}") from exc
    finally:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()


def _make_dir(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise FailedPrecondition(f"cannot create {directory}: {exc.strerror}") from exc


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        address = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        raise InvalidArgument(f"--ip {text!r} is not an IPv4 or IPv6 address") from None
    if address.is_unspecified or address.is_multicast:
        raise InvalidArgument(f"--ip {text!r} is not a node's address (give the one peers dial)")
    return address


def _dns(text: str) -> str:
    name = text.lower().rstrip(".")
    if len(name) > 253 or not _DNS.fullmatch(name):
        raise InvalidArgument(f"--dns {text!r} is not a host name (letters, digits, '-', dots; ASCII)")
    return name


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
