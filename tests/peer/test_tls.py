"""Site membership with mutual TLS, on the real network side (`peer.node.PeerNode` in this process:
its aiohttp servers, its store, its control plane) and real clients: raw `ssl` sockets, plain TCP,
aiohttp sessions as curl would be used, the exchange's `PeerClient`, the control plane's client.

Certificates come from the operator's own commands (`peersync site init/issue`, `testbed.pki`);
strangers' from `trustme`; an expired one is minted with `cryptography` and the site's own CA key.
Everything listens on 127.0.0.1 and is stopped by the test.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kernel.config import Config, TlsConfig, loads
from kernel.store.chunkstore import ChunkStore
from kernel.store.meta import Meta
from peer import tls
from peer.control.client import ControlClient, Counters
from peer.exchange import PREFIX, TCP_CONNECT_TIMEOUT, PeerClient, PeerError
from peer.node import PeerNode
from testbed.pki import NodeCert, SiteCA
from testbed.procs import free_port

CHUNK = 64 << 10
BLOB = bytes(range(256)) * 1024  # 256 KiB: four chunks
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


@dataclass
class Running:
    node: PeerNode
    port: int
    mirror: int
    cert: NodeCert | None

    @property
    def url(self) -> str:
        return f"{self.node.transport.scheme}://127.0.0.1:{self.port}"


@pytest.fixture
def site(tmp_path: Path) -> SiteCA:
    return SiteCA(tmp_path / "site", name="lab")


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """`await start(tls_toml, cert=None, peers=[])`: a PeerNode on free loopback ports holding BLOB."""
    running: list[tuple[PeerNode, ChunkStore, Meta]] = []

    async def make(tls_toml: str, cert: NodeCert | None = None, peers: list[str] | None = None) -> Running:
        port, mirror = free_port(), free_port()
        root = tmp_path / f"node-{port}"
        text = (
            f'[peer]\nlisten = "127.0.0.1:{port}"\npeers = {list(peers or [])!r}\n'.replace("'", '"')
            + f'[mirror]\nlisten = "127.0.0.1:{mirror}"\n[discovery]\nmdns = false\n'
            + tls_toml
        )
        cfg = loads(text).with_overrides(root=root)
        meta = Meta(root)
        store = ChunkStore(root, meta, CHUNK)
        store.recover()
        writer = store.ingests.open("blob", len(BLOB))
        writer.write_at(0, BLOB)
        writer.commit(len(BLOB), DIGEST)
        node = PeerNode(cfg, store, meta)
        await node.start()
        running.append((node, store, meta))
        return Running(node, port, mirror, cert)

    yield make
    for node, store, meta in running:
        await node.stop()
        store.close()
        meta.close()


def member(site: SiteCA, name: str = "member") -> NodeCert:
    return site.issue(name)


def raw_tls_request(port: int, context: ssl.SSLContext, request: bytes) -> bytes:
    """Connect, handshake, send `request`, read until the server closes; what came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
            conn.sendall(request)
            received = b""
            while chunk := conn.recv(65536):
                received += chunk
            return received


async def assert_refused(port: int, context: ssl.SSLContext, request: bytes) -> None:
    """The server answers `request` with nothing: the connection ends in the handshake (an alert,
    or closed: with TLS 1.3 the client's side of the handshake completes before the server has
    checked the client's certificate, and asyncio's server closes without flushing its alert)."""
    try:
        answer = await asyncio.to_thread(raw_tls_request, port, context, request)
    except (ssl.SSLError, ConnectionError) as exc:
        assert not isinstance(exc, ssl.SSLCertVerificationError), f"the client refused the server: {exc}"
        return
    assert answer == b"", f"the server answered: {answer[:200]!r}"


def plain_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(request)
        received = b""
        try:
            while chunk := conn.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        return received


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Connection: close\r\n\r\n".encode()


def whois_body(site_name: str = "default") -> dict[str, Any]:
    return {"v": 1, "site": site_name, "record": None}


