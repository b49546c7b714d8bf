"""How this node speaks to the other nodes of its site: mutual TLS, plain HTTP for a lab, or not at all.

Site membership is a certificate from the site CA (`peersync site`, docs/tls.md). With one, every
request on the peer port (exchange, tracker, discovery's whois) is mutual TLS:

- the server requires a client certificate that the site CA signed (`CERT_REQUIRED`), so a
  stranger's connection fails in the handshake, before aiohttp has parsed a byte of HTTP and
  before any handler runs;
- the clients (the exchange's `PeerClient`, the control plane's session) present this node's
  certificate and verify the server's against the site CA, the address dialled checked against
  its subject alternative names;
- TLS 1.3 only: every peer is this daemon, so no old peer needs anything older, and 1.3 leaves
  no cipher or renegotiation choices to get wrong. X.509 checks are strict.

`load(config.tls)` decides the mode once, at start, and never raises for a file problem: the
daemon must not take containerd down because a certificate is missing or expired.

    mtls       the certificates load, chain to the site CA and are valid now
    insecure   `[tls] insecure = true`: plain HTTP, no authentication (a lab), warned about
    disabled   neither: the peer port is not opened and no peer is asked; the local side
               (containerd's plugins, the mirror pulling from the origin) keeps working.
               `reason` says why, and `status()` carries it into the control plane's status.

A certificate found at start is used until the daemon restarts (rotation: docs/tls.md).
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID

from kernel.config import TlsConfig

log = structlog.get_logger(__name__)

MTLS, INSECURE, DISABLED = "mtls", "insecure", "disabled"
EXPIRY_WARNING = datetime.timedelta(days=30)
INSECURE_WARNING = (
    "[tls] insecure = true: the peer port speaks plain HTTP without authentication; any host "
    "that reaches it can read every blob this node holds, private images included, and join the "
    "site's control plane. For labs only (docs/tls.md)"
)


class CertificateProblem(Exception):
    """Why the node's certificates cannot be used (the text goes into logs and status)."""


@dataclass(frozen=True)
class PeerTransport:
    """The outcome of `load`: the mode, and the SSL contexts in mode "mtls"."""

    mode: str
    server: ssl.SSLContext | None = None
    client: ssl.SSLContext | None = None
    reason: str = ""  # disabled: why; insecure: the warning
    warnings: tuple[str, ...] = ()
    certificate: dict[str, Any] = field(default_factory=dict)
    _names: frozenset[str] = frozenset()  # the certificate's SANs, normalised (check_address)

    @property
    def scheme(self) -> str:
        """The URL scheme of every peer URL this node makes or accepts."""
        return "http" if self.mode == INSECURE else "https"

    @property
    def enabled(self) -> bool:
        """Whether this node may serve and ask peers at all."""
        return self.mode != DISABLED

    def check_address(self, host: str) -> bool:
        """Whether `host` (an IP address or a DNS name) is one the certificate names; peers
        dialling this node there verify exactly that. Always true without TLS."""
        if self.mode != MTLS:
            return True
        try:
            return str(ipaddress.ip_address(host.strip("[]"))) in self._names
        except ValueError:
            return host.lower().rstrip(".") in self._names

    def status(self) -> dict[str, Any]:
        """JSON-compatible: `mode`, `scheme`, `reason` (disabled: why; insecure: the warning),
        `warnings` (e.g. the certificate expires soon) and `certificate` (mtls: `subject`,
        `issuer`, `not_after`, `expires_in_days`, `addresses`)."""
        return {
            "mode": self.mode,
            "scheme": self.scheme,
            "reason": self.reason,
            "warnings": list(self.warnings),
            "certificate": dict(self.certificate),
        }


def plain() -> PeerTransport:
    """Plain HTTP, as `[tls] insecure = true` gives (in-process tests of other concerns)."""
    return PeerTransport(INSECURE, reason=INSECURE_WARNING)


