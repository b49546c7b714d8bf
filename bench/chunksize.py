"""How the chunk size affects ingest+commit throughput and metadata overhead.

For each chunk size, ingest a random blob through the real Write path (IngestWriter.write_at in
1 MiB messages, as containerd sends them), commit it (fsync, rename, LMDB record with the chunk
table), and measure: write throughput (hashing whole + per chunk, pwrite), commit time, the LMDB
transaction alone, the chunk table's size, and the cost of looking up one chunk's hash (what a
peer serving a chunk pays). A whole-blob-only SHA-256 pass gives the floor for hashing.

    python bench/chunksize.py [--size-mb 200] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernel.store import commit
from kernel.store.chunkstore import ChunkStore
from kernel.store.meta import Meta

KIB, MIB = 1024, 1024 * 1024
SIZES = [256 * KIB, 1 * MIB, 4 * MIB]
MESSAGE = 1 * MIB


def run_once(data: bytes, chunk_size: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        meta = Meta(Path(tmp))
        store = ChunkStore(Path(tmp), meta, chunk_size)
        txn_time = []
        real_commit_record = commit.commit_record

        def timed(*args: object) -> None:
            t = time.perf_counter()
            real_commit_record(*args)  # type: ignore[arg-type]
            txn_time.append(time.perf_counter() - t)

        commit.commit_record = timed  # type: ignore[assignment]
        try:
            t0 = time.perf_counter()
            writer = store.ingests.open("bench", len(data))
            view = memoryview(data)
            for off in range(0, len(data), MESSAGE):
                writer.write_at(off, view[off : off + MESSAGE])
            t1 = time.perf_counter()
            digest = writer.commit(len(data), "")
            t2 = time.perf_counter()
        finally:
            commit.commit_record = real_commit_record  # type: ignore[assignment]
        table = len(b"".join(store.chunk_hashes(digest)))
        count = store.record(digest).chunks
        t3 = time.perf_counter()
        lookups = 2000
        for i in range(lookups):
            store.chunk_hash(digest, i % count)
        lookup_us = (time.perf_counter() - t3) / lookups * 1e6
        store.close()
        meta.close()
    return {
        "write_s": t1 - t0,
        "commit_s": t2 - t1,
        "txn_ms": txn_time[0] * 1e3,
        "table": table,
        "chunks": count,
        "lookup_us": lookup_us,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    data = os.urandom(args.size_mb * MIB)
    t = time.perf_counter()
    hashlib.sha256(data).digest()
    floor = args.size_mb / (time.perf_counter() - t)
    print(f"blob {args.size_mb} MiB, {args.repeat} runs each (median); sha256 alone: {floor:.0f} MiB/s")
    print(
        f"{'chunk':>8} {'chunks':>7} {'write MiB/s':>12} {'commit s':>9} {'ingest+commit MiB/s':>20} "
        f"{'LMDB txn ms':>12} {'table KiB':>10} {'hash lookup us':>15}"
    )
    for chunk_size in SIZES:
        runs = [run_once(data, chunk_size) for _ in range(args.repeat)]

        def med(key: str, runs: list[dict[str, float]] = runs) -> float:
            return statistics.median(r[key] for r in runs)

        total = med("write_s") + med("commit_s")
        print(
            f"{chunk_size // KIB:>6}Ki {int(med('chunks')):>7} {args.size_mb / med('write_s'):>12.0f} "
            f"{med('commit_s'):>9.2f} {args.size_mb / total:>20.0f} {med('txn_ms'):>12.2f} "
            f"{med('table') / KIB:>10.1f} {med('lookup_us'):>15.1f}"
        )


if __name__ == "__main__":
    main()
