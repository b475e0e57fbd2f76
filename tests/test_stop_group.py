"""stop_group waits for a stage's leader only while it still runs: an exited leader not yet reaped (a zombie: the
daemon's own child before wait(), or a leftover adopted by a pid 1 that does not reap, as on these machines) no
longer delays the SIGKILL of its group or the daemon's recovery by the whole kill grace."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from evaluator.common.procs import process_start_time, still_runs
from evaluator.daemon.local import stop_group


def test_a_live_process_still_runs_an_exited_unreaped_one_and_a_gone_one_do_not():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = process_start_time(proc.pid)
        assert start is not None and still_runs(proc.pid, start)
        assert not still_runs(proc.pid, "0")  # another process under a reused pid
        proc.kill()
        for _ in range(200):  # exited, and not reaped: a zombie until wait()
            with open(f"/proc/{proc.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.01)
        assert process_start_time(proc.pid) == start  # what the wait used to compare: unchanged for a zombie
        assert not still_runs(proc.pid, start)
    finally:
        proc.kill()
        proc.wait()
    assert not still_runs(proc.pid, start)


def test_stop_group_does_not_wait_out_the_grace_for_a_leader_that_exited_on_sigterm():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        time.sleep(0.2)
        t0 = time.monotonic()
        stop_group(proc.pid, grace=30)  # the leader dies on SIGTERM and stays a zombie until wait() below
        waited = time.monotonic() - t0
        assert proc.wait(timeout=5) == -signal.SIGTERM
        assert waited < 25, waited  # not the 30 s grace (a behaviour bound, far from any machine's noise)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
