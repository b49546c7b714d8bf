"""`peersync-testbed`: the test and benchmark tooling's own entry point (not part of the product).

    peersync-testbed demo              three nodes on loopback: pull, share chunks, run (needs root)
    peersync-testbed site [OPTIONS]    the emulated edge-site benchmark (see `site --help`)

The product's `peersync` command holds only what an operator runs on a node; everything that
builds registries, containerds, network namespaces or benchmark images lives here, outside the
wheel and the .deb. `python -m testbed` is the same command.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return int(args.func(args) or 0)


def _parser() -> argparse.ArgumentParser:
    from testbed import bench

    parser = argparse.ArgumentParser(
        prog="peersync-testbed", description="PeerSync's demo and edge-site benchmark (needs root)"
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo", help="three nodes on loopback: pull, share chunks, run, the kubelet way too"
    )
    demo.set_defaults(func=_demo)
    site = sub.add_parser(
        "site", help="emulated edge site benchmark: PeerSync vs registry, cache, BitTorrent"
    )
    bench.add_arguments(site)
    site.set_defaults(func=bench.main_from_args)
    return parser


def _demo(_args: argparse.Namespace) -> int:
    from testbed import demo

    return demo.main()


if __name__ == "__main__":
    sys.exit(main())