async def received_whois(node: Running) -> int:
    """How many whois requests reached the handler (a counter the handler itself bumps)."""
    assert node.node.control is not None
    return node.node.control.counters.snapshot()["whois_received"]


# -- a member gets in ----------------------------------------------------------------------------


async def test_a_site_member_reads_views_tables_chunks_and_control_messages(
    site: SiteCA, start: Callable[..., Any]
) -> None:
    a_cert = site.issue("a")
    a = await start(a_cert.toml(), a_cert)
    assert a.node.transport.mode == tls.MTLS and a.url.startswith("https://")
    b = member(site, "b")
    async with aiohttp.ClientSession() as session:
        client = PeerClient(session, ssl=b.client_context())
        views = await client.have(a.url, [DIGEST])
        assert views[DIGEST].complete
        assert len(await client.table(a.url, DIGEST, 4)) == 4
        reply = await client.chunk(a.url, DIGEST, CHUNK, CHUNK)
        assert reply.data == BLOB[CHUNK : 2 * CHUNK] and reply.claim == hashlib.sha256(reply.data).digest()
    control = ControlClient("default", Counters(), 5.0, ssl=b.client_context())
    try:
        assert a.node.control is not None
        answer = await control.whois(a.url, a.node.control.me)
        assert answer is not None and answer.record.id == a.node.control.node_id
    finally:
        await control.close()
    assert await received_whois(a) == 1
    status = a.node.control.status()
    assert status["transport"]["mode"] == "mtls"
    assert status["transport"]["certificate"]["addresses"] == ["127.0.0.1"]


# -- strangers are refused in the handshake ----------------------------------------------------------


async def test_no_client_certificate_is_refused_in_the_handshake_before_any_handler(
    site: SiteCA, start: Callable[..., Any]
) -> None:
    a_cert = site.issue("a")
    a = await start(a_cert.toml(), a_cert)
    trusting = ssl.create_default_context(cafile=str(a_cert.ca))  # verifies the server, shows nothing
    body = b'{"v": 1, "site": "default", "record": null}'
    whois = (
        f"POST /peersync/v1/control/whois HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    data = get(f"{PREFIX}/blobs/{DIGEST}/data", "Range: bytes=0-65535\r\n")
    for request in (whois, data, get(f"{PREFIX}/stats")):
        await assert_refused(a.port, trusting, request)
    assert await received_whois(a) == 0, "a handler ran for a client without a certificate"
    # the same whois with a site member's certificate reaches the handler: the counter counts
    member_ctx = member(site).client_context()
    assert (await asyncio.to_thread(raw_tls_request, a.port, member_ctx, whois)).startswith(b"HTTP/1.1 200")
    assert await received_whois(a) == 1


async def test_plain_http_to_the_peer_port_gets_no_http_answer(
    site: SiteCA, start: Callable[..., Any]
) -> None:
    """The issue's finding 1, at the exchange: `curl http://node:5381/...` no longer answers."""
    a_cert = site.issue("a")
    a = await start(a_cert.toml(), a_cert)
    for path in (f"{PREFIX}/blobs/{DIGEST}/data", f"{PREFIX}/blobs/{DIGEST}", f"{PREFIX}/stats"):
        answer = await asyncio.to_thread(plain_request, a.port, get(path, "Range: bytes=0-65535\r\n"))
        assert not answer.startswith(b"HTTP/"), answer[:200]
        assert BLOB[:64] not in answer


@pytest.mark.parametrize("verify", [True, False], ids=["verifying", "like-curl-k"])
async def test_an_http_client_without_a_certificate_gets_nothing(
    site: SiteCA, start: Callable[..., Any], verify: bool
) -> None:
    a_cert = site.issue("a")
    a = await start(a_cert.toml(), a_cert)
    context: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(a_cert.ca)) if verify else False
    async with aiohttp.ClientSession() as session:
        for method, path, kw in (
            ("GET", f"/blobs/{DIGEST}/data", {"headers": {"Range": "bytes=0-65535"}}),
            ("POST", "/have", {"json": {"digests": [DIGEST]}}),
            ("GET", "/stats", {}),
            ("GET", "/control/status", {}),
        ):
            with pytest.raises(aiohttp.ClientError):
                async with session.request(method, f"{a.url}{PREFIX}{path}", ssl=context, **kw) as resp:
                    await resp.read()


