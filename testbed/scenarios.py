"""Scenarios: how the nodes of a site ask for the image, and what is measured while they do.

- burst: every node pulls at t=0.
- staggered: node i starts at i * stagger seconds.
- varying: burst, while the uplink rate follows a schedule (by default 100% -> 30% at 5 s -> 100% at
  20 s of the configured rate), applied with `site.set_uplink()` from a timer thread.
- node-death: burst; once the uplink has carried `kill_fraction` of the image (or after
  `kill_after` seconds), the last node's agents are SIGKILLed; the others are measured.

Per node: seconds from its own start until its pull returned (image fetched and unpacked), and the
time since t=0 when `ctr run` of the check command succeeded on it. Per run: uplink bytes both ways,
peak uplink Mbit/s (0.5 s windows of the site sampler), LAN bytes, CPU seconds and peak RSS of the
system's processes (/proc/PID/stat and VmHWM), plus the CPU of the short-lived clients (ctr, tar),
from this process's RUSAGE_CHILDREN.
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .netns import Site
from .systems import System

SCENARIOS = ("burst", "staggered", "varying", "node-death")
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class ScenarioOptions:
    stagger_s: float = 2.0
    vary: list[tuple[float, float]] = field(default_factory=lambda: [(5.0, 0.3), (20.0, 1.0)])
    kill_fraction: float = 0.4
    kill_after_s: float = 30.0
    timeout_s: float = 420.0


def proc_cpu_split(pid: int) -> tuple[float, float] | None:
    """(user, kernel) CPU seconds of a process so far, None once it is gone.

    Kept apart because the two tell different stories on this testbed: the daemons' user time is
    the product's own work, their kernel time is mostly the filesystem's (creating an unpacked
    layer's files), which depends on the machine's disk and on what else deletes files on it
    (bench/RESULTS.md, the Go client against CRI)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def proc_peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100), None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class NodeRecord:
    node: str
    start_s: float | None = None  # since t0
    pull_s: float | None = None  # duration of its own pull
    done_at_s: float | None = None  # since t0
    runnable_at_s: float | None = None  # since t0, after `ctr run` succeeded
    killed: bool = False
    error: str | None = None


class ProcessMeter:
    """CPU seconds per process between start() and the final read (or its death), and peak RSS."""

    def __init__(self, procs: list[tuple[str, int, int]]) -> None:
        self.procs = procs
        self.start_cpu: dict[int, tuple[float, float]] = {}  # (user, kernel)
        self.end_cpu: dict[int, tuple[float, float]] = {}
        self.rss: dict[int, float] = {}
        self.reaped_lifetime = 0.0

    def start(self) -> None:
        self.children0 = children_cpu_seconds()
        for _, _, pid in self.procs:
            self.start_cpu[pid] = proc_cpu_split(pid) or (0.0, 0.0)

    def read(self, pids: set[int] | None = None) -> None:
        for _, _, pid in self.procs:
            if pids is not None and pid not in pids:
                continue
            cpu, rss = proc_cpu_split(pid), proc_peak_rss_mb(pid)
            if cpu is not None:
                self.end_cpu[pid] = cpu
            if rss is not None:
                self.rss[pid] = rss

    def result(self, clients: bool = True) -> dict[str, Any]:
        procs = self.procs
        cpu: dict[str, float] = {}
        kernel: dict[str, float] = {}
        rss: dict[str, float] = {}
        for role, _, pid in procs:
            (user0, sys0), (user1, sys1) = (
                self.start_cpu.get(pid, (0.0, 0.0)), self.end_cpu.get(pid, (0.0, 0.0))
            )
            cpu[role] = cpu.get(role, 0.0) + max(0.0, user1 - user0) + max(0.0, sys1 - sys0)
            kernel[role] = kernel.get(role, 0.0) + max(0.0, sys1 - sys0)
            if pid in self.rss:
                rss[role] = max(rss.get(role, 0.0), self.rss[pid])
        if clients:
            used = children_cpu_seconds() - self.children0 - self.reaped_lifetime
            cpu["clients"] = max(0.0, used)
        return {
            "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
            "cpu_total_s": round(sum(cpu.values()), 2),
            "cpu_kernel_s": {k: round(v, 2) for k, v in kernel.items()},  # part of cpu_s, per role
            "peak_rss_mb": {k: round(v, 1) for k, v in rss.items()},
        }


