"""gzip inflate for layer unpacking: zlib (CPython's) against ISA-L (`isal`), side by side in one run.

    python bench/inflate.py [--mb 64] [--rounds 5]

The daemon unpacks layers itself (snapshotter/apply.py), and on a 2-core edge node the inflate is
the biggest single cost of a compressible layer. This measures what `apply._gunzip` does: a
`decompressobj(wbits=31)` fed 256 KiB of input at a time with a 1 MiB output cap. Inputs, all made
here (no download): random bytes (incompressible, gzip only frames them), text-like data (~3:1)
and a tar of this Python installation's standard library (a real image's content), each gzip'd at
level 6 as `docker build` does. It also runs two inflates at once in two threads, to see whether
the library releases the GIL (a layer unpacks in a helper thread beside the tar writer).

Reports MB/s of uncompressed output, median of `--rounds`, alternating the order of the two.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import io
import os
import random
import statistics
import sys
import sysconfig
import tarfile
import threading
import time
import zlib
from collections.abc import Callable
from types import ModuleType

GZIP_INPUT = 256 << 10
CHUNK = 1 << 20


def inflate(lib: ModuleType, blob: bytes) -> int:
    d = lib.decompressobj(wbits=31)
    pos, out = 0, 0
    data = b""
    while True:
        if not data:
            data = blob[pos : pos + GZIP_INPUT]
            pos += len(data)
            if not data:
                return out
        got = d.decompress(data, CHUNK)
        out += len(got)
        data = d.unconsumed_tail
        if d.eof:
            return out


def samples(mb: int) -> dict[str, bytes]:
    rng = random.Random(7)
    size = mb << 20
    words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)]
    text = bytearray()
    while len(text) < size:
        text += b" ".join(rng.choices(words, k=4096)) + b"\n"
    stdlib = io.BytesIO()
    with tarfile.open(fileobj=stdlib, mode="w") as tar:
        tar.add(sysconfig.get_paths()["stdlib"], arcname="usr/lib/python3", filter=_no_site_packages)
    raw = {
        "random": os.urandom(size),
        "text (~3:1)": bytes(text[:size]),
        f"python stdlib tar ({stdlib.tell() >> 20} MB)": stdlib.getvalue(),
    }
    return {name: gzip.compress(data, compresslevel=6, mtime=0) for name, data in raw.items()}


def _no_site_packages(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    return None if "site-packages" in info.name or "__pycache__" in info.name else info


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    start = time.perf_counter()
    n = fn()
    return time.perf_counter() - start, n


def two_threads(lib: ModuleType, blob: bytes) -> int:
    results = [0, 0]

    def work(i: int) -> None:
        results[i] = inflate(lib, blob)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(results)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=64, help="uncompressed size of the generated inputs")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    try:
        from isal import isal_zlib
    except ImportError:
        print("isal is not installed (pip install isal)", file=sys.stderr)
        return 1
    libs: dict[str, ModuleType] = {"zlib": zlib, "isal": isal_zlib}
    print("| input | compressed MB | zlib MB/s | isal MB/s | isal/zlib | zlib 2 threads | isal 2 threads |")
    print("|---|---|---|---|---|---|---|")
    for name, blob in samples(args.mb).items():
        rates: dict[str, list[float]] = {k: [] for k in ("zlib", "isal", "zlib2", "isal2")}
        for rnd in range(args.rounds):
            order = list(libs.items()) if rnd % 2 == 0 else list(libs.items())[::-1]
            for lib_name, lib in order:
                secs, n = timed(functools.partial(inflate, lib, blob))
                rates[lib_name].append(n / secs / 1e6)
                secs, n = timed(functools.partial(two_threads, lib, blob))
                rates[lib_name + "2"].append(n / secs / 1e6)
        med = {k: statistics.median(v) for k, v in rates.items()}
        print(
            f"| {name} | {len(blob) / 1e6:.1f} | {med['zlib']:.0f} | {med['isal']:.0f} "
            f"| {med['isal'] / med['zlib']:.2f}x | {med['zlib2']:.0f} | {med['isal2']:.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
