"""Local executor: stage subprocesses on two lanes, each in its own process group.

The GPU lane runs inference (one slot per GPU unless configured otherwise; the slot's GPU goes in
CUDA_VISIBLE_DEVICES), the CPU lane runs evaluation, so checkpoint N is scored while N+1 generates.
Non-blocking: the daemon loop calls `poll()`; nothing here sleeps except `stop_all`.
A timeout sends SIGTERM to the whole group, then SIGKILL after kill_grace_seconds. Every stage carries
its intent token in its environment, so a daemon restarted after a kill -9 finds (and stops) it.
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
from evaluator.daemon.executors import TOKEN_ENV, Exit, Intent, Launch, Started, SubmitError

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
    token: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid


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


def processes_with_token(tokens: set[str]) -> dict[str, list[int]]:
    """token -> pids whose environment carries `CKPT_EVAL_TOKEN=<token>:<stage>` (one pass over /proc)."""
    found: dict[str, list[int]] = {}
    if not tokens:
        return found
    needle = (TOKEN_ENV + "=").encode()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read()
        except OSError:  # gone, or another user's process
            continue
        for var in env.split(b"\0"):
            if var.startswith(needle):
                token = var[len(needle):].decode("utf-8", "replace")
                if token in tokens:
                    found.setdefault(token, []).append(int(name))
                break
    return found


class LocalExecutor:
    """Stage processes on this machine: the GPU lane (inference) and the CPU lane (evaluation)."""

    def __init__(self, lanes: Lanes, kill_grace_seconds: float = 5.0):
        self.lanes = lanes
        self.kill_grace = kill_grace_seconds
        self.procs: dict[tuple, StageProcess] = {}

    @classmethod
    def from_config(cls, ex) -> "LocalExecutor":
        gpus = ex.gpus if ex.gpus is not None else detect_gpus()
        lanes = Lanes(ex.inference_concurrency or max(1, len(gpus)), ex.evaluation_concurrency, gpus,
                      overlap=ex.overlap_lanes)
        return cls(lanes, ex.kill_grace_seconds)

    def describe(self) -> str:
        lanes = self.lanes
        return f"lanes inference={lanes.inference} evaluation={lanes.evaluation} gpus={lanes.gpus or 'none'}"

    def capacity(self, stage: str) -> int:
        return self.lanes.inference if stage == INFERENCE else self.lanes.evaluation

    def free_slots(self, stage: str) -> int:
        if not self.lanes.overlap:
            return 0 if self.procs else 1
        return self.capacity(stage) - sum(1 for p in self.procs.values() if p.stage == stage)

    def busy(self) -> bool:
        return bool(self.procs)

    def running(self) -> list[tuple]:
        return [(sp.key, sp.stage) for sp in self.procs.values()]

    def _free_gpu(self) -> Optional[str]:
        if not self.lanes.gpus:
            return None
        busy = [p.gpu for p in self.procs.values() if p.stage == INFERENCE]
        # least-loaded GPU first (several jobs may share a GPU when concurrency > GPUs)
        return min(self.lanes.gpus, key=lambda g: busy.count(g))

    def submit(self, launch: Launch) -> Started:
        """Start the stage in its own session; `launch.then` is ignored (the daemon starts evaluation
        when inference is done, on the CPU lane)."""
        env = dict(os.environ)
        env[TOKEN_ENV] = f"{launch.token}:{launch.stage}"
        gpu = None
        if launch.stage == INFERENCE and self.lanes.gpus:
            gpu = self._free_gpu()
            env["CUDA_VISIBLE_DEVICES"] = gpu
        elif launch.stage == EVALUATION and self.lanes.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU lane must not grab the inference GPU
        try:
            os.makedirs(launch.cwd, exist_ok=True)
            with open(launch.log_path, "ab") as logf:
                logf.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(launch.argv)}\n".encode())
                logf.flush()
                proc = subprocess.Popen(list(launch.argv), cwd=launch.cwd, env=env, stdin=subprocess.DEVNULL,
                                        stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:  # ENOSPC, EMFILE, a venv that went away: this job fails, not the daemon
            raise SubmitError(f"{type(e).__name__}: {e}") from None
        now = time.monotonic()
        sp = StageProcess(launch.key, launch.stage, proc, now, now + launch.timeout_s, gpu, token=launch.token)
        self.procs[launch.key] = sp
        where = f"pid {proc.pid}" + (f", GPU {gpu}" if gpu else "")
        return Started(launch.key, launch.stage, str(proc.pid), where, pid_start=process_start_time(proc.pid))

    def poll(self) -> list[Exit]:
        """Finished stage processes (forgotten here once reported); also enforces timeouts."""
        done = []
        now = time.monotonic()
        for key, sp in list(self.procs.items()):
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
            del self.procs[key]
            done.append(Exit(key, sp.stage, sp.token, code, now - sp.started, timed_out=sp.timed_out))
        return done

    def recover(self, intents: list[Intent]) -> dict[tuple, Started]:
        """Kill what a previous daemon left running under these tokens: a restarted daemon cannot
        collect a child it did not start, so the stage's outputs are checked and it runs again if needed."""
        if not intents:
            return {}
        found = processes_with_token({f"{i.token}:{i.stage}" for i in intents if i.token})
        for intent in intents:
            # by token; and by the recorded pid + start time (rows written before tokens existed)
            pids = set(found.get(f"{intent.token}:{intent.stage}", [])) if intent.token else set()
            if intent.handle and intent.handle.isdigit() and intent.pid_start and \
                    process_start_time(int(intent.handle)) == intent.pid_start:
                pids.add(int(intent.handle))
            for pid in sorted(pids):
                log.warning("%s %s: stage pid %d of the previous daemon still runs: killing its group",
                            intent.stage, intent.key, pid)
                stop_group(pid, self.kill_grace)
        return {}

    def stop(self) -> list[tuple]:
        """SIGTERM every running group, wait up to kill_grace, then SIGKILL. Returns what was stopped."""
        stopped = list(self.procs.values())
        for sp in stopped:
            kill_group(sp.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.kill_grace
        while time.monotonic() < deadline and any(sp.proc.poll() is None for sp in stopped):
            time.sleep(0.05)
        for sp in stopped:
            kill_group(sp.pid, signal.SIGKILL)
            sp.proc.wait()
        self.procs.clear()
        return [(sp.key, sp.stage) for sp in stopped]

    def cancel(self, key: tuple) -> None:
        sp = self.procs.pop(tuple(key), None)
        if sp is not None:
            stop_group(sp.pid, self.kill_grace)
            sp.proc.wait()


def stop_group(pid: int, grace: float) -> None:
    """SIGTERM a process group, SIGKILL it after `grace` if its leader still lives."""
    start = process_start_time(pid)
    kill_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and start is not None and process_start_time(pid) == start:
        time.sleep(0.05)
    kill_group(pid, signal.SIGKILL)