def run_scenario(
    site: Site, system: System, scenario: str, image_bytes: int, opts: ScenarioOptions
) -> dict[str, Any]:
    """Drive `scenario` on a set-up `system`; return the run's measurements (JSON-able)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r} (known: {', '.join(SCENARIOS)})")
    n = len(site.nodes)
    offsets = [i * opts.stagger_s if scenario == "staggered" else 0.0 for i in range(n)]
    victim = n - 1 if scenario == "node-death" else None
    records = [NodeRecord(node.name) for node in site.nodes]
    events: list[tuple[float, str]] = []
    stop = threading.Event()
    meter = ProcessMeter(system.processes())
    wan = [(role, -1, pid) for role, pid in system.wan_processes()]
    wan_meter = ProcessMeter(wan)
    base_mbit = site.uplink_mbit

    up0, upu0, lan0, lanr0 = (
        site.uplink_bytes(),
        site.uplink_bytes_up(),
        site.lan_bytes(),
        site.lan_bytes_from_router(),
    )
    meter.start()
    wan_meter.start()
    t0 = time.monotonic()
    deadline = t0 + opts.timeout_s

    def node_job(i: int) -> None:
        rec = records[i]
        if stop.wait(max(0.0, t0 + offsets[i] - time.monotonic())):
            return
        started = time.monotonic()
        rec.start_s = started - t0
        try:
            system.pull(i, timeout=max(1.0, deadline - started))
            now = time.monotonic()
            rec.pull_s, rec.done_at_s = now - started, now - t0
            system.run_check(i, timeout=max(1.0, min(120.0, deadline - now)))
            rec.runnable_at_s = time.monotonic() - t0
        except Exception as exc:  # recorded per node
            rec.error = f"{type(exc).__name__}: {str(exc)[:800]}"

    def vary_job() -> None:
        for at, fraction in opts.vary:
            if stop.wait(max(0.0, t0 + at - time.monotonic())):
                return
            mbit = base_mbit * fraction
            site.set_uplink(mbit)
            events.append((round(time.monotonic() - t0, 2), f"uplink {mbit:g} Mbit/s"))

    def kill_job() -> None:
        assert victim is not None
        kill_at = t0 + opts.kill_after_s
        while not stop.is_set():
            moved = site.uplink_bytes() - up0
            if records[victim].done_at_s is not None:
                events.append((round(time.monotonic() - t0, 2), f"n{victim} finished before the kill"))
                return
            if moved >= opts.kill_fraction * image_bytes or time.monotonic() >= kill_at:
                break
            time.sleep(0.02)
        if stop.is_set():
            return
        pids = {pid for _, node, pid in meter.procs if node == victim}
        meter.read(pids)  # their CPU up to the kill
        before = children_cpu_seconds()
        system.kill_node(victim)
        # a killed child we waited for (the peersync daemon) now counts in RUSAGE_CHILDREN: take it out
        meter.reaped_lifetime += max(0.0, children_cpu_seconds() - before)
        records[victim].killed = True
        moved = site.uplink_bytes() - up0
        events.append(
            (
                round(time.monotonic() - t0, 2),
                f"killed n{victim} (uplink at {moved / image_bytes:.2f}x image)",
            )
        )

    threads = [threading.Thread(target=node_job, args=(i,), daemon=True) for i in range(n)]
    if scenario == "varying":
        threads.append(threading.Thread(target=vary_job, daemon=True))
    if victim is not None:
        threads.append(threading.Thread(target=kill_job, daemon=True))
    for t in threads:
        t.start()
    for t in threads[:n]:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    timed_out = any(t.is_alive() for t in threads[:n])
    stop.set()
    for t in threads[n:]:
        t.join(timeout=10)
    t_end = time.monotonic()
    if timed_out:
        for rec in records:
            if rec.done_at_s is None and rec.error is None:
                rec.error = f"not done after the scenario timeout ({opts.timeout_s:.0f}s)"

    alive = meter.procs if victim is None else [p for p in meter.procs if p[1] != victim]
    meter.read({pid for _, _, pid in alive})
    wan_meter.read()
    extra = [p for p in system.processes() if p not in meter.procs]  # started during the run (aria2c)
    meter.procs += extra
    for _, _, pid in extra:
        meter.start_cpu.setdefault(pid, (0.0, 0.0))
    meter.read({pid for _, i, pid in extra if i != victim})
    survivors = [r for r in records if not r.killed]
    durations = [r.pull_s for r in survivors if r.pull_s is not None]
    done_at = [r.done_at_s for r in survivors if r.done_at_s is not None]
    runnable_at = [r.runnable_at_s for r in survivors if r.runnable_at_s is not None]
    all_ok = len(runnable_at) == len(survivors)
    stats = {}
    for i, rec in enumerate(records):
        if not rec.killed:
            with contextlib.suppress(Exception):
                stats[rec.node] = system.node_stats(i)
    series = _rate_series(site.sampler.samples(since=t0 - 0.5), t0, 0.5)
    result: dict[str, Any] = {
        "nodes": [r.__dict__ for r in records],
        "victim": None if victim is None else f"n{victim}",
        "completed": len(durations),
        "survivors": len(survivors),
        "all_completed": all_ok,
        "p50_s": _r(percentile(durations, 50)),
        "p95_s": _r(percentile(durations, 95)),
        "max_s": _r(max(durations) if durations else None),
        "all_done_s": _r(max(done_at, default=None) if all_ok else None),
        "all_runnable_s": _r(max(runnable_at, default=None) if all_ok else None),
        "elapsed_s": round(t_end - t0, 2),
        "uplink_bytes": site.uplink_bytes() - up0,
        "uplink_up_bytes": site.uplink_bytes_up() - upu0,
        "peak_uplink_mbit": round(site.sampler.peak_mbit(since=t0), 1),
        "lan_bytes": site.lan_bytes() - lan0,
        "lan_p2p_bytes": (site.lan_bytes() - lan0) - (site.lan_bytes_from_router() - lanr0),
        "events": events,
        "uplink_series": series,
        "node_stats": stats,
    }
    result |= meter.result()
    result["agent_rss_mb"] = result["peak_rss_mb"].get(system.agent_role())
    result["wan"] = wan_meter.result(clients=False)
    return result


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


def _rate_series(samples: list[Any], t0: float, step: float) -> list[tuple[float, float]]:
    """WAN->LAN Mbit/s per `step`-second bucket from the sampler's cumulative counters.

    Rates come from byte differences over whole buckets, so a starved sampler thread (samples
    bunched together on a busy 2-core machine) cannot produce spikes.
    """
    out: list[tuple[float, float]] = []
    if not samples:
        return out
    start = samples[0]
    for s in samples[1:]:
        if s.t - start.t >= step:
            rate = (s.down_bytes - start.down_bytes) * 8 / (s.t - start.t) / 1e6
            out.append((round(s.t - t0, 2), round(rate, 1)))
            start = s
    return out
