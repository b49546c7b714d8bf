"""The `peersync` command: parse flags and config, set up logging, build the service, run it.

    peersync daemon --root DIR --socket PATH [--config FILE]
    peersync containerd-config [--socket PATH] [--config FILE] [--no-content] [--cri [--hosts-dir DIR]]
    peersync config-defaults
    peersync hosts install [--dir DIR] [--mirror URL] REGISTRY...
    peersync hosts remove [--dir DIR] (REGISTRY... | --all)
    peersync site init --dir DIR [--name SITE] [--days N] [--force]
    peersync site issue NODE --dir DIR [--out DIR] [--ip ADDR ...] [--dns NAME ...] [--days N] [--force]
    peersync status | peers | version | cache ... | prefetch IMAGE... | seed ...   (`peersync.cli_admin`)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kernel import config
from kernel.errors import PeerSyncError
from peersync import __version__, cli_admin, containerd_config


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "admin", False):
        return cli_admin.run(args)
    try:
        return int(args.func(args) or 0)
    except PeerSyncError as exc:
        print(f"peersync: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peersync", description="P2P image distribution for containerd")
    parser.add_argument("--version", action="version", version=f"peersync {__version__}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    daemon = sub.add_parser("daemon", help="serve the containerd proxy plugins until SIGTERM")
    _common(daemon)
    daemon.add_argument("--root", type=Path, help="state directory (default from config: /var/lib/peersync)")
    daemon.add_argument("--metrics-listen", metavar="HOST:PORT",
                        help="where /metrics listens (overrides [admin] listen; the Helm chart passes "
                        "the node's address)")
    daemon.set_defaults(func=_daemon)

    cc = sub.add_parser("containerd-config", help="print the containerd config (v2) that registers peersync")
    _common(cc)
    cc.add_argument(
        "--no-content", action="store_true", help="register only the snapshotter (mirror-only mode)"
    )
    cc.add_argument(
        "--cri",
        action="store_true",
        help="also point the CRI plugin (kubelet) at peersync, with layer annotations on",
    )
    cc.add_argument(
        "--hosts-dir",
        type=Path,
        default=containerd_config.DEFAULT_HOSTS_DIR,
        help="with --cri: the registry hosts dir CRI reads (default %(default)s)",
    )
    cc.set_defaults(func=_containerd_config)

    defaults = sub.add_parser("config-defaults", help="print the default daemon config, documented")
    defaults.set_defaults(func=lambda _args: print(config.DEFAULT_TOML, end=""))

    _hosts_parser(sub)
    _site_parser(sub)
    cli_admin.add_commands(sub)
    return parser


def _site_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The operator's certificate tool (peersync/site.py); run it where the site CA is kept."""
    from peersync import site

    group = sub.add_parser("site", help="make the site CA and node certificates (mutual TLS between nodes)")
    ssub = group.add_subparsers(required=True, metavar="ACTION")
    init = ssub.add_parser("init", help="create the site CA (ca.key, ca.crt) in --dir")
    init.add_argument("--dir", type=Path, required=True, help="the site directory (keep it off the nodes)")
    init.add_argument("--name", default="default", help="the site's name, shown in its certificates")
    init.add_argument("--days", type=int, default=site.CA_DAYS, help="lifetime (default %(default)s)")
    init.add_argument("--force", action="store_true", help="replace an existing CA (cuts off every node)")
    init.set_defaults(func=_site_init)
    issue = ssub.add_parser("issue", help="issue a node certificate signed by the site CA")
    issue.add_argument("node", metavar="NODE", help="the node's name (the certificate's CN)")
    issue.add_argument("--dir", type=Path, required=True, help="the site directory (`site init --dir`)")
    issue.add_argument("--out", type=Path, help="where to write ca.crt, node.crt, node.key (DIR/nodes/NODE)")
    issue.add_argument("--ip", action="append", default=[], metavar="ADDR",
                       help="an address peers dial this node at (repeatable)")
    issue.add_argument("--dns", action="append", default=[], metavar="NAME",
                       help="a host name peers dial this node by (repeatable)")
    issue.add_argument("--days", type=int, default=site.NODE_DAYS, help="lifetime (default %(default)s)")
    issue.add_argument("--force", action="store_true", help="replace the files in --out")
    issue.set_defaults(func=_site_issue)


