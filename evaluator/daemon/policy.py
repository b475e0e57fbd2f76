"""The daemon's decisions, as pure functions: no I/O, no clock reads (callers pass `now`).

The loop (daemon.py) observes -- scans, stage exits, sink replies, the clock -- asks these functions
what that means, and applies the answer to the ledger and the executor. Everything here is tested
table-driven in milliseconds (tests/test_policy.py).

One definition each of: finality (`is_final`), "this run takes this benchmark" (`RunSpec.runs_benchmark`
+ `wanted`), the backoff formula (`RetryPolicy.delay`), what an exit means (`stage_outcome`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

from evaluator.common.contracts import EVALUATION, EXIT_BAD_SPEC, EXIT_TEMPFAIL, INFERENCE
from evaluator.daemon import ledger as L
from evaluator.daemon.checkpoints import Checkpoint, Selection

# per stage: the state a job waits in, runs in, and reaches when the stage is done
STAGE_STATES = {INFERENCE: (L.PENDING, L.INFERRING, L.INFERRED), EVALUATION: (L.INFERRED, L.SCORING, L.SCORED)}


# ---- what is configured ------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    name: str
    root: str
    layout: str
    benchmarks: Optional[tuple] = None  # benchmark names run on this run's checkpoints; None = all

    def runs_benchmark(self, name: str) -> bool:
        return self.benchmarks is None or name in self.benchmarks


def wanted(runs: dict[str, RunSpec], benchmarks: Iterable[str], run: str, benchmark: str) -> bool:
    """Whether a row's (run, benchmark) is still configured: the one test used by admission, dispatch,
    pinning, idleness and range-finished. Rows that are not wanted are left as they are (status lists them)."""
    spec = runs.get(run)
    return spec is not None and benchmark in benchmarks and spec.runs_benchmark(benchmark)


# ---- retries -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    backoff_seconds: float = 30.0
    backoff_max_seconds: float = 3600.0
    tempfail_seconds: float = 7200.0  # exit 75 has its own budget: this long of nothing but "retry later"

    @classmethod
    def from_executor(cls, ex) -> "RetryPolicy":
        """From the config's `executor:` section (ExecutorConfig)."""
        return cls(ex.max_attempts, ex.backoff_seconds, ex.backoff_max_seconds, ex.tempfail_minutes * 60)

    def delay(self, failures: int) -> float:
        """Exponential backoff after the n-th failure in a row (n >= 1)."""
        return min(self.backoff_max_seconds, self.backoff_seconds * 2 ** max(0, failures - 1))

    def tempfail_delay(self, since: float, now: float) -> float:
        """Wait after an exit 75: as long as the stage has been asking to wait already (so the waits
        double), at least backoff_seconds, at most backoff_max_seconds."""
        return min(self.backoff_max_seconds, max(self.backoff_seconds, now - since))


def is_final(state: str, next_retry_at: Optional[float] = None) -> bool:
    """Nothing more will happen to a row in this state (a failed row is final once it has no retry)."""
    return state in (L.RECORDED, L.VANISHED, L.SKIPPED, L.INVALIDATED) or (state == L.FAILED and next_retry_at is None)


def job_final(job: L.Job) -> bool:
    return is_final(job.state, job.next_retry_at)


# ---- which benchmarks can run now -----------------------------------------------------------------
def hold_reason(name: str, missing: Optional[str], problem: Optional[str], stale: dict[str, int],
                changes: dict[str, list[str]], config: str = "<cfg>") -> Optional[str]:
    """Why benchmark `name` must not start anything now, or None. `missing`: its dataset is not there (it runs
    once it appears); `problem`: its data cannot be scored as configured; `stale`: older fingerprint -> rows whose
    outputs were made with other settings, `changes` what differs for each (running it now would put two
    settings on one curve, so the operator chooses)."""
    if missing:
        return f"dataset {missing} does not exist (looked for again at every rescan)"
    if problem:
        return problem
    if stale:
        n = sum(stale.values())
        what = "; ".join(dict.fromkeys(c for fp in stale for c in changes.get(fp, ["settings unknown"])))
        return (f"settings changed since {n} result(s) were made ({what}): `tools/evaluator.py rerun --config {config} "
                f"--benchmark {name}` re-evaluates them with the new settings, `tools/evaluator.py invalidate --config "
                f"{config} --benchmark {name}` withdraws them, or give the benchmark a new name for a new curve")
    return None


