"""Adversarial requests against a running daemon, as hypothesis strategies, and the verdict on
each answer: the property suites (tests/integration/test_adversarial.py) and bench/faults.py
draw from the same strategies and judge with the same `Verdict`.

Requests: every method of both gRPC APIs over the unix socket (stubs from protos/), the peer
exchange's HTTP routes and the registry mirror's, with random and hostile keys, refs, digests,
offsets, sizes, labels, filters, paths, Range headers and bodies. A good answer is any clear
refusal or success: for gRPC any code but UNKNOWN, INTERNAL, DATA_LOSS or DEADLINE_EXCEEDED
(a hang); over HTTP any status but 500 and no traceback in the body.

Traffic rule: every address a request can make the daemon dial is on loopback. `?ns=` is drawn
only from `Target.origins` (loopback registries and a closed loopback port), the daemon's
`[mirror] default_registry` must be a loopback registry too, and control-route bodies carry no
strings at all (a member record naming an address would be dialled).

Unauthorised reads: a mirror request naming an origin that does not hold a blob (`Target.empty`,
a loopback registry with nothing in it) must not get that blob's bytes from the store."""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import ssl
import tomllib
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import field_mask_pb2 as field_mask
from hypothesis import strategies as st

from snapshotter.api import content_pb2, content_pb2_grpc, snapshots_pb2, snapshots_pb2_grpc
from testbed.faults import ContentWrites, Ledger, SnapshotWrites, prime_mirror
from testbed.images import BuiltImage
from testbed.peersyncd import PeerSyncDaemon, loopback_config, start_peersync
from testbed.procs import free_port
from testbed.registry import Registry, start_registry