def _site_init(args: argparse.Namespace) -> int:
    from peersync import site

    files = site.init_site(args.dir, args.name, force=args.force, days=args.days)
    print(f"site CA {args.name!r}: {files.cert} (certificate), {files.key} (private key, 0600: the site's")
    print("  membership; keep it here, off the nodes). Next: peersync site issue NODE --dir "
          f"{args.dir} --ip ADDR")
    return 0


def _site_issue(args: argparse.Namespace) -> int:
    from peersync import site

    out = args.out or args.dir / "nodes" / args.node
    files = site.issue_node(args.dir, args.node, out, args.ip, args.dns, force=args.force, days=args.days)
    print(f"node {args.node}: {files.cert}, {files.key} (0600), {files.ca}; valid until "
          f"{files.not_after:%Y-%m-%d}")
    print("  install on the node: the three files into /etc/peersync/tls/ (the [tls] defaults), then "
          "restart peersync")
    return 0


def _hosts_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from peersync import hosts

    group = sub.add_parser("hosts", help="add or remove the peersync mirror in containerd's hosts.toml files")
    hsub = group.add_subparsers(required=True, metavar="ACTION")
    install = hsub.add_parser("install", help="make the peersync mirror the first host of each registry")
    remove = hsub.add_parser("remove", help="take the peersync mirror out again, restoring the files")
    for p in (install, remove):
        p.add_argument("--dir", type=Path, default=hosts.DEFAULT_DIR,
                       help=f"containerd's hosts directory (default {hosts.DEFAULT_DIR})")
    install.add_argument("--mirror", default=hosts.DEFAULT_MIRROR,
                         help=f"the mirror endpoint (default {hosts.DEFAULT_MIRROR})")
    install.add_argument("registries", nargs="+", metavar="REGISTRY",
                         help="registry host, e.g. docker.io, ghcr.io, or _default for every registry")
    install.set_defaults(func=_hosts_install)
    remove.add_argument("registries", nargs="*", metavar="REGISTRY")
    remove.add_argument("--all", action="store_true", help="every registry that has the peersync mirror")
    remove.set_defaults(func=_hosts_remove)


def _hosts_install(args: argparse.Namespace) -> int:
    from peersync import hosts

    mirror = hosts.check_mirror(args.mirror)
    return _hosts_each(args.registries, lambda r: hosts.install(r, mirror, args.dir))


def _hosts_remove(args: argparse.Namespace) -> int:
    from peersync import hosts

    if bool(args.registries) == bool(args.all):
        print("peersync: hosts remove: name registries or pass --all (not both)", file=sys.stderr)
        return 2
    if args.all:
        registries = hosts.managed(args.dir)
        if not registries:
            print(f"no hosts.toml under {args.dir} has the peersync mirror")
    else:
        registries = args.registries
    return _hosts_each(registries, lambda r: hosts.remove(r, args.dir))


def _hosts_each(registries: list[str], action: Callable[[str], Any]) -> int:
    """Apply `action` to each registry; report each result, go on after a failure."""
    failed = False
    for registry in registries:
        try:
            change = action(registry)
        except PeerSyncError as exc:
            print(f"peersync: {registry}: {exc}", file=sys.stderr)
            failed = True
        else:
            print(f"{registry}: {change.action} ({change.path})")
    return 2 if failed else 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML config file (see `peersync config-defaults`)")
    p.add_argument("--socket", type=Path, help="unix socket path (default from config)")


def _load(args: argparse.Namespace) -> config.Config:
    cfg = config.load(args.config)
    return cfg.with_overrides(root=getattr(args, "root", None), socket=args.socket)


def _daemon(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if args.metrics_listen is not None:
        cfg = config.with_admin_listen(cfg, args.metrics_listen)
    from kernel import logging as pslogging
    from peersync.service import Service, run_until_signal

    pslogging.setup(cfg.log.level, cfg.log.format)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(run_until_signal(Service(cfg)))
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (~15% less CPU per small RPC, bench/rpc_overhead.py), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _containerd_config(args: argparse.Namespace) -> int:
    cfg = _load(args)
    text = containerd_config.render(
        cfg.socket.absolute(), content=not args.no_content, cri=args.cri, hosts_dir=args.hosts_dir
    )
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