def stranger_ca_cert(tmp_path: Path) -> NodeCert:
    """A certificate for 127.0.0.1 from a CA that is not the site's (trustme)."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    out = tmp_path / "stranger"
    out.mkdir()
    ca.cert_pem.write_to_path(str(out / "ca.crt"))
    leaf.cert_chain_pems[0].write_to_path(str(out / "node.crt"))
    leaf.private_key_pem.write_to_path(str(out / "node.key"))
    return NodeCert(out / "ca.crt", out / "node.crt", out / "node.key")


def expired_cert(site: SiteCA, tmp_path: Path) -> NodeCert:
    """A node certificate the site CA itself signed, expired yesterday."""
    ca_key = serialization.load_pem_private_key((site.directory / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = x509.load_pem_x509_certificate(site.ca.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "expired")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=30))
        .not_valid_after(now - datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("expired.test")]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out = tmp_path / "expired"
    out.mkdir()
    (out / "node.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "node.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    (out / "node.key").chmod(0o600)
    return NodeCert(site.ca, out / "node.crt", out / "node.key")


def presenting(cert: NodeCert, trust: Path) -> ssl.SSLContext:
    """A client that verifies the server against `trust` and presents `cert` (whatever signed it)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(trust))
    ctx.load_cert_chain(cert.cert, cert.key)
    return ctx


@pytest.mark.parametrize("who", ["another-site", "trustme-ca", "expired"])
async def test_a_certificate_the_site_ca_did_not_sign_or_that_expired_is_refused(
    site: SiteCA, start: Callable[..., Any], tmp_path: Path, who: str
) -> None:
    a_cert = site.issue("a")
    a = await start(a_cert.toml(), a_cert)
    if who == "another-site":  # a node of the neighbouring site, made with the same tool
        cert = SiteCA(tmp_path / "other-site", name="other").issue("intruder")
    elif who == "trustme-ca":
        cert = stranger_ca_cert(tmp_path)
    else:
        cert = expired_cert(site, tmp_path)
    context = presenting(cert, a_cert.ca)
    await assert_refused(a.port, context, get(f"{PREFIX}/stats"))
    async with aiohttp.ClientSession() as session:
        client = PeerClient(session, ssl=context)
        with pytest.raises(PeerError):
            await client.have(a.url, [DIGEST])
        with pytest.raises(PeerError):
            await client.chunk(a.url, DIGEST, 0, CHUNK)
    assert await received_whois(a) == 0


# -- and a member refuses a server that is not what it dialled ----------------------------------------


async def test_a_member_refuses_a_server_outside_the_site_or_at_an_address_its_cert_does_not_name(
    site: SiteCA, start: Callable[..., Any], tmp_path: Path
) -> None:
    b = member(site, "b")
    stranger = stranger_ca_cert(tmp_path)
    s = await start(stranger.toml(), stranger)  # a TLS server whose certificate is from another CA
    assert s.node.transport.mode == tls.MTLS  # it trusts its own CA: a consistent node of another site
    elsewhere = site.issue("moved", ips=["10.9.9.9"])  # the site's CA, but for another address
    m = await start(elsewhere.toml(), elsewhere)
    assert any("peers will refuse it" in w for w in m.node.transport.warnings)
    assert m.node.control is not None
    assert any("peers will refuse it" in w for w in m.node.control.status()["transport"]["warnings"])
    async with aiohttp.ClientSession() as session:
        client = PeerClient(session, ssl=b.client_context())
        with pytest.raises(PeerError, match="CERTIFICATE_VERIFY_FAILED"):
            await client.have(s.url, [DIGEST])
        with pytest.raises(PeerError, match="IP address mismatch"):
            await client.have(m.url, [DIGEST])