SNAPSHOTTER = "peersync"
TIMEOUT = 30.0
BAD_CODES = {
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
EXCHANGE = "/peersync/v1"


@dataclass
class Target:
    """What the adversary knows of the daemon: its socket and ports, what it holds (readable,
    never to be changed: `protected_*`), and the loopback origins `?ns=` may name."""

    socket: str
    exchange: str  # host:port
    mirror: str  # host:port
    origins: list[str]  # loopback registries and ports, the only ?ns= values
    empty: str  # a loopback registry that holds nothing (unauthorised-read probe)
    repo: str  # a repository of origins[0] the daemon fetched
    blobs: list[str]  # digests the daemon holds
    protected_snapshots: list[str]  # committed snapshot names
    blob_bytes: dict[str, bytes] = field(default_factory=dict)
    # A site member's client context for the exchange (mutual TLS): the attacker is a member gone
    # bad, so its requests reach the handlers; a stranger's are refused before them (test_tls).
    exchange_ssl: ssl.SSLContext | None = None


@dataclass
class Verdict:
    """One answer judged: `bad` says what was wrong ("" when the answer was a good one)."""

    request: str
    bad: str = ""
    unauthorised: bool = False


# -- values ---------------------------------------------------------------------------------------

HEX = "0123456789abcdef"


def texts(max_size: int = 64) -> st.SearchStrategy[str]:
    """Strings as a hostile client sends them: empty, unicode, control characters, path tricks."""
    return st.one_of(
        st.text(max_size=max_size),
        st.sampled_from(
            ["", ".", "..", "../../etc/passwd", "/", "a/b", "\x00", "a\x00b", " ", "%2e%2e", "\ufeff"]
        ),
        st.text(alphabet=HEX + ":/", max_size=max_size),
    )


def digests(target: Target) -> st.SearchStrategy[str]:
    """Valid, near-valid and broken digests, and the ones the daemon holds."""
    return st.one_of(
        st.builds(lambda h: "sha256:" + h, st.text(alphabet=HEX, min_size=64, max_size=64)),
        st.builds(lambda h: "sha256:" + h, st.text(alphabet=HEX + "ABCDEFG", min_size=0, max_size=70)),
        st.builds(lambda h: "sha512:" + h, st.text(alphabet=HEX, min_size=128, max_size=128)),
        st.sampled_from(["sha256:", "md5:abc", "sha256:" + "0" * 64, "SHA256:" + "a" * 64]),
        texts(),
        st.sampled_from(target.blobs),
    )


def labels() -> st.SearchStrategy[dict[str, str]]:
    return st.dictionaries(texts(32), st.one_of(texts(32), st.text(min_size=1000, max_size=4000)), max_size=6)


def filters() -> st.SearchStrategy[list[str]]:
    return st.lists(
        st.one_of(
            texts(),
            st.sampled_from(
                [
                    'labels."a"==b',
                    "kind==committed",
                    "parent!=x",
                    "name~=.*",
                    'labels."',
                    "==",
                    "a==b,c~=(",
                    "digest~=[",
                ]
            ),
        ),
        max_size=4,
    )


def offsets() -> st.SearchStrategy[int]:
    return st.one_of(
        st.integers(-(2**63), 2**63 - 1), st.integers(-2, 5_000_000), st.sampled_from([0, 1, -1])
    )


# -- gRPC -----------------------------------------------------------------------------------------

Call = Callable[[grpc.Channel], Any]


def _unary(stub_cls: Any, method: str, request: Any) -> Call:
    def call(channel: grpc.Channel) -> Any:
        return getattr(stub_cls(channel), method)(request, timeout=TIMEOUT)

    return call


def _streaming(stub_cls: Any, method: str, request: Any) -> Call:
    def call(channel: grpc.Channel) -> Any:
        return list(getattr(stub_cls(channel), method)(request, timeout=TIMEOUT))

    return call


def _write(requests: list[content_pb2.WriteContentRequest]) -> Call:
    def call(channel: grpc.Channel) -> Any:
        return list(content_pb2_grpc.ContentStub(channel).Write(iter(requests), timeout=TIMEOUT))

    return call


def content_calls(target: Target) -> st.SearchStrategy[tuple[str, Call]]:
    """(description, call) pairs for every content method; never one that deletes or relabels
    a blob the daemon held before (`target.blobs`)."""
    stub, pb = content_pb2_grpc.ContentStub, content_pb2
    writable = digests(target).filter(lambda d: d not in target.blobs)
    write_req = st.builds(
        pb.WriteContentRequest,
        action=st.sampled_from([pb.STAT, pb.WRITE, pb.COMMIT, 7]),
        ref=texts(),
        total=offsets(),
        expected=digests(target),
        offset=offsets(),
        data=st.binary(max_size=4096),
        labels=labels(),
    )
    return st.one_of(
        st.builds(lambda d: (f"Info {d!r}", _unary(stub, "Info", pb.InfoRequest(digest=d))), digests(target)),
        st.builds(
            lambda d, o, s: (
                f"Read {d!r} {o} {s}",
                _streaming(stub, "Read", pb.ReadContentRequest(digest=d, offset=o, size=s)),
            ),
            digests(target),
            offsets(),
            offsets(),
        ),
        st.builds(lambda r: (f"Status {r!r}", _unary(stub, "Status", pb.StatusRequest(ref=r))), texts()),
        st.builds(
            lambda f: (
                f"ListStatuses {f!r}",
                _unary(stub, "ListStatuses", pb.ListStatusesRequest(filters=f)),
            ),
            filters(),
        ),
        st.builds(
            lambda f: (f"List {f!r}", _streaming(stub, "List", pb.ListContentRequest(filters=f))), filters()
        ),
        st.builds(lambda r: (f"Abort {r!r}", _unary(stub, "Abort", pb.AbortRequest(ref=r))), texts()),
        st.builds(
            lambda d: (f"Delete {d!r}", _unary(stub, "Delete", pb.DeleteContentRequest(digest=d))), writable
        ),
        st.builds(
            lambda d, lab, paths: (
                f"Update {d!r} {paths!r}",
                _unary(
                    stub,
                    "Update",
                    pb.UpdateRequest(
                        info=pb.Info(digest=d, labels=lab), update_mask=field_mask.FieldMask(paths=paths)
                    ),
                ),
            ),
            writable,
            labels(),
            st.lists(st.one_of(texts(), st.sampled_from(["labels", "labels.a", "size"])), max_size=3),
        ),
        st.builds(
            lambda reqs: (
                f"Write {[(r.action, r.ref[:20], r.offset, len(r.data)) for r in reqs]!r}",
                _write(reqs),
            ),
            st.lists(write_req, min_size=0, max_size=4),
        ),
    )


def snapshot_calls(target: Target) -> st.SearchStrategy[tuple[str, Call]]:
    """(description, call) pairs for every snapshots method; never one that removes, commits
    over or relabels a snapshot that existed before (`target.protected_snapshots`)."""
    stub, pb = snapshots_pb2_grpc.SnapshotsStub, snapshots_pb2
    protected = set(target.protected_snapshots)
    keys = st.one_of(texts(), st.sampled_from([*target.protected_snapshots, "adv-a", "adv-b"]))
    mine = keys.filter(lambda k: k not in protected)
    name = st.one_of(texts(), st.sampled_from(["", "x"]))
    return st.one_of(
        st.builds(
            lambda k, p, lab: (
                f"Prepare {k!r} on {p!r}",
                _unary(
                    stub,
                    "Prepare",
                    pb.PrepareSnapshotRequest(snapshotter=SNAPSHOTTER, key=k, parent=p, labels=lab),
                ),
            ),
            mine,
            keys,
            labels(),
        ),
        st.builds(
            lambda k, p: (
                f"View {k!r} on {p!r}",
                _unary(stub, "View", pb.ViewSnapshotRequest(snapshotter=SNAPSHOTTER, key=k, parent=p)),
            ),
            mine,
            keys,
        ),
        st.builds(
            lambda k: (
                f"Mounts {k!r}",
                _unary(stub, "Mounts", pb.MountsRequest(snapshotter=SNAPSHOTTER, key=k)),
            ),
            keys,
        ),
        st.builds(
            lambda n, k: (
                f"Commit {k!r} as {n!r}",
                _unary(stub, "Commit", pb.CommitSnapshotRequest(snapshotter=SNAPSHOTTER, name=n, key=k)),
            ),
            mine,
            mine,
        ),
        st.builds(
            lambda k: (
                f"Remove {k!r}",
                _unary(stub, "Remove", pb.RemoveSnapshotRequest(snapshotter=SNAPSHOTTER, key=k)),
            ),
            mine,
        ),
        st.builds(
            lambda k: (
                f"Stat {k!r}",
                _unary(stub, "Stat", pb.StatSnapshotRequest(snapshotter=SNAPSHOTTER, key=k)),
            ),
            keys,
        ),
        st.builds(
            lambda k: (
                f"Usage {k!r}",
                _unary(stub, "Usage", pb.UsageRequest(snapshotter=SNAPSHOTTER, key=k)),
            ),
            keys,
        ),
        st.builds(
            lambda k, lab, paths: (
                f"Update {k!r} {paths!r}",
                _unary(
                    stub,
                    "Update",
                    pb.UpdateSnapshotRequest(
                        snapshotter=SNAPSHOTTER,
                        info=pb.Info(name=k, labels=lab),
                        update_mask=field_mask.FieldMask(paths=paths),
                    ),
                ),
            ),
            mine,
            labels(),
            st.lists(st.one_of(texts(), st.sampled_from(["labels", "labels.a", "kind"])), max_size=3),
        ),
        st.builds(
            lambda f: (
                f"List {f!r}",
                _streaming(stub, "List", pb.ListSnapshotsRequest(snapshotter=SNAPSHOTTER, filters=f)),
            ),
            filters(),
        ),
        st.builds(
            lambda s: (
                f"Stat on snapshotter {s!r}",
                _unary(stub, "Stat", pb.StatSnapshotRequest(snapshotter=s, key="x")),
            ),
            name,
        ),
        st.just(("Cleanup", _unary(stub, "Cleanup", pb.CleanupRequest(snapshotter=SNAPSHOTTER)))),
    )


def judge_grpc(description: str, call: Call, channel: grpc.Channel) -> Verdict:
    """Run one call; bad if it ended in a code that means the daemon failed, not the request."""
    try:
        call(channel)
    except grpc.RpcError as exc:
        if exc.code() in BAD_CODES:
            return Verdict(description, f"{exc.code().name}: {exc.details()}")
    return Verdict(description)


# -- HTTP -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpRequest:
    """One request to the exchange or the mirror (`port` is which)."""

    where: str  # "exchange" or "mirror"
    method: str
    path: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


def _quote(text: str) -> str:
    return urllib.parse.quote(text, safe="/:@")


def ranges() -> st.SearchStrategy[str]:
    number = st.one_of(st.integers(0, 2**64).map(str), st.sampled_from(["", "-1", "x", "9" * 30]))
    return st.one_of(
        st.builds(lambda a, b: f"bytes={a}-{b}", number, number),
        st.builds(lambda a: f"bytes=-{a}", number),
        st.builds(lambda a, b, c: f"bytes={a}-{b},{c}-", number, number, number),
        st.sampled_from(["bytes=", "bytes", "items=0-1", "bytes=5-1", "bytes=0-0", "\x7f"]),
    )


def _headers() -> st.SearchStrategy[tuple[tuple[str, str], ...]]:
    return st.lists(
        st.one_of(
            st.tuples(st.just("Range"), ranges()),
            st.tuples(
                st.just("Accept"),
                st.sampled_from(
                    [
                        "application/vnd.oci.image.manifest.v1+json",
                        "*/*",
                        "text/html",
                        "",
                        "application/json;q=x",
                    ]
                ),
            ),
            st.tuples(
                st.just("Authorization"), st.sampled_from(["Bearer x", "Basic Zm9vOmJhcg==", "Basic !!", ""])
            ),
        ),
        max_size=3,
        unique_by=lambda h: h[0],
    ).map(tuple)


def _json_without_strings() -> st.SearchStrategy[Any]:
    """JSON values with no strings (keys aside), so a body never names an address to dial."""
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False))
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(
                st.sampled_from(["digests", "members", "node", "epoch", "id", "url", "sections", "x"]),
                inner,
                max_size=4,
            ),
        ),
        max_leaves=12,
    )


