"""A warm stage worker: stage jobs one after another in one process, so imports, a loaded model (inference) and
metric models (evaluation) are paid once, not once per (checkpoint x benchmark).

    python -m evaluator.stages.worker --parent <daemon pid>     (started by the daemon's local executor, in the
                                                                 stage's venv)

Protocol, JSON lines. stdin: one request per job, {"module", "job", "log", "cwd", "token"}; `module` is a key of
contracts.WARM_STAGE_MODULES. stdout: one answer per job, {"job", "rc"}, rc being exactly what
`python -m <module> --job <job>` would have exited with. During a job, fds 1 and 2 are that job's log file and
the job's token is in the environment (for anything the stage starts), so a job reads and writes the same files
as a stage process would: the job spec files stay the interface.

The worker exits on EOF, after any job that did not end with 0 (a fresh process for whatever comes next: no state
from a failure can leak), and when the daemon dies (PR_SET_PDEATHSIG). A timeout is the executor killing the
worker's process group, as for a stage process. Standard library only until a job imports its stage.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import signal
import sys
import time
import traceback
from typing import Optional

from evaluator.common.contracts import TOKEN_ENV, WARM_STAGE_MODULES
from evaluator.common.procs import exited
from evaluator.stages import common

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: Optional[int]) -> None:
    """SIGKILL this worker when the daemon that started it dies (a kill -9 leaves no worker behind). `parent`: the
    daemon's pid. A daemon that died before prctl took effect left this worker adopted (by pid 1, or by a subreaper:
    systemd --user, a supervisor): it exits at once. Another parent alone is not enough: the venv's python may be a
    wrapper that runs the real one as its child, while the daemon lives."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the daemon's recovery finds leftovers by WORKER_ENV
        pass
    if parent is None:
        orphaned = os.getppid() == 1
    else:
        orphaned = os.getppid() != parent and exited(parent)
    if orphaned:
        os._exit(1)


def run_one(request: dict) -> int:
    """One job, as `python -m <module> --job <job>` would run it; returns its exit code."""
    stage_module = importlib.import_module(WARM_STAGE_MODULES[request["module"]])
    try:
        rc = stage_module.main(["--job", request["job"]])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:  # the stage's own bug: its traceback in its log, exit 1 as a process would
        traceback.print_exc()
        rc = 1
    return int(rc or 0)


def serve(requests, answer_fd: int) -> int:
    common.WARM = True
    saved_out, saved_err = os.dup(1), os.dup(2)
    jobs = 0
    for line in requests:
        if not line.strip():
            continue
        request = json.loads(line)
        rc = 1
        with open(request["log"], "ab", buffering=0) as log:
            log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} warm worker pid {os.getpid()} job {jobs + 1}: "
                      f"-m {request['module']} --job {request['job']}\n".encode())
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            os.environ[TOKEN_ENV] = request["token"]
            try:
                os.chdir(request["cwd"])
                rc = run_one(request)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved_out, 1)
                os.dup2(saved_err, 2)
        jobs += 1
        os.write(answer_fd, (json.dumps({"job": request["job"], "rc": rc}) + "\n").encode())
        if rc != 0:
            return 0  # a failed job ends the worker: the next job gets a fresh process
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parent", type=int, default=None, help="the pid of the daemon that starts this worker")
    die_with_parent(parser.parse_args(argv).parent)
    answer_fd = os.dup(1)  # the daemon reads answers here; fd 1 itself becomes each job's log
    os.dup2(2, 1)  # between jobs, stray prints go to the worker's own stderr, never into the answer pipe
    try:
        return serve(sys.stdin, answer_fd)
    finally:
        common.close_warm()  # e.g. stop a served checkpoint's server, and wait for it


if __name__ == "__main__":
    sys.exit(main())
