"""The origin registry client: the OCI distribution API, read side, over http and https.

The download engine uses it as the last-resort source of blob bytes, the registry mirror to resolve
tags and fetch manifests. Three calls cover both:

    async with aiohttp.ClientSession() as session:
        origin = OriginClient(session, CredentialStore({"registry.example": BasicCredentials("u", "p")}))
        manifest = await origin.resolve("docker.io", "library/busybox", "latest")
        size = await origin.blob_size("docker.io", "library/busybox", layer_digest)
        async with contextlib.aclosing(origin.read_blob("docker.io", "library/busybox", layer_digest,
                                                        offset=4 << 20, length=1 << 20)) as chunks:
            async for chunk in chunks:
                ...

Hosts, as containerd names them: the registry part of an image reference (`docker.io`,
`registry.example:5000`) maps to the API host, `docker.io` -> `registry-1.docker.io`; https unless
`HostSettings(plain_http=True)` says otherwise (containerd's hosts.toml `http://` servers), with
`skip_verify` / `ca_file` for private TLS. A docker.io repository without a slash gets `library/`.

Auth: anonymous first; on 401 the `WWW-Authenticate` challenge decides. `Basic realm=...` -> HTTP basic
with the host's credentials. `Bearer realm=...,service=...,scope=...` -> a token from the realm per the
Docker token spec (GET, with basic credentials when configured, else anonymous), cached per
(host, scope) until `expires_in` (default 60 s) runs out; the request is retried once. Once a host has
challenged, later requests authenticate up front, and concurrent requests share one token fetch.

Redirects (registries send blob GETs to storage backends) are followed here, not by aiohttp, at most
`MAX_REDIRECTS` hops; the Authorization header never leaves the registry's origin (scheme, host, port).

Errors are translated once, at this boundary, into `kernel.errors`:

    404, NAME_UNKNOWN, MANIFEST_UNKNOWN, BLOB_UNKNOWN     -> NotFound
    401 / 403 after authenticating, token refused         -> FailedPrecondition("unauthorized: ...")
    400, *_INVALID, bad names given to this client        -> InvalidArgument
    416, or a range that runs past the end of the blob    -> OutOfRange
    429, 5xx, timeouts, connection errors, short bodies   -> Unavailable
    digest mismatch, TLS verification, other 4xx          -> FailedPrecondition

The registry's JSON error body (`{"errors": [{"code", "message", "detail"}]}`) becomes the message.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import re
import ssl
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog
from yarl import URL

from kernel.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PeerSyncError,
    Unavailable,
    Unimplemented,
)

log = structlog.get_logger(__name__)

MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_MEDIA_TYPES = (MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST, MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST)
MANIFEST_ACCEPT = ", ".join((*MANIFEST_MEDIA_TYPES, "*/*;q=0.8"))

DOCKER_HUB = "docker.io"
DOCKER_HUB_HOST = "registry-1.docker.io"
MAX_MANIFEST_SIZE = 4 << 20  # containerd refuses larger manifests too
MAX_ERROR_BODY = 64 << 10
MAX_REDIRECTS = 10
READ_CHUNK = 256 << 10  # bytes per yielded chunk at most: bounds the memory of one stream
DEFAULT_TOKEN_TTL = 60.0  # seconds, when the token server gives no expires_in (token spec default)
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

# Names, per distribution's reference grammar.
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST_RE = re.compile(r"([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")
_HOST_RE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?")
_DIGEST_HEX = {"sha256": 64, "sha384": 96, "sha512": 128}  # the algorithms go-digest knows
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")

# RFC 7235 challenge syntax: `Scheme param=value, param="quoted, value"`, several challenges a header.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_SCHEME_RE = re.compile(rf"[\s,]*({_TOKEN})(?=\s|,|$)")
_PARAM_RE = re.compile(rf'\s*({_TOKEN})\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]*)\s*(?:,|$)')


# ---------------------------------------------------------------------------------------------------
# Public data
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Descriptor:
    """What a HEAD on a manifest tells: media type, digest, size."""

    media_type: str
    digest: str
    size: int


@dataclass(frozen=True)
class Manifest(Descriptor):
    """A manifest or index as the registry served it; `digest` is verified against `body`."""

    body: bytes = field(repr=False, default=b"")

    def json(self) -> Any:
        """The parsed body."""
        return json.loads(self.body)


@dataclass(frozen=True)
class BasicCredentials:
    """A registry user; the password may be a personal access token."""

    username: str
    password: str = field(repr=False)

    def header(self) -> str:
        """The `Authorization: Basic ...` value."""
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


@dataclass
class CredentialStore:
    """Registry host -> credentials. Keys are the registry part of a reference (`docker.io`,
    `registry.example:5000`); the API host (`registry-1.docker.io`) is tried as well.

    Loadable from the daemon config as a table of `host = {username = ..., password = ...}`.
    """

    entries: dict[str, BasicCredentials] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, table: Mapping[str, Mapping[str, str]]) -> CredentialStore:
        """Build from `{host: {"username": ..., "password": ...}}` (e.g. a parsed TOML table)."""
        entries: dict[str, BasicCredentials] = {}
        for host, entry in table.items():
            try:
                entries[host] = BasicCredentials(str(entry["username"]), str(entry["password"]))
            except (KeyError, TypeError) as exc:
                raise InvalidArgument(f"credentials for {host!r}: need username and password") from exc
        return cls(entries)

    def set(self, registry: str, username: str, password: str) -> None:
        self.entries[registry] = BasicCredentials(username, password)

    def get(self, registry: str) -> BasicCredentials | None:
        """Credentials for `registry` (or its API host), None for anonymous access."""
        found = self.entries.get(registry)
        if found is None:
            found = self.entries.get(registry_host(registry))
        return found


@dataclass(frozen=True)
class HostSettings:
    """How to reach one registry host: the `[host]` options of containerd's hosts.toml we honour."""

    plain_http: bool = False  # http:// instead of https://
    skip_verify: bool = False  # https without certificate verification
    ca_file: str | None = None  # extra CA bundle for a private registry's certificate


