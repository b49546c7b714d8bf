"""The `peersync` command: parse flags and config, set up logging, build the service, run it.

    peersync daemon --root DIR --socket PATH [--config FILE]
    peersync containerd-config [--socket PATH] [--config FILE] [--no-content]
    peersync config-defaults
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from peersync import __version__, config, containerd_config
from peersync.errors import PeerSyncError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
    daemon.set_defaults(func=_daemon)

    cc = sub.add_parser("containerd-config", help="print the containerd config (v2) that registers peersync")
    _common(cc)
    cc.add_argument(
        "--no-content", action="store_true", help="register only the snapshotter (mirror-only mode)"
    )
    cc.set_defaults(func=_containerd_config)

    defaults = sub.add_parser("config-defaults", help="print the default daemon config, documented")
    defaults.set_defaults(func=lambda _args: print(config.DEFAULT_TOML, end=""))
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML config file (see `peersync config-defaults`)")
    p.add_argument("--socket", type=Path, help="unix socket path (default from config)")


def _load(args: argparse.Namespace) -> config.Config:
    cfg = config.load(args.config)
    return cfg.with_overrides(root=getattr(args, "root", None), socket=args.socket)


def _daemon(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from peersync import logging as pslogging
    from peersync.service import Service, run_until_signal

    pslogging.setup(cfg.log.level, cfg.log.format)
    asyncio.run(run_until_signal(Service(cfg)))
    return 0


def _containerd_config(args: argparse.Namespace) -> int:
    cfg = _load(args)
    print(containerd_config.render(cfg.socket.absolute(), content=not args.no_content), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
