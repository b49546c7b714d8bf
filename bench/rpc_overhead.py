"""Server CPU per content `Read` RPC: snapshotter.h2server vs its predecessors and grpc.aio, side by
side in one run.

Reproduces containerd's unpack pattern: one server-streaming Read(digest, offset, 32 KiB) per ReadAt,
strictly sequential, each answered with a 32 KiB `os.pread` from a blob. The client (a separate
process, identical for every server: grpcio's sync stub over a unix socket) warms up, then issues N
Reads; the server's CPU (user+sys of the whole process, from /proc) is sampled around the measured
window. Servers run in their own processes too. Rounds are interleaved to spread machine noise.

    python bench/rpc_overhead.py [-n 5000] [--rounds 3] [--size 32768] [--only h2/asyncio,...]
                                 [--old-rev cecb1e0] [--lib-rev 9bdab7b]

Rows, on the default asyncio loop and on uvloop (if installed):
- `h2`: snapshotter/h2server.py as it is in this tree;
- `h2-old`: the server before the hostile-test fixes (`git show OLD_REV:snapshotter/h2server.py`,
  written into a temporary module at bench time);
- `h2-lib`: the rebuild on the `h2` library (branch `h2`: its four modules `git show LIB_REV:...`
  into a temporary `snapshotter` package placed in front of the real one, so `snapshotter.api`
  still resolves; needs `h2` installed, the dev extra has it);
- `grpc.aio`: grpcio's asyncio server;
- `h2-thread` (asyncio only): `h2` with the pread moved to `asyncio.to_thread` (what a servicer that
  keeps the loop free pays).
No copy of the old servers lives in the tree: they come from git each run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CLK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK  # utime, stime


# ---------------------------------------------------------------------------------------------- server

OLD_REV = "cecb1e0"  # snapshotter/h2server.py before the hostile-test fixes (one 1.6k-line module)
LIB_REV = "9bdab7b"  # branch h2: the server rebuilt on the h2 library
LIB_MODULES = ("h2server", "h2conn", "h2call", "h2wire")


def git_show(rev: str, path: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:{path}"], check=True, capture_output=True, text=True
    ).stdout


def old_server_module(rev: str, tmp: str) -> str:
    """Write the old server's source (from git) as module `h2server_old` in a directory; return it."""
    where = os.path.join(tmp, "oldserver")
    os.makedirs(where, exist_ok=True)
    Path(where, "h2server_old.py").write_text(git_show(rev, "snapshotter/h2server.py"))
    return where


def lib_server_package(rev: str, tmp: str) -> str:
    """Write branch h2's server modules (from git) into a `snapshotter` package whose `__path__` puts
    them before the real snapshotter/ (for `snapshotter.api`); return the directory to put first
    on sys.path."""
    where = os.path.join(tmp, "libserver")
    pkg = os.path.join(where, "snapshotter")
    os.makedirs(pkg, exist_ok=True)
    for name in LIB_MODULES:
        Path(pkg, f"{name}.py").write_text(git_show(rev, f"snapshotter/{name}.py"))
    real = str(ROOT / "snapshotter")
    Path(pkg, "__init__.py").write_text(f"__path__ = [{pkg!r}, {real!r}]\n")
    return where


def serve(kind: str, sock: str, blob: str, loop_kind: str, old_dir: str | None, lib_dir: str | None) -> None:
    if kind == "h2-lib":  # before anything imports the real snapshotter package
        sys.path.insert(0, lib_dir)
    import grpc

    from snapshotter.api import content_pb2, content_pb2_grpc

    fd = os.open(blob, os.O_RDONLY)
    response = content_pb2.ReadContentResponse

    class Content(content_pb2_grpc.ContentServicer):
        async def Read(self, request, context):  # gRPC method name
            yield response(offset=request.offset, data=os.pread(fd, request.size, request.offset))

    class ThreadedContent(content_pb2_grpc.ContentServicer):
        async def Read(self, request, context):
            data = await asyncio.to_thread(os.pread, fd, request.size, request.offset)
            yield response(offset=request.offset, data=data)

    async def main() -> None:
        options = [("grpc.max_receive_message_length", 16 << 20)]
        if kind == "h2-old":
            sys.path.insert(0, old_dir)
            import h2server_old

            server = h2server_old.server(options)
        elif kind.startswith("h2"):
            from snapshotter import h2server

            assert (kind == "h2-lib") == h2server.__file__.startswith(lib_dir or "-"), h2server.__file__
            server = h2server.server(options)
        else:
            server = grpc.aio.server(options=options)
        servicer = ThreadedContent() if kind.endswith("thread") else Content()
        content_pb2_grpc.add_ContentServicer_to_server(servicer, server)
        server.add_insecure_port(f"unix:{sock}")
        await server.start()
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        await server.stop(None)

    if loop_kind == "uvloop":
        import uvloop

        uvloop.install()
    asyncio.run(main())


# ---------------------------------------------------------------------------------------------- client