def exchange_requests(target: Target) -> st.SearchStrategy[HttpRequest]:
    suffix = st.sampled_from(["", "/table", "/data", "/data/x", "/"])
    blob_path = st.builds(lambda d, s: f"{EXCHANGE}/blobs/{_quote(d)}{s}", digests(target), suffix)
    have_body = st.one_of(
        st.builds(lambda ds: json.dumps({"digests": ds}).encode(), st.lists(digests(target), max_size=40)),
        st.builds(lambda v: json.dumps(v).encode(), _json_without_strings()),
        st.binary(max_size=200),
    )
    control = st.sampled_from([f"{EXCHANGE}/sync", f"{EXCHANGE}/whois", f"{EXCHANGE}/tracker"])
    control_body = st.one_of(
        st.builds(lambda v: json.dumps(v).encode(), _json_without_strings()), st.binary(max_size=200)
    )
    return st.one_of(
        st.builds(
            HttpRequest,
            st.just("exchange"),
            st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE"]),
            blob_path,
            _headers(),
        ),
        st.builds(
            HttpRequest,
            st.just("exchange"),
            st.just("POST"),
            st.just(f"{EXCHANGE}/have"),
            st.just(()),
            have_body,
        ),
        st.builds(
            HttpRequest,
            st.just("exchange"),
            st.sampled_from(["POST", "GET"]),
            control,
            st.just(()),
            control_body,
        ),
        st.builds(
            HttpRequest,
            st.just("exchange"),
            st.sampled_from(["GET", "OPTIONS"]),
            st.one_of(
                st.sampled_from([f"{EXCHANGE}/stats", f"{EXCHANGE}/status", "/", "//", "/peersync"]),
                texts().map(lambda t: "/" + _quote(t)),
            ),
        ),
    )


