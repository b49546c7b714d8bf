"""The operator's commands against a running daemon (over its admin socket), and seeds.

    peersync status | peers | version                 [--json]
    peersync cache ls | pin DIGEST | unpin DIGEST | evict DIGEST | gc   [--json]
    peersync prefetch IMAGE...                        [--json]
    peersync seed export IMAGE... --out FILE [--direct]   (from the daemon, or straight from the registry)
    peersync seed import FILE --root DIR [--no-pin]       (offline: no daemon on that root)

Every command takes `--admin-socket PATH`, or finds the socket from `--config FILE` as the daemon
does (`[admin] socket`, default admin.sock beside `socket`: /run/peersync/admin.sock). Human output is rich
tables; `--json` prints the daemon's answer as one JSON document, whose keys docs/cli.md
documents and keeps stable. A daemon that is not running, or a socket that is not accessible,
is one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from kernel import config
from kernel.errors import PeerSyncError
from peersync import __version__
from peersync.admin.client import AdminClient, DaemonUnreachable

if TYPE_CHECKING:
    Sub = argparse._SubParsersAction[argparse.ArgumentParser]  # argparse's own (private) name


def add_commands(sub: Sub) -> None:
    """Register the admin and seed commands on the `peersync` parser."""
    status = _admin(sub, "status", "this node: role, tracker, members, cache, transfers")
    status.set_defaults(func=_status)
    peers = _admin(sub, "peers", "each peer's measured throughput, latency, queue, failures and score")
    peers.set_defaults(func=_peers)
    version = _admin(sub, "version", "the CLI's version and the running daemon's")
    version.set_defaults(func=_version)
    prefetch = _admin(sub, "prefetch", "bring images into this node's store (a site's preheat)")
    prefetch.add_argument("images", nargs="+", metavar="IMAGE")
    prefetch.add_argument("--timeout", type=float, default=3600.0, help="seconds (default %(default)s)")
    prefetch.set_defaults(func=_prefetch)

    cache = sub.add_parser("cache", help="the node's cache: list, pin, unpin, evict, gc")
    csub = cache.add_subparsers(required=True, metavar="ACTION")
    _admin(csub, "ls", "usage, budget, pins and the next eviction candidates").set_defaults(func=_cache_ls)
    for action, text in (("pin", "keep a blob whatever the budget"), ("unpin", "undo pin"),
                         ("evict", "evict one cache-only blob now")):
        p = _admin(csub, action, text)
        p.add_argument("digest", metavar="DIGEST")
        p.set_defaults(func=_cache_action, action=action)
    _admin(csub, "gc", "forget what nothing keeps, then evict to the watermark").set_defaults(func=_cache_gc)

    seed = sub.add_parser("seed", help="images carried into a node's store before it boots")
    ssub = seed.add_subparsers(required=True, metavar="ACTION")
    export = _admin(ssub, "export", "write a seed (an OCI layout tar) of images")
    export.add_argument("images", nargs="+", metavar="IMAGE")
    export.add_argument("--out", type=Path, required=True, help="the seed file to write")
    export.add_argument("--direct", action="store_true",
                        help="straight from the registries (no daemon; [origin] settings of --config)")
    export.set_defaults(func=_seed_export)
    imp = ssub.add_parser("import", help="install a seed into a store (offline, no daemon on the root)")
    imp.add_argument("file", type=Path, metavar="FILE")
    imp.add_argument("--root", type=Path, required=True, help="the store's root directory")
    imp.add_argument("--config", type=Path, help="the daemon's config (its chunk size)")
    imp.add_argument("--no-pin", action="store_true", help="leave the blobs evictable cache")
    imp.add_argument("--json", action="store_true", help="print what was done as JSON")
    imp.set_defaults(func=_seed_import, admin=True)


def _admin(sub: Sub, name: str, text: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=text, description=text)
    p.add_argument("--json", action="store_true", help="print JSON (docs/cli.md) instead of tables")
    p.add_argument("--admin-socket", type=Path, help="the daemon's admin socket")
    p.add_argument("--config", type=Path, help="the daemon's config, to find its admin socket")
    p.set_defaults(admin=True)
    return p


def run(args: argparse.Namespace) -> int:
    """Run an admin command: 1 and one line on stderr when the daemon cannot be used."""
    try:
        return int(args.func(args) or 0)
    except DaemonUnreachable as exc:
        print(f"peersync: {exc}", file=sys.stderr)
        return 1
    except PeerSyncError as exc:
        print(f"peersync: {exc}", file=sys.stderr)
        return 1


def _cfg(args: argparse.Namespace) -> config.Config:
    return config.load(getattr(args, "config", None))


def _client(args: argparse.Namespace) -> AdminClient:
    return AdminClient(args.admin_socket or _cfg(args).admin_socket)


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True))


def _console() -> Console:
    return Console(highlight=False)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


# -- status, peers, version -----------------------------------------------------------------------


def _show(args: argparse.Namespace, route: str, render: Callable[[Any], None]) -> int:
    """GET `route`: its JSON as it is with --json, else `render`ed as tables."""
    doc = _client(args).get(route)
    if args.json:
        _print_json(doc)
    else:
        render(doc)
    return 0


def _status(args: argparse.Namespace) -> int:
    return _show(args, "/v1/status", _render_status)


def _render_status(st: dict[str, Any]) -> None:
    con = _console()
    control = st["control"]
    table = Table(title=f"peersync {st['version']} at {st['url'] or '(no peer listener)'}", show_header=False)
    if control is not None:
        tracker = control["tracker"]
        table.add_row("node", f"{control['id']} (site {control['site']})")
        table.add_row("role", control["role"])
        table.add_row("tracker", "-" if tracker is None else f"{tracker['id']} epoch {tracker['epoch']}")
        table.add_row("members", str(len(control["members"])))
    cache = st["cache"]
    table.add_row("cache", f"{_size(cache['used'])} of {_size(cache['budget'])}, "
                           f"{cache['pins']} pinned, {cache['evictions']} evicted")
    moved = st["transfers"]["bytes"]
    table.add_row("in", f"{_size(moved['peer_in'])} from peers, {_size(moved['origin_in'])} from the origin")
    table.add_row("out", f"{_size(moved['peer_out'])} to peers, {_size(moved['local_out'])} to containerd")
    table.add_row("downloading", str(len(st["transfers"]["downloads"])))
    con.print(table)
    if control is not None and control["members"]:
        members = Table("rank", "id", "url", "last heard (s)")
        for m in control["members"]:
            heard = "-" if m["last_heard"] is None else f"{m['last_heard']:.1f}"
            members.add_row(str(m["rank"]), m["id"] + (" (this node)" if m["self"] else ""), m["url"], heard)
        con.print(members)


def _peers(args: argparse.Namespace) -> int:
    return _show(args, "/v1/peers", _render_peers)


def _render_peers(doc: dict[str, Any]) -> None:
    table = Table("peer", "throughput", "rtt", "p99", "queue", "failures", "score", "state",
                  title=f"peers (chunk {_size(doc['chunk_size'])})")
    for p in doc["peers"]:
        p99 = "-" if p["p99"] is None else f"{p['p99'] * 1000:.1f} ms"
        failures = f"{p['chunk_failures']}+{p['poll_failures']}"
        table.add_row(p["url"], f"{_size(int(p['throughput']))}/s", f"{p['rtt'] * 1000:.1f} ms", p99,
                      str(p["inflight"]), failures, f"{p['score'] * 1000:.1f} ms", p["state"])
    _console().print(table)


def _version(args: argparse.Namespace) -> int:
    try:
        daemon: str | None = _client(args).get("/v1/version")["version"]
    except DaemonUnreachable:
        daemon = None
    if args.json:
        _print_json({"cli": __version__, "daemon": daemon})
    else:
        print(f"peersync {__version__} (daemon: {daemon or 'not running'})")
    return 0


# -- cache ----------------------------------------------------------------------------------------


def _cache_ls(args: argparse.Namespace) -> int:
    return _show(args, "/v1/cache", _render_cache)


def _render_cache(st: dict[str, Any]) -> None:
    con = _console()
    usage = st["usage"]
    budget = f"{_size(st['budget'])} ({st['budget_config'] or 'none'})"
    con.print(f"budget {budget}, used {_size(usage['total'])}: "
              f"{_size(usage['complete'])} complete, {_size(usage['partial'])} partial, "
              f"{_size(usage['ingest'])} ingests; evictions {st['evictions']['count']} "
              f"({_size(st['evictions']['bytes'])})")
    blobs = Table(*st["blobs"].keys(), title="blobs")
    blobs.add_row(*(str(v) for v in st["blobs"].values()))
    con.print(blobs)
    if st["pins"]:
        con.print("pinned: " + ", ".join(st["pins"]))
    nxt = Table("next to evict", "size", "score", "replicas", title="eviction order")
    for e in st["next"]:
        nxt.add_row(e["digest"], _size(e["size"]), f"{e['score']:.3f}", str(e["replicas"]))
    con.print(nxt)


def _cache_action(args: argparse.Namespace) -> int:
    doc = _client(args).post(f"/v1/cache/{args.action}", {"digest": args.digest})
    if args.json:
        _print_json(doc)
    elif args.action == "evict":
        print(f"evicted {doc['digest']}: {_size(doc['freed'])} freed")
    else:
        print(f"{args.action}ned {doc['digest']}" if doc["changed"] else f"{doc['digest']}: no change")
    return 0


def _cache_gc(args: argparse.Namespace) -> int:
    doc = _client(args).post("/v1/cache/gc")
    if args.json:
        _print_json(doc)
    else:
        print(f"forgot {doc['forgotten']}, evicted {doc['evicted']}, freed {_size(doc['freed'])}")
    return 0


# -- prefetch -------------------------------------------------------------------------------------


def _prefetch(args: argparse.Namespace) -> int:
    client = _client(args)
    results: dict[str, dict[str, Any]] = {}
    lines = client.lines("/v1/prefetch", {"images": args.images}, timeout=args.timeout)
    if args.json:
        for line in lines:
            results[line["image"]] = line
    else:
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
        with Progress(*columns, console=Console(stderr=True)) as progress:
            bars = {ref: progress.add_task(ref, total=None) for ref in args.images}
            for line in lines:
                results[line["image"]] = line
                bar = bars[line["image"]]
                if "error" in line:
                    progress.update(bar, description=f"{line['image']}: {line['error']}")
                else:
                    progress.update(bar, total=line["total"], completed=line["done_bytes"])
    out = [{"image": ref, **{k: v for k, v in results.get(ref, {}).items() if k != "image"}}
           for ref in args.images]
    failed = [r for r in out if r.get("error") or not r.get("done")]
    if args.json:
        _print_json({"images": out})
    for r in failed:
        print(f"peersync: prefetch {r['image']}: {r.get('error', 'no answer')}", file=sys.stderr)
    return 1 if failed else 0


# -- seeds ----------------------------------------------------------------------------------------


def _seed_export(args: argparse.Namespace) -> int:
    tmp = args.out.with_name(args.out.name + ".part")
    try:
        with open(tmp, "wb") as f:
            if args.direct:
                written = asyncio.run(_export_direct(_cfg(args), args.images, f))
            else:
                query = "&".join(f"image={_quote(r)}" for r in args.images)
                resp = _client(args).stream(f"/v1/seed?{query}", timeout=3600.0)
                written = 0
                while piece := resp.read(1 << 20):
                    f.write(piece)
                    written += len(piece)
                _check_complete(tmp, written)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, args.out)
    finally:
        tmp.unlink(missing_ok=True)
    doc = {"out": str(args.out), "bytes": written, "images": args.images, "direct": bool(args.direct)}
    if args.json:
        _print_json(doc)
    else:
        print(f"wrote {args.out}: {_size(written)}, {len(args.images)} image(s)")
    return 0


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def _check_complete(path: Path, written: int) -> None:
    """A tar cut short (the daemon failed mid-export) ends without its two zero blocks."""
    with open(path, "rb") as f:
        f.seek(max(0, written - 1024))
        if written < 1024 or f.read(1024) != b"\0" * 1024:
            raise PeerSyncError(f"the daemon's seed export ended early ({written} bytes): see its log")


async def _export_direct(cfg: config.Config, refs: list[str], f: Any) -> int:
    """Straight from the registries, with the daemon's [origin] settings: no daemon needed."""
    import aiohttp

    from peer.images import Blob, Image
    from peer.origin import CredentialStore, HostSettings, OriginClient
    from peersync import seed

    written = 0

    async def write(data: bytes) -> None:
        nonlocal written
        await asyncio.to_thread(f.write, data)
        written += len(data)

    async with aiohttp.ClientSession(auto_decompress=False) as session:
        hosts = {h: HostSettings(plain_http=True) for h in cfg.origin.plain_http}
        origin = OriginClient(session, CredentialStore.from_mapping(cfg.origin.auth), hosts=hosts)

        async def resolve(registry: str, repo: str, ref: str) -> tuple[bytes, str, str]:
            m = await origin.resolve(registry, repo, ref)
            return m.body, m.media_type, m.digest

        async def read(image: Image, blob: Blob) -> AsyncIterator[bytes]:
            ref = image.ref
            pieces = origin.read_blob(ref.registry, ref.repository, blob.digest, 0, blob.size, blob.size)
            async for piece in pieces:
                yield piece

        images = await seed.walk_all(resolve, refs, cfg.mirror.default_registry)
        await seed.export(images, read, write)
    return written


def _seed_import(args: argparse.Namespace) -> int:
    from peersync import seed

    cfg = config.load(args.config)
    report = seed.import_seed(args.file, args.root, cfg.store.chunk_size, pin=not args.no_pin)
    if args.json:
        _print_json(report.as_dict())
    else:
        print(f"imported {report.written} blob(s) ({_size(report.bytes)}), {report.present} already there, "
              f"{report.pinned} pinned: {', '.join(report.images)}")
    return 0