# ---- small action values ------------------------------------------------------------------------
@dataclass(frozen=True)
class Move:
    """Move one row to `to` (None: only set fields), with a note for the events table and the log."""

    key: L.JobKey
    to: Optional[str]
    note: str
    fields: dict = field(default_factory=dict)
    level: str = "info"  # how loudly the loop logs it
    discard_snapshot: bool = False  # the checkpoint changed under the stage: pin it again


@dataclass(frozen=True)
class NewRow:
    key: L.JobKey
    path: str
    state: str
    error: Optional[str] = None

    def as_tuple(self) -> tuple:
        return (*self.key, self.path, self.state, self.error)


# ---- admission ----------------------------------------------------------------------------------
def admit(c: Checkpoint, have: set, spec: RunSpec, benchmarks: Iterable[str], selection: Selection) -> list[NewRow]:
    """Rows for a checkpoint the scan reported: new (iteration, benchmark) pairs only.

    A complete checkpoint gives pending rows (skipped outside begin/end/interval); one whose final marker
    is there but whose content is invalid gives failed rows with the reason, so status shows it and
    nobody rechecks it every second."""
    if not (c.complete or c.invalid):
        return []
    if not selection.selects(c.iteration):
        state, error = L.SKIPPED, None
    elif c.invalid:
        state, error = L.FAILED, f"checkpoint invalid: {c.invalid}"
    else:
        state, error = L.PENDING, None
    return [NewRow(L.JobKey(c.run, c.iteration, name), c.path, state, error)
            for name in benchmarks if name not in have and spec.runs_benchmark(name)]


# ---- reconciliation with what is on disk ------------------------------------------------------------
def needs_checkpoint(job: L.Job) -> bool:
    """Rows whose next step reads the checkpoint (so its deletion makes them vanish)."""
    return job.state in (L.PENDING, L.SKIPPED) or (
        job.state == L.FAILED and job.resume_state == L.PENDING and job.next_retry_at is not None)


def reconcile(job: L.Job, present: Optional[Checkpoint], protected: bool, missing_for: Optional[float],
              grace: float, selected: bool) -> Optional[Move]:
    """Follow the selection (it may change between restarts) and notice deleted checkpoints.

    `missing_for`: for how long consecutive scans of an available run folder have not seen the
    checkpoint (None = seen in this scan). A checkpoint is vanished only after `grace` of that."""
    if present is None:
        if protected or not needs_checkpoint(job):
            return None
        if missing_for is None or missing_for < grace:
            return None
        why = f"checkpoint deleted before evaluation (absent from every scan for {missing_for:.0f}s)"
        # a checkpoint outside the selection (rotated away as a trainer does) is no loss worth a warning
        return Move(job.key, L.VANISHED, why, {"next_retry_at": None, "last_error": why},
                    level="info" if job.state == L.SKIPPED else "warning")
    if job.state == L.VANISHED:  # gone before it was evaluated, and complete on disk again: evaluate it now
        if not (present.complete and selected):
            return None
        return Move(job.key, L.PENDING, "the checkpoint is back",
                    {"path": present.path, "last_error": None, "next_retry_at": None})
    moved = {"path": present.path} if present.path != job.path and job.state in (L.PENDING, L.SKIPPED,
                                                                                   L.FAILED) else {}
    if job.state == L.SKIPPED and selected:
        return Move(job.key, L.PENDING, "now selected", moved)
    if not selected and (job.state == L.PENDING or (job.state == L.FAILED and job.next_retry_at is not None)):
        # a failed attempt waiting for its retry is not evaluated outside the selection either
        return Move(job.key, L.SKIPPED, "outside begin/end/interval", {"next_retry_at": None, **moved})
    if moved:
        return Move(job.key, None, "the checkpoint's folder moved", moved)
    return None