def mirror_requests(target: Target) -> st.SearchStrategy[HttpRequest]:
    names = st.one_of(
        st.just(target.repo), texts(40).map(_quote), st.sampled_from(["library/x", "a/../b", "A"])
    )
    ns = st.one_of(st.none(), st.sampled_from(target.origins), st.sampled_from([target.empty]))

    def url(kind: str, name: str, ref: str, origin: str | None) -> str:
        query = f"?ns={urllib.parse.quote(origin)}" if origin is not None else ""
        return f"/v2/{name}/{kind}/{_quote(ref)}{query}"

    refs = st.one_of(digests(target), st.sampled_from(["latest", "faults", "", "x" * 200]), texts())
    return st.one_of(
        st.builds(
            HttpRequest,
            st.just("mirror"),
            st.sampled_from(["GET", "HEAD"]),
            st.builds(url, st.sampled_from(["manifests", "blobs"]), names, refs, ns),
            _headers(),
        ),
        st.builds(
            HttpRequest,
            st.just("mirror"),
            st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"]),
            st.one_of(
                st.sampled_from(["/v2/", "/v2", "/", "/v2/_catalog", "/v2/x/tags/list"]),
                texts().map(lambda t: "/v2/" + _quote(t)),
            ),
        ),
    )


def judge_http(target: Target, request: HttpRequest) -> Verdict:
    """Send one request; bad on a 500, a traceback, or a connection the daemon dropped; an
    unauthorised read if the mirror served a held blob's bytes under the empty origin."""
    address = target.exchange if request.where == "exchange" else target.mirror
    host, port = address.rsplit(":", 1)
    description = f"{request.where} {request.method} {request.path[:200]} {request.headers!r}"
    description += f" body={request.body[:80]!r}"
    conn: http.client.HTTPConnection
    if request.where == "exchange" and target.exchange_ssl is not None:
        conn = http.client.HTTPSConnection(host, int(port), timeout=TIMEOUT, context=target.exchange_ssl)
    else:
        conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    try:
        conn.request(request.method, request.path, body=request.body or None, headers=dict(request.headers))
        resp = conn.getresponse()
        body = resp.read(1 << 20) if request.method != "HEAD" else b""
    except (http.client.HTTPException, OSError) as exc:
        return Verdict(description, f"no answer: {exc!r}")
    finally:
        conn.close()
    if resp.status == 500 or b"Traceback" in body:
        return Verdict(description, f"{resp.status}: {body[:300]!r}")
    unauthorised = (
        request.where == "mirror"
        and f"ns={urllib.parse.quote(target.empty)}" in request.path
        and resp.status in (200, 206)
        and any(body and body in held for held in target.blob_bytes.values())
    )
    return Verdict(description, unauthorised=unauthorised)