def registry_host(registry: str) -> str:
    """The API host for the registry part of a reference, as containerd maps it."""
    return DOCKER_HUB_HOST if registry == DOCKER_HUB else registry


# ---------------------------------------------------------------------------------------------------
# Auth internals
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    """One `WWW-Authenticate` challenge; `scheme` is lower case, parameter names too."""

    scheme: str
    params: Mapping[str, str]


def parse_challenges(values: Iterable[str]) -> list[Challenge]:
    """Parse `WWW-Authenticate` header values into challenges (unparseable rest is ignored)."""
    challenges: list[Challenge] = []
    for value in values:
        pos = 0
        while pos < len(value):
            scheme = _SCHEME_RE.match(value, pos)
            if scheme is None:
                break
            pos = scheme.end()
            params: dict[str, str] = {}
            while True:
                param = _PARAM_RE.match(value, pos)
                if param is None:
                    break
                raw = param.group(2)
                if raw.startswith('"'):
                    raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
                params[param.group(1).lower()] = raw
                pos = param.end()
            challenges.append(Challenge(scheme.group(1).lower(), params))
    return challenges


@dataclass
class _Token:
    value: str
    expires_at: float


@dataclass
class _Auth:
    """What a request carried: the header value and, for a bearer token, its cache key."""

    header: str | None
    scheme: str | None = None
    token_key: tuple[str, str] | None = None


# ---------------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------------


