"""A Docker token-auth server for tests: the bearer-token half of a real registry's auth.

distribution 2.8 with `auth: token: {realm, service, issuer, rootcertbundle}` answers unauthenticated
requests with `401 WWW-Authenticate: Bearer realm=...,service=...,scope=repository:NAME:pull`; the
client GETs a token from the realm (with basic credentials, or anonymously) and retries with
`Authorization: Bearer <JWT>`. The registry never calls the token server: it only checks the JWT,
whose header carries the signing certificate as `x5c` (base64 DER; distribution verifies that chain
against `rootcertbundle`, then the ES256 signature with the leaf's key), and whose claims must name
the configured issuer, the service as audience, an unexpired `exp` (60 s leeway) and the granted
`access`. The JWS is built with `cryptography` alone (no PyJWT).

The server runs in a thread (`ThreadingHTTPServer`), so synchronous helpers such as skopeo pushes and
asyncio tests can both use it. It records every token request (`requests`) so tests can count them.

    with start_token_server(tmp, users={"alice": "pw"}) as tokens:
        with start_registry(token_auth=tokens.registry_auth(Credentials("alice", "pw"))) as reg:
            ...
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import json
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from testbed.registry import Credentials, TokenAuth

DEFAULT_ISSUER = "peersync-test-issuer"
DEFAULT_SERVICE = "peersync-test-registry"


def b64url(data: bytes) -> str:
    """Unpadded base64url, as JOSE uses it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class SigningKey:
    """An EC P-256 key and its self-signed certificate (the registry's `rootcertbundle`)."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def generate(cls, common_name: str = "peersync test token signer") -> SigningKey:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def sign_jwt(self, claims: dict[str, object]) -> str:
        """A compact ES256 JWS with the certificate in `x5c` (what distribution's verifier accepts)."""
        der = self.cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(der).decode()]}
        signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


@dataclass(frozen=True)
class TokenRequest:
    """One request the server answered: who (None: anonymous), for which scopes, and the status."""

    user: str | None
    scopes: tuple[str, ...]
    status: int


@dataclass
class TokenServer:
    """A running token service; mutate `expires_in` or `users` between requests if a test needs to."""

    host: str
    port: int
    signing: SigningKey
    cert_path: Path
    users: dict[str, str]
    allow_anonymous: bool
    expires_in: int
    issuer: str = DEFAULT_ISSUER
    service: str = DEFAULT_SERVICE
    requests: list[TokenRequest] = field(default_factory=list)
    untrusted: int = 0  # sign this many next tokens with a key the registry does not trust
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def realm(self) -> str:
        return f"http://{self.host}:{self.port}/token"

    def registry_auth(self, credentials: Credentials | None = None) -> TokenAuth:
        """The registry's `auth.token` settings; `credentials` is the user the harness pushes as."""
        return TokenAuth(self.realm, self.service, self.issuer, self.cert_path, credentials)

    def count(self, status: int | None = 200) -> int:
        """How many token requests were answered with `status` (None: all of them)."""
        with self._lock:
            return sum(1 for r in self.requests if status is None or r.status == status)

    def record(self, request: TokenRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def issue(self, user: str | None, scopes: list[str]) -> dict[str, object]:
        """The token response for an authenticated `user` (None: anonymous) asking for `scopes`."""
        access = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) < 3:
                continue
            kind, name, actions = parts[0], ":".join(parts[1:-1]), parts[-1].split(",")
            granted = [a for a in actions if user is not None or a == "pull"]
            if granted:
                access.append({"type": kind, "name": name, "actions": granted})
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": self.service,
            "exp": now + self.expires_in,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signer = self.signing
        with self._lock:
            if self.untrusted > 0:
                self.untrusted -= 1
                signer = SigningKey.generate("untrusted signer")
        token = signer.sign_jwt(claims)
        issued = dt.datetime.fromtimestamp(now, dt.UTC).isoformat().replace("+00:00", "Z")
        return {"token": token, "access_token": token, "expires_in": self.expires_in, "issued_at": issued}


def _handler(server: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # stdlib signature
            pass

        def _answer(self, status: int, body: dict[str, object], extra: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # stdlib naming
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            scopes = [s for value in query.get("scope", []) for s in value.split()]
            if url.path != "/token":
                self._answer(404, {"details": "not found"})
                return
            if query.get("service", [server.service])[0] != server.service:
                server.record(TokenRequest(None, tuple(scopes), 400))
                self._answer(400, {"details": "unknown service"})
                return
            user = self._user()
            if user is False or (user is None and not server.allow_anonymous):
                server.record(TokenRequest(None, tuple(scopes), 401))
                challenge = {"WWW-Authenticate": f'Basic realm="{server.realm}"'}
                self._answer(401, {"details": "invalid username or password"}, challenge)
                return
            server.record(TokenRequest(user, tuple(scopes), 200))
            self._answer(200, server.issue(user, scopes))

        def _user(self) -> str | None | Literal[False]:
            """The authenticated user, None for anonymous, False for bad credentials."""
            header = self.headers.get("Authorization")
            if header is None:
                return None
            scheme, _, encoded = header.partition(" ")
            if scheme.lower() != "basic":
                return False
            try:
                username, _, password = base64.b64decode(encoded).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            expected = server.users.get(username)
            if expected is None or not secrets.compare_digest(expected, password):
                return False
            return username

    return Handler


@contextlib.contextmanager
def start_token_server(
    workdir: Path | None = None,
    users: dict[str, str] | None = None,
    allow_anonymous: bool = False,
    expires_in: int = 300,
    host: str = "127.0.0.1",
) -> Iterator[TokenServer]:
    """Serve tokens on host:<free port> until the block exits; the certificate goes to `workdir`.

    `users` may authenticate with basic auth and get every action they ask for; anonymous callers
    get `pull` only, and only with `allow_anonymous`. Bad credentials get a 401.
    """
    base = Path(tempfile.mkdtemp(prefix="tokenserver-")) if workdir is None else Path(workdir)
    base.mkdir(parents=True, exist_ok=True)
    signing = SigningKey.generate()
    cert_path = base / "token-signer.pem"
    cert_path.write_bytes(signing.cert_pem())
    state = TokenServer(host, 0, signing, cert_path, dict(users or {}), allow_anonymous, expires_in)
    httpd = ThreadingHTTPServer((host, 0), _handler(state))
    httpd.daemon_threads = True
    state.port = int(httpd.server_address[1])
    thread = threading.Thread(target=httpd.serve_forever, name="token-server", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