def client(sock: str, n: int, size: int, warmup: int) -> None:
    import grpc

    from snapshotter.api import content_pb2, content_pb2_grpc

    channel = grpc.insecure_channel(f"unix:{sock}")
    stub = content_pb2_grpc.ContentStub(channel)
    span = 48 << 20

    def run(count: int, base: int) -> int:
        got = 0
        for i in range(count):
            off = (base + i) * size % span
            for r in stub.Read(content_pb2.ReadContentRequest(digest="x", offset=off, size=size)):
                got += len(r.data)
        return got

    run(warmup, 0)
    print("warm", flush=True)
    sys.stdin.readline()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    got = run(n, warmup)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    assert got == n * size, got
    print(json.dumps({"wall": wall, "cpu": cpu}), flush=True)
    channel.close()


# ---------------------------------------------------------------------------------------------- driver


def measure(kind: str, loop_kind: str, blob: str, n: int, size: int, tmp: str, dirs: list[str]) -> dict:
    sock = os.path.join(tmp, f"{kind}-{loop_kind}.sock")
    me = [sys.executable, __file__]
    srv = subprocess.Popen(
        [*me, "--serve", kind, "--sock", sock, "--blob", blob, "--loop", loop_kind]
        + ["--old-dir", dirs[0], "--lib-dir", dirs[1]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert srv.stdout.readline().strip() == "ready"
        cli = subprocess.Popen(
            [*me, "--client", "--sock", sock, "-n", str(n), "--size", str(size)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert cli.stdout.readline().strip() == "warm"
        s0 = proc_cpu(srv.pid)
        cli.stdin.write("go\n")
        cli.stdin.flush()
        result = json.loads(cli.stdout.readline())
        s1 = proc_cpu(srv.pid)
        cli.wait(30)
    finally:
        try:
            srv.stdin.write("stop\n")
            srv.stdin.flush()
            srv.wait(10)
        except Exception:
            srv.kill()
    return {
        "server_us": (s1 - s0) / n * 1e6,
        "client_us": result["cpu"] / n * 1e6,
        "wall_us": result["wall"] / n * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=32768)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--serve")
    ap.add_argument("--client", action="store_true")
    ap.add_argument("--sock")
    ap.add_argument("--blob")
    ap.add_argument("--loop", default="asyncio")
    ap.add_argument("--only", help="comma-separated subset of row names")
    ap.add_argument("--old-rev", default=OLD_REV, help="git revision of the h2-old rows' h2server.py")
    ap.add_argument("--lib-rev", default=LIB_REV, help="git revision of the h2-lib rows' server modules")
    ap.add_argument("--old-dir", help=argparse.SUPPRESS)
    ap.add_argument("--lib-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.sock, args.blob, args.loop, args.old_dir, args.lib_dir)
        return
    if args.client:
        client(args.sock, args.n, args.size, args.warmup)
        return

    try:
        import uvloop  # noqa: F401

        loops = ["asyncio", "uvloop"]
    except ImportError:
        loops = ["asyncio"]
    kinds = ["h2", "h2-old", "h2-lib", "grpc.aio"]
    try:
        import h2  # noqa: F401
    except ImportError:
        kinds.remove("h2-lib")
        print("h2 is not installed: no h2-lib rows", file=sys.stderr)
    rows = [(k, lp) for k in kinds for lp in loops] + [("h2-thread", "asyncio")]
    if args.only:
        wanted = set(args.only.split(","))
        rows = [r for r in rows if f"{r[0]}/{r[1]}" in wanted]
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [old_server_module(args.old_rev, tmp), lib_server_package(args.lib_rev, tmp)]
        blob = os.path.join(tmp, "blob")
        with open(blob, "wb") as f:
            f.write(os.urandom(48 << 20))
        samples: dict[tuple[str, str], list[dict]] = {r: [] for r in rows}
        for rnd in range(args.rounds):
            for row in rows:
                samples[row].append(measure(*row, blob, args.n, args.size, tmp, dirs))
                print(f"round {rnd + 1}: {row[0]}/{row[1]}: {samples[row][-1]}", file=sys.stderr)

    def med(row: tuple[str, str], key: str) -> float:
        return statistics.median(s[key] for s in samples[row])

    print(f"\nPython {sys.version.split()[0]}; h2-old = {args.old_rev}, h2-lib = {args.lib_rev} (from git)")
    print(f"{args.n} sequential Read RPCs of {args.size} B per round, median of {args.rounds} rounds")
    heads = ("server CPU µs/RPC", "client CPU µs/RPC", "wall µs/RPC")
    print(f"{'server':<12} {'loop':<8} {heads[0]:>18} {heads[1]:>18} {heads[2]:>12}")
    for row in rows:
        print(
            f"{row[0]:<12} {row[1]:<8} {med(row, 'server_us'):>18.1f} {med(row, 'client_us'):>18.1f} "
            f"{med(row, 'wall_us'):>12.1f}"
        )
    for lp in loops:
        ours = ("h2", lp)
        if ours not in samples:
            continue
        for other in ("h2-old", "h2-lib", "grpc.aio"):
            if (other, lp) in samples:
                ratio = med(ours, "server_us") / med((other, lp), "server_us")
                print(f"server CPU ratio h2/{other} ({lp}): {ratio:.2f}x")


if __name__ == "__main__":
    main()
