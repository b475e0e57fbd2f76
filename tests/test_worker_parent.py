"""A warm worker exits at once when the daemon that started it is already dead (it died before the worker's
PR_SET_PDEATHSIG took effect), but not merely because its parent is another process: a venv's python may be a
wrapper script that runs the real interpreter as its child (module systems, container launchers), and a worker
that exited there would fail every warm job while the daemon lives. The worker reads its requests on stdin; with
stdin at EOF a healthy worker exits 0 having run nothing."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT

WORKER = [sys.executable, "-m", "evaluator.stages.worker"]


def run_worker(parent: int, wrapper: bool = False) -> int:
    cmd = WORKER + ["--parent", str(parent)]
    if wrapper:  # the interpreter runs as the child of a shell that does not exec it
        cmd = ["sh", "-c", '"$@"; exit $?', "sh", *cmd]
    return subprocess.run(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, timeout=60).returncode


def test_a_worker_started_by_its_live_daemon_runs():
    assert run_worker(os.getpid()) == 0


def test_a_worker_behind_a_python_wrapper_runs_while_its_daemon_lives():
    assert run_worker(os.getpid(), wrapper=True) == 0


def test_a_worker_whose_daemon_is_gone_exits_at_once():
    gone = subprocess.Popen(["true"])
    gone.wait()  # exited and reaped: its pid names no process (reuse within this test is not a concern)
    assert run_worker(gone.pid) == 1


def test_a_worker_whose_daemon_exited_but_is_not_yet_reaped_exits_at_once():
    zombie = subprocess.Popen(["true"])
    try:
        while True:  # a zombie until wait(): what a killed daemon is until its parent reaps it
            with open(f"/proc/{zombie.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        assert run_worker(zombie.pid) == 1
    finally:
        zombie.wait()