@contextlib.contextmanager
def attacked_daemon(
    work: Path, registry: Registry, image: BuiltImage, repo: str, seed: int = 0
) -> Iterator[tuple[PeerSyncDaemon, Ledger, Target]]:
    """A daemon holding what an attack must not change: three committed blobs and snapshots
    (in the `Ledger`) and `image`'s layers fetched through its mirror from `registry` (pushed as
    `repo`, tag `image.tag`); its default registry and every origin the `Target` names are on
    loopback, and an empty registry stands in for an origin without the blobs."""
    with start_registry(work / "empty") as empty:
        config = loopback_config(plain_http=[registry.address, empty.address])
        config = config.replace("[mirror]\n", f'[mirror]\ndefault_registry = "{registry.address}"\n', 1)
        with start_peersync(work / "attacked", config=config) as daemon:
            rng, ledger = random.Random(seed), Ledger()
            with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
                for i in range(3):
                    ContentWrites(daemon, ledger, rng, f"held-c{i}").step(channel)
                    SnapshotWrites(daemon, ledger, rng, f"held-s{i}").step(channel)
            prime_mirror(daemon, registry.address, repo, image.tag)
            fetched: dict[str, bytes] = {}
            for layer in image.layers:
                url = (
                    f"http://{daemon.mirror}/v2/{repo}/blobs/{layer.descriptor.digest}?ns={registry.address}"
                )
                with urllib.request.urlopen(url, timeout=60) as resp:
                    fetched[layer.descriptor.digest] = resp.read()
            exchange = tomllib.loads((daemon.root.parent / "peersync.toml").read_text())["peer"]["listen"]
            yield (
                daemon,
                ledger,
                Target(
                    socket=str(daemon.socket),
                    exchange=str(exchange),
                    mirror=daemon.mirror,
                    origins=[registry.address, f"127.0.0.1:{free_port()}"],
                    empty=empty.address,
                    repo=repo,
                    blobs=sorted({*ledger.blobs, *fetched}),
                    protected_snapshots=sorted(ledger.snapshots),
                    blob_bytes=fetched,
                    exchange_ssl=daemon.client_context(),
                ),
            )


def strategies(target: Target) -> dict[str, st.SearchStrategy[Any]]:
    """The four request classes by name: both gRPC APIs, the exchange, the mirror."""
    return {
        "content": content_calls(target),
        "snapshots": snapshot_calls(target),
        "exchange": exchange_requests(target),
        "mirror": mirror_requests(target),
    }


def judge(target: Target, request: Any, channel: grpc.Channel) -> Verdict:
    """Judge a drawn request of any class: an `HttpRequest` or a gRPC (description, call)."""
    if isinstance(request, HttpRequest):
        return judge_http(target, request)
    return judge_grpc(request[0], request[1], channel)


def campaign(target: Target, requests: st.SearchStrategy[Any], count: int, seed: int = 0) -> list[Verdict]:
    """Draw `count` requests of `requests` (gRPC (description, call) pairs or `HttpRequest`s)
    and judge each, without stopping at a bad one: the benchmark's count of every outcome."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    verdicts: list[Verdict] = []
    with grpc.insecure_channel(f"unix:{target.socket}") as channel:

        @hseed(seed)
        @settings(
            max_examples=count,
            deadline=None,
            database=None,
            derandomize=False,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.generate],
        )
        @given(requests)
        def run(request: Any) -> None:
            verdicts.append(judge(target, request, channel))

        run()
    return verdicts


__all__ = [
    "attacked_daemon",
    "campaign",
    "judge",
    "strategies",
    "HttpRequest",
    "Target",
    "Verdict",
    "content_calls",
    "exchange_requests",
    "judge_grpc",
    "judge_http",
    "mirror_requests",
    "snapshot_calls",
]