class OriginClient:
    """Read manifests and blobs from origin registries (see the module docstring for the contract).

    `session` is shared and owned by the caller; it must not carry default auth. The client keeps
    per-host challenges and a token cache, so use one client per daemon. `connect_timeout` and
    `read_timeout` (seconds between bytes) bound every request; no total timeout, so a large blob
    streams as long as it moves. `clock` is monotonic seconds (tests may pass their own).
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        credentials: CredentialStore | None = None,
        *,
        hosts: Mapping[str, HostSettings] | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
        self._credentials = credentials if credentials is not None else CredentialStore()
        self._hosts = {registry_host(name): settings for name, settings in (hosts or {}).items()}
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._clock = clock
        self._challenges: dict[str, Challenge] = {}  # API host -> its last auth challenge
        self._tokens: dict[tuple[str, str], _Token] = {}  # (API host, scope) -> bearer token
        self._token_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._ssl: dict[str, ssl.SSLContext | bool] = {}
        self.token_fetches = 0  # how many tokens were fetched (metrics, tests)

    # -- public API ---------------------------------------------------------------------------------

    async def resolve(self, registry: str, repo: str, reference: str) -> Manifest:
        """GET the manifest or index `reference` (a tag or a digest) of `registry/repo`.

        Accepts OCI index/manifest and Docker manifest list/schema2. The digest is the registry's
        Docker-Content-Digest, checked against the body; for a digest reference the body must hash to
        it. Raises NotFound, FailedPrecondition (unauthorized, digest mismatch), Unavailable, ...
        """
        repo = _check_repo(registry, repo)
        _check_reference(reference)
        what = f"manifest {registry}/{repo}:{reference}"
        resp = await self._request(
            "GET", registry, repo, f"/v2/{repo}/manifests/{reference}", {"Accept": MANIFEST_ACCEPT}, what
        )
        try:
            body = await _read_limited(resp, MAX_MANIFEST_SIZE, what)
        finally:
            resp.release()
        digest = _manifest_digest(reference, resp.headers.get("Docker-Content-Digest"), body, what)
        return Manifest(_media_type(resp.headers.get("Content-Type"), body), digest, len(body), body)

    async def head_manifest(self, registry: str, repo: str, reference: str) -> Descriptor:
        """HEAD the manifest `reference`: its media type, digest and size, without the body.

        Cheaper than `resolve` for a tag lookup (Docker Hub does not count HEADs against the pull
        rate limit). Falls back to a GET when the registry sends no digest for a tag.
        """
        repo = _check_repo(registry, repo)
        _check_reference(reference)
        what = f"manifest {registry}/{repo}:{reference}"
        resp = await self._request(
            "HEAD", registry, repo, f"/v2/{repo}/manifests/{reference}", {"Accept": MANIFEST_ACCEPT}, what
        )
        resp.release()
        header_digest = resp.headers.get("Docker-Content-Digest")
        size = _content_length(resp)
        media_type = _strip_params(resp.headers.get("Content-Type", ""))
        if _DIGEST_RE.fullmatch(reference):
            if header_digest and header_digest != reference:
                raise FailedPrecondition(f"{what}: registry reports digest {header_digest}")
            header_digest = reference
        if not header_digest or size is None or media_type not in MANIFEST_MEDIA_TYPES:
            manifest = await self.resolve(registry, repo, reference)
            return Descriptor(manifest.media_type, manifest.digest, manifest.size)
        return Descriptor(media_type, header_digest, size)

    async def blob_size(self, registry: str, repo: str, digest: str) -> int:
        """HEAD the blob: its size in bytes. NotFound if the registry does not have it."""
        repo = _check_repo(registry, repo)
        _check_digest(digest)
        what = f"blob {registry}/{repo}@{digest}"
        resp = await self._request(
            "HEAD", registry, repo, f"/v2/{repo}/blobs/{digest}", {"Accept-Encoding": "identity"}, what
        )
        resp.release()
        size = _content_length(resp)
        if size is None:
            raise Unavailable(f"{what}: the registry sent no Content-Length")
        return size

    async def read_blob(
        self,
        registry: str,
        repo: str,
        digest: str,
        offset: int = 0,
        length: int | None = None,
        size: int | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """Stream `length` bytes (None: to the end) of the blob from `offset`, in chunks.

        An async generator: errors surface on the first iteration, before any byte. Sends
        `Range: bytes=offset-end` and accepts 206, or a 200 with the whole blob from registries that
        ignore Range (the bytes before `offset` are skipped, not kept). A range that starts at or runs
        past the end raises OutOfRange; a body that ends early raises Unavailable. The bytes are not
        verified here: the caller hashes chunks and blobs. Close early with `contextlib.aclosing`.

        `size` is the blob's size from the manifest that names it: a response that declares
        another total (Content-Range on a 206, Content-Length on a 200) is refused with
        FailedPrecondition before any byte, since the registry is not serving the blob the
        manifest describes (a size is only ever taken from a manifest, never from the origin).
        """
        repo = _check_repo(registry, repo)
        _check_digest(digest)
        if offset < 0 or (length is not None and length < 0):
            raise InvalidArgument(f"read {digest}: negative offset {offset} or length {length}")
        if length == 0:
            return
        what = f"blob {registry}/{repo}@{digest}"
        headers = {"Accept-Encoding": "identity"}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            headers["Range"] = f"bytes={offset}-{end}"
        resp = await self._request("GET", registry, repo, f"/v2/{repo}/blobs/{digest}", headers, what)
        complete = False
        try:
            skip, remaining = _plan_body(resp, offset, length, what)
            declared = _declared_total(resp)
            if size is not None and declared is not None and declared != size:
                raise FailedPrecondition(
                    f"{what}: the registry declares {declared} bytes, the manifest {size}; refused"
                )
            with _network_errors(what):
                async for data in resp.content.iter_chunked(READ_CHUNK):
                    if skip:
                        if len(data) <= skip:
                            skip -= len(data)
                            continue
                        data, skip = data[skip:], 0
                    if remaining is not None:
                        data = data[:remaining]
                        remaining -= len(data)
                    yield data
                    if remaining == 0:
                        break
            if skip or remaining:
                raise Unavailable(f"{what}: the body ended {skip + (remaining or 0)} bytes short")
            complete = resp.content.at_eof()
        finally:
            if complete:
                resp.release()
            else:
                resp.close()  # never drain a multi-GB body we stopped wanting

    # -- requests, auth, redirects ------------------------------------------------------------------

    def _settings(self, host: str) -> HostSettings:
        return self._hosts.get(host) or HostSettings()

    def _base_url(self, registry: str) -> URL:
        host = registry_host(registry)
        return URL(f"{'http' if self._settings(host).plain_http else 'https'}://{host}")

    def _ssl_for(self, url: URL) -> ssl.SSLContext | bool:
        if url.scheme != "https":
            return True
        host = url.raw_authority
        if host not in self._ssl:
            settings = self._settings(host)
            if settings.skip_verify:
                self._ssl[host] = False
            elif settings.ca_file:
                self._ssl[host] = ssl.create_default_context(cafile=settings.ca_file)
            else:
                self._ssl[host] = True
        return self._ssl[host]

    async def _request(
        self,
        method: str,
        registry: str,
        repo: str,
        path: str,
        headers: Mapping[str, str],
        what: str,
    ) -> aiohttp.ClientResponse:
        """Send one API request with auth; return the open response (status < 400) or raise.

        At most two tries: the second after a 401 taught us how to authenticate (or that our token
        went stale). The caller releases the response.
        """
        host = registry_host(registry)
        url = self._base_url(registry).with_path(path, encoded=False)
        scope = f"repository:{repo}:pull"
        rejected: _Auth | None = None
        asked_scope: str | None = None
        for attempt in range(2):
            auth = await self._authorization(registry, host, scope, rejected, asked_scope)
            resp = await self._send(method, url, headers, auth.header, what)
            if resp.status != 401 or attempt == 1:
                break
            challenges = parse_challenges(resp.headers.getall("WWW-Authenticate", []))
            challenge = _pick_challenge(challenges)
            if challenge is None or (auth.scheme == "basic" and challenge.scheme == "basic"):
                break  # nothing more to try: report the 401 below
            if challenge.scheme == "basic" and self._credentials.get(registry) is None:
                resp.release()
                raise FailedPrecondition(
                    f"unauthorized: {what}: {host} asks for basic auth and no credentials are configured"
                )
            # Remember how the host authenticates, minus the per-request parts (scope, error).
            params = {k: v for k, v in challenge.params.items() if k not in ("scope", "error")}
            self._challenges[host] = Challenge(challenge.scheme, params)
            asked_scope = challenge.params.get("scope")
            resp.release()
            rejected = auth
        if resp.status >= 400:
            await _raise_for_status(resp, method, what)
        return resp

    async def _authorization(
        self, registry: str, host: str, scope: str, rejected: _Auth | None, asked_scope: str | None
    ) -> _Auth:
        """The Authorization header for a request to `host`, from what its last challenge asked.

        Tokens are cached under our own scope for the repository; `asked_scope` (the scope of a
        challenge just received, if any) is what a new token is requested for.
        """
        challenge = self._challenges.get(host)
        if challenge is None:
            return _Auth(None)
        creds = self._credentials.get(registry)
        if challenge.scheme == "basic":
            return _Auth(creds.header(), "basic") if creds is not None else _Auth(None)
        key = (host, scope)
        stale = rejected.header if rejected is not None and rejected.token_key == key else None
        token = await self._token(key, challenge, creds, stale, asked_scope or scope)
        return _Auth(f"Bearer {token}", "bearer", key)

    async def _token(
        self,
        key: tuple[str, str],
        challenge: Challenge,
        creds: BasicCredentials | None,
        stale: str | None,
        token_scope: str,
    ) -> str:
        """A valid bearer token for `key`: cached, or fetched once for all concurrent callers."""
        lock = self._token_locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(key)
            if cached is not None and cached.expires_at > self._clock() and f"Bearer {cached.value}" != stale:
                return cached.value
            self._tokens.pop(key, None)
            token = await self._fetch_token(key, challenge, creds, token_scope)
            self._tokens[key] = token
            return token.value

    async def _fetch_token(
        self, key: tuple[str, str], challenge: Challenge, creds: BasicCredentials | None, token_scope: str
    ) -> _Token:
        """GET a token from the challenge's realm (Docker token spec, not the OAuth2 POST flow)."""
        host, _ = key
        scope = token_scope
        realm = challenge.params.get("realm", "")
        what = f"token for {host} ({scope}) from {realm}"
        try:
            url = URL(realm)
        except ValueError:
            url = URL()
        if url.scheme not in ("http", "https") or not url.host:
            raise FailedPrecondition(f"unauthorized: {host} sent a bearer challenge with bad realm {realm!r}")
        query: list[tuple[str, str]] = list(url.query.items())
        if "service" in challenge.params:
            query.append(("service", challenge.params["service"]))
        for one in scope.split():
            query.append(("scope", one))
        url = url.with_query(query)
        started = self._clock()
        self.token_fetches += 1
        resp = await self._send("GET", url, {}, creds.header() if creds else None, what)
        try:
            if resp.status >= 400:
                await _raise_for_status(resp, "GET", what)
            body = await _read_limited(resp, MAX_ERROR_BODY, what)
        finally:
            resp.release()
        try:
            data = json.loads(body)
            value = data.get("token") or data.get("access_token")
            expires_in = float(data.get("expires_in") or DEFAULT_TOKEN_TTL)
        except (ValueError, AttributeError, TypeError) as exc:
            raise Unavailable(f"{what}: unreadable token response") from exc
        if not isinstance(value, str) or not value:
            raise Unavailable(f"{what}: the response holds no token")
        # Renew a little early so a token never expires on the wire.
        margin = min(5.0, expires_in / 10)
        log.debug("origin.token", host=host, scope=scope, expires_in=expires_in, anonymous=creds is None)
        return _Token(value, started + expires_in - margin)

    async def _send(
        self, method: str, url: URL, headers: Mapping[str, str], authorization: str | None, what: str
    ) -> aiohttp.ClientResponse:
        """One request, following redirects by hand; Authorization stays on the first origin."""
        origin = url.origin()
        for _ in range(MAX_REDIRECTS + 1):
            request_headers = dict(headers)
            if authorization is not None:
                request_headers["Authorization"] = authorization
            with _network_errors(what):
                resp = await self._session.request(
                    method,
                    url,
                    headers=request_headers,
                    allow_redirects=False,
                    ssl=self._ssl_for(url),
                    timeout=self._timeout,
                )
            location = resp.headers.get("Location")
            if resp.status not in _REDIRECT_STATUSES or not location:
                return resp
            resp.release()
            try:
                url = url.join(URL(location))
            except ValueError as exc:
                raise Unavailable(f"{what}: bad redirect location {location!r}") from exc
            if url.scheme not in ("http", "https"):
                raise Unavailable(f"{what}: redirect to unsupported URL {location!r}")
            if url.origin() != origin:
                authorization = None  # never hand registry credentials to a storage backend
            if resp.status == 303 and method != "HEAD":
                method = "GET"
        raise Unavailable(f"{what}: more than {MAX_REDIRECTS} redirects")


