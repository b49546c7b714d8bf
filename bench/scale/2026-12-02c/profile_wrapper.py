"""Wrap bench/scale.py (same arguments): for the burst only, CPU and minor faults per process
name, the daemons' counters (summed and per node), and optionally PERF=1 (`perf record -a -g`),
PERF=dwarf (page faults of two daemons, DWARF call graphs), PYSPY=1 (py-spy of three daemons),
KEEPLOGS=DIR (every daemon's log copied out before the site is torn down), IDLE=S (the CPU of
every process over S seconds of the idle site before the burst; scale.py's all-done time then
includes them). Always printed: the bytes the nodes received on their LAN interfaces during the
burst ("LAN bytes", `Site.lan_bytes`), and per node the control messages that failed ("CONTROL
FAILURES", from `/peersync/v1/control/status`). The burst's own time is "burst wall": scale.py's
all-done time also counts what this wrapper reads after the burst. How the 2026-12-02
figures in bench/RESULTS.md ("Where a 32-node burst's CPU goes") were taken; a one-off tool, kept
beside its figures rather than in the product or the testbed.

    python bench/scale/2026-12-02c/profile_wrapper.py --nodes 32 --no-static-peers --settle 3
"""
import os, sys, subprocess, time, collections, json, shutil
from pathlib import Path
REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO)); sys.path.insert(0, str(REPO / "bench"))
import scale
from testbed.cluster import Cluster

from testbed.scenarios import CLK_TCK as HZ


def cpu_by_pid():
    """pid -> (name, user ticks, system ticks, minor faults), every process. One read of
    /proc/PID/stat each (`testbed.scenarios.proc_cpu_split` reads the same file for one pid but
    not the name or the faults). The daemons are named "peersyncd" by their command line."""
    proc = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit(): continue
        try:
            s = open(f"/proc/{pid}/stat").read()
            cmd = open(f"/proc/{pid}/cmdline","rb").read().split(b"\0")
        except OSError: continue
        comm = s[s.index("(")+1:s.rindex(")")]
        f = s[s.rindex(")")+2:].split()
        ut, st, flt = int(f[11]), int(f[12]), int(f[7])
        name = comm
        if b"daemon" in cmd and any(b"peersync" in c for c in cmd): name = "peersyncd"
        proc[pid] = (name, ut, st, flt)
    return proc

orig = Cluster.pull_all
def pull_all(self, ref):
    idle = float(os.environ.get("IDLE", "0"))
    if idle:
        i0 = cpu_by_pid(); t_i = time.monotonic(); time.sleep(idle); i1 = cpu_by_pid(); w_i = time.monotonic() - t_i
        ag = collections.defaultdict(int)
        for pid, (name, ut, st, flt) in i1.items():
            ub, sb, fb = i0[pid][1:] if pid in i0 else (0, 0, 0)
            ag[name] += ut - ub + st - sb
        print(f"IDLE {w_i:.1f}s CPU", sorted(((round(v/HZ,2), k) for k, v in ag.items() if v), reverse=True)[:8])
    b = cpu_by_pid()
    st0 = [cn.stats() for cn in self.nodes]
    ms0 = [cn.control().get("messages", {}) for cn in self.nodes]
    pids = [p for p, v in b.items() if v[0] == "peersyncd"][:2]
    cmdline = ["perf", "record", "-a", "-F", "199", "-g", "-o", "perf.data"] if os.environ.get("PERF") != "dwarf" else ["perf", "record", "-p", ",".join(pids), "-e", "page-faults", "--call-graph", "dwarf,16384", "-o", "perf.data"]
    perf = subprocess.Popen(cmdline, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL) if os.environ.get("PERF") else None
    spies = []
    if os.environ.get("PYSPY"):
        for i, p in enumerate([p for p, v in b.items() if v[0] == "peersyncd"][:3]):
            spies.append(subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--pid", p, "-r", "97", "--nonblocking", "--format", "raw", "-o", f"spy{i}.txt", "-d", "60"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    lan0 = self.site.lan_bytes()
    t = time.monotonic()
    try:
        return orig(self, ref)
    finally:
        wall = time.monotonic() - t
        if perf: perf.send_signal(2); perf.wait()
        for sp in spies: sp.send_signal(2)
        for sp in spies: sp.wait()
        a = cpu_by_pid()
        print("LAN bytes", self.site.lan_bytes() - lan0)
        st1 = [cn.stats() for cn in self.nodes]
        ms1 = [cn.control().get("messages", {}) for cn in self.nodes]
        fails = {i: {k: v - m0.get(k, 0) for k, v in m1.items() if k.endswith("_failed") and isinstance(v, int) and v - m0.get(k, 0)} for i, (m0, m1) in enumerate(zip(ms0, ms1))}
        print("CONTROL FAILURES", json.dumps({i: f for i, f in fails.items() if f}))
        tot = collections.Counter()
        pern = []
        for x, y in zip(st1, st0):
            d = {}
            for k, v in x.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    d[k] = v - y.get(k, 0); tot[k] += d[k]
            pern.append(d)
        logdir = os.environ.get("KEEPLOGS")
        if logdir:
            time.sleep(1.5)
            os.makedirs(logdir, exist_ok=True)
            for i, cn in enumerate(self.nodes):
                shutil.copy(cn.daemon.process.log_path, f"{logdir}/node{i}.log")
        print("STATS", json.dumps({k: v for k, v in tot.items() if v}))
        print("PERNODE", json.dumps([{k: v for k, v in d.items() if v and ("origin" in k or "lease" in k)} for d in pern]))
        agg = collections.defaultdict(lambda: [0, 0])
        flts = collections.Counter()
        for pid, (name, ut, st, flt) in a.items():
            # by pid, not by name: a kernel worker renames itself with its work, and a new name
            # must not count its whole lifetime (the 2026-12-02 runs' "CPU total" did)
            ub, sb, fb = b[pid][1:] if pid in b else (0, 0, 0)
            agg[name][0] += ut - ub; agg[name][1] += st - sb; flts[name] += flt - fb
        print("minor faults:", flts.most_common(4))
        rows = sorted(agg.items(), key=lambda kv: -(kv[1][0] + kv[1][1]))
        tot = sum(u + s for _, (u, s) in rows)
        print(f"burst wall {wall:.2f}s; CPU total {tot/HZ:.1f}s (user+sys)")
        for name, (u, s) in rows[:15]:
            print(f"  {name:20s} user {u/HZ:6.1f}  sys {s/HZ:6.1f}")
Cluster.pull_all = pull_all
sys.exit(scale.main(sys.argv[1:]))
