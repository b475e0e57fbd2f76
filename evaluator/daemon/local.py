"""Local executor: stage subprocesses on two lanes, each in its own process group.

The GPU lane runs inference (one slot per GPU unless configured otherwise; the slot's GPU goes in
CUDA_VISIBLE_DEVICES), the CPU lane runs evaluation, so checkpoint N is scored while N+1 generates.
Non-blocking: the daemon loop calls `poll()`; nothing here sleeps except `stop_all`.
A timeout sends SIGTERM to the whole group, then SIGKILL after kill_grace_seconds.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Optional

from evaluator.common.contracts import EVALUATION, INFERENCE

log = logging.getLogger(__name__)


@dataclass
class StageProcess:
    key: tuple
    stage: str
    proc: subprocess.Popen
    started: float
    deadline: float
    gpu: Optional[str] = None
    term_sent_at: Optional[float] = None
    timed_out: bool = False
    returncode: Optional[int] = None
    reason: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ledger_fields(self) -> dict:
        return {"pid": self.pid, "pid_start": process_start_time(self.pid)}


@dataclass
class Lanes:
    inference: int
    evaluation: int
    gpus: list = field(default_factory=list)
    overlap: bool = True  # False: one stage at a time in all (the strictly serial baseline of scripts/bench_pipeline.py)


def detect_gpus() -> list[str]:
    """GPU ids for the inference lane: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


def process_start_time(pid: int) -> Optional[str]:
    """The kernel's start time of a pid (field 22 of /proc/pid/stat), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def kill_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


class LocalExecutor:
    chains = False  # each stage is started by the daemon when its input is ready

    def __init__(self, lanes: Lanes, kill_grace_seconds: float = 5.0):
        self.lanes = lanes
        self.kill_grace = kill_grace_seconds
        self.running: dict[tuple, StageProcess] = {}

    def capacity(self, stage: str) -> int:
        return self.lanes.inference if stage == INFERENCE else self.lanes.evaluation

    def free_slots(self, stage: str) -> int:
        if not self.lanes.overlap:
            return 0 if self.running else 1
        return self.capacity(stage) - sum(1 for p in self.running.values() if p.stage == stage)

    def _free_gpu(self) -> Optional[str]:
        if not self.lanes.gpus:
            return None
        busy = [p.gpu for p in self.running.values() if p.stage == INFERENCE]
        # least-loaded GPU first (several jobs may share a GPU when concurrency > GPUs)
        return min(self.lanes.gpus, key=lambda g: busy.count(g))

    def adopt(self, key: tuple) -> None:
        return None  # nothing is ever pre-submitted locally

    def cancel_chained(self, key: tuple) -> None:
        pass

    def start(self, key: tuple, stage: str, argv: list[str], cwd: str, log_path: str,
              timeout_s: float, env: Optional[dict] = None, chain: Optional[tuple] = None) -> StageProcess:
        env = dict(os.environ if env is None else env)
        gpu = None
        if stage == INFERENCE and self.lanes.gpus:
            gpu = self._free_gpu()
            env["CUDA_VISIBLE_DEVICES"] = gpu
        elif stage == EVALUATION and self.lanes.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU lane must not grab the inference GPU
        os.makedirs(cwd, exist_ok=True)
        with open(log_path, "ab") as logf:
            logf.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
            logf.flush()
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        now = time.monotonic()
        sp = StageProcess(key, stage, proc, now, now + timeout_s, gpu)
        self.running[key] = sp
        return sp

    def poll(self) -> list[StageProcess]:
        """Finished stage processes (removed from `running`); also enforces timeouts."""
        done = []
        now = time.monotonic()
        for key, sp in list(self.running.items()):
            code = sp.proc.poll()
            if code is None:
                if sp.term_sent_at is None and now >= sp.deadline:
                    log.warning("%s %s: timed out, sending SIGTERM to its process group", sp.stage, key)
                    sp.timed_out = True
                    sp.term_sent_at = now
                    kill_group(sp.pid, signal.SIGTERM)
                elif sp.term_sent_at is not None and now - sp.term_sent_at >= self.kill_grace:
                    kill_group(sp.pid, signal.SIGKILL)
                continue
            # the leader is gone; take any straggler of its group with it
            kill_group(sp.pid, signal.SIGKILL)
            sp.returncode = code
            del self.running[key]
            done.append(sp)
        return done

    def stop_all(self) -> list[StageProcess]:
        """SIGTERM every running group, wait up to kill_grace, then SIGKILL. Returns what was stopped."""
        stopped = list(self.running.values())
        for sp in stopped:
            kill_group(sp.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.kill_grace
        while time.monotonic() < deadline and any(sp.proc.poll() is None for sp in stopped):
            time.sleep(0.05)
        for sp in stopped:
            kill_group(sp.pid, signal.SIGKILL)
            sp.returncode = sp.proc.wait()
        self.running.clear()
        return stopped