# ---------------------------------------------------------------------------------------------------
# Helpers: validation, errors, bodies
# ---------------------------------------------------------------------------------------------------


def _check_repo(registry: str, repo: str) -> str:
    if not _HOST_RE.fullmatch(registry):
        raise InvalidArgument(f"invalid registry host {registry!r}")
    if registry == DOCKER_HUB and "/" not in repo:
        repo = f"library/{repo}"
    if len(repo) > 255 or not _REPO_RE.fullmatch(repo):
        raise InvalidArgument(f"invalid repository name {repo!r}")
    return repo


def _check_digest(digest: str) -> None:
    match = _DIGEST_RE.fullmatch(digest)
    if match is None:
        raise InvalidArgument(f"invalid digest {digest!r}")
    algorithm, encoded = match.groups()
    want = _DIGEST_HEX.get(algorithm)
    if want is None:
        raise InvalidArgument(f"unsupported digest algorithm in {digest!r}")
    if len(encoded) != want or not re.fullmatch(r"[0-9a-f]+", encoded):
        raise InvalidArgument(f"invalid {algorithm} digest {digest!r}")


def _check_reference(reference: str) -> None:
    if ":" in reference:
        _check_digest(reference)
    elif not _TAG_RE.fullmatch(reference):
        raise InvalidArgument(f"invalid tag {reference!r}")