# ---- what a stage's end means ------------------------------------------------------------------------
@dataclass(frozen=True)
class StageEnd:
    """What the loop observed about a stage that ended."""

    stage: str
    returncode: int
    seconds: float
    timed_out: bool = False
    reason: str = ""  # the executor's words
    done_problem: Optional[str] = None  # what is wrong with the done-file (None = valid)
    changed: Optional[str] = None  # what changed in the checkpoint while the stage read it (None = nothing)
    checkpoint_gone: bool = False  # the original is deleted and no snapshot protects it
    timeout_minutes: float = 0.0
    log_tail: str = ""
    # a cause outside the job, in words, that explains its failure: cache_dir's disk full (heartbeat.disk_full's
    # words), or for a start, a Slurm controller that could not be reached (start_failed)
    outside_cause: Optional[str] = None


def _describe_exit(end: StageEnd) -> str:
    if end.timed_out:
        text = f"timed out after {end.timeout_minutes:g} min ({end.reason or 'process group killed'})"
    elif end.returncode == EXIT_TEMPFAIL:
        text = "exit 75: the stage asked to be retried later"
    elif end.returncode == EXIT_BAD_SPEC:
        text = "exit 2: bad job spec or data (not retried)"
    elif end.returncode > 0:
        text = f"exit {end.returncode}"
    elif end.returncode < 0:
        text = f"killed by {_signal_name(-end.returncode)}"
    else:
        text = f"exit 0 but {end.done_problem}"
    if end.reason and not end.timed_out:
        text += f" ({end.reason})"
    return text


def checkpoint_changed(job: L.Job, stage: str, change: str) -> Move:
    """The stage's result describes other bytes than the checkpoint found complete: discarded, the snapshot too,
    and inference runs again (not an attempt)."""
    why = f"{stage}: the checkpoint changed while the stage read it ({change}): result discarded"
    return Move(job.key, L.PENDING, why, {"pid": None, "pid_start": None, "last_error": why, "token": None},
                level="warning", discard_snapshot=True)


def siblings_after_change(jobs: list[L.Job], changed: tuple) -> tuple[list[Move], list[L.Job], list[L.Job]]:
    """The other benchmarks of an iteration whose checkpoint changed under one of them (`changed`, its key), so
    that all of the iteration's results describe one save: (moves back to pending for those no sink has seen, in
    flight or not (the loop stops the running ones first); recorded ones, for a rerun as a new revision; ones
    being recorded now, which can only be named)."""
    why = (f"another benchmark of this iteration ({changed[2]}) found the checkpoint changed: its result here may "
           f"describe the earlier save; inference again")
    moves, rerun, recording = [], [], []
    for job in jobs:
        if job.key == tuple(changed) or (job.run, job.iteration) != tuple(changed[:2]):
            continue
        if job.state in (L.INFERRING, L.INFERRED, L.SCORING):
            moves.append(Move(job.key, L.PENDING, why, {"pid": None, "pid_start": None, "token": None,
                                                        "last_error": why}, level="warning"))
        elif job.state == L.RECORDED:
            rerun.append(job)
        elif job.state == L.SCORED:
            recording.append(job)
    return moves, rerun, recording


