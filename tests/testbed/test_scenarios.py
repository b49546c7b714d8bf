"""testbed.scenarios.ProcessMeter: CPU per role, with its kernel part kept apart.

The kernel part is what told the Go client's extra daemon CPU on the Debian image apart from the
product's own work (bench/RESULTS.md): these tests pin that it is measured, from /proc, as a part
of the total and not beside it."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from testbed.scenarios import ProcessMeter, proc_cpu_split

# A child that, once told to, burns CPU in both modes until /proc shows a new tick of each: user
# time in a loop, kernel time creating and removing files.
_BURN = """
import os, sys, tempfile
sys.stdin.readline()
def split():
    f = open(f"/proc/{os.getpid()}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]), int(f[12])
u0, s0 = split()
d = tempfile.mkdtemp()
n = 0
while True:
    u, s = split()
    if u > u0 and s > s0:
        break
    x = sum(i * i for i in range(20000))
    for i in range(50):
        p = os.path.join(d, str(n)); n += 1
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o600)); os.unlink(p)
os.rmdir(d)
sys.stdout.write("done\\n"); sys.stdout.flush()
sys.stdin.read()
"""


def test_proc_cpu_split_of_a_gone_process_is_none() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert proc_cpu_split(child.pid) is None


def test_meter_reports_kernel_time_as_part_of_each_roles_cpu() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _BURN], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=tempfile.gettempdir(),
    )  # fmt: skip
    try:
        meter = ProcessMeter([("worker", 0, child.pid), ("self", 1, os.getpid())])
        meter.start()
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout is not None and child.stdout.readline() == "done\n"
        meter.read()
        result = meter.result(clients=False)
    finally:
        child.kill()
        child.wait()
    total, kernel = result["cpu_s"], result["cpu_kernel_s"]
    assert set(total) == set(kernel) == {"worker", "self"}
    assert kernel["worker"] > 0  # the child burned a kernel tick after start()
    assert total["worker"] > kernel["worker"]  # and a user tick: the total holds both
    assert result["cpu_total_s"] >= sum(kernel.values())
