"""The loop that ties discovery, the ledger, the executor and the recorder together.

One pass of the loop (`step`): rescan what changed -> reap finished stages -> release due retries
-> start stages on free lanes -> hand scored results to the sinks. Between passes the loop sleeps
until a watcher event, a child exit, a retry or settle deadline, or a signal wakes it.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Optional

from filelock import FileLock, Timeout

from evaluator.common.atomic import read_json
from evaluator.common.contracts import (
    DONE_FILE, EVALUATION, INFERENCE, JOB_FILE, LOG_FILE, OUTPUT_FILES, StageJob,
    read_metrics, result_dir)
from evaluator.common.errors import EvaluatorError
from evaluator.daemon import ledger as L
from evaluator.daemon.checkpoints import LAYOUTS, Checkpoint, CheckpointLayout, Selection
from evaluator.daemon.config import AutoEvalConfig
from evaluator.daemon.local import Lanes, LocalExecutor, StageProcess, detect_gpus, kill_group, process_start_time
from evaluator.daemon.slurm import SlurmExecutor
from evaluator.daemon.snapshots import SnapshotKeeper, resolve_mode
from evaluator.daemon.stages import BENCHMARK_TYPES
from evaluator.daemon.watch import CheckpointWatcher, Rescanner, choose_mode
from recorder.sinks import ResultRecord, make_sinks

log = logging.getLogger("evaluator")
STAGE_STATE = {INFERENCE: (L.PENDING, L.INFERRING, L.INFERRED), EVALUATION: (L.INFERRED, L.SCORING, L.SCORED)}
HEARTBEAT_SECONDS = 60.0
RECHECK_SECONDS = 1.0  # how often an incomplete checkpoint of a marker-less layout is looked at again
MIN_SCAN_GAP = 0.005  # a burst of file events costs one rescan, not one per event


@dataclass(frozen=True)
class RunSpec:
    name: str
    root: str
    layout: str
    benchmarks: Optional[tuple] = None  # benchmark names run on this run's checkpoints; None = all

    def runs_benchmark(self, name: str) -> bool:
        return self.benchmarks is None or name in self.benchmarks


def resolve_runs(cfg: AutoEvalConfig, model_type: Optional[str] = None) -> list[RunSpec]:
    """The training runs to watch: watch.paths, or Data-Juicer's megatron.checkpoint_path."""
    paths = list(cfg.watch.paths)
    default_layout = model_type or cfg.watch.layout or "megatron"
    if not paths:
        if cfg.megatron and cfg.megatron.checkpoint_path:
            return [RunSpec(cfg.model_name, cfg.megatron.checkpoint_path, default_layout)]
        raise EvaluatorError("invalid config: auto_eval.watch.paths: no checkpoint folder to watch; "
                             "set watch.paths or megatron.checkpoint_path")
    runs = []
    for p in paths:
        name = p.name or (cfg.model_name if len(paths) == 1 else os.path.basename(p.path.rstrip("/")))
        runs.append(RunSpec(name, p.path, p.layout or default_layout,
                            tuple(p.benchmarks) if p.benchmarks is not None else None))
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            raise EvaluatorError(f"invalid config: auto_eval.watch.paths: two runs are named {r.name!r}; give each "
                                 f"path a distinct `name:` (it names the folder of its results)")
    for r in runs:
        if os.path.isabs(r.name) or ".." in r.name.split("/") or not r.name.strip("/"):
            raise EvaluatorError(f"invalid config: run name {r.name!r} (model_name or watch.paths[].name) must be a "
                                 f"relative folder name without '..'")
        if os.path.exists(r.root) and not os.path.isdir(r.root):
            raise EvaluatorError(f"invalid config: auto_eval.watch.paths: {r.root} is not a folder")
    return runs


def make_layouts(cfg: AutoEvalConfig, runs: list[RunSpec]) -> dict[str, CheckpointLayout]:
    w = cfg.watch
    return {r.name: LAYOUTS[r.layout](r.name, r.root, w.settle_seconds, w.pattern, w.done_marker) for r in runs}


def venv_python(path: str) -> str:
    """A venv folder or a python executable -> the python executable."""
    return os.path.join(path, "bin", "python") if os.path.isdir(path) else path