def stage_outcome(job: L.Job, end: StageEnd, policy: RetryPolicy, now: float) -> Move:
    """Done / retry at T / failed for good / vanished / discarded, for a stage that ended.

    - 0 with a valid done-file: done (attempts reset).
    - the checkpoint changed under the stage: the result is discarded and inference runs again (not an attempt).
    - 2: the stage says its spec or data is wrong: failed for good at once, with its message.
    - 75: retried with backoff on its own time budget (policy.tempfail_seconds), not counted as an attempt.
    - any failure with a cause outside the job (`outside_cause`: cache_dir's disk full, so the outputs had no
      room; a Slurm controller that could not be reached): the same as 75.
    - anything else (crash, timeout, exit 0 without a valid done-file): an attempt; up to max_attempts.
    - an inference that failed because its checkpoint was deleted: vanished (retrying cannot help)."""
    ready, _, done = STAGE_STATES[end.stage]
    clear = {"pid": None, "pid_start": None}
    ok = end.returncode == 0 and not end.timed_out and end.done_problem is None
    if end.changed:
        return checkpoint_changed(job, end.stage, end.changed)
    if ok:
        return Move(job.key, done, f"{end.stage} done in {end.seconds:.1f}s",
                    {**clear, "attempts": 0, "last_error": None, "next_retry_at": None, "tempfail_since": None})
    problem = _describe_exit(end)
    full = end.outside_cause and not end.timed_out  # e.g. its outputs had no room (any exit, 2 too): not its fault
    if full:
        problem = f"{problem} while {end.outside_cause}"
    error = f"{end.stage}: {problem}\n{end.log_tail}".rstrip()
    failed = {**clear, "resume_state": ready, "last_error": error, "token": None}
    if end.stage == INFERENCE and end.checkpoint_gone:
        why = f"checkpoint deleted before its inference finished ({problem})"
        return Move(job.key, L.VANISHED, f"inference: {problem}; checkpoint gone",
                    {**clear, "next_retry_at": None, "last_error": why}, level="warning")
    if full or (end.returncode == EXIT_TEMPFAIL and not end.timed_out):
        return _later(job, end.stage, problem, failed, policy, now)
    if end.returncode == EXIT_BAD_SPEC and not end.timed_out:
        return Move(job.key, L.FAILED, f"{end.stage}: {problem}; failed for good",
                    {**failed, "attempts": job.attempts + 1, "next_retry_at": None}, level="error")
    attempts = job.attempts + 1
    if attempts >= policy.max_attempts:
        return Move(job.key, L.FAILED, f"{end.stage}: {problem}; failed for good after {attempts} attempt(s)",
                    {**failed, "attempts": attempts, "next_retry_at": None, "tempfail_since": None}, level="error")
    delay = policy.delay(attempts)
    return Move(job.key, L.FAILED, f"{end.stage}: {problem}; retry {attempts + 1}/{policy.max_attempts} in {delay:g}s",
                {**failed, "attempts": attempts, "next_retry_at": now + delay, "tempfail_since": None},
                level="warning")


def _later(job: L.Job, stage: str, problem: str, failed: dict, policy: RetryPolicy, now: float) -> Move:
    """Retried with backoff on the tempfail budget (executor.tempfail_minutes), not counted as an attempt."""
    since = job.tempfail_since if job.tempfail_since is not None else now
    if now - since >= policy.tempfail_seconds:
        return Move(job.key, L.FAILED, f"{stage}: {problem} for {(now - since) / 60:.0f} min "
                    f"(executor.tempfail_minutes); failed for good",
                    {**failed, "next_retry_at": None, "tempfail_since": since}, level="error")
    delay = policy.tempfail_delay(since, now)
    return Move(job.key, L.FAILED, f"{stage}: {problem}; retry in {delay:g}s (not counted as an attempt)",
                {**failed, "next_retry_at": now + delay, "tempfail_since": since}, level="warning")


def start_failed(job: L.Job, stage: str, problem: str, policy: RetryPolicy, now: float,
                 outside_cause: Optional[str] = None) -> Move:
    """A stage that could not even be started (sbatch refused it, EMFILE while preparing): an attempt like a
    crash, so a deterministic failure ends after max_attempts instead of looping. When a cause outside the job
    explains it (`outside_cause`: a full cache_dir disk, an unreachable Slurm controller) it waits on the
    tempfail budget instead, like an exit 75: an outage of a few minutes must not fail every pending job."""
    end = StageEnd(stage=stage, returncode=1, seconds=0.0, reason=f"could not start: {problem}",
                   outside_cause=outside_cause)
    return stage_outcome(job, end, policy, now)


def due_retry(job: L.Job, now: float) -> Optional[Move]:
    if job.state == L.FAILED and job.next_retry_at is not None and job.next_retry_at <= now:
        return Move(job.key, job.resume_state or L.PENDING, f"retry {job.attempts + 1}", {"next_retry_at": None})
    return None


