"""Slurm executor: each stage is one sbatch job; the evaluation job is submitted together with the
inference job, with --dependency=afterok, so a checkpoint's pipeline proceeds without the daemon.

The daemon talks to it as to the local executor (free_slots / start / poll / stop_all); the
differences: stopping the daemon leaves jobs running (they are re-attached by id on the next start),
and states come from sacct (or `scontrol show job` where no accounting database answers), polled
with backoff. A job's batch script is kept next to its log in the results tree.
"""
from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from typing import Optional

from evaluator.common.atomic import write_text_atomic
from evaluator.common.contracts import EVALUATION, INFERENCE
from evaluator.common.errors import EvaluatorError

log = logging.getLogger("evaluator")

FINISHED_OK = {"COMPLETED"}
FINISHED_BAD = {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "CANCELLED", "BOOT_FAIL",
                "DEADLINE", "REVOKED"}
SCRIPT_FILE = {INFERENCE: "infer.sbatch", EVALUATION: "eval.sbatch"}
POLL_MIN, POLL_MAX = 1.0, 30.0


@dataclass
class SlurmJob:
    key: tuple
    stage: str
    job_id: str
    started: float
    returncode: Optional[int] = None
    timed_out: bool = False
    reason: str = ""
    gpu: Optional[str] = None

    @property
    def pid(self) -> int:  # the ledger's pid column is for local processes
        return 0

    def ledger_fields(self) -> dict:
        return {"infer_job" if self.stage == INFERENCE else "eval_job": self.job_id}


def _run(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise EvaluatorError(f"executor.type slurm: `{argv[0]}` not found; is this a Slurm submit host?") from None
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, 124, "", f"{argv[0]} timed out")


def _minutes(m: float) -> str:
    total = max(1, int(round(m)))
    return f"{total // 60}:{total % 60:02d}:00"