async def test_two_nodes_of_one_site_pull_chunks_from_each_other_over_tls(
    site: SiteCA, start: Callable[..., Any]
) -> None:
    """The engine's own path: B's peers are https URLs made from bare addresses, asked with B's cert."""
    a_cert, b_cert = site.issue("a"), site.issue("b")
    a = await start(a_cert.toml(), a_cert)
    b = await start(b_cert.toml(), b_cert, peers=[f"127.0.0.1:{a.port}"])
    assert b.node.engine is not None and b.node.control is not None
    assert a.url in b.node.control.peers()
    assert b.node.engine.client is not None
    views = await b.node.engine.client.have(a.url, [DIGEST])
    assert views[DIGEST].complete


# -- insecure and disabled ---------------------------------------------------------------------------


async def test_insecure_serves_plain_http_and_says_so_loudly(start: Callable[..., Any]) -> None:
    with structlog.testing.capture_logs() as logs:
        a = await start("[tls]\ninsecure = true\n")
    assert a.url.startswith("http://")
    warning = [e for e in logs if e["event"] == "PEER PORT UNAUTHENTICATED"]
    assert warning and warning[0]["log_level"] == "warning"
    async with aiohttp.ClientSession() as session:
        headers = {"Range": f"bytes=0-{CHUNK - 1}"}
        async with session.get(f"{a.url}{PREFIX}/blobs/{DIGEST}/data", headers=headers) as r:
            assert r.status == 206 and await r.read() == BLOB[:CHUNK]
    assert a.node.control is not None
    transport = a.node.control.status()["transport"]
    assert transport["mode"] == "insecure" and "without authentication" in transport["reason"]


async def test_without_certificates_the_peer_side_is_off_and_the_local_side_works(
    start: Callable[..., Any], tmp_path: Path
) -> None:
    """The default when no certificate is installed (docs/tls.md): the peer port is never opened
    and no peer is asked, but the mirror answers and the engine still has the origin; the log
    and the control plane's status (served on the loopback mirror too) say why."""
    missing = TlsConfig(ca=tmp_path / "none" / "ca.crt", cert=tmp_path / "none" / "node.crt")
    toml = f'[tls]\nca = "{missing.ca}"\ncert = "{missing.cert}"\nkey = "{tmp_path / "none" / "k"}"\n'
    with structlog.testing.capture_logs() as logs:
        a = await start(toml, peers=["127.0.0.1:1"])
    errors = [e for e in logs if e["log_level"] == "error"]
    assert any(e["event"].startswith("PEER SIDE DISABLED") and str(missing.ca) in e["reason"] for e in errors)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", a.port)
    assert a.node.control is not None and a.node.engine is not None
    assert a.node.control.role == "disabled" and a.node.control.peers() == []
    status = a.node.control.status()
    assert status["role"] == "disabled" and status["transport"]["mode"] == "disabled"
    assert "no site CA certificate at" in status["transport"]["reason"]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{a.mirror}/v2/") as r:
            assert r.status == 200
        async with session.get(f"http://127.0.0.1:{a.mirror}/peersync/v1/control/status") as r:
            local = await r.json()
    assert local["role"] == "disabled" and local["transport"]["reason"] == status["transport"]["reason"]
    assert a.node.engine.peer_source.peers() == []


# -- what load() makes of the files --------------------------------------------------------------


def test_load_refuses_files_that_do_not_belong_together(site: SiteCA, tmp_path: Path) -> None:
    a, b = site.issue("a"), site.issue("b")
    other = SiteCA(tmp_path / "other").issue("x")
    cases = {
        "is not the key": TlsConfig(ca=a.ca, cert=a.cert, key=b.key),
        "is not signed by the site CA": TlsConfig(ca=other.ca, cert=a.cert, key=a.key),
        "no node private key at": TlsConfig(ca=a.ca, cert=a.cert, key=tmp_path / "nope"),
    }
    for problem, files in cases.items():
        transport = tls.load(files)
        assert transport.mode == tls.DISABLED and transport.server is None and transport.client is None
        assert (problem in transport.reason) or ("KEY_VALUES_MISMATCH" in transport.reason), (
            problem,
            transport.reason,
        )