# ---- what runs next ------------------------------------------------------------------------------
def choose(ready: list[L.Job], free: int, is_wanted, after: Optional[str] = None) -> list[L.Job]:
    """Up to `free` jobs from `ready` (already in dispatch order), served fairly across runs: one job of
    each run in turn, so no run waits behind another's backlog. The turn goes on across passes: `after` is the
    run served last, and the runs (in name order) are served from the one after it."""
    if free <= 0:
        return []
    queues: dict[str, list[L.Job]] = {}
    for job in ready:
        if is_wanted(job):
            queues.setdefault(job.run, []).append(job)
    order = sorted(queues)
    if after is not None:
        order = [r for r in order if r > after] + [r for r in order if r <= after]
    chosen: list[L.Job] = []
    while len(chosen) < free and any(queues.values()):
        for run in order:
            if queues[run] and len(chosen) < free:
                chosen.append(queues[run].pop(0))
    return chosen


# ---- recording ----------------------------------------------------------------------------------
def delivery_failed(failures: int, max_failures: int, policy: RetryPolicy, now: float) -> Optional[float]:
    """When to offer a result to a sink again after its n-th failure there; None = quarantine it (a
    poison result must not hold the results behind it)."""
    if failures >= max_failures:
        return None
    return now + policy.delay(failures)


# ---- when is the daemon done ------------------------------------------------------------------------
@dataclass(frozen=True)
class Backlog:
    """Counts the loop needs to decide whether --once may end."""

    runnable: int = 0  # wanted rows pending/inferred/running, or failed with a retry to come
    undelivered: int = 0  # scored rows with a sink still to accept them (not quarantined, not given up)


def idle(b: Backlog) -> bool:
    """The loop asks only once nothing is in flight (stages, pins, settling checkpoints, sink calls)."""
    return b.runnable == 0 and b.undelivered == 0


def range_finished(expected: Optional[range], runs: list[RunSpec], benchmarks: list[str],
                   rows: dict[str, dict[tuple, bool]], newest: dict[str, int],
                   on_disk: Optional[dict[str, set]] = None) -> bool:
    """Every iteration up to --end-iteration done, for every run and wanted benchmark.

    rows: run -> {(iteration, benchmark): final?} for iterations in the selection's range; newest: run ->
    its newest iteration with a row; on_disk: run -> the iterations its last scan listed. A (iteration, benchmark)
    with no row while the run has a later iteration is not waited for when the checkpoint is not on disk (never
    saved, or rotated away before it was seen or before the benchmark was added); on disk, its row is to come.
    Only the iterations with a row or on disk are looked at, never the whole range (it may be astronomically long)."""
    if expected is None:
        return False
    for run in runs:
        names = [b for b in benchmarks if run.runs_benchmark(b)]
        if not names or not expected:
            continue
        have = rows.get(run.name, {})
        there = (on_disk or {}).get(run.name, set())
        top = newest.get(run.name)
        if top is None or expected[-1] > top:
            return False  # an expected iteration after the newest row: not saved yet
        for it in {i for i, _ in have} | set(there) | {top}:
            if it not in expected:
                continue
            for name in names:
                final = have.get((it, name))
                if final is None and it not in there and top > it:
                    continue
                if not final:
                    return False
    return True


def rescan_due(last_scan: float, poll_seconds: float, now_monotonic: float) -> bool:
    """Full rescans run on the monotonic clock: a wall-clock step (NTP, a VM resumed) never stops them."""
    return now_monotonic - last_scan >= poll_seconds


def vanish_grace(configured: Optional[float], poll_seconds: float) -> float:
    """Default: three poll intervals (at least 30 s), so a mount that drops for a moment loses nothing."""
    return configured if configured is not None else max(30.0, 3 * poll_seconds)


def _signal_name(num: int) -> str:
    import signal

    try:
        return signal.Signals(num).name
    except ValueError:  # real-time signals have no name
        return f"signal {num}"
