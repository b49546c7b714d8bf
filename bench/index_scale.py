"""The tracker index's cost per sync at site sizes up to 10,000 members (issue 9, for issue 12).

    python bench/index_scale.py [--members 100,1000,10000] [--chunks 200] [--rounds 20]

Drives `peer.policy.index.Index` as a tracker would, with a simulated clock and no network: every
member fills the same blob of `--chunks` chunks; each round every member sends one sync (its new
chunks, a lease request while it needs one, a candidate query) and chunks spread: a member lands
its leased runs and a few chunks its candidates hold. Reports the tracker's CPU per sync handled
(mean over the rounds), the largest candidate set, how many chunks were leased more than once
(must be 0), and with `--memory` the memory allocated meanwhile and still held (tracemalloc,
which slows the run down). Pure CPU on one core.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path
from random import Random

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peer.policy.index import Announcement, Index  # noqa: E402

DIGEST = "sha256:" + "5a" * 32
CS = 1 << 20


def run(members: int, chunks: int, rounds: int, memory: bool, seed: int = 0) -> dict[str, float]:
    rng = Random(seed)
    idx = Index()
    names = [f"m{i:05d}" for i in range(members)]
    for i, m in enumerate(names):
        idx.set_member(m, f"http://10.{i // 65536}.{i // 256 % 256}.{i % 256}:5381")
    have = {m: 0 for m in names}
    pending: dict[str, list[tuple[int, int]]] = {m: [] for m in names}
    leased = [0] * chunks
    full = (1 << chunks) - 1
    now, handled, spent, widest = 0.0, 0, 0.0, 0
    if memory:
        tracemalloc.start()
    for _ in range(rounds):
        for m in names:
            if have[m] == full:
                continue
            add = pending[m]
            pending[m] = []
            t = time.process_time()
            idx.apply(m, Announcement(DIGEST, chunks * CS, CS, tuple(add), filling=True), now)
            lease = idx.grant(DIGEST, m, [], 32, now)
            cands = idx.candidates(DIGEST, m, now, rng)
            spent += time.process_time() - t
            handled += 1
            widest = max(widest, len(cands))
            if lease is not None:
                for i in range(lease.first, lease.last + 1):
                    leased[i] += 1
                pending[m].append((lease.first, lease.last))
                have[m] |= lease.mask
            for h in cands[:4]:  # a few chunks from the candidates this round
                got = h.have & ~have[m] if not h.complete else full & ~have[m]
                for _ in range(2):
                    if not got:
                        break
                    low = got & -got
                    i = low.bit_length() - 1
                    have[m] |= low
                    got ^= low
                    pending[m].append((i, i))
            if have[m] == full:
                idx.apply(m, Announcement(DIGEST, chunks * CS, CS, complete=True), now)
        now += 0.25
    mem = tracemalloc.get_traced_memory()[0] if memory else 0
    tracemalloc.stop()
    done = sum(have[m] == full for m in names)
    return {
        "members": members,
        "us_per_sync": round(1e6 * spent / max(1, handled), 1),
        "syncs": handled,
        "widest_candidates": widest,
        "chunks_leased_twice": sum(n > 1 for n in leased),
        "complete_members": done,
        "index_mib": round(mem / (1 << 20), 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/index_scale.py", description=__doc__.split("\n")[0])
    p.add_argument("--members", default="100,1000,10000")
    p.add_argument("--chunks", type=int, default=200)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--memory", action="store_true", help="trace the index's memory (slows it down)")
    args = p.parse_args(argv)
    print("| members | µs per sync | syncs | widest candidate set | chunks leased twice | complete | MiB |")
    print("|---|---|---|---|---|---|---|")
    for n in [int(x) for x in args.members.split(",")]:
        r = run(n, args.chunks, args.rounds, args.memory)
        print(
            f"| {r['members']} | {r['us_per_sync']} | {r['syncs']} | {r['widest_candidates']} | "
            f"{r['chunks_leased_twice']} | {r['complete_members']} | {r['index_mib']} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
