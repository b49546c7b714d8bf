"""A real `docker-registry` (distribution 2.8, Debian package) on 127.0.0.1 for tests and benchmarks.

The config is written as JSON: JSON is valid YAML, and the registry's YAML loader reads it, so no
YAML library is needed. Optional htpasswd basic auth (bcrypt, which is the only hash distribution's
htpasswd accepts), bearer-token auth against a token server (`TokenAuth`, see `tokenserver.py`) and
pull-through-cache mode (`proxy.remoteurl`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import secrets
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .procs import ManagedProcess, free_port, http_answers, running

REGISTRY_BINARY = "/usr/bin/docker-registry"
# Go's bcrypt minimum cost. The registry re-checks the bcrypt hash on EVERY request (no cache), so the
# default cost 10-12 (60-250 ms of CPU per request) would dominate benchmarks; cost 4 is ~1 ms.
BCRYPT_COST = 4


def bcrypt_hash(password: str, cost: int = BCRYPT_COST) -> str:
    """Bcrypt-hash `password` for an htpasswd line ($2b$, accepted by Go's x/crypto/bcrypt).

    Uses the `bcrypt` pip package when installed, else the stdlib `crypt` module, which calls the
    system's libxcrypt (Debian 12 supports bcrypt there). `crypt` is deprecated in 3.11 and gone in
    3.13, hence the preference order; no apache2-utils `htpasswd` binary is needed either way.
    """
    try:
        import bcrypt  # type: ignore[import-not-found]  # optional, in no dependency list: crypt below
    except ImportError:
        bcrypt = None
    if bcrypt is not None:
        return str(bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=cost)).decode())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # deprecated module, imported only as the fallback
    hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=2**cost))
    if not hashed or not hashed.startswith("$2"):
        raise RuntimeError("no bcrypt implementation: pip install bcrypt")
    return hashed


def write_htpasswd(path: Path, users: dict[str, str]) -> Path:
    """Write an htpasswd file with one bcrypt line per user."""
    path.write_text("".join(f"{user}:{bcrypt_hash(pw)}\n" for user, pw in users.items()))
    return path


@dataclass(frozen=True)
class Credentials:
    """A registry user; `colon` is the user:password form that skopeo and ctr take."""

    username: str
    password: str

    @property
    def colon(self) -> str:
        return f"{self.username}:{self.password}"


@dataclass(frozen=True)
class TokenAuth:
    """The registry's `auth.token` settings (Docker token spec); `tokenserver.start_token_server` makes
    them. `credentials` is the user the harness pushes and queries as (it becomes `Registry.credentials`).
    """

    realm: str
    service: str
    issuer: str
    rootcertbundle: Path
    credentials: Credentials | None = None


@dataclass
class Registry:
    """A running registry: where it listens and how to talk to it over plain HTTP."""

    host: str
    port: int
    root: Path
    process: ManagedProcess
    credentials: Credentials | None = None
    proxy_remote: str | None = None
    log_path: Path = field(default_factory=Path)
    token_auth: TokenAuth | None = None

    @property
    def address(self) -> str:
        """host:port, the registry part of an image reference."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def ref(self, repo: str, tag: str = "latest") -> str:
        """Full image reference for `repo:tag` on this registry."""
        return f"{self.address}/{repo}:{tag}"

    def get(
        self, path: str, accept: str | None = None, method: str = "GET"
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request to the registry API (with basic auth if configured).

        With token auth, a 401 bearer challenge is answered with a token fetched from the realm
        (with the basic credentials if configured) and the request is sent once more.
        """
        basic = None
        if self.credentials is not None:
            basic = "Basic " + base64.b64encode(self.credentials.colon.encode()).decode()
        first_auth = basic if self.token_auth is None else None
        status, headers, body = _urlopen(self.url + path, method, first_auth, accept)
        if status == 401 and self.token_auth is not None:
            challenge = next((v for k, v in headers.items() if k.lower() == "www-authenticate"), "")
            params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
            query = urllib.parse.urlencode({k: v for k, v in params.items() if k in ("service", "scope")})
            realm = params.get("realm", self.token_auth.realm)
            t_status, t_headers, t_body = _urlopen(f"{realm}?{query}", "GET", basic)
            if t_status != 200:
                return t_status, t_headers, t_body
            bearer = "Bearer " + json.loads(t_body)["token"]
            status, headers, body = _urlopen(self.url + path, method, bearer, accept)
        return status, headers, body

    def catalog(self) -> list[str]:
        """Repositories the registry stores (for a proxy: those it has cached)."""
        status, _, body = self.get("/v2/_catalog")
        if status != 200:
            raise RuntimeError(f"catalog: HTTP {status}: {body[:200]!r}")
        return list(json.loads(body)["repositories"])

    def manifest_digest(self, repo: str, tag: str) -> str:
        """Digest the registry reports for repo:tag (OCI or Docker v2 manifest)."""
        accept = (
            "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
        )
        status, headers, body = self.get(f"/v2/{repo}/manifests/{tag}", accept=accept, method="HEAD")
        if status != 200:
            raise RuntimeError(f"manifest {repo}:{tag}: HTTP {status}")
        return headers["Docker-Content-Digest"]

    def has_blob(self, repo: str, digest: str) -> bool:
        """True if the blob is stored (HEAD; a proxy may fetch it from upstream to answer)."""
        status, _, _ = self.get(f"/v2/{repo}/blobs/{digest}", method="HEAD")
        return status == 200


def _urlopen(
    url: str, method: str, authorization: str | None, accept: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method)
    if authorization:
        req.add_header("Authorization", authorization)
    if accept:
        req.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def registry_config(
    root: Path,
    port: int,
    host: str = "127.0.0.1",
    htpasswd: Path | None = None,
    proxy_remote: str | None = None,
    proxy_credentials: Credentials | None = None,
    token_auth: TokenAuth | None = None,
) -> dict[str, Any]:
    """The registry's v2 config (`version: 0.1` is the config schema version, not the API)."""
    config: dict[str, Any] = {
        "version": "0.1",
        "log": {"level": "info", "formatter": "text", "fields": {"service": "registry"}},
        "storage": {
            "filesystem": {"rootdirectory": str(root)},
            "delete": {"enabled": True},
            "cache": {"blobdescriptor": "inmemory"},
            # Upload purging runs a background walk; tests never leave uploads for long.
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": f"{host}:{port}", "secret": secrets.token_hex(16)},
        # The default storagedriver health check only adds log noise and periodic I/O.
        "health": {"storagedriver": {"enabled": False}},
    }
    if htpasswd is not None:
        config["auth"] = {"htpasswd": {"realm": "peersync-test", "path": str(htpasswd)}}
    if token_auth is not None:
        token = {
            "realm": token_auth.realm,
            "service": token_auth.service,
            "issuer": token_auth.issuer,
            "rootcertbundle": str(token_auth.rootcertbundle),
        }
        config["auth"] = {"token": token}
    if proxy_remote is not None:
        proxy: dict[str, str] = {"remoteurl": proxy_remote}
        if proxy_credentials is not None:
            proxy |= {"username": proxy_credentials.username, "password": proxy_credentials.password}
        config["proxy"] = proxy
    return config


@contextlib.contextmanager
def start_registry(
    workdir: Path | None = None,
    auth: Credentials | None = None,
    proxy_remote: str | None = None,
    proxy_credentials: Credentials | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    prefix: Sequence[str] = (),
    run_probe: Callable[[Callable[[], bool]], bool] | None = None,
    token_auth: TokenAuth | None = None,
) -> Iterator[Registry]:
    """Run a registry on host:<free port> with storage under `workdir` (a temp dir if None).

    `auth` turns on htpasswd basic auth with that one user. `proxy_remote` (e.g. another test
    registry's `url`) makes it a pull-through cache; distribution then refuses pushes.
    Ready when `/v2/` answers (200, or 401 with auth).

    `prefix` is a command the registry is launched under (e.g. `nsenter --net=/var/run/netns/NS --`);
    `run_probe(check)` runs the readiness check where host:port is reachable (e.g. inside that network
    namespace) and returns its result. Pass `port` with a prefix: free_port() probes this namespace.

    `token_auth` (exclusive with `auth`) turns on bearer-token auth against a token server
    (`tokenserver.start_token_server`); its `credentials` become the registry's push credentials.
    """
    if auth is not None and token_auth is not None:
        raise ValueError("start_registry: auth (htpasswd) and token_auth are exclusive")
    own_dir = workdir is None
    base = Path(tempfile.mkdtemp(prefix="registry-")) if workdir is None else Path(workdir)
    base.mkdir(parents=True, exist_ok=True)
    try:
        port = port or free_port(host)
        htpasswd = write_htpasswd(base / "htpasswd", {auth.username: auth.password}) if auth else None
        config = registry_config(
            base / "storage", port, host, htpasswd, proxy_remote, proxy_credentials, token_auth
        )
        config_path = base / "config.yml"
        config_path.write_text(json.dumps(config, indent=2))
        log_path = base / "registry.log"
        proc = ManagedProcess([*prefix, REGISTRY_BINARY, "serve", str(config_path)], log_path)
        credentials = token_auth.credentials if token_auth is not None else auth
        registry = Registry(
            host, port, base / "storage", proc, credentials, proxy_remote, log_path, token_auth
        )
        ok = (200, 401) if auth or token_auth else (200,)

        def answers() -> bool:
            return http_answers(f"{registry.url}/v2/", ok)

        ready = answers if run_probe is None else (lambda: run_probe(answers))
        with running(proc, ready, what="answering /v2/"):
            yield registry
    finally:
        if own_dir:
            shutil.rmtree(base, ignore_errors=True)