def load(config: TlsConfig, now: datetime.datetime | None = None) -> PeerTransport:
    """The peer transport `config` gives, logged loudly unless it is mutual TLS (module docstring)."""
    if config.insecure:
        present = [str(p) for p in (config.cert, config.key) if p.exists()]
        extra = (f"certificates at {', '.join(present)} are ignored",) if present else ()
        log.warning("PEER PORT UNAUTHENTICATED", reason=INSECURE_WARNING, notes=list(extra))
        return PeerTransport(INSECURE, reason=INSECURE_WARNING, warnings=extra)
    try:
        transport = _mtls(config, now or datetime.datetime.now(datetime.UTC))
    except CertificateProblem as exc:
        reason = (
            f"{exc}. The peer port stays closed and no peer is asked: pulls go to the origin, "
            "containerd and the mirror keep working. Install this node's certificate (`peersync "
            "site issue`, docs/tls.md) and restart, or set [tls] insecure = true in a lab"
        )
        log.error("PEER SIDE DISABLED: no usable site certificate", reason=reason)
        return PeerTransport(DISABLED, reason=reason)
    for warning in transport.warnings:
        log.warning("site certificate", warning=warning)
    return transport


def _mtls(config: TlsConfig, now: datetime.datetime) -> PeerTransport:
    ca_pem = _read(config.ca, "[tls] ca", "site CA certificate")
    cert_pem = _read(config.cert, "[tls] cert", "node certificate")
    _read(config.key, "[tls] key", "node private key")
    try:
        cas = x509.load_pem_x509_certificates(ca_pem)
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise CertificateProblem(f"{config.ca} or {config.cert} is not a PEM certificate: {exc}") from exc
    if cert.not_valid_after_utc <= now:
        raise CertificateProblem(
            f"the node certificate {config.cert} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        )
    if cert.not_valid_before_utc > now:
        raise CertificateProblem(
            f"the node certificate {config.cert} is valid only from "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (is this node's clock right?)"
        )
    issuer = next((ca for ca in cas if _issued_by(cert, ca)), None)
    if issuer is None:
        raise CertificateProblem(
            f"the node certificate {config.cert} is not signed by the site CA in {config.ca}"
        )
    try:
        ekus = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        ekus = {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    if not {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= ekus:
        raise CertificateProblem(
            f"the node certificate {config.cert} lacks the server or client auth usage "
            "(a node is both: issue it with `peersync site issue`)"
        )
    try:
        server, client = server_context(config), client_context(config)
    except (ssl.SSLError, OSError) as exc:
        raise CertificateProblem(f"{config.cert} with {config.key}: {exc}") from exc
    names = _names(cert)
    warnings = []
    left = cert.not_valid_after_utc - now
    if left < EXPIRY_WARNING:
        warnings.append(f"the node certificate {config.cert} expires in {left.days} days: issue a new one")
    if stat.S_IMODE(config.key.stat().st_mode) & 0o077:
        warnings.append(f"the node private key {config.key} is readable by others than its owner: chmod 600")
    info = {
        "subject": cert.subject.rfc4514_string(),
        "issuer": issuer.subject.rfc4514_string(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "expires_in_days": left.days,
        "addresses": sorted(names),
    }
    return PeerTransport(MTLS, server, client, warnings=tuple(warnings), certificate=info, _names=names)


def server_context(config: TlsConfig) -> ssl.SSLContext:
    """The peer port's context: this node's certificate; clients must show one the site CA signed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _common(ctx, config)
    ctx.verify_mode = ssl.CERT_REQUIRED
    # No TLS 1.3 session tickets: no peer client can resume (asyncio's SSL transport, which
    # aiohttp uses, never offers a saved session), so tickets were pure cost: OpenSSL 3 copies the
    # session for each of the default two, decoding the client's certificate again each time, and
    # sends them in an extra write; the client then parses both. That was a sixth to a third of the
    # server's handshake CPU (bench/RESULTS.md, "Mutual TLS between the nodes"). Every
    # connection still does a full mutually authenticated handshake.
    ctx.num_tickets = 0
    return ctx


def client_context(config: TlsConfig) -> ssl.SSLContext:
    """Every peer-facing client's context: this node's certificate presented, the server's checked
    against the site CA and the address dialled (`check_hostname`, IP addresses included)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname already
    _common(ctx, config)
    return ctx


def _common(ctx: ssl.SSLContext, config: TlsConfig) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(cafile=str(config.ca))
    ctx.load_cert_chain(str(config.cert), str(config.key))


def _read(path: Path, key: str, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertificateProblem(f"no {what} at {path} ({key})") from None
    except OSError as exc:
        raise CertificateProblem(f"cannot read the {what} {path} ({key}): {exc.strerror}") from exc


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _names(cert: x509.Certificate) -> frozenset[str]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return frozenset()
    ips = [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    return frozenset([*ips, *(d.lower() for d in sans.get_values_for_type(x509.DNSName))])