def stage_done(stage: str, output_dir: str) -> Optional[str]:
    """None when the stage's outputs are complete and valid, else what is wrong."""
    path = os.path.join(output_dir, DONE_FILE[stage])
    if not os.path.exists(path):
        return f"no {DONE_FILE[stage]} written"
    try:
        if stage == EVALUATION:
            read_metrics(path)
        else:
            read_json(path)
    except ValueError as e:
        return str(e)
    return None


def is_final(job: L.Job) -> bool:
    """Nothing more will happen to this job."""
    return job.state in (L.RECORDED, L.VANISHED, L.SKIPPED) or (job.state == L.FAILED and job.next_retry_at is None)


def log_tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Daemon:
    def __init__(self, cfg: AutoEvalConfig, selection: Selection, model_type: Optional[str] = None,
                 once: bool = False):
        self.cfg = cfg
        self.selection = selection
        self.once = once
        self.runs = resolve_runs(cfg, model_type)
        self.run_specs = {r.name: r for r in self.runs}
        self.layouts = make_layouts(cfg, self.runs)
        self.benchmarks = {b.name: b for b in cfg.benchmarks}
        self._lock = threading.Lock()
        self._dirty: set[str] = {r.name for r in self.runs}
        self.unavailable: set[str] = set()
        self.stopping = False
        self.settling: dict[str, float] = {}  # run -> when its settling checkpoints need another look
        self.recheck: dict[str, float] = {}  # run -> when to look again at its incomplete checkpoints
        self.last_scan = 0.0
        # a sink that fails backs off as a whole, so results still reach it oldest first once it is back
        self.sink_retry_at: dict[str, float] = {}
        self.sink_failures: dict[str, int] = {}  # consecutive failures per sink in this process
        self.last_heartbeat = 0.0
        self.ledger: Optional[L.Ledger] = None

    # ---- wiring --------------------------------------------------------------------------
    def notify(self, run: Optional[str] = None) -> None:
        """Called from watcher/scheduler threads: mark runs for rescanning and wake the loop."""
        with self._lock:
            self._dirty.update([run] if run else [r.name for r in self.runs])
        self._poke()

    def _poke(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: the loop is due to wake anyway

    def _sleep(self, timeout: float) -> None:
        select.select([self._wake_r], [], [], timeout)
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _check_envs(self) -> dict[str, str]:
        pythons = {}
        for stage, key in ((INFERENCE, "inference"), (EVALUATION, "evaluation")):
            py = venv_python(getattr(self.cfg.envs, key))
            if not os.access(py, os.X_OK):
                raise EvaluatorError(f"auto_eval.envs.{key}: no python at {py} (run `make setup`, or point it at a venv)")
            probe = subprocess.run([py, "-c", "import evaluator.stages"], capture_output=True, text=True)
            if probe.returncode != 0:
                raise EvaluatorError(f"auto_eval.envs.{key}: {py} cannot import the evaluator package "
                                     f"(run `make setup`): {probe.stderr.strip().splitlines()[-1:]}")
            pythons[stage] = py
        return pythons

    def run(self) -> int:
        if not self.benchmarks:
            raise EvaluatorError("auto_eval.benchmarks: no benchmarks configured; nothing to run "
                                 "(--dry-run shows which checkpoints would be evaluated)")
        self.pythons = self._check_envs()
        try:
            os.makedirs(self.cfg.cache_dir, exist_ok=True)
        except OSError as e:
            raise EvaluatorError(f"auto_eval.cache_dir: cannot create {self.cfg.cache_dir}: {e.strerror}") from None
        if self.cfg.watch.snapshot == "hardlink":
            for r in self.runs:
                if resolve_mode("auto", self.cfg.cache_dir, r.root) != "hardlink":
                    raise EvaluatorError(f"auto_eval.watch.snapshot: hardlink needs cache_dir ({self.cfg.cache_dir}) on the "
                                         f"same filesystem as {r.root}; use 'copy' (or 'auto')")
        lock = FileLock(os.path.join(self.cfg.cache_dir, "daemon.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise EvaluatorError(f"another daemon is already running on cache_dir {self.cfg.cache_dir} "
                                 f"(it holds {lock.lock_file}); stop it first") from None
        try:
            return self._run_locked()
        finally:
            lock.release()

    def _run_locked(self) -> int:
        # Wake-ups come through a pipe: watcher threads write a byte, and signal.set_wakeup_fd makes
        # the C-level signal handler write one too, so no Python-level handler ever takes a lock.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        ex = self.cfg.executor
        if ex.type == "slurm":
            self.executor = SlurmExecutor(ex, {s: self._timeout_s(s) for s in (INFERENCE, EVALUATION)})
            where = f"slurm executor (max_in_flight={ex.max_in_flight})"
        else:
            gpus = ex.gpus if ex.gpus is not None else detect_gpus()
            lanes = Lanes(ex.inference_concurrency or max(1, len(gpus)), ex.evaluation_concurrency, gpus,
                          overlap=ex.overlap_lanes)
            self.executor = LocalExecutor(lanes, ex.kill_grace_seconds)
            where = f"lanes inference={lanes.inference} evaluation={lanes.evaluation} gpus={gpus or 'none'}"
        self.sinks = make_sinks(self.cfg)
        self.ledger = L.Ledger(self.cfg.cache_dir)
        stale = sorted({j.run for j in self.ledger.jobs()} - {r.name for r in self.runs})
        if stale:
            log.warning("the ledger holds jobs of run(s) %s that are not configured now; if a run was renamed, "
                        "its checkpoints are evaluated again under the new name", ", ".join(stale))
        w = self.cfg.watch
        self.keeper = SnapshotKeeper(self.ledger, self.cfg.cache_dir, self.layouts, w.snapshot, w.snapshot_max_gb,
                                     w.snapshot_exclude, self._poke)
        mode = choose_mode(self.cfg.watch.mode, [r.root for r in self.runs])
        log.info("daemon started: %d run(s), %d benchmark(s), %s, %s + rescan every %ss",
                 len(self.runs), len(self.benchmarks), where, mode, self.cfg.watch.poll_seconds)
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)}
        previous_fd = signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler must exist for the wakeup byte
        watcher = None
        if mode == "inotify":
            watcher = CheckpointWatcher({r.name: r.root for r in self.runs}, self.notify)
            watcher.start()
        rescanner = Rescanner(self.cfg.watch.poll_seconds, self.notify)
        rescanner.start()
        exit_code = 0
        try:
            self.recover()
            while not self.stopping:
                self.step()
                if watcher:
                    watcher.ensure_watches()
                if self.once and self.idle():
                    unrecorded = len(self.ledger.jobs([L.SCORED]))
                    if unrecorded:
                        log.warning("--once: %d scored result(s) could not be recorded (sink down, see status); "
                                    "they stay queued and are recorded by the next run", unrecorded)
                        exit_code = 1
                    log.info("--once: every job that exists is done")
                    break
                if self.range_finished():
                    log.info("every iteration up to --end-iteration %s is done", self.selection.end)
                    break
                self._sleep(self._sleep_seconds())
            if self.stopping:
                log.info("stop signal received: stopping (running stages are killed and go back to the queue)")
        finally:
            self._shutdown(watcher, rescanner)
            for s, h in previous.items():
                signal.signal(s, h)
            signal.set_wakeup_fd(previous_fd)
            os.close(self._wake_r)
            os.close(self._wake_w)
        self.print_summary()
        return exit_code

    def _on_stop_signal(self, signum, _frame):
        self.stopping = True  # only a flag: the wakeup fd has already woken the loop

    def _shutdown(self, watcher, rescanner) -> None:
        for sp in self.executor.stop_all():
            back = L.PENDING if sp.stage == INFERENCE else L.INFERRED
            self.ledger.transition(sp.key, back, "daemon stopped mid-stage", pid=None, pid_start=None)
            log.info("%s %s: stopped, back to %s", sp.stage, _fmt(sp.key), back)
        self.keeper.shutdown()
        self.keeper.collect()
        self.keeper.release_finished(is_final)
        if watcher:
            watcher.stop()
        rescanner.stop()

    # ---- one pass -----------------------------------------------------------------------
    def step(self) -> None:
        now = time.monotonic()
        if now - self.last_scan >= MIN_SCAN_GAP:
            with self._lock:
                dirty, self._dirty = self._dirty, set()
            dirty |= {run for run, t in list(self.settling.items()) + list(self.recheck.items()) if now >= t}
            if dirty:
                self.last_scan = now
                self.scan(dirty)
        self.pin_snapshots()
        for sp in self.executor.poll():
            self.finish_stage(sp)
        self.release_retries()
        self.dispatch()
        self.record()
        self.heartbeat()

    def scan(self, runs: set[str]) -> None:
        for run in runs:
            self.settling.pop(run, None)
            self.recheck.pop(run, None)
            layout = self.layouts[run]
            if not os.path.isdir(layout.root):
                # not there (yet, or a storage hiccup): no news, and no reason to call anything vanished
                if run not in self.unavailable:
                    log.warning("run %s: %s is not available; waiting for it", run, layout.root)
                self.unavailable.add(run)
                continue
            rows = self.ledger.jobs(run=run)
            have = {(j.iteration, j.benchmark) for j in rows}
            try:
                checkpoints = layout.scan(frozenset(it for it, _ in have))
            except OSError as e:  # flaky storage (EIO, ESTALE, EACCES): try again at the next rescan
                log.warning("run %s: scanning %s failed (%s); will rescan", run, layout.root, e)
                continue
            if run in self.unavailable:
                log.info("run %s: %s is available again", run, layout.root)
                self.unavailable.discard(run)
            by_iter = {c.iteration: c for c in checkpoints}
            for c in checkpoints:
                if c.settle_deadline is not None:
                    self.settling[run] = min(self.settling.get(run, c.settle_deadline), c.settle_deadline)
                if c.complete:
                    self._admit(c, have)
                elif layout.recheck_incomplete:
                    # its completion shows inside the checkpoint dir, which is not watched: look again soon
                    self.recheck[run] = time.monotonic() + RECHECK_SECONDS
            for job in rows:
                self._reconcile(job, by_iter.get(job.iteration))

    def _admit(self, c: Checkpoint, have: set) -> None:
        state = L.PENDING if self.selection.selects(c.iteration) else L.SKIPPED
        spec = self.run_specs[c.run]
        for name in self.benchmarks:
            if (c.iteration, name) in have or not spec.runs_benchmark(name):
                continue
            if self.ledger.add(c.run, c.iteration, name, c.path, state) and state == L.PENDING:
                log.info("checkpoint %s iteration %d complete: queued %s", c.run, c.iteration, name)

    def pin_snapshots(self) -> None:
        """Pin queued checkpoints (rotation safety), collect finished pins, release finished snapshots."""
        waiting = {(j.run, j.iteration): j.path for j in self.ledger.jobs([L.PENDING])}
        queued = [Checkpoint(run, it, path, True) for (run, it), path in sorted(waiting.items())]
        for run, iteration, why in self.keeper.ensure(queued) + self.keeper.collect():
            for job in self.ledger.jobs(run=run, iteration=iteration):
                if job.state in (L.PENDING, L.SKIPPED, L.FAILED) and not is_final(job):
                    self.ledger.transition(job.key, L.VANISHED, why, next_retry_at=None, last_error=why)
            log.warning("%s iteration %d: %s: vanished", run, iteration, why)
        self.keeper.release_finished(is_final)

    def _reconcile(self, job: L.Job, present: Optional[Checkpoint]) -> None:
        """Follow the selection (it may change between restarts) and notice deleted checkpoints."""
        if present is None and self.keeper.protects(job.run, job.iteration):
            return  # pinned: the original may go, the snapshot stays
        if present is None:
            needs_checkpoint = job.state in (L.PENDING, L.SKIPPED) or (
                job.state == L.FAILED and job.resume_state == L.PENDING and job.next_retry_at is not None)
            if needs_checkpoint:
                self.ledger.transition(job.key, L.VANISHED, "checkpoint deleted before evaluation", next_retry_at=None,
                                       last_error="checkpoint deleted before its inference finished")
                log.warning("%s: checkpoint %s vanished", _fmt(job.key), job.path)
            return
        if present.path != job.path and job.state in (L.PENDING, L.SKIPPED, L.FAILED):
            self.ledger.update(job.key, path=present.path)  # the run folder moved (config updated)
        selected = self.selection.selects(job.iteration)
        if job.state == L.SKIPPED and selected:
            self.ledger.transition(job.key, L.PENDING, "now selected")
        elif job.state == L.PENDING and not selected:
            self.ledger.transition(job.key, L.SKIPPED, "outside begin/end/interval")

    def finish_stage(self, sp: StageProcess) -> None:
        job = self.ledger.get(sp.key)
        _, _, done_state = STAGE_STATE[sp.stage]
        out = self._outdir(job)
        problem = None
        if sp.timed_out:
            minutes = self._timeout_s(sp.stage) / 60
            problem = f"timed out after {minutes:g} min ({sp.reason or 'process group killed'})"
        elif sp.returncode == 75:
            problem = "exit 75: the stage asked to be retried later"
        elif sp.returncode != 0:
            problem = f"exit {sp.returncode}" if sp.returncode > 0 else f"killed by {_signal_name(-sp.returncode)}"
        else:
            problem = stage_done(sp.stage, out)
            if problem:
                problem = f"exit 0 but {problem}"
        if problem and sp.reason and not sp.timed_out:
            problem += f" ({sp.reason})"
        seconds = time.monotonic() - sp.started
        if problem is None:
            self.ledger.transition(sp.key, done_state, f"{sp.stage} done in {seconds:.1f}s", attempts=0,
                                   last_error=None, pid=None, pid_start=None, next_retry_at=None)
            log.info("%s %s: done in %.1fs", sp.stage, _fmt(sp.key), seconds)
            return
        self.fail(job, sp.stage, problem)

    def fail(self, job: L.Job, stage: str, problem: str) -> None:
        if stage == INFERENCE:
            self.executor.cancel_chained(job.key)  # its evaluation job would wait for nothing
        tail = log_tail(os.path.join(self._outdir(job), LOG_FILE[stage]))
        if stage == INFERENCE and not self.keeper.protects(job.run, job.iteration) and not os.path.exists(job.path):
            # deleted under us: retrying cannot help, so no retry storm
            self.ledger.transition(job.key, L.VANISHED, f"inference: {problem}; checkpoint gone", next_retry_at=None,
                                   last_error=f"checkpoint deleted before its inference finished ({problem})",
                                   pid=None, pid_start=None)
            log.warning("inference %s: checkpoint %s was deleted mid-stage: vanished, not retried", _fmt(job.key), job.path)
            return
        ex = self.cfg.executor
        attempts = job.attempts + 1
        resume = L.PENDING if stage == INFERENCE else L.INFERRED
        if attempts >= ex.max_attempts:
            retry_at, what = None, f"failed for good after {attempts} attempt(s)"
        else:
            delay = min(ex.backoff_max_seconds, ex.backoff_seconds * 2 ** (attempts - 1))
            retry_at, what = time.time() + delay, f"retry {attempts + 1}/{ex.max_attempts} in {delay:g}s"
        self.ledger.transition(job.key, L.FAILED, f"{stage}: {problem}", attempts=attempts, resume_state=resume,
                               next_retry_at=retry_at, last_error=f"{stage}: {problem}\n{tail}".rstrip(),
                               pid=None, pid_start=None, eval_job=None)
        log.warning("%s %s: %s; %s (log: %s)", stage, _fmt(job.key), problem, what,
                    os.path.join(self._outdir(job), LOG_FILE[stage]))

    def release_retries(self) -> None:
        now = time.time()
        for job in self.ledger.jobs([L.FAILED]):
            if job.next_retry_at is not None and job.next_retry_at <= now:
                self.ledger.transition(job.key, job.resume_state or L.PENDING, f"retry {job.attempts + 1}",
                                       next_retry_at=None)

    def _ordered(self, state: str) -> list[L.Job]:
        jobs = self.ledger.jobs([state])
        newest = self.cfg.watch.order == "newest-first"
        return sorted(jobs, key=lambda j: (-j.iteration if newest else j.iteration, j.run, j.benchmark))

    def dispatch(self) -> None:
        for stage in (INFERENCE, EVALUATION):
            ready, _, _ = STAGE_STATE[stage]
            free = self.executor.free_slots(stage)
            for job in self._ordered(ready):
                if free <= 0 or self.stopping:
                    break
                spec = self.run_specs.get(job.run)
                if job.benchmark not in self.benchmarks or (spec and not spec.runs_benchmark(job.benchmark)):
                    continue  # removed from the config (or this run's list) since it was queued; kept as it is
                if stage == EVALUATION and stage_done(INFERENCE, self._outdir(job)):
                    self.ledger.transition(job.key, L.PENDING, "inference outputs missing: infer again")
                    continue
                checkpoint = self.keeper.checkpoint_for(job.run, job.iteration, job.path)
                if checkpoint is None:
                    continue  # its snapshot is still being pinned
                self.start_stage(job, stage, checkpoint)
                free -= 1

    def _prepare(self, job: L.Job, stage: str, checkpoint: str) -> list[str]:
        """Clear the stage's old outputs, write its job spec; returns the command that runs it."""
        bench = self.benchmarks[job.benchmark]
        out = self._outdir(job)
        os.makedirs(out, exist_ok=True)
        for name in OUTPUT_FILES[stage]:  # a fresh attempt must not inherit an earlier one's outputs
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
        spec = StageJob(stage=stage, run=job.run, iteration=job.iteration, checkpoint=checkpoint,
                        benchmark=bench.model_dump(), output_dir=out,
                        seed=bench.seed if bench.seed is not None else self.cfg.seed,
                        attempt=job.attempts + 1, tokens_b=self.tokens_b(job.iteration),
                        extra={"config_dir": self.cfg.config_dir})
        job_file = os.path.join(out, JOB_FILE[stage])
        spec.write(job_file)
        btype = BENCHMARK_TYPES[bench.type]
        module = btype.inference_module if stage == INFERENCE else btype.evaluation_module
        return [self.pythons[stage], "-m", module, "--job", job_file]

    def start_stage(self, job: L.Job, stage: str, checkpoint: str) -> None:
        out = self._outdir(job)
        _, running_state, _ = STAGE_STATE[stage]
        if stage == EVALUATION:
            adopted = self.executor.adopt(job.key)
            if adopted is not None:  # submitted together with its inference job (--dependency=afterok)
                self.ledger.transition(job.key, running_state, "evaluation job already submitted",
                                       started_at=time.time(), **adopted.ledger_fields())
                return
        argv = self._prepare(job, stage, checkpoint)
        chain = None
        if stage == INFERENCE and self.executor.chains:
            chain = (self._prepare(job, EVALUATION, checkpoint), out, os.path.join(out, LOG_FILE[EVALUATION]))
        self.ledger.transition(job.key, running_state, f"attempt {job.attempts + 1}", started_at=time.time())
        try:
            sp = self.executor.start(job.key, stage, argv, out, os.path.join(out, LOG_FILE[stage]),
                                     self._timeout_s(stage), chain=chain)
        except RuntimeError as e:  # e.g. sbatch refused the job: a failed attempt, with sbatch's reason
            self.fail(self.ledger.get(job.key), stage, str(e))
            return
        fields = sp.ledger_fields()
        if chain is not None:
            fields["eval_job"] = self.executor.chained_id(job.key)
        self.ledger.update(job.key, **fields)
        where = f"Slurm job {fields.get('infer_job') or fields.get('eval_job')}" if self.executor.chains else f"pid {sp.pid}"
        log.info("%s %s: started (%s%s)", stage, _fmt(job.key), where, f", GPU {sp.gpu}" if sp.gpu else "")

    def record(self) -> None:
        """Offer scored results to the sinks; `scored` rows + `recordings` are the durable outbox."""
        now = time.monotonic()
        ex = self.cfg.executor
        for job in self.ledger.jobs([L.SCORED]):
            done = self.ledger.recorded_sinks(job.key)
            todo = [s for s in self.sinks if s.name not in done and self.sink_retry_at.get(s.name, 0) <= now]
            if not todo and not all(s.name in done for s in self.sinks):
                continue  # every sink it still needs is backing off
            path = os.path.join(self._outdir(job), DONE_FILE[EVALUATION])
            try:
                m = read_metrics(path)
            except (OSError, ValueError) as e:
                self.ledger.transition(job.key, L.INFERRED, f"metrics unreadable ({e}): score again")
                continue
            result = ResultRecord(run=job.run, iteration=job.iteration, benchmark=job.benchmark,
                                  metrics=m["metrics"], tokens_b=self.tokens_b(job.iteration), n=m.get("n"),
                                  stderr=m.get("stderr") or {}, per_category=m.get("per_category") or {},
                                  checkpoint=job.path, metrics_path=path, versions=m.get("versions") or {})
            for sink in self.sinks:
                if sink.name in done:
                    continue
                if self.sink_retry_at.get(sink.name, 0) > now:
                    continue  # backing off (maybe since earlier in this pass); the others still get it
                try:
                    sink.record(result)
                except Exception as e:  # a sink that is down must not stop evaluation: retried later
                    n = self.sink_failures[sink.name] = self.sink_failures.get(sink.name, 0) + 1
                    delay = max(MIN_SCAN_GAP, min(ex.backoff_max_seconds, ex.backoff_seconds * 2 ** (n - 1)))
                    self.sink_retry_at[sink.name] = now + delay
                    error = f"recorder {sink.name}: {type(e).__name__}: {e}"
                    self.ledger.update(job.key, last_error=error)  # the result stays queued; status shows why
                    log.warning("%s for %s (failure %d); retrying in %gs", error, _fmt(job.key), n, delay)
                    continue
                self.sink_failures.pop(sink.name, None)
                self.ledger.mark_recorded(job.key, sink.name)
                done.add(sink.name)
            if all(s.name in done for s in self.sinks):
                self.ledger.transition(job.key, L.RECORDED, "recorded", last_error=None)
                log.info("recorded %s: %s", _fmt(job.key),
                         ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.metrics.items())))
        for sink in self.sinks:
            flush = getattr(sink, "flush", None)
            if flush is None:
                continue
            try:
                flush()  # derived views (plots): a failure here loses no result and is tried next pass
            except Exception as e:
                log.warning("recorder %s: refreshing its views failed: %s: %s", sink.name, type(e).__name__, e)

    # ---- restart recovery ---------------------------------------------------------------
    def recover(self) -> None:
        """Rows left running by a previous daemon: stop leftovers, check outputs, resume."""
        for job in self.ledger.jobs(L.RUNNING):
            stage = INFERENCE if job.state == L.INFERRING else EVALUATION
            job_id = job.infer_job if stage == INFERENCE else job.eval_job
            if self.executor.chains and job_id:  # Slurm jobs run on without us: follow them again
                self.executor.attach(job.key, stage, job_id)
                if stage == INFERENCE and job.eval_job:
                    self.executor.attach(job.key, EVALUATION, job.eval_job, chained=True)
                log.info("%s %s: re-attached to Slurm job %s", stage, _fmt(job.key), job_id)
                continue
            if job.pid and job.pid_start and process_start_time(job.pid) == job.pid_start:
                log.warning("%s %s: stage pid %d of the previous daemon still runs: killing its group",
                            stage, _fmt(job.key), job.pid)
                kill_group(job.pid, signal.SIGTERM)
                deadline = time.monotonic() + self.cfg.executor.kill_grace_seconds
                while time.monotonic() < deadline and process_start_time(job.pid) == job.pid_start:
                    time.sleep(0.05)
                kill_group(job.pid, signal.SIGKILL)
            ready, _, done_state = STAGE_STATE[stage]
            if stage_done(stage, self._outdir(job)) is None:
                self.ledger.transition(job.key, done_state, "recovered after restart: outputs complete",
                                       pid=None, pid_start=None)
            else:
                self.ledger.transition(job.key, ready, "recovered after restart: run again", pid=None, pid_start=None)
            log.info("%s %s: resumed after restart as %s", stage, _fmt(job.key), self.ledger.get(job.key).state)
        for job in self.ledger.jobs([L.SCORED]):
            if stage_done(EVALUATION, self._outdir(job)):
                self.ledger.transition(job.key, L.INFERRED, "recovered: metrics missing, score again")
        for job in self.ledger.jobs([L.INFERRED]):
            if stage_done(INFERENCE, self._outdir(job)):
                self.ledger.transition(job.key, L.PENDING, "recovered: predictions missing, infer again")
            elif self.executor.chains and job.eval_job:  # its evaluation job was submitted already
                self.executor.attach(job.key, EVALUATION, job.eval_job, chained=True)
        self.keeper.recover()

    # ---- helpers ------------------------------------------------------------------------
    def tokens_b(self, iteration: int) -> Optional[float]:
        tpi = self.cfg.token_per_iteration
        return iteration * tpi if tpi else None

    def _outdir(self, job: L.Job) -> str:
        return result_dir(self.cfg.cache_dir, job.run, job.iteration, job.benchmark)

    def _timeout_s(self, stage: str) -> float:
        ex = self.cfg.executor
        return 60 * (ex.inference_timeout_minutes if stage == INFERENCE else ex.evaluation_timeout_minutes)

    def idle(self) -> bool:
        """Nothing running, nothing runnable, no retry or settling checkpoint still to come."""
        if self.executor.running or self.settling or self._dirty or self.keeper.busy():
            return False
        for job in self.ledger.jobs([L.PENDING, L.INFERRED, L.SCORED, L.FAILED]):
            if job.benchmark not in self.benchmarks:
                continue
            if job.state == L.SCORED and any(self.sink_failures.get(s.name, 0) >= self.cfg.executor.max_attempts
                                             for s in self.sinks if s.name not in self.ledger.recorded_sinks(job.key)):
                continue  # a sink that stays down: the result waits, durably, for the next run
            if job.state != L.FAILED or job.next_retry_at is not None:
                return False
        return True

    def range_finished(self) -> bool:
        expected = self.selection.expected()
        if expected is None or self.executor.running:
            return False
        for run in self.runs:
            jobs = {(j.iteration, j.benchmark): j for j in self.ledger.jobs(run=run.name)}
            newest = max((it for it, _ in jobs), default=None)
            for it in expected:
                for name in filter(run.runs_benchmark, self.benchmarks):
                    job = jobs.get((it, name))
                    if job is None and newest is not None and newest > it:
                        continue  # never saved (or rotated away unseen) while a later one exists: not waited for
                    if job is None or not is_final(job):
                        return False
        return True

    def _sleep_seconds(self) -> float:
        now = time.monotonic()
        if self._dirty:  # an event came within MIN_SCAN_GAP of the last scan: scan as soon as the gap ends
            return max(0.001, self.last_scan + MIN_SCAN_GAP - now)
        if self.executor.running:
            return 0.5  # SIGCHLD wakes us sooner; this bounds timeout enforcement
        waits = [5.0] + [t - now for t in list(self.settling.values()) + list(self.recheck.values())]
        retries = [j.next_retry_at for j in self.ledger.jobs([L.FAILED]) if j.next_retry_at is not None]
        if retries:
            waits.append(min(retries) - time.time())
        waits += [t - now for t in self.sink_retry_at.values() if t > now]
        return max(MIN_SCAN_GAP, min(waits))

    def heartbeat(self) -> None:
        now = time.monotonic()
        if now - self.last_heartbeat < HEARTBEAT_SECONDS:
            return
        self.last_heartbeat = now
        counts = Counter(j.state for j in self.ledger.jobs())
        running = ", ".join(f"{sp.stage} {_fmt(k)}" for k, sp in self.executor.running.items()) or "nothing"
        log.info("status: %s; running: %s", ", ".join(f"{s}={counts[s]}" for s in L.STATES if counts[s]) or "no jobs yet",
                 running)

    def print_summary(self) -> None:
        counts = Counter(j.state for j in self.ledger.jobs())
        log.info("stopped; jobs: %s", ", ".join(f"{s}={counts[s]}" for s in L.STATES if counts[s]) or "none")
        self.ledger.close()


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:  # real-time signals have no name
        return f"signal {num}"


def _fmt(key: tuple) -> str:
    run, iteration, bench = key
    return f"{run}@{iteration}/{bench}"