def test_load_warns_of_an_expiry_near_and_a_key_others_can_read(site: SiteCA) -> None:
    a = site.issue("a")
    a.key.chmod(0o644)
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=340)
    transport = tls.load(a.config, now=soon)
    assert transport.mode == tls.MTLS
    assert any("expires in" in w for w in transport.warnings)
    assert any("chmod 600" in w for w in transport.warnings)
    later = soon + datetime.timedelta(days=60)
    assert "expired on" in tls.load(a.config, now=later).reason


def test_contexts_speak_tls13_only_and_require_a_client_certificate(site: SiteCA) -> None:
    a = site.issue("a")
    server, client = tls.server_context(a.config), tls.client_context(a.config)
    assert server.verify_mode == ssl.CERT_REQUIRED
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname
    assert server.minimum_version == client.minimum_version == ssl.TLSVersion.TLSv1_3


def handshake_in_memory(
    server: ssl.SSLContext, client: ssl.SSLContext
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A full handshake between `server` and `client` over memory BIOs, the client then reading
    what the server sent after it (TLS 1.3 sends its session tickets there): (server, client)."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    s = server.wrap_bio(s_in, s_out, server_side=True)
    c = client.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    done: set[str] = set()
    for _ in range(10):
        for name, side, out, into in (("c", c, c_out, s_in), ("s", s, s_out, c_in)):
            if name not in done:
                try:
                    side.do_handshake()
                    done.add(name)
                except ssl.SSLWantReadError:
                    pass
            into.write(out.read())
    assert done == {"c", "s"}
    with pytest.raises(ssl.SSLWantReadError):
        c.read(1)  # no application data: this only processes the post-handshake messages
    return s, c


def test_the_server_issues_no_session_tickets_and_still_authenticates_both_sides(site: SiteCA) -> None:
    # No peer client can resume a session (asyncio's SSL transport never offers one), so the
    # tickets a TLS 1.3 server sends by default were handshake cost for nothing (peer.tls).
    a, b = site.issue("a"), site.issue("b")
    server_obj, client_obj = handshake_in_memory(tls.server_context(a.config), tls.client_context(b.config))
    assert client_obj.version() == "TLSv1.3"
    assert server_obj.getpeercert()["subject"] and client_obj.getpeercert()["subject"]
    assert client_obj.session is not None and not client_obj.session.has_ticket
    # the same handshake from a context that keeps OpenSSL's default does get a ticket: the
    # check above can tell the two apart
    default = tls.server_context(a.config)
    default.num_tickets = 2
    _, with_ticket = handshake_in_memory(default, tls.client_context(b.config))
    assert with_ticket.session is not None and with_ticket.session.has_ticket


async def test_a_node_serves_its_peers_without_session_tickets(
    site: SiteCA, start: Callable[..., Any]
) -> None:
    a_cert = site.issue("a")
    a = await start(a_cert.toml(), a_cert)

    def ask() -> tuple[bytes, ssl.SSLSession | None]:
        with socket.create_connection(("127.0.0.1", a.port), timeout=10) as raw:
            with member(site).client_context().wrap_socket(raw, server_hostname="127.0.0.1") as conn:
                conn.sendall(get(f"{PREFIX}/blobs/{DIGEST}"))
                received = b""
                while chunk := conn.recv(65536):
                    received += chunk
                return received, conn.session

    answer, session = await asyncio.to_thread(ask)
    assert answer.startswith(b"HTTP/1.1 200")
    assert session is not None and not session.has_ticket


async def test_control_messages_reuse_one_connection_and_count_the_connections_opened(
    site: SiteCA, start: Callable[..., Any]
) -> None:
    a_cert = site.issue("a")
    a = await start(a_cert.toml(), a_cert)
    assert a.node.control is not None
    counters = Counters()
    control = ControlClient("default", counters, 5.0, ssl=member(site).client_context())
    try:
        for _ in range(3):
            assert await control.whois(a.url, a.node.control.me) is not None
    finally:
        await control.close()
    # one handshake for three messages: the warm connection carried the other two
    assert counters.snapshot()["connections_opened"] == 1
    assert counters.snapshot()["whois_sent"] == 3
    # the node's own counts are in its stats (its sessions have opened none: it asked nobody)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{a.url}{PREFIX}/stats", ssl=member(site).client_context()) as resp:
            stats = await resp.json()
    assert stats["connections_opened"] == 0 and stats["control"]["connections_opened"] == 0


def test_default_config_is_mutual_tls_at_the_documented_paths() -> None:
    t = Config().tls
    assert not t.insecure and str(t.cert) == "/etc/peersync/tls/node.crt"


async def test_a_ca_bundle_lets_old_and_new_certificates_meet_while_the_site_ca_is_rotated(
    tmp_path: Path, start: Callable[..., Any]
) -> None:
    """docs/tls.md's CA rotation: every node first trusts old + new (one ca.crt holding both),
    then gets a certificate from the new CA. A node that still trusts only the old CA refuses a
    rotated node's server, which is why the bundle goes everywhere first."""
    old, new = SiteCA(tmp_path / "old", name="old"), SiteCA(tmp_path / "new", name="new")
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(old.ca.read_bytes() + new.ca.read_bytes())

    def files(site: SiteCA, name: str, trust: Path) -> NodeCert:
        cert = site.issue(name)
        return NodeCert(trust, cert.cert, cert.key)

    rotated, bundled, late = files(new, "a", bundle), files(old, "b", bundle), files(old, "c", old.ca)
    nodes = {k: await start(c.toml(), c) for k, c in (("a", rotated), ("b", bundled), ("c", late))}
    assert all(n.node.transport.mode == tls.MTLS for n in nodes.values())
    async with aiohttp.ClientSession() as session:

        async def ask(who: NodeCert, server: str) -> None:
            await PeerClient(session, ssl=who.client_context()).have(nodes[server].url, [DIGEST])

        await ask(bundled, "a")  # old cert, to the rotated node: it trusts the old CA too
        await ask(rotated, "b")  # new cert, to a bundled node
        await ask(late, "b")  # old to old: the bundle changed nothing for them
        with pytest.raises(PeerError, match="CERTIFICATE_VERIFY_FAILED"):
            await ask(late, "a")  # it cannot check the rotated node's new certificate
        with pytest.raises(PeerError):
            await ask(rotated, "c")  # nor does it accept it from a client


async def test_a_peer_slow_to_shake_hands_is_waited_for_not_given_up_on(site: SiteCA) -> None:
    """A TLS handshake needs the peer's event loop: one busy unpacking answers its ClientHello
    late. The exchange client waits for it within the request's timeout instead of the 2 s a bare
    TCP connect gets (with which busy peers of an 8-node burst were dropped as unreachable)."""
    server_ctx = site.issue("busy").server_context()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve_once() -> None:
        conn, _ = listener.accept()  # the kernel completed the TCP handshake at once
        time.sleep(TCP_CONNECT_TIMEOUT + 0.5)  # the loop was busy: the ClientHello waits
        with server_ctx.wrap_socket(conn, server_side=True) as tls_conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += tls_conn.recv(65536)
            head, _, body = request.partition(b"\r\n\r\n")
            lengths = [h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")]
            length = int(lengths[0].split(b":")[1])
            while len(body) < length:
                body += tls_conn.recv(65536)
            answer = b'{"blobs": []}'
            tls_conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(answer), answer)
            )

    server = threading.Thread(target=serve_once, daemon=True)
    server.start()
    try:
        async with aiohttp.ClientSession() as session:
            client = PeerClient(session, ssl=member(site).client_context())
            assert await client.have(f"https://127.0.0.1:{port}", [DIGEST]) == {}
    finally:
        await asyncio.to_thread(server.join, 10)
        listener.close()
