"""Local executor: stage subprocesses on two lanes, each in its own process group.

The GPU lane runs inference (one slot per GPU unless configured otherwise; the slot's GPU goes in
CUDA_VISIBLE_DEVICES), the CPU lane runs evaluation, so checkpoint N is scored while N+1 generates.
Non-blocking: the daemon loop calls `poll()`; nothing here sleeps except `stop_all`.
A timeout sends SIGTERM to the whole group, then SIGKILL after kill_grace_seconds. Every stage carries
its intent token in its environment, so a daemon restarted after a kill -9 finds (and stops) it.

Warm workers (`executor.warm_workers`, evaluator/stages/worker.py): a native inference or evaluation stage goes
to a long-lived worker process of its lane instead of a new process, one job at a time per worker, so imports
and the loaded model are paid once per worker, not once per (checkpoint x benchmark). The unit the daemon tracks
does not change: each job is submitted, timed out (the worker's group is killed, as a stage process's would be)
and reported (`Exit` with the job's own exit code) on its own. A worker is replaced after a failed job, after
`worker_max_jobs`, and -- `warm_workers: checkpoint` -- when the next job reads another checkpoint. Workers carry
`CKPT_EVAL_WORKER=<marker>` in their environment and die with the daemon (PR_SET_PDEATHSIG); a restarted daemon
kills any that are left all the same.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Optional

from evaluator.common.contracts import EVALUATION, INFERENCE, WARM_STAGE_MODULES, WORKER_ENV
from evaluator.common.procs import process_start_time, still_runs
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

    worker: Optional["Worker"] = None  # the warm worker running it (None: its own process)

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class Worker:
    """A warm worker process of one lane (evaluator/stages/worker.py)."""

    stage: str
    python: str
    proc: subprocess.Popen
    gpu: Optional[str]
    session: str = ""  # the checkpoint its last job read
    bound: bool = False  # it ran a job whose backend wants a fresh worker per checkpoint: it keeps its session
    engine: bool = False  # it ran a job of a backend that holds an engine (vllm), reloading or not
    jobs: int = 0
    job: Optional[tuple] = None  # the key of the job it runs now
    buffer: bytes = b""
    retiring: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def answers(self) -> list[dict]:
        """Complete answer lines that arrived (non-blocking)."""
        try:
            while True:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                self.buffer += chunk
        except BlockingIOError:
            pass
        except OSError:
            pass
        *lines, self.buffer = self.buffer.split(b"\n")
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                log.warning("warm worker pid %d: unreadable answer %r", self.pid, line[:200])
        return out


@dataclass
class Lanes:
    inference: int
    evaluation: int
    gpus: list = field(default_factory=list)
    overlap: bool = True  # False: one stage at a time in all (the strictly serial baseline of scripts/bench_pipeline.py)


def choose_worker(idle: list, session: str, warm: str, fresh_session: bool, engine: bool = False) -> tuple:
    """(the idle worker to give a job reading checkpoint `session`, or None: start one; the idle workers to retire).
    One whose last job read the same checkpoint first; else, in `on` mode, any idle one, unless the job's backend
    wants a fresh worker for another checkpoint (`fresh_session`, vLLM), which it then gets as in `checkpoint` mode.
    A worker that ran such a job (`bound`: it may hold a vLLM engine) never takes another checkpoint's job,
    whatever its backend: an hf job in between would otherwise carry it on to the next checkpoint, whose vLLM job
    would then build a second engine in the same process. One that ran a vLLM job reloading weights in place
    (`engine`) takes another checkpoint's job only if it is such a job too (`engine`: it swaps the weights in).
    A worker that ran any vLLM job never takes a job of another backend, not even on its own checkpoint (closing
    the engine for an hf model, the next vLLM job would build a second engine in that process). Idle workers that
    may not take the job are retired when no other one can."""
    same = [w for w in idle if w.session == session and (engine or not w.engine)]
    if same:
        return same[0], []
    others = [w for w in idle if not w.bound and (engine or not w.engine)]
    if others and warm == "on" and not fresh_session:
        return others[0], [w for w in idle if w not in others]
    return None, list(idle)


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


def kill_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def processes_with_token(tokens: set[str], variable: str = TOKEN_ENV) -> dict[str, list[int]]:
    """token -> pids whose environment carries `<variable>=<token>` (CKPT_EVAL_TOKEN=<token>:<stage>, or a warm
    worker's CKPT_EVAL_WORKER=<marker>), in one pass over /proc."""
    found: dict[str, list[int]] = {}
    if not tokens:
        return found
    needle = (variable + "=").encode()
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

    def __init__(self, lanes: Lanes, kill_grace_seconds: float = 5.0, warm: str = "off", worker_max_jobs: int = 100,
                 marker: str = ""):
        self.lanes = lanes
        self.kill_grace = kill_grace_seconds
        self.procs: dict[tuple, StageProcess] = {}
        self.warm, self.worker_max_jobs = warm, worker_max_jobs
        self.marker = marker or f"{os.getpid()}"  # WORKER_ENV value: whose workers they are (daemon.py: cache_dir)
        self.workers: list[Worker] = []

    @classmethod
    def from_config(cls, ex, timeouts=None, marker: str = "") -> "LocalExecutor":
        gpus = ex.gpus if ex.gpus is not None else detect_gpus()
        lanes = Lanes(ex.inference_concurrency or max(1, len(gpus)), ex.evaluation_concurrency, gpus,
                      overlap=ex.overlap_lanes)
        return cls(lanes, ex.kill_grace_seconds, ex.warm_workers, ex.worker_max_jobs, marker)

    def describe(self) -> str:
        lanes = self.lanes
        return (f"lanes inference={lanes.inference} evaluation={lanes.evaluation} gpus={lanes.gpus or 'none'}, "
                f"warm workers {self.warm}")

    def capacity(self, stage: str) -> int:
        return self.lanes.inference if stage == INFERENCE else self.lanes.evaluation

    def free_slots(self, stage: str) -> int:
        if not self.lanes.overlap:
            return 0 if self.procs else 1
        return self.capacity(stage) - sum(1 for p in self.procs.values() if p.stage == stage)

    def busy(self) -> bool:
        return bool(self.procs)

    def wake_fds(self) -> list[int]:
        """The answer pipes of warm workers with a job in flight: the loop wakes when one answers (a job ending
        in a worker sends no SIGCHLD)."""
        return [sp.worker.proc.stdout.fileno() for sp in self.procs.values()
                if sp.worker is not None and not sp.worker.proc.stdout.closed]

    def running(self) -> list[tuple]:
        return [(sp.key, sp.stage) for sp in self.procs.values()]

    def _free_gpu(self) -> Optional[str]:
        if not self.lanes.gpus:
            return None
        busy = [p.gpu for p in self.procs.values() if p.stage == INFERENCE]
        # least-loaded GPU first (several jobs may share a GPU when concurrency > GPUs)
        return min(self.lanes.gpus, key=lambda g: busy.count(g))

    def _env(self, launch: Launch) -> tuple[dict, Optional[str]]:
        env = dict(os.environ)
        env[TOKEN_ENV] = f"{launch.token}:{launch.stage}"
        # recovery finds what a previous daemon started by these variables in /proc/<pid>/environ; setproctitle
        # (vLLM names its engine-core process with it) overwrites that memory unless SPT_NOENV is set, and an
        # engine core orphaned by a killed worker would then keep its model (GPU memory) until someone kills it
        env["SPT_NOENV"] = "1"
        gpu = None
        if launch.stage == INFERENCE and self.lanes.gpus:
            gpu = self._free_gpu()
            env["CUDA_VISIBLE_DEVICES"] = gpu
        elif launch.stage == EVALUATION and self.lanes.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU lane must not grab the inference GPU
        return env, gpu

    def submit(self, launch: Launch) -> Started:
        """Start the stage in its own session (or hand it to a warm worker); `launch.then` is ignored (the
        daemon starts evaluation when inference is done, on the CPU lane)."""
        argv = list(launch.argv)
        if self.warm != "off" and len(argv) == 5 and argv[1] == "-m" and argv[2] in WARM_STAGE_MODULES:
            return self._submit_warm(launch)
        env, gpu = self._env(launch)
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

    # ---- warm workers ------------------------------------------------------------------------------------
    def _submit_warm(self, launch: Launch) -> Started:
        python, module, job = launch.argv[0], launch.argv[2], launch.argv[4]
        worker = self._worker_for(launch, python)
        request = {"module": module, "job": job, "log": launch.log_path, "cwd": launch.cwd,
                   "token": f"{launch.token}:{launch.stage}"}
        try:
            os.makedirs(launch.cwd, exist_ok=True)
            worker.proc.stdin.write((json.dumps(request) + "\n").encode())
            worker.proc.stdin.flush()
        except OSError as e:  # the worker died between jobs: this job fails to start, the worker is replaced
            self._retire(worker, kill=True)
            raise SubmitError(f"warm worker pid {worker.pid}: {type(e).__name__}: {e}") from None
        now = time.monotonic()
        worker.job, worker.session = tuple(launch.key), launch.session
        worker.bound = worker.bound or launch.fresh_session
        worker.engine = worker.engine or launch.engine
        sp = StageProcess(launch.key, launch.stage, worker.proc, now, now + launch.timeout_s, worker.gpu,
                          token=launch.token, worker=worker)
        self.procs[launch.key] = sp
        where = f"warm worker pid {worker.pid} (job {worker.jobs + 1})" + (f", GPU {worker.gpu}" if worker.gpu else "")
        return Started(launch.key, launch.stage, str(worker.pid), where, pid_start=process_start_time(worker.pid))

    def _worker_for(self, launch: Launch, python: str) -> Worker:
        """An idle worker of the lane, preferring one whose last job read the same checkpoint; `checkpoint`
        mode replaces a worker that read another one. Starts one when none fits."""
        idle = [w for w in self.workers if w.job is None and not w.retiring and w.stage == launch.stage
                and w.python == python and w.proc.poll() is None]
        if launch.stage == INFERENCE and self.lanes.gpus:
            gpu = self._free_gpu()
            idle = [w for w in idle if w.gpu == gpu]
        chosen, retire = choose_worker(idle, launch.session, self.warm, launch.fresh_session, launch.engine)
        for w in retire:  # another checkpoint's session ended, or a GPU slot's worker is due
            self._retire(w)
        if chosen is not None:
            return chosen
        lane_workers = [w for w in self.workers if w.stage == launch.stage and not w.retiring]
        if len(lane_workers) >= self.capacity(launch.stage):  # idle ones of another venv: make room
            for w in lane_workers:
                if w.job is None:
                    self._retire(w)
        env, gpu = self._env(launch)
        env[WORKER_ENV] = self.marker
        stderr = self._worker_log(launch)
        try:
            proc = subprocess.Popen([python, "-m", "evaluator.stages.worker", "--parent", str(os.getpid())],
                                    cwd=launch.cwd, env=env,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                    start_new_session=True)
        except OSError as e:
            raise SubmitError(f"starting a warm worker: {type(e).__name__}: {e}") from None
        finally:
            if stderr is not subprocess.DEVNULL:
                stderr.close()  # the worker has its own copy
        os.set_blocking(proc.stdout.fileno(), False)
        worker = Worker(launch.stage, python, proc, gpu)
        self.workers.append(worker)
        log.info("%s lane: started warm worker pid %d%s", launch.stage, proc.pid, f" on GPU {gpu}" if gpu else "")
        return worker

    @staticmethod
    def _worker_log(launch: Launch):
        """A worker's own stderr (between jobs: startup errors, a crash outside a job) goes to the log of the job
        that started it: that is where `status` looks when the job fails."""
        try:
            return open(launch.log_path, "ab")
        except OSError:
            return subprocess.DEVNULL

    def _retire(self, worker: Worker, kill: bool = False) -> None:
        """Close the worker's stdin (it exits after its current job) or kill its group now."""
        worker.retiring = True
        try:
            worker.proc.stdin.close()
        except OSError:
            pass
        if kill:
            kill_group(worker.pid, signal.SIGKILL)

    def _reap_workers(self) -> None:
        for w in list(self.workers):
            if w.proc.poll() is not None and w.job is None:
                kill_group(w.pid, signal.SIGKILL)  # anything it started (a model server) goes with it
                for f in (w.proc.stdin, w.proc.stdout):
                    try:
                        f.close()
                    except OSError:
                        pass
                self.workers.remove(w)

    def _poll_warm(self, sp: StageProcess, now: float) -> Optional[Exit]:
        w = sp.worker
        for answer in w.answers():
            if w.job == tuple(sp.key) and answer.get("job"):
                w.job = None
                w.jobs += 1
                rc = int(answer.get("rc", 1))
                if rc != 0 or w.jobs >= self.worker_max_jobs:
                    self._retire(w)  # the worker exits by itself after a failed job
                return Exit(sp.key, sp.stage, sp.token, rc, now - sp.started)
        code = w.proc.poll()
        if code is not None:  # died mid-job: killed at its timeout, out of memory, a segfault
            w.job = None
            kill_group(w.pid, signal.SIGKILL)
            reason = "" if sp.timed_out else f"the warm worker (pid {w.pid}) died mid-job (exit {code})"
            return Exit(sp.key, sp.stage, sp.token, code if code != 0 else 1, now - sp.started,
                        timed_out=sp.timed_out, reason=reason)
        return None

    def poll(self) -> list[Exit]:
        """Finished stage processes and warm-worker jobs (forgotten here once reported); also enforces timeouts."""
        done = []
        now = time.monotonic()
        for key, sp in list(self.procs.items()):
            if sp.worker is not None:
                ended = self._poll_warm(sp, now)
                if ended is not None:
                    del self.procs[key]
                    done.append(ended)
                elif sp.term_sent_at is None and now >= sp.deadline:
                    log.warning("%s %s: timed out, killing its warm worker (pid %d)", sp.stage, key, sp.pid)
                    sp.timed_out = True
                    sp.term_sent_at = now
                    sp.worker.retiring = True
                    kill_group(sp.pid, signal.SIGTERM)
                elif sp.term_sent_at is not None and now - sp.term_sent_at >= self.kill_grace:
                    kill_group(sp.pid, signal.SIGKILL)
                continue
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
        self._reap_workers()
        return done

    def recover(self, intents: list[Intent]) -> dict[tuple, Started]:
        """Kill what a previous daemon left running under these tokens: a restarted daemon cannot
        collect a child it did not start, so the stage's outputs are checked and it runs again if needed."""
        for pid in processes_with_token({self.marker}, WORKER_ENV).get(self.marker, []):
            log.warning("a warm worker (pid %d) of the previous daemon still runs: killing its group", pid)
            stop_group(pid, self.kill_grace)
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
        """SIGTERM every running group and every warm worker, wait up to kill_grace, then SIGKILL. Returns what
        was stopped (jobs, not idle workers)."""
        stopped = list(self.procs.values())
        procs = {sp.proc.pid: sp.proc for sp in stopped} | {w.pid: w.proc for w in self.workers}
        for w in self.workers:
            self._retire(w)
        for pid in procs:
            kill_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.kill_grace
        while time.monotonic() < deadline and any(p.poll() is None for p in procs.values()):
            time.sleep(0.05)
        for pid, p in procs.items():
            kill_group(pid, signal.SIGKILL)
            p.wait()
        self.procs.clear()
        for w in self.workers:
            w.job = None
        self._reap_workers()
        return [(sp.key, sp.stage) for sp in stopped]

    def cancel(self, key: tuple) -> None:
        sp = self.procs.pop(tuple(key), None)
        if sp is not None:
            if sp.worker is not None:
                sp.worker.job = None
                sp.worker.retiring = True
            stop_group(sp.pid, self.kill_grace)
            sp.proc.wait()


def stop_group(pid: int, grace: float) -> None:
    """SIGTERM the process group `pid` is in, SIGKILL it after `grace` if `pid` still lives. The group it is in,
    not one named by it: a leftover found by its token may be a stage's child whose leader is already gone."""
    start = process_start_time(pid)
    try:
        group = os.getpgid(pid)
    except ProcessLookupError:  # gone already: what is left of a group it led
        group = pid
    if group == os.getpgrp():
        return  # not a stage (each runs in its own session): never the daemon's own group
    kill_group(group, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and still_runs(pid, start):
        time.sleep(0.05)
    kill_group(group, signal.SIGKILL)
