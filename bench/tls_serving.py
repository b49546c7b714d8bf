"""Chunk serving through the peer exchange: mutual TLS vs plain HTTP, on one real daemon.

    python bench/tls_serving.py [--mib 64] [--rounds 3] [--concurrency 8] [--connections 300]

A `peersync daemon` on loopback (its store filled beforehand with one random blob of --mib MiB),
asked for every 1 MiB chunk of it by a client in this process, `concurrency` requests in flight
(the engine's window), over connections kept alive as the engine keeps them. Once with `[tls]
insecure = true`, once with a site certificate (`peersync site issue`), alternating, `rounds`
times each. Reports MiB/s as the client sees it and the daemon's CPU seconds per GiB served
(from /proc/<pid>/stat) and its peak RSS: what serving chunks costs the node that serves them;
and the client's CPU per GiB (this process: the exchange client receiving). Then `connections`
requests for a blob's view, each on a new connection (4 at a time): the CPU milliseconds a new
connection costs the daemon and the client, which under TLS is a full mutual handshake. Medians
over the rounds.

Under uvloop (the daemon's loop) aiohttp's FileResponse never gets a zero-copy sendfile, TLS or
not: `loop.sendfile` is not implemented there, so both paths read the file in the executor and
write it through the transport; TLS adds the encryption (AES-GCM) and one more copy.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import ssl
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import uvloop  # noqa: E402

from kernel.store.chunkstore import ChunkStore  # noqa: E402
from kernel.store.meta import Meta  # noqa: E402
from peer.exchange import PeerClient  # noqa: E402
from testbed.peersyncd import loopback_config, start_peersync  # noqa: E402

CHUNK = 1 << 20


def fill(root: Path, mib: int) -> str:
    data = os.urandom(mib * CHUNK)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    meta = Meta(root)
    store = ChunkStore(root, meta, CHUNK)
    store.recover()
    writer = store.ingests.open("bench", len(data))
    writer.write_at(0, data)
    writer.commit(len(data), digest)
    store.close()
    meta.close()
    return digest


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def fetch_all(url: str, digest: str, mib: int, concurrency: int, ctx: ssl.SSLContext | None) -> float:
    connector = aiohttp.TCPConnector(limit=256, limit_per_host=32)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        client = PeerClient(session, ssl=ctx)
        # as many connections up as there will be requests in flight, handshakes done: the
        # timed part is the transfer alone (new connections are measured on their own)
        await asyncio.gather(*(client.chunk(url, digest, 0, CHUNK) for _ in range(concurrency)))
        queue = list(range(mib))
        started = time.monotonic()

        async def worker() -> None:
            while queue:
                i = queue.pop()
                data = (await client.chunk(url, digest, i * CHUNK, CHUNK)).data
                assert len(data) == CHUNK

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.monotonic() - started


async def new_connections(url: str, digest: str, n: int, ctx: ssl.SSLContext | None) -> None:
    """`n` requests for the view of `digest`, each on a connection of its own, 4 at a time."""
    connector = aiohttp.TCPConnector(force_close=True, limit=4)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        client = PeerClient(session, ssl=ctx)
        await asyncio.gather(*(client.have(url, [digest]) for _ in range(n)))


Row = tuple[float, float, float, float, float, float]


def one(work: Path, mode: str, mib: int, concurrency: int, conns: int) -> Row:
    node = work / mode
    root = node / "root"
    root.mkdir(parents=True)
    digest = fill(root, mib)
    extra = "[tls]\ninsecure = true\n" if mode == "plain" else ""
    with start_peersync(node, config=loopback_config(extra=extra)) as daemon:
        before, client_before = cpu_seconds(daemon.process.pid), time.process_time()
        fetch = fetch_all(daemon.peer_url, digest, mib, concurrency, daemon.client_context())
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # the daemon's loop
            seconds = runner.run(fetch)
            cpu = cpu_seconds(daemon.process.pid) - before
            client = time.process_time() - client_before
            rss = peak_rss_mb(daemon.process.pid)
            before, client_before = cpu_seconds(daemon.process.pid), time.process_time()
            runner.run(new_connections(daemon.peer_url, digest, conns, daemon.client_context()))
            conn_server = (cpu_seconds(daemon.process.pid) - before) / conns * 1000
            conn_client = (time.process_time() - client_before) / conns * 1000
    gib = mib / 1024
    return mib / seconds, cpu / gib, client / gib, rss, conn_server, conn_client


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--connections", type=int, default=300)
    args = p.parse_args()
    results: dict[str, list[Row]] = {"plain": [], "tls": []}
    with tempfile.TemporaryDirectory(prefix="tls-serving-") as tmp:
        for r in range(args.rounds):
            for mode in ("plain", "tls") if r % 2 == 0 else ("tls", "plain"):
                row = one(Path(tmp) / f"r{r}", mode, args.mib, args.concurrency, args.connections)
                results[mode].append(row)
                line = f"round {r} {mode:5}: {row[0]:7.1f} MiB/s, daemon CPU {row[1]:5.2f} s/GiB"
                line += f", client CPU {row[2]:5.2f} s/GiB, daemon peak RSS {row[3]:.0f} MB"
                print(f"{line}, per new connection {row[4]:.2f} / {row[5]:.2f} ms", flush=True)
    head = (
        "| transport | MiB/s | daemon (server) CPU s/GiB | client CPU s/GiB | daemon peak RSS MB "
        "| new connection: daemon CPU ms | client CPU ms |"
    )
    print(f"\n{head}\n|---|---|---|---|---|---|---|")
    for mode, rows in results.items():
        med = [sorted(col)[len(col) // 2] for col in zip(*rows, strict=True)]
        cells = [f"{v:.0f}" if i in (0, 3) else f"{v:.2f}" for i, v in enumerate(med)]
        print(f"| {mode} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