def _pick_challenge(challenges: list[Challenge]) -> Challenge | None:
    """Bearer if offered (it works without credentials), else Basic; other schemes we cannot do."""
    for scheme in ("bearer", "basic"):
        for challenge in challenges:
            if challenge.scheme == scheme:
                return challenge
    return None


@contextlib.contextmanager
def _network_errors(what: str) -> Iterator[None]:
    """Translate aiohttp, timeout and OS errors into our vocabulary (the one place that does)."""
    try:
        yield
    except PeerSyncError:
        raise
    except aiohttp.ClientConnectorCertificateError as exc:
        raise FailedPrecondition(f"{what}: TLS certificate verification failed: {exc}") from exc
    except TimeoutError as exc:
        raise Unavailable(f"{what}: timed out") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise Unavailable(f"{what}: {type(exc).__name__}: {exc}") from exc


def _content_length(resp: aiohttp.ClientResponse) -> int | None:
    raw = resp.headers.get("Content-Length")
    if raw is None or not raw.strip().isdigit():
        return None
    return int(raw)


def _strip_params(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def _media_type(content_type: str | None, body: bytes) -> str:
    """The manifest's media type: Content-Type, or the body's mediaType when the header is generic."""
    media_type = _strip_params(content_type or "")
    if media_type in MANIFEST_MEDIA_TYPES:
        return media_type
    with contextlib.suppress(ValueError, AttributeError):
        declared = json.loads(body).get("mediaType")
        if isinstance(declared, str) and declared:
            return declared
    return media_type


def _manifest_digest(reference: str, header: str | None, body: bytes, what: str) -> str:
    """The digest of a fetched manifest, checked: header and reference must both match the body."""
    expected = reference if _DIGEST_RE.fullmatch(reference) else header
    if expected is None:
        return "sha256:" + hashlib.sha256(body).hexdigest()
    try:
        _check_digest(expected)
    except InvalidArgument as exc:
        raise FailedPrecondition(f"{what}: the registry sent digest {expected!r}") from exc
    algorithm = expected.split(":", 1)[0]
    actual = f"{algorithm}:{hashlib.new(algorithm, body).hexdigest()}"
    if actual != expected or (header and header.startswith(f"{algorithm}:") and header != actual):
        raise FailedPrecondition(f"{what}: digest mismatch: expected {expected}, body is {actual}")
    return actual


async def _read_limited(resp: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    """The whole body, refusing more than `limit` bytes."""
    declared = _content_length(resp)
    if declared is not None and declared > limit:
        raise FailedPrecondition(f"{what}: {declared} bytes is larger than the {limit} byte limit")
    parts: list[bytes] = []
    size = 0
    with _network_errors(what):
        async for data in resp.content.iter_chunked(64 << 10):
            size += len(data)
            if size > limit:
                raise FailedPrecondition(f"{what}: larger than the {limit} byte limit")
            parts.append(data)
    body = b"".join(parts)
    if declared is not None and len(body) != declared:
        raise Unavailable(f"{what}: got {len(body)} of {declared} bytes")
    return body


def _registry_errors(body: bytes) -> tuple[list[str], str]:
    """Codes and a readable message from a registry error body (`{"errors": [...]}`) or plain text."""
    try:
        data = json.loads(body)
    except ValueError:
        return [], body.decode(errors="replace").strip()[:300]
    items = data.get("errors") if isinstance(data, dict) else None
    if not isinstance(items, list):
        # Token servers answer {"details": "..."} or {"error": "...", "error_description": ...}.
        if isinstance(data, dict):
            for key in ("details", "error_description", "error", "message"):
                if isinstance(data.get(key), str):
                    return [], data[key]
        return [], body.decode(errors="replace").strip()[:300]
    codes: list[str] = []
    messages: list[str] = []
    for item in items:
        if not isinstance(item, dict):
            continue
        code = str(item.get("code", "")).upper()
        message = str(item.get("message", "")).strip()
        codes.append(code)
        messages.append(f"{code}: {message}" if code and message else code or message)
    return codes, "; ".join(m for m in messages if m)


_NOT_FOUND_CODES = frozenset({"NAME_UNKNOWN", "MANIFEST_UNKNOWN", "BLOB_UNKNOWN"})
_INVALID_CODES = frozenset(
    {"NAME_INVALID", "TAG_INVALID", "DIGEST_INVALID", "MANIFEST_INVALID", "SIZE_INVALID", "RANGE_INVALID"}
)


async def _raise_for_status(resp: aiohttp.ClientResponse, method: str, what: str) -> None:
    """Raise the error a failed response stands for; the response is closed."""
    status = resp.status
    if status == 416:
        # distribution 2.8 answers 416 with the blob's Content-Length and a short body: never read it.
        resp.close()
        total = resp.headers.get("Content-Range", "").rpartition("/")[2]
        raise OutOfRange(f"{what}: requested range not satisfiable (blob size {total or 'unknown'})")
    codes: list[str] = []
    message = ""
    if method != "HEAD":
        try:
            body = await _read_limited(resp, MAX_ERROR_BODY, what)
            codes, message = _registry_errors(body)
        except PeerSyncError:
            pass
    resp.close()
    detail = f"{what}: HTTP {status}" + (f": {message}" if message else "")
    if status == 404 or _NOT_FOUND_CODES.intersection(codes):
        raise NotFound(detail)
    if status in (401, 403):
        raise FailedPrecondition(f"unauthorized: {detail}")
    if status == 429 or status >= 500:
        retry_after = resp.headers.get("Retry-After")
        raise Unavailable(detail + (f" (retry after {retry_after})" if retry_after else ""))
    if status == 400 or _INVALID_CODES.intersection(codes):
        raise InvalidArgument(detail)
    if status in (405, 501) or "UNSUPPORTED" in codes:
        raise Unimplemented(detail)
    raise FailedPrecondition(detail)


def _declared_total(resp: aiohttp.ClientResponse) -> int | None:
    """The blob's total size as a blob GET's response declares it (None: not declared)."""
    if resp.status == 206:
        match = _CONTENT_RANGE_RE.fullmatch(resp.headers.get("Content-Range", "").strip())
        return None if match is None or match.group(3) == "*" else int(match.group(3))
    return _content_length(resp) if resp.status == 200 else None


def _plan_body(
    resp: aiohttp.ClientResponse, offset: int, length: int | None, what: str
) -> tuple[int, int | None]:
    """For a blob GET: how many leading bytes to skip and how many to deliver (None: all)."""
    if resp.status == 206:
        match = _CONTENT_RANGE_RE.fullmatch(resp.headers.get("Content-Range", "").strip())
        if match is None:
            raise Unavailable(f"{what}: 206 without a usable Content-Range (multipart or missing)")
        start, stop = int(match.group(1)), int(match.group(2))
        total = None if match.group(3) == "*" else int(match.group(3))
        if start != offset:
            raise Unavailable(f"{what}: asked for offset {offset}, got range {start}-{stop}")
        if length is not None and (stop - start + 1 < length):
            if total is not None and offset + length > total:
                raise OutOfRange(f"{what}: range {offset}+{length} runs past the end ({total} bytes)")
            raise Unavailable(f"{what}: asked for {length} bytes, the range has {stop - start + 1}")
        if length is None and total is not None and stop + 1 < total:
            raise Unavailable(f"{what}: asked for bytes {offset}- to the end, got {start}-{stop}/{total}")
        return 0, stop - start + 1 if length is None else length
    if resp.status == 200:
        total = _content_length(resp)
        if total is not None:
            if offset >= total and offset > 0:
                raise OutOfRange(f"{what}: offset {offset} is past the end ({total} bytes)")
            if length is not None and offset + length > total:
                raise OutOfRange(f"{what}: range {offset}+{length} runs past the end ({total} bytes)")
            return offset, total - offset if length is None else length
        return offset, length
    raise Unavailable(f"{what}: unexpected HTTP {resp.status} to a blob GET")


__all__ = [
    "BasicCredentials",
    "Challenge",
    "CredentialStore",
    "Descriptor",
    "HostSettings",
    "MANIFEST_ACCEPT",
    "MANIFEST_MEDIA_TYPES",
    "Manifest",
    "OriginClient",
    "parse_challenges",
    "registry_host",
]