class SlurmExecutor:
    chains = True  # the evaluation job is submitted with its inference job

    def __init__(self, ex, timeouts: dict[str, float]):
        self.ex = ex  # ExecutorConfig
        self.timeouts = timeouts  # stage -> seconds
        self.running: dict[tuple, SlurmJob] = {}
        self.chained: dict[tuple, SlurmJob] = {}  # submitted evaluation jobs waiting on their inference
        self.next_poll = 0.0
        self.interval = POLL_MIN

    # ---- slots: max_in_flight counts pipelines (a checkpoint x benchmark with a job not finished)
    def _in_flight(self) -> int:
        return len(set(self.running) | set(self.chained))

    def free_slots(self, stage: str) -> int:
        if stage == EVALUATION:
            return self.ex.max_in_flight  # chained ones are adopted; a lone re-score is one pipeline
        return self.ex.max_in_flight - self._in_flight()

    # ---- submission ----------------------------------------------------------------------
    def _script(self, key: tuple, stage: str, argv: list[str], cwd: str, log_path: str) -> str:
        run, iteration, bench = key
        ex = self.ex
        lines = ["#!/bin/bash",
                 f"#SBATCH --job-name={shlex.quote(f'eval-{run}-{iteration}-{bench}-{stage[:5]}')}",
                 f"#SBATCH --output={log_path}", f"#SBATCH --error={log_path}", "#SBATCH --open-mode=append",
                 f"#SBATCH --chdir={cwd}", f"#SBATCH --time={ex.time or _minutes(self.timeouts[stage] / 60)}"]
        for flag, value in (("partition", ex.partition), ("account", ex.account), ("qos", ex.qos),
                            ("cpus-per-task", ex.cpus_per_task), ("mem", ex.mem)):
            if value:
                lines.append(f"#SBATCH --{flag}={value}")
        if stage == INFERENCE:
            if ex.gres:
                lines.append(f"#SBATCH --gres={ex.gres}")
            elif ex.gpus_per_job:
                lines.append(f"#SBATCH --gpus={ex.gpus_per_job}")
        lines += [f"#SBATCH {a}" for a in ex.extra_sbatch_args]
        lines += ["set -e", *ex.env_setup, "set +e", f"exec {' '.join(shlex.quote(a) for a in argv)}", ""]
        path = os.path.join(cwd, SCRIPT_FILE[stage])
        write_text_atomic(path, "\n".join(lines))
        return path

    def _sbatch(self, script: str, after: Optional[str] = None) -> str:
        argv = ["sbatch", "--parsable"]
        if after:
            argv += [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"]
        proc = _run(argv + [script])
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout.strip().split(";")[0]

    def start(self, key: tuple, stage: str, argv: list[str], cwd: str, log_path: str, timeout_s: float,
              env: Optional[dict] = None, chain: Optional[tuple] = None) -> SlurmJob:
        job = SlurmJob(key, stage, self._sbatch(self._script(key, stage, argv, cwd, log_path)), time.monotonic())
        self.running[key] = job
        if chain is not None:  # (argv, cwd, log_path) of the evaluation stage
            e_argv, e_cwd, e_log = chain
            eval_id = self._sbatch(self._script(key, EVALUATION, e_argv, e_cwd, e_log), after=job.job_id)
            self.chained[key] = SlurmJob(key, EVALUATION, eval_id, time.monotonic())
        self.next_poll = 0.0
        self.interval = POLL_MIN
        return job

    def chained_id(self, key: tuple) -> Optional[str]:
        job = self.chained.get(key)
        return job.job_id if job else None

    def adopt(self, key: tuple) -> Optional[SlurmJob]:
        """Track the already-submitted evaluation job of `key` as running."""
        job = self.chained.pop(key, None)
        if job is not None:
            job.started = time.monotonic()
            self.running[key] = job
        return job

    def attach(self, key: tuple, stage: str, job_id: str, chained: bool = False) -> None:
        """Re-attach to a job submitted by a previous daemon."""
        job = SlurmJob(key, stage, job_id, time.monotonic())
        (self.chained if chained else self.running)[key] = job
        self.next_poll = 0.0

    def cancel_chained(self, key: tuple) -> None:
        job = self.chained.pop(key, None)
        if job is not None:
            _run(["scancel", job.job_id])

    # ---- state tracking -------------------------------------------------------------------
    def poll(self) -> list[SlurmJob]:
        now = time.monotonic()
        if not self.running or now < self.next_poll:
            return []
        states = query_states([j.job_id for j in self.running.values()])
        done = []
        for key, job in list(self.running.items()):
            state, exit_code, reason = states.get(job.job_id, ("UNKNOWN", None, ""))
            if state in FINISHED_OK:
                job.returncode = 0
            elif state in FINISHED_BAD:
                job.timed_out = state == "TIMEOUT"
                job.returncode = exit_code if exit_code not in (None, 0) else 1
                job.reason = f"Slurm job {job.job_id} {state}" + (f" ({reason})" if reason and reason != "None" else "")
            elif state == "GONE":
                job.returncode = 1
                job.reason = f"Slurm job {job.job_id} is unknown to Slurm (purged before it was seen finishing)"
            else:
                continue
            del self.running[key]
            done.append(job)
            if job.returncode != 0 and job.stage == INFERENCE:
                self.cancel_chained(key)  # its dependency can never be satisfied
        # back off while nothing changes; look again soon after a change
        self.interval = POLL_MIN if done else min(POLL_MAX, self.interval * 1.5)
        self.next_poll = now + min(self.interval, self.ex.slurm_poll_max_seconds)
        return done

    def stop_all(self) -> list:
        """Jobs are independent of the daemon: leave them running, re-attach on the next start."""
        n = len(set(self.running) | set(self.chained))
        if n:
            log.info("%d Slurm pipeline(s) left running; the next start re-attaches to them by job id", n)
        return []


_STATE = re.compile(r"JobState=(\S+)")
_EXIT = re.compile(r"ExitCode=(\d+):(\d+)")
_REASON = re.compile(r"Reason=(\S+)")


def _parse_exit(text: str) -> Optional[int]:
    m = re.match(r"(\d+):(\d+)", text or "")
    if not m:
        return None
    code, sig = int(m.group(1)), int(m.group(2))
    return code if code else (128 + sig if sig else 0)


def query_states(job_ids: list[str]) -> dict[str, tuple[str, Optional[int], str]]:
    """job id -> (state, exit code, reason): sacct first, `scontrol show job` for what it lacks."""
    out: dict[str, tuple[str, Optional[int], str]] = {}
    proc = _run(["sacct", "-n", "-X", "-P", "-j", ",".join(job_ids), "-o", "JobID,State,ExitCode,Reason"])
    if proc.returncode == 0:
        for line in proc.stdout.splitlines():
            parts = line.split("|")
            if len(parts) >= 3 and parts[0] in job_ids:
                state = parts[1].split()[0] if parts[1] else "UNKNOWN"  # "CANCELLED by 0" -> CANCELLED
                out[parts[0]] = (state, _parse_exit(parts[2]), parts[3] if len(parts) > 3 else "")
    for job_id in job_ids:
        if job_id in out and out[job_id][0] not in ("PENDING", "RUNNING", "REQUEUED", "RESIZING", "SUSPENDED"):
            continue
        proc = _run(["scontrol", "show", "job", job_id])
        if proc.returncode != 0:
            if job_id not in out and "Invalid job id" in (proc.stderr + proc.stdout):
                out[job_id] = ("GONE", None, "")
            continue
        state = _STATE.search(proc.stdout)
        exit_m = _EXIT.search(proc.stdout)
        reason = _REASON.search(proc.stdout)
        code = None
        if exit_m:
            code = int(exit_m.group(1)) or (128 + int(exit_m.group(2)) if int(exit_m.group(2)) else 0)
        if state:
            out[job_id] = (state.group(1), code, reason.group(1) if reason else "")
    return out


def cancel(job_ids: list[str]) -> None:
    if job_ids:
        _run(["scancel", *job_ids])
