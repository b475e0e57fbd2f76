"""The daemon: observe -> decide (policy.py) -> apply.

`build.build(cfg, ...)` is the composition root: it checks the stage venvs, takes the cache_dir lock and
makes the ledger, executor, sinks (outbox), snapshot keeper and watcher, and hands them to `Daemon`. One
pass of the loop (`Daemon.step`) reads top to bottom:

    apply stage exits -> rescan runs that changed -> pin the next checkpoints -> release due retries
    -> start stages on free slots -> carry scored results to the sinks -> heartbeat

Between passes the loop sleeps until a watcher event, a child exit, a signal, or the next deadline
(rescan, settle, retry, delivery), all on the monotonic clock except ledger times, which must survive
restarts. Everything that could fail for one job fails that job; nothing one job does ends the daemon.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import shutil
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from evaluator.common.atomic import read_json
from evaluator.common.checks import iteration_number
from evaluator.common.contracts import (
    DONE_FILE, EVALUATION, INFERENCE, JOB_FILE, LOG_FILE, METRICS_LOST, OUTPUT_FILES, StageJob, read_metrics,
    result_dir, scratch_dir)
from evaluator.common.errors import EvaluatorError, UnavailableError
from evaluator.daemon import fingerprint as F
from evaluator.daemon import heartbeat
from evaluator.daemon.hints import diagnose
from evaluator.daemon.insight import Insight
from evaluator.daemon import ledger as L
from evaluator.daemon import policy as P
from evaluator.daemon.checkpoints import Checkpoint, CheckpointLayout, Selection
from evaluator.daemon.config import AutoEvalConfig, dataset_problem
from evaluator.daemon.executors import Exit, Intent, Launch, Started, SubmitError
from evaluator.daemon.outbox import Outbox
from evaluator.daemon.policy import RunSpec
from evaluator.daemon.snapshots import SnapshotKeeper
from evaluator.daemon.stages import BENCHMARK_TYPES
from evaluator.daemon.watch import CheckpointWatcher
from evaluator.stages.inference import backends  # the registry: standard library only
from recorder.sinks import ResultRecord

log = logging.getLogger("evaluator")
HEARTBEAT_SECONDS = 60.0  # the status line in the log
STATE_SECONDS = heartbeat.BEAT_EVERY_S  # <cache_dir>/daemon.json: liveness, held benchmarks, hints (for `status`)
RECHECK_SECONDS = 1.0  # first re-look at an incomplete checkpoint of a marker-less layout; doubles up to poll_seconds
DATA_CHECK_SECONDS = 60.0  # how often every dataset's files are stat'ed for changes (held ones: every rescan)
MIN_SCAN_GAP = 0.005  # a burst of file events costs one rescan, not one per event
MAX_IDLE_SLEEP = 5.0
ADMIT_CHUNK = 2000  # rows per admission transaction (the stop flag is checked between chunks)
PIN_WINDOW = 32  # checkpoints pinned ahead of dispatch, in dispatch order
LEDGER_RETRY_SECONDS = 10.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # SIGHUP: a closed terminal stops cleanly too


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
    except (OSError, ValueError) as e:
        return str(e)
    return None


def scored_metrics(path: str) -> tuple[Optional[dict], str]:
    """A scored row's metrics.json: (its contents, ""), or (None, why) when it is gone or not valid (the row is scored
    again). Raises OSError when the file is there but cannot be read now (EIO, EACCES, ESTALE): storage trouble,
    retried later, never a reason to score again (a new revision would put a second point in every sink)."""
    try:
        return read_metrics(path), ""
    except METRICS_LOST as e:
        return None, str(e)


def log_tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@dataclass(frozen=True)
class Assessment:
    """Whether a benchmark may run now (`hold` None) and the settings it would run with."""

    hold: Optional[str]
    fingerprint: Optional[str] = None  # None while its dataset is missing
    settings: Optional[dict] = None
    stale_results: int = 0  # rows whose outputs were made with other settings
    changed: list = field(default_factory=list)  # what differs from those settings, e.g. "seed: 0 -> 7"


def missing_dataset(bench) -> Optional[str]:
    """The dataset path a benchmark names that is not there (a share not mounted yet), or None."""
    return bench.dataset if bench.dataset and not os.path.exists(bench.dataset) else None


def assess(bench, default_seed: int, ledger: Optional[L.Ledger], settings: Optional[dict] = None,
           config: str = "<cfg>", runs: Optional[list] = None) -> Assessment:
    """The one look at a benchmark's dataset, data and settings against the ledger, for the daemon and --dry-run
    alike (policy.hold_reason decides). `settings`: already computed (the dataset digest is read once). `runs`: the
    configured runs that evaluate it; results of other runs (no longer configured) never hold it, since they can
    neither run again nor join a curve it records now."""
    missing = missing_dataset(bench)
    if missing:
        return Assessment(P.hold_reason(bench.name, missing, None, {}, {}))
    dataset = bench.dataset
    problem = dataset_problem(bench)
    if settings is None:
        seed = bench.seed if bench.seed is not None else default_seed
        try:
            digest = F.dataset_digest(dataset)
        except OSError as e:  # a file that cannot be read now (EIO, permissions): held, looked at again each rescan
            return Assessment(P.hold_reason(bench.name, None, f"dataset {dataset} cannot be read ({e}); looked at "
                                                              f"again at every rescan", {}, {}))
        settings = F.settings(bench, seed, digest)
    fp = F.fingerprint(settings)
    stale = ledger.stale_outputs(bench.name, fp, runs) if ledger is not None else {}
    changes = {old: F.changes(ledger.settings_of(old, bench.name) or {}, settings) for old in stale}
    changed = list(dict.fromkeys(c for cs in changes.values() for c in cs))
    return Assessment(P.hold_reason(bench.name, None, problem, stale, changes, config), fp, settings,
                      sum(stale.values()), changed)


@dataclass
class RunWatch:
    """What the loop remembers of one run between scans (all on the monotonic clock)."""

    known: dict = field(default_factory=dict)  # iteration -> benchmarks with a ledger row
    reconciled: bool = False  # every row checked against disk and selection once (at the first scan)
    device: Optional[int] = None  # st_dev of the run folder at the last good scan
    unavailable: Optional[str] = None  # why the folder cannot be trusted now
    missing_since: dict = field(default_factory=dict)  # iteration -> when scans stopped seeing it
    settle_at: Optional[float] = None  # when a settling checkpoint needs another look
    recheck_at: Optional[float] = None
    recheck_gap: float = RECHECK_SECONDS
    on_disk: set = field(default_factory=set)  # the iterations the last scan listed
    last_scan: float = float("-inf")
    hinted: bool = False  # set-up hints looked for once (a run whose checkpoints are all known needs no more)
    had_incomplete: bool = False  # the last scan found a checkpoint not complete yet (hints.diagnose names it)
    unfinished: dict = field(default_factory=dict)  # iteration -> why the last scan found it not complete (selected)


class Daemon:
    def __init__(self, cfg: AutoEvalConfig, selection: Selection, runs: list[RunSpec],
                 layouts: dict[str, CheckpointLayout], ledger: L.Ledger, executor, sinks: list,
                 keeper: SnapshotKeeper, watcher: Optional[CheckpointWatcher], pythons: dict[str, str],
                 timeouts: dict[str, float], once: bool = False, alert_channels: Optional[list] = None):
        self.cfg = cfg
        self.selection = selection
        self.once = once
        self.runs = {r.name: r for r in runs}
        self.layouts = layouts
        self.ledger = ledger
        self.executor = executor
        self.keeper = keeper
        self.watcher = watcher
        self.pythons = pythons
        self.timeouts = timeouts
        self.benchmarks = {b.name: b for b in cfg.benchmarks}
        self.fingerprints: dict[str, str] = {}  # benchmark -> its settings fingerprint (once its data is there)
        self.settings: dict[str, dict] = {}  # benchmark -> the settings behind its fingerprint
        self.data_stamp: dict[str, Optional[str]] = {}  # benchmark -> its dataset's stamp when fingerprinted
        self.seen_stamp: dict[str, Optional[str]] = {}  # benchmark -> its dataset's stamp at the last look
        self.checked_once = False  # datasets there at the start are taken as they are; later ones must settle
        self.last_data_check = float("-inf")
        self.stop_reason = "crashed (the log says why)"  # what daemon.json says once it stops; set on clean ends
        self.held: dict[str, str] = {}  # benchmark -> why nothing of it may start now (policy.hold_reason)
        self.last_served: dict[str, str] = {}  # stage -> the run whose job started last (choose's turn)
        # what dispatch said of cache_dir's disk when it was full (it starts nothing until there is room), else None
        self.disk_was_full: Optional[str] = None
        self.settings_changed: dict[str, dict] = {}  # benchmark -> {results, changes} while it is held for it
        self.hints: dict[str, list] = {}  # run -> hints.Hint: why its folder gives nothing (or less than expected)
        self.started_wall = time.time()
        self.last_state_write = float("-inf")
        self.policy = P.RetryPolicy.from_executor(cfg.executor)
        self.grace = P.vanish_grace(cfg.watch.vanish_grace_seconds, cfg.watch.poll_seconds)
        self.state = {r.name: RunWatch() for r in runs}
        self.dirty: set[str] = set(self.runs)  # runs to rescan (watcher events, rechecks, the periodic rescan)
        self.unapplied: list[Exit] = []  # stage exits observed but not yet in the ledger (it was unwritable)
        self.stopping = False
        self.stop_signal = 0  # the signal that stopped it (--once and --end-iteration then exit 128 + it)
        self.changed = True  # a transition happened since range_finished was last asked
        self.last_heartbeat = float("-inf")
        self.last_range_check = float("-inf")
        self.watching = False  # the watcher thread runs (stopped at shutdown only then)
        self.last_rescan = time.monotonic()
        self.ledger_error_logged = float("-inf")
        self.paused: Optional[str] = None  # why the ledger cannot be written now (daemon.json says so to status)
        self.lock = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.keeper.on_done = self._poke
        if self.watcher is not None:
            self.watcher.on_change = self.notify
        self.outbox = Outbox(sinks, cfg.recorder.timeout_seconds, self._poke)
        # after a result is scored (insight.py): its comparison, the run's best checkpoints, the alert rules and
        # their channels (a second outbox)
        self.insight = Insight(cfg, [r.name for r in runs], self.benchmarks, ledger, keeper, alert_channels or [],
                               self.outdir, self.release_if_finished, self._poke)

    # ---- wiring --------------------------------------------------------------------------------
    def notify(self, run: Optional[str] = None) -> None:
        """Called from watcher threads: mark runs for rescanning and wake the loop (set.add is atomic)."""
        for name in ([run] if run else list(self.runs)):
            self.dirty.add(name)
        self._poke()

    def _poke(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (the loop is due to wake anyway) or closed (stopping)

    def _sleep(self, timeout: float) -> None:
        select.select([self._wake_r, *self.executor.wake_fds()], [], [], max(0.0, timeout))
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _on_stop_signal(self, signum, _frame):
        self.stopping = True  # only a flag: the wakeup fd has already woken the loop
        self.stop_signal = self.stop_signal or signum

    # ---- the loop --------------------------------------------------------------------------------
    def run(self) -> int:
        """Run until stopped (signal, --once idle, --end-iteration done); returns the exit code."""
        previous = {s: signal.getsignal(s) for s in STOP_SIGNALS + (signal.SIGCHLD,)}
        previous_fd = signal.set_wakeup_fd(self._wake_w)
        for s in STOP_SIGNALS:
            signal.signal(s, self._on_stop_signal)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler must exist for the wakeup byte
        exit_code, finished = 0, False
        log.info("daemon started: %d run(s), %d benchmark(s), %s, %s + rescan every %ss",
                 len(self.runs), len(self.benchmarks), _describe(self.executor),
                 "inotify" if self.watcher else "polling", self.cfg.watch.poll_seconds)
        try:
            if self.watcher:
                self.watcher.start()
                self.watching = True
            # recovery and the benchmark check write the ledger: an unwritable one (disk full) pauses the start
            # until it can be written, never skips them (a recovered row left `inferring` would wait forever)
            while not self.guarded(self.start_up) and not self.stopping:
                self._sleep(LEDGER_RETRY_SECONDS)
            self.write_state()
            if self.held and len(self.held) == len(self.benchmarks) and not self.stopping:
                missing = any(missing_dataset(self.benchmarks[b]) for b in self.held)
                error = (UnavailableError if missing else EvaluatorError)(
                    "no benchmark can run: " + "; ".join(f"{b}: {why}" for b, why in self.held.items()))
                self.stop_reason = f"exited {error.exit_code}: {error}"
                raise error
            while not self.stopping:
                if not self.guarded(self.step):
                    self._sleep(LEDGER_RETRY_SECONDS)
                    continue
                if self.once and self.idle():
                    exit_code, finished = self.once_outcome(), True
                    break
                if self.range_finished():
                    log.info("every iteration up to --end-iteration %s is done", self.selection.end)
                    exit_code = self.once_outcome("--end-iteration", self.selection.selects)  # 1: one failed
                    finished = True
                    break
                self._sleep(self.sleep_seconds())
            if self.stopping:
                log.info("stop signal received: stopping (running stages are stopped and go back to the queue)")
                if (self.once or self.selection.end is not None) and not finished:  # before its work was done
                    exit_code = 128 + int(self.stop_signal or signal.SIGTERM)
            self.stop_reason = "stopped cleanly"
        finally:
            self.shutdown()
            for s, h in previous.items():
                signal.signal(s, h)
            signal.set_wakeup_fd(previous_fd)
        return exit_code

    def start_up(self) -> None:
        self.recover()
        self.check_benchmarks()
        for sink in self.outbox.names:  # a sink added to the config gets new results only: say so
            missing = self.ledger.recorded_without(sink)
            if missing:
                log.warning("sink %s: %d result(s) recorded before it was configured are not in it; the daemon "
                            "records only new results there%s", sink, missing,
                            " (`tools/wandb_writer.py` with a `results` source adds the missing ones)"
                            if sink == "wandb" else "")

    def guarded(self, work) -> bool:
        """Run one pass; an unwritable ledger (disk full, read-only) pauses the daemon instead of
        ending it: the ledger stays intact, running stages go on, and the pass is retried."""
        try:
            work()
        except L.LedgerUnavailable as e:
            now = time.monotonic()
            if now - self.ledger_error_logged >= 60:
                log.error("%s; paused (nothing is lost; retrying every %gs until it can be written)",
                          e, LEDGER_RETRY_SECONDS)
                self.ledger_error_logged = now
            self.paused = str(e)
            if now - self.last_state_write >= STATE_SECONDS:
                self.write_state()  # the beat goes on while paused, where daemon.json can still be written
            return False
        if self.paused is not None:
            log.info("the ledger can be written again: resumed")
            self.paused = None
            self.last_state_write = float("-inf")  # status should see it now
        return True

    def step(self) -> None:
        self.apply_exits(self.unapplied + self.executor.poll())
        self.insight.collect_comparisons()
        self.scan_changed_runs()
        self.pin_ahead()
        self.release_retries()
        self.dispatch()
        self.deliver()
        self.insight.deliver_alerts()
        self.heartbeat()

    # ---- observe: stage exits ------------------------------------------------------------------------
    def apply_exits(self, exits: list[Exit]) -> None:
        self.unapplied = list(exits)
        while self.unapplied:
            ex = self.unapplied[0]
            try:
                self.finish_stage(ex)
            except L.LedgerUnavailable:
                raise  # kept in self.unapplied: applied when the ledger can be written again
            except Exception:  # a bug finishing one job must not end the daemon
                log.exception("%s %s: finishing the stage failed", ex.stage, L.JobKey(*ex.key))
            self.unapplied.pop(0)

    def finish_stage(self, ex: Exit) -> None:
        key = L.JobKey(*ex.key)
        job = self.ledger.get(key)
        running = P.STAGE_STATES[ex.stage][1]
        if job is None or job.state != running or (job.token and job.token != ex.token):
            log.warning("%s %s: ended (exit %s) but the ledger has it %s; ignored", ex.stage, key, ex.returncode,
                        job.state if job else "missing")
            if ex.then_started is not None:
                self.executor.cancel(key)
            return
        out = self.outdir(job)
        ok = ex.returncode == 0 and not ex.timed_out
        done_problem = stage_done(ex.stage, out) if ok else None
        changed = None
        if ok and done_problem is None and ex.stage == INFERENCE:
            changed = self.keeper.verify(job.run, job.iteration)
        gone = (ex.stage == INFERENCE and not ok and not self.keeper.protects(job.run, job.iteration)
                and not os.path.exists(job.path))
        full = None if ok and done_problem is None else heartbeat.disk_full(self.cfg.cache_dir)
        end = P.StageEnd(stage=ex.stage, returncode=ex.returncode, seconds=ex.seconds, timed_out=ex.timed_out,
                         reason=ex.reason, done_problem=done_problem, changed=changed, checkpoint_gone=gone,
                         outside_cause=full,
                         timeout_minutes=self.timeouts[ex.stage] / 60,
                         log_tail="" if ok and done_problem is None else log_tail(os.path.join(out, LOG_FILE[ex.stage])))
        if full:  # what the failed attempt wrote may be what filled the disk: room first (the ledger needs it too)
            try:
                clear_outputs(ex.stage, out)
            except OSError as e:
                log.warning("%s %s: could not delete the failed attempt's outputs: %s", ex.stage, key, e)
            if ex.stage == INFERENCE:  # its scratch (a converted model) is made again by the inference
                self.drop_scratch(key)
        move = P.stage_outcome(job, end, self.policy, time.time())
        self.apply(move)
        if ex.then_started is not None:
            if move.to == L.INFERRED:  # the executor chained the evaluation: it runs already
                self.apply(P.Move(key, L.SCORING, f"evaluation already submitted ({ex.then_started.where})",
                                  {"eval_job": ex.then_started.handle, "started_at": time.time()}))
            else:
                self.executor.cancel(key)

    # ---- observe: the run folders -------------------------------------------------------------------------
    def scan_changed_runs(self) -> None:
        now = time.monotonic()
        if P.rescan_due(self.last_rescan, self.cfg.watch.poll_seconds, now):
            self.last_rescan = now
            self.dirty.update(self.runs)
            self.release_finished_snapshots(held_count_as_done=False)
            if now - self.last_data_check >= DATA_CHECK_SECONDS:
                self.check_benchmarks()  # every dataset's stamp: one edited under a running daemon is seen
            elif self.held:
                self.check_benchmarks(list(self.held))
        for name, st in self.state.items():
            if (st.settle_at is not None and now >= st.settle_at) or (st.recheck_at is not None and now >= st.recheck_at):
                self.dirty.add(name)
        for name in sorted(self.dirty):
            if self.stopping:
                return
            st = self.state[name]
            if now - st.last_scan < MIN_SCAN_GAP:
                continue  # a burst of events: scanned a moment ago; sleep_seconds wakes us for it
            self.dirty.discard(name)
            st.last_scan = now
            try:
                self.scan(name)
            except L.LedgerUnavailable:
                raise
            except Exception:  # one run's scan must not end the daemon (or starve the other runs)
                log.exception("run %s: scanning failed; will rescan", name)
        if self.watcher:
            self.watcher.ensure_watches()

    def folder_problem(self, run: str) -> Optional[str]:
        """Why a run folder cannot be trusted now: missing, unreadable, empty, or another filesystem than
        at the last good scan (an NFS mount that dropped leaves an empty mount point behind)."""
        root = self.layouts[run].root
        st = self.state[run]
        try:
            dev = os.stat(root).st_dev
            with os.scandir(root) as it:
                empty = next(it, None) is None
        except FileNotFoundError:
            return "does not exist"
        except NotADirectoryError:
            return "is not a folder"
        except OSError as e:
            return f"cannot be read ({e.strerror or e})"
        if st.device is not None and dev != st.device:
            return "is on another filesystem than before (a mount that dropped?)"
        if empty:
            return "is empty"
        st.device = dev
        return None

    def scan(self, run: str) -> None:
        st = self.state[run]
        st.settle_at = st.recheck_at = None
        layout = self.layouts[run]
        problem = self.folder_problem(run)
        if problem:
            self.set_hints(run, diagnose(layout.root, layout.name, [], self.selection, self.cfg.watch.pattern))
            if st.unavailable != problem:
                log.warning("run %s: %s is not available (it %s); nothing there counts as deleted until it is back",
                            run, layout.root, problem)
            st.unavailable = problem
            st.missing_since.clear()  # absences only count across scans of a folder we can trust
            return
        if st.unavailable:
            log.info("run %s: %s is available again", run, layout.root)
            st.unavailable = None
        if not st.reconciled:
            st.known = self.ledger.known(run)
        wanted = self.wanted_names(run)
        # a vanished checkpoint is judged again like a new one: it may come back (restored, or saved anew)
        vanished = {j.iteration for j in self.ledger.jobs([L.VANISHED], run=run)}
        full = frozenset(it for it, names in st.known.items() if wanted <= names and it not in vanished)
        try:
            checkpoints = layout.scan(full)
        except OSError as e:  # flaky storage (EIO, ESTALE, EACCES): try again at the next rescan
            log.warning("run %s: scanning %s failed (%s); will rescan", run, layout.root, e)
            return
        present: dict[int, Checkpoint] = {}
        for c in checkpoints:  # one per iteration: the layout reports a second folder naming it as ignored
            if c.iteration not in present or (c.complete and not present[c.iteration].complete):
                present[c.iteration] = c
        self.admit(run, [c for it, c in present.items() if it not in full])
        incomplete = [c for c in checkpoints if not c.complete and not c.invalid
                      and c.iteration not in full]
        # a run with every checkpoint known and admitted needs no hint; one with a selected checkpoint waited on (or
        # that had one at the last scan, to clear its hint) is diagnosed again
        waited = any(self.selection.selects(c.iteration) for c in incomplete)
        if not full or not st.hinted or waited or st.had_incomplete:
            self.set_hints(run, diagnose(layout.root, layout.name, checkpoints, self.selection, self.cfg.watch.pattern))
        st.had_incomplete = waited
        for it in sorted(set(st.unfinished) - set(present)):
            # deleted before it ever counted as complete (a trainer's save_total_limit rotating faster than the settle
            # wait, or a save given up): no row, so nothing else would ever say it existed
            log.warning("run %s: iteration %d was deleted before it was complete (last seen: %s): not evaluated%s",
                        run, it, st.unfinished[it], "; if saves come faster than watch.settle_seconds, lower it"
                        if st.unfinished[it] == "settling" else "")
        st.unfinished = {c.iteration: c.reason for c in incomplete if self.selection.selects(c.iteration)}
        now = time.monotonic()
        # a checkpoint outside the selection is never evaluated: its settling must not keep --once (or
        # evaluate_checkpoint's one-iteration run) from ending, nor wake the loop
        deadlines = [c.settle_deadline for c in checkpoints
                     if c.settle_deadline is not None and self.selection.selects(c.iteration)]
        if deadlines:
            st.settle_at = min(deadlines)
        if incomplete and layout.recheck_incomplete:
            # its completion shows inside the checkpoint dir, which is not watched: look again, less and
            # less often while nothing changes (a checkpoint that never completes must not cost a scan a second)
            st.recheck_at = now + st.recheck_gap
            st.recheck_gap = min(st.recheck_gap * 2, self.cfg.watch.poll_seconds)
        else:
            st.recheck_gap = RECHECK_SECONDS
        self.reconcile(run, present, now, vanished)

    def set_hints(self, run: str, hints: list) -> None:
        """Keep a run's hints for status and log each one once, when it first appears."""
        st = self.state[run]
        st.hinted = True
        old = {h.text for h in self.hints.get(run, [])}
        for h in hints:
            if h.text not in old:
                (log.warning if h.level == "warning" else log.info)("run %s: %s", run, h.text)
        if [h.text for h in hints] != [h.text for h in self.hints.get(run, [])]:
            self.hints[run] = hints
            self.last_state_write = float("-inf")  # status should see it now

    def wanted_names(self, run: str) -> set[str]:
        spec = self.runs[run]
        return {b for b in self.benchmarks if spec.runs_benchmark(b)}

    def startable_names(self, run: str) -> list[str]:
        """The benchmarks of `run` whose rows may start now: wanted and not held."""
        return sorted(self.wanted_names(run) - set(self.held))

    def admit(self, run: str, checkpoints) -> None:
        st = self.state[run]
        spec = self.runs[run]
        rows = []
        for c in checkpoints:
            rows += P.admit(c, st.known.get(c.iteration, set()), spec, list(self.benchmarks), self.selection)
        for i in range(0, len(rows), ADMIT_CHUNK):
            if self.stopping:
                return  # the rest is admitted by the next start's first scan
            chunk = rows[i:i + ADMIT_CHUNK]
            added = self.ledger.add_many(r.as_tuple() for r in chunk)
            for r in chunk:
                st.known.setdefault(r.key.iteration, set()).add(r.key.benchmark)
            if added:
                self.changed = True
            new = set(added)
            for r in chunk:
                if r.key in new and r.state == L.PENDING and len(chunk) <= 50:
                    log.info("checkpoint %s iteration %d complete: queued %s", run, r.key.iteration, r.key.benchmark)
                elif r.key in new and r.state == L.FAILED:
                    log.error("%s: %s", r.key, r.error)
            if len(chunk) > 50:
                log.info("run %s: admitted %d job(s) (%d new)", run, len(chunk), len(added))

    def reconcile(self, run: str, present: dict[int, Checkpoint], now: float, vanished: set = frozenset()) -> None:
        """Rows against disk: at the first scan every row (selection and paths may have changed since
        the last start), later only rows whose checkpoint is no longer listed, and `vanished` rows (their
        iterations read once by the scan) whose checkpoint is complete again."""
        st = self.state[run]
        st.on_disk = set(present)
        gone = [it for it in st.known if it not in present]
        for it in list(st.missing_since):
            if it in present:
                del st.missing_since[it]
        for it in gone:
            st.missing_since.setdefault(it, now)
        if st.reconciled:  # and the iterations with vanished rows seen complete again (scan read them once)
            iterations = gone + sorted(it for it in vanished if it in present and present[it].complete)
        else:
            iterations = list(st.known)
            st.reconciled = True
        for it in iterations:
            if self.stopping:
                return
            since = st.missing_since.get(it)
            protected = self.keeper.protects(run, it)
            for job in self.ledger.jobs(run=run, iteration=it):
                move = P.reconcile(job, present.get(it), protected, None if since is None else now - since,
                                   self.grace, self.selection.selects(it))
                if move is not None:
                    self.apply(move)
                    snap = self.ledger.snapshot(run, it) if job.state == L.VANISHED else None
                    if snap is not None and snap["state"] in (L.RELEASED, L.VANISHED):
                        self.ledger.drop_snapshot(run, it)  # pinned afresh, like a new checkpoint

    # ---- decide + apply: snapshots, retries, starts ---------------------------------------------------------
    def pin_ahead(self) -> None:
        """Pin the next PIN_WINDOW checkpoints in dispatch order; collect finished pins."""
        queued: dict[tuple, str] = {}
        for run in self.runs:
            startable = self.startable_names(run)
            if not startable:
                continue
            for job in self.ledger.jobs([L.PENDING], run=run, benchmarks=startable, newest_first=self.newest_first,
                                        limit=PIN_WINDOW * len(startable)):
                if self.may_start(job) and len(queued) < PIN_WINDOW * len(self.runs):
                    queued.setdefault((job.run, job.iteration), job.path)
        ready = [Checkpoint(run, it, path, True) for (run, it), path in queued.items()]
        before = dict(self.keeper.waiting)
        vanished = self.keeper.ensure(ready) + self.keeper.collect()
        for (run, iteration), why in self.keeper.waiting.items():
            if before.get((run, iteration)) != why:  # e.g. unreadable: say so where status shows it
                for job in self.ledger.jobs([L.PENDING], run=run, iteration=iteration):
                    self.ledger.update(job.key, last_error=f"waiting to pin the checkpoint: {why}")
        for (run, iteration) in set(before) - set(self.keeper.waiting):
            for job in self.ledger.jobs([L.PENDING], run=run, iteration=iteration):
                self.ledger.update(job.key, last_error=None)
        now = time.monotonic()
        for run, iteration, why in vanished:
            # gone while pinning is what a scan missing it would say: the same grace, and nothing while the
            # run folder cannot be trusted (a mount that dropped looks exactly like this)
            st = self.state.get(run)
            if st is None:
                continue
            since = None if st.unavailable else st.missing_since.setdefault(iteration, now)
            if since is None or now - since < self.grace:
                self.keeper.discard(run, iteration)  # pinned again at a later pass if it is back
                self.dirty.add(run)  # a rescan tells a dropped mount from a deletion
                continue
            for job in self.ledger.jobs(run=run, iteration=iteration):
                if job.state in (L.PENDING, L.SKIPPED, L.FAILED) and not P.job_final(job):
                    self.apply(P.Move(job.key, L.VANISHED, why, {"next_retry_at": None, "last_error": why},
                                      level="warning"))

    def release_retries(self) -> None:
        now = time.time()
        for job in self.ledger.due_retries(now):
            move = P.due_retry(job, now)
            if move is not None:
                self.apply(move)

    @property
    def newest_first(self) -> bool:
        return self.cfg.watch.order == "newest-first"

    def is_wanted(self, job: L.Job) -> bool:
        return P.wanted(self.runs, self.benchmarks, job.run, job.benchmark)

    def may_start(self, job: L.Job) -> bool:
        """Wanted, and its benchmark not held (dataset missing, data unscorable, settings changed)."""
        return job.benchmark not in self.held and self.is_wanted(job)

    # ---- which benchmarks can run ------------------------------------------------------------------------
    def check_benchmarks(self, names: Optional[list[str]] = None) -> None:
        """Fingerprint each benchmark whose data is there (once) and decide whether it is held: at the start
        for all, then at every rescan for the held ones (a dataset that appeared, a rerun or invalidate that
        resolved changed settings)."""
        for name in names if names is not None else list(self.benchmarks):
            bench = self.benchmarks[name]
            stamp = F.dataset_stamp(bench.dataset)
            if stamp != self.data_stamp.get(name):  # new, appeared, or edited: digest it again once it is still
                self.settings.pop(name, None)
                self.fingerprints.pop(name, None)
                settled = stamp is None or not self.checked_once or stamp == self.seen_stamp.get(name)
                self.seen_stamp[name] = stamp
                if not settled:
                    self.hold(name, f"dataset {bench.dataset} appeared or changed: waiting until it stays unchanged "
                                    f"for a rescan (a copy may be in progress)")
                    continue
                self.data_stamp[name] = stamp
            a = assess(bench, self.cfg.seed, self.ledger, self.settings.get(name), self.cfg.config_path or "<cfg>",
                       [run for run in self.runs if P.wanted(self.runs, self.benchmarks, run, name)])
            if a.fingerprint and name not in self.fingerprints:
                self.adopt(name, a)
            if a.changed:
                self.settings_changed[name] = {"benchmark": name, "results": a.stale_results, "changes": a.changed}
            else:
                self.settings_changed.pop(name, None)
            self.hold(name, a.hold)
        self.checked_once = True
        self.last_data_check = time.monotonic()

    def hold(self, name: str, why: Optional[str]) -> None:
        """Record (and log, once) whether a benchmark is held and why."""
        if why != self.held.get(name):
            if why:
                log.warning("benchmark %s: held, nothing of it starts: %s", name, why)
            else:
                log.info("benchmark %s: can run (fingerprint %s)", name, self.fingerprints.get(name))
            self.changed = True
            self.last_state_write = float("-inf")
        if why:
            self.held[name] = why
        else:
            self.held.pop(name, None)

    def adopt(self, name: str, a: "Assessment") -> None:
        """Today's settings of a benchmark: kept in the ledger (so a later change can say what changed), stamped
        on the rows whose outputs predate fingerprints."""
        self.ledger.put_settings(a.fingerprint, name, a.settings)
        adopted = self.ledger.adopt_fingerprint(name, a.fingerprint)
        if adopted:
            log.info("benchmark %s: %d result(s) made before settings fingerprints existed are taken to match the "
                     "current settings (%s)", name, adopted, a.fingerprint)
        self.fingerprints[name] = a.fingerprint
        self.settings[name] = a.settings

    def dispatch(self) -> None:
        full = heartbeat.disk_full(self.cfg.cache_dir)
        if bool(full) != bool(self.disk_was_full):
            if full:
                log.warning("%s: no stage starts until there is room (its outputs could not be written)", full)
            else:
                log.info("cache_dir has room again: stages start")
        self.disk_was_full = full
        if full:
            return
        for stage in (INFERENCE, EVALUATION):
            free = self.executor.free_slots(stage)
            if free <= 0 or self.stopping:
                continue
            ready_state = P.STAGE_STATES[stage][0]
            ready: list[L.Job] = []
            for run in self.runs:  # per run, so one run's backlog cannot fill the window (policy.choose is fair)
                startable = self.startable_names(run)  # in SQL: held or dropped benchmarks' rows must not fill it
                if startable:
                    ready += self.ledger.jobs([ready_state], run=run, benchmarks=startable,
                                              newest_first=self.newest_first, limit=free + 64)
            ready.sort(key=lambda j: (-j.iteration if self.newest_first else j.iteration, j.run, j.benchmark))
            started = 0
            # all of them in fair order: one whose snapshot is still pinning does not hold a slot
            for job in P.choose(ready, len(ready), self.may_start, after=self.last_served.get(stage)):
                if self.stopping or started >= free:
                    break
                try:
                    n = self.start_stage(job, stage)
                    if n < 0:  # the executor cannot be reached (a hung Slurm controller): no more tries this pass
                        return
                    started += n
                    if n:
                        self.last_served[stage] = job.run  # the next pass starts with the run after it
                except L.LedgerUnavailable:
                    raise
                except Exception as e:  # a bug starting one job fails that job, never the daemon
                    log.exception("%s %s: could not be started", stage, job.key)
                    self.fail_start(job.key, stage, f"{type(e).__name__}: {e}")

    def start_stage(self, job: L.Job, stage: str) -> int:
        """Two-phase: the intent (a token) is durable in the ledger before the executor starts anything. Returns
        the number started (0 or 1), or -1 when the executor could not be reached (each try may take its timeout)."""
        if stage == EVALUATION and stage_done(INFERENCE, self.outdir(job)):
            self.apply(P.Move(job.key, L.PENDING, "inference outputs missing: infer again"))
            return 0
        checkpoint = self.keeper.checkpoint_for(job.run, job.iteration, job.path)
        if checkpoint is None:
            return 0  # its snapshot is still being pinned
        if stage == INFERENCE and checkpoint == job.path and not os.path.exists(checkpoint):
            return 0  # absent now (deleted, or a mount hiccup): reconcile decides after the grace period
        token = uuid.uuid4().hex[:12]  # fresh per start: an old job of this key can never be mistaken for it
        try:
            launch = self.launch(job, stage, checkpoint, token)
        except OSError as e:  # ENOSPC/EACCES writing the job spec: this job fails, the daemon goes on
            full = heartbeat.disk_full(self.cfg.cache_dir) or (
                f"cache_dir {self.cfg.cache_dir}: {e.strerror}" if e.errno in (errno.ENOSPC, errno.EDQUOT) else None)
            self.fail_start(job.key, stage, f"preparing the stage: {e}", outside_cause=full)
            return 0
        running = P.STAGE_STATES[stage][1]
        handle = "infer_job" if stage == INFERENCE else "eval_job"
        # the outputs an inference makes are made with today's settings: the row says which
        settings = {"fingerprint": self.fingerprints.get(job.benchmark)} if stage == INFERENCE else {}
        self.ledger.transition(job.key, running, f"attempt {job.attempts + 1}", token=token, started_at=time.time(),
                               pid=None, pid_start=None, **{handle: None}, **settings)
        try:
            started = self.executor.submit(launch)
        except SubmitError as e:
            self.fail_start(job.key, stage, str(e), outside_cause=e.outside_cause)
            return -1 if e.outside_cause else 0
        self.record_started(started)
        log.info("%s %s: started (%s)", stage, job.key, started.where)
        return 1

    def record_started(self, started: Started) -> None:
        fields = {"infer_job" if started.stage == INFERENCE else "eval_job": started.handle,
                  "pid_start": started.pid_start}
        if started.then_handle:
            fields["eval_job"] = started.then_handle
        if started.handle.isdigit() and started.pid_start:
            fields["pid"] = int(started.handle)
        self.ledger.update(started.key, **fields)

    def fail_start(self, key: tuple, stage: str, problem: str, outside_cause: Optional[str] = None) -> None:
        job = self.ledger.get(key)
        if job is None or job.state not in (P.STAGE_STATES[stage][0], P.STAGE_STATES[stage][1]):
            return
        if job.state == L.INFERRED:  # evaluation could not start: it still counts, from scoring's view
            self.apply(P.Move(job.key, L.SCORING, "starting"))
            job = self.ledger.get(key)
        self.apply(P.start_failed(job, stage, problem, self.policy, time.time(), outside_cause))

    def launch(self, job: L.Job, stage: str, checkpoint: str, token: str) -> Launch:
        """Write the stage's job spec (and, for inference, the evaluation's: executors that chain
        submit both at once); clear outputs an earlier attempt left."""
        out = self.outdir(job)
        os.makedirs(out, exist_ok=True)
        stages = (INFERENCE, EVALUATION) if stage == INFERENCE else (EVALUATION,)
        bench = self.benchmarks[job.benchmark]
        launches = []
        for s in stages:
            self.write_job(job, s, checkpoint, out)
            btype = BENCHMARK_TYPES[bench.type]
            module = btype.inference_module if s == INFERENCE else btype.evaluation_module
            fresh = s == INFERENCE and backends.fresh_worker_per_checkpoint(bench.backend, bench.backend_options)
            engine = s == INFERENCE and backends.holds_engine(bench.backend)
            launches.append(Launch(job.key, s, token, (self.pythons[s], "-m", module, "--job", os.path.join(out, JOB_FILE[s])),
                                   out, os.path.join(out, LOG_FILE[s]), self.timeouts[s], session=checkpoint,
                                   fresh_session=fresh, engine=engine))
        if len(launches) == 2:
            first, then = launches
            return Launch(first.key, first.stage, token, first.argv, first.cwd, first.log_path, first.timeout_s, then,
                          session=checkpoint, fresh_session=first.fresh_session, engine=first.engine)
        return launches[0]

    def write_job(self, job: L.Job, stage: str, checkpoint: str, out: str) -> None:
        bench = self.benchmarks[job.benchmark]
        clear_outputs(stage, out)  # a fresh attempt must not inherit an earlier one's outputs
        spec = StageJob(stage=stage, run=job.run, iteration=job.iteration, checkpoint=checkpoint,
                        benchmark=bench.model_dump(), output_dir=out,
                        seed=bench.seed if bench.seed is not None else self.cfg.seed,
                        attempt=job.attempts + 1, tokens_b=self.tokens_b(job.iteration),
                        extra={"config_dir": self.cfg.config_dir, "fingerprint": self.fingerprints.get(job.benchmark),
                               "revision": job.revision, "scratch_dir": self.scratch(job.key)})
        spec.write(os.path.join(out, JOB_FILE[stage]))

    def apply(self, move: P.Move) -> None:
        """Write one decision to the ledger (and log it); a conflict is a bug, logged, never fatal."""
        try:
            if move.to is None:
                self.ledger.update(move.key, **move.fields)
            else:
                self.ledger.transition(move.key, move.to, move.note, **move.fields)
        except L.LedgerConflict as e:
            log.error("%s: %s (ignored: %s)", move.key, move.note, e)
            return
        self.changed = True
        if move.to is not None:
            getattr(log, move.level)("%s: %s", L.JobKey(*move.key), move.note)
        if move.to == L.FAILED:
            self.insight.check_failure_alerts(L.JobKey(*move.key))
        if move.to == L.SCORED:
            self.insight.scored(L.JobKey(*move.key))
        if move.discard_snapshot:
            self.restart_siblings(move.key)  # first: none may go on reading the snapshot that goes now
            self.keeper.discard(move.key[0], move.key[1])
        if move.to is not None and P.is_final(move.to, move.fields.get("next_retry_at")):
            self.release_if_finished(move.key[0], move.key[1])
            self.drop_scratch(move.key)

    def restart_siblings(self, key: tuple) -> None:
        """The checkpoint of `key`'s iteration changed while a stage read it: its other benchmarks start over too
        (policy.siblings_after_change), so the iteration's results never mix two saves."""
        from evaluator.daemon import rerun

        moves, recorded, recording = P.siblings_after_change(self.ledger.jobs(run=key[0], iteration=key[1]), key)
        for move in moves:
            self.executor.cancel(move.key)  # a stage of the old bytes: stopped, its exit never applied
            self.apply(move)
        for job in recorded:  # a new revision of the new save, recorded to every sink as a rerun is
            try:
                rerun.apply_one("rerun", self.cfg.cache_dir, self.ledger, job, self.cfg.recorder.plots)
                log.warning("%s: recorded from the earlier save of this iteration; evaluated again as revision %d",
                            job.key, job.revision + 1)
            except (L.LedgerConflict, OSError) as e:
                log.error("%s: recorded from the earlier save of this iteration and could not be rerun (%s): "
                          "run `tools/evaluator.py rerun --run %s --iterations %d`", job.key, e, key[0], key[1])
        for job in recording:
            log.error("%s: being recorded from the earlier save of this iteration: once it is, run "
                      "`tools/evaluator.py rerun --run %s --iterations %d`", job.key, key[0], key[1])

    def scratch(self, key: tuple) -> str:
        return scratch_dir(self.cfg.cache_dir, *key)

    def sweep_scratch(self) -> None:
        """At start: scratch folders of jobs that are final (a crash between the final move and the delete)."""
        def entries(path: str) -> list[str]:  # one folder that cannot be listed is left as it is, said once
            try:
                return os.listdir(path) if os.path.isdir(path) else []
            except OSError as e:
                log.warning("scratch folder %s cannot be read (%s): left as it is", path, e.strerror or e)
                return []

        root = os.path.join(self.cfg.cache_dir, "scratch")
        for run in entries(root):
            for it_dir in entries(os.path.join(root, run)):
                iteration = iteration_number(it_dir[5:]) if it_dir.startswith("iter_") else None
                if iteration is None:
                    continue
                for bench in entries(os.path.join(root, run, it_dir)):
                    job = self.ledger.get((run, iteration, bench))
                    if job is not None and P.job_final(job):
                        self.drop_scratch(job.key)

    def drop_scratch(self, key: tuple) -> None:
        """A final job's {scratch_dir} (a converted model, say) is deleted: it is the stages' space, not a result."""
        path = self.scratch(key)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            if os.path.isdir(path):
                log.warning("%s: could not delete its scratch folder %s", L.JobKey(*key), path)

    def release_finished_snapshots(self, held_count_as_done: bool = True) -> None:
        """Snapshots of iterations whose rows are all final now without a move of ours: at start, and at every
        rescan for what another process changed (`invalidate` of a pending row, or of a failed one waiting for
        its retry). At a rescan only rows really final count: a hold may lift at the same rescan (a dataset that
        settles), and a released snapshot is never pinned again."""
        for row in self.ledger.snapshots([L.PINNED]):
            self.release_if_finished(row["run"], row["iteration"], held_count_as_done)

    def release_if_finished(self, run: str, iteration: int, held_count_as_done: bool = True) -> None:
        """A snapshot goes on the transition that finalises the last wanted job of its iteration (a held
        benchmark's rows do not keep it: a hold may last for ever; they read the original when it lifts)."""
        jobs = self.ledger.jobs(run=run, iteration=iteration)
        if all(P.job_final(j) or (held_count_as_done and not self.may_start(j)) for j in jobs):
            self.keeper.release(run, iteration)

    # ---- recording ------------------------------------------------------------------------------------
    def deliver(self) -> None:
        for reply in self.outbox.collect():
            self.delivered(reply)
        idle = [s for s in self.outbox.names if self.outbox.idle(s)]
        if not idle:
            return
        offered: set[str] = set()
        for job, sink in self.ledger.deliveries_due(idle, time.time(), limit=len(idle) * 4):
            if sink in offered:
                continue
            try:
                result = self.result_of(job)
            except OSError as e:  # metrics.json is there but cannot be read now: this sink tries again later
                self.delivery_failed(job.key, sink, f"reading its metrics.json: {e}")
                continue
            if result is None:
                continue
            if self.outbox.offer(job.key, sink, result):
                offered.add(sink)

    def result_of(self, job: L.Job) -> Optional[ResultRecord]:
        if job.key in self.insight.comparing:
            return None  # offered once its compare.json is written (the sinks carry the comparison)
        path = os.path.join(self.outdir(job), DONE_FILE[EVALUATION])
        m, why = scored_metrics(path)
        if m is None:
            self.score_again(job, f"metrics unreadable ({why})")
            return None
        return ResultRecord(run=job.run, iteration=job.iteration, benchmark=job.benchmark, metrics=m["metrics"],
                            tokens_b=self.tokens_b(job.iteration), n=m.get("n"), stderr=m.get("stderr") or {},
                            per_category=m.get("per_category") or {}, checkpoint=job.path, metrics_path=path,
                            versions=m.get("versions") or {}, revision=job.revision,
                            fingerprint=job.fingerprint or "", comparison=self.insight.comparison_of(job),
                            best=self.insight.best_summary(job.run))

    def score_again(self, job: L.Job, why: str) -> None:
        """A scored row's metrics.json is gone or unreadable: scored again from its predictions, as a new revision
        that every sink records. A sink may hold the first number already (its reply on the way, or sent before a
        crash), and a judge or sampling may give another: the same revision would leave two numbers for it."""
        now = self.ledger.get(job.key)
        if now is None or now.state != L.SCORED or now.revision != job.revision:
            return  # handled already in this pass (another sink's delivery of the same result)
        sinks = sorted(self.ledger.recorded_sinks(job.key))
        try:
            self.ledger.restart(job.key, f"{why}: score again as a new revision", L.INFERRED)
        except L.LedgerConflict as e:  # moved on meanwhile: nothing to do here
            log.info("%s: %s", job.key, e)
            return
        log.warning("%s: %s%s: scored again as revision %d, which every sink records", job.key, why,
                    f" after {', '.join(sinks)} recorded it" if sinks else "", job.revision + 1)

    def delivered(self, reply) -> None:
        key = L.JobKey(*reply.key)
        job = self.ledger.get(key)
        if job is None or job.revision != reply.revision:
            log.info("%s: %s answered for revision %d, but the row is at revision %s now (re-run): ignored",
                     key, reply.sink, reply.revision, job.revision if job else "-")
            return
        if reply.error is None:
            self.ledger.mark_recorded(key, reply.sink)
            self.finish_recording(key)
            return
        if reply.late:
            return  # this call was already counted as failed when it ran past the timeout
        self.delivery_failed(key, reply.sink, reply.error)

    def delivery_failed(self, key: L.JobKey, sink: str, problem: str) -> None:
        """One failed delivery of a result to `sink`: offered again after a backoff, set aside after
        recorder.max_failures."""
        failures = self.ledger.delivery_failures(key, sink) + 1
        retry_at = P.delivery_failed(failures, self.cfg.recorder.max_failures, self.policy, time.time())
        error = f"recorder {sink}: {problem}"
        self.ledger.delivery_failed(key, sink, failures, retry_at, error)
        self.ledger.update(key, last_error=error)  # the result stays queued; status shows why
        if retry_at is None:
            log.error("%s: %s; set aside after %d failures (status lists it; `status --retry-recording` offers it "
                      "again); other results keep flowing", key, error, failures)
        else:
            log.warning("%s: %s (failure %d); offered again in %gs", key, error, failures, retry_at - time.time())

    def finish_recording(self, key: L.JobKey) -> None:
        job = self.ledger.get(key)
        if job is None or job.state != L.SCORED:
            return
        if set(self.outbox.names) <= self.ledger.recorded_sinks(key):
            self.apply(P.Move(key, L.RECORDED, "recorded", {"last_error": None}))
            try:
                m = read_metrics(os.path.join(self.outdir(job), DONE_FILE[EVALUATION]))["metrics"]
                log.info("recorded %s: %s", key, ", ".join(f"{k}={v:.4g}" for k, v in sorted(m.items())
                                                          if isinstance(v, (int, float))))
            except (OSError, ValueError):
                pass

    # ---- restart recovery ------------------------------------------------------------------------------
    def recover(self) -> None:
        """One routine for work a previous daemon left: find it by its token (re-attach or stop it), then
        check outputs instead of trusting states."""
        stale = sorted(set(self.ledger.runs()) - set(self.runs))
        if stale:
            log.warning("the ledger holds jobs of run(s) %s that are not configured now: left as they are "
                        "(status lists them); if a run was renamed, its checkpoints are evaluated again under "
                        "the new name", ", ".join(stale))
        # the best checkpoints' snapshots are kept: known before a recovered move finalises an iteration (a
        # recording finished below) and releases its snapshot
        self.insight.rank_best()
        running = self.ledger.jobs(L.RUNNING)
        chained = [j for j in self.ledger.jobs([L.INFERRED]) if j.token and j.eval_job]
        intents = []
        for j in running + chained:
            stage = INFERENCE if j.state == L.INFERRING else EVALUATION
            handle = j.infer_job if stage == INFERENCE else j.eval_job
            if handle is None and j.pid:  # a row written before handles were kept per stage
                handle = str(j.pid)
            intents.append(Intent(j.key, stage, j.token or "", handle, j.pid_start))
        found = self.executor.recover(intents)
        for j in running:
            now = self.ledger.get(j.key)
            if now is None or now.state != j.state:  # a sibling's changed checkpoint restarted it just now
                continue
            stage = INFERENCE if j.state == L.INFERRING else EVALUATION
            if (j.key, stage) in found:
                started = found[(j.key, stage)]
                self.record_started(started)
                log.info("%s %s: re-attached to %s", stage, j.key, started.where)
                continue
            ready, _, done_state = P.STAGE_STATES[stage]
            if stage_done(stage, self.outdir(j)) is None:
                # checked as finish_stage checks a stage that ends: the checkpoint may have changed while the
                # stage read it and no daemon was there to see
                changed = self.keeper.verify(j.run, j.iteration) if stage == INFERENCE else None
                self.apply(P.checkpoint_changed(j, stage, changed) if changed else
                           P.Move(j.key, done_state, "recovered after restart: outputs complete",
                                  {"pid": None, "pid_start": None}))
            else:
                self.apply(P.Move(j.key, ready, "recovered after restart: run again",
                                  {"pid": None, "pid_start": None, "token": None if stage == INFERENCE else j.token}))
        for j in chained:
            now = self.ledger.get(j.key)
            if (j.key, EVALUATION) in found and now is not None and now.state == j.state:
                started = found[(j.key, EVALUATION)]
                self.apply(P.Move(j.key, L.SCORING, f"re-attached to {started.where}",
                                  {"eval_job": started.handle, "started_at": time.time()}))
        for j in self.ledger.jobs([L.SCORED]):
            try:
                metrics, why = scored_metrics(os.path.join(self.outdir(j), DONE_FILE[EVALUATION]))
            except OSError as e:  # there but unreadable now: its delivery retries (deliver), nothing is scored again
                log.warning("%s: its metrics.json cannot be read now (%s): its recording waits", j.key, e)
                self.finish_recording(j.key)  # every sink may have accepted it just before a crash
                continue
            if metrics is None:
                self.score_again(j, f"recovered: metrics missing ({why})")
            else:
                doc = self.insight.comparison_of(j)
                if doc is None:
                    self.insight.scored(j.key)  # a crash between the scored transition and compare.json (this revision)
                else:
                    self.insight.check_alerts(j, doc)  # a crash before its rules were checked (an alert fires once)
                self.finish_recording(j.key)  # every sink may have accepted it just before a crash
        for j in self.ledger.jobs([L.INFERRED]):
            if stage_done(INFERENCE, self.outdir(j)):
                self.apply(P.Move(j.key, L.PENDING, "recovered: predictions missing, infer again"))
        self.insight.recover_failure_alerts(self.is_wanted)
        self.sweep_scratch()
        self.keeper.recover()
        self.insight.rank_best()  # again: recovery may have withdrawn a result (metrics missing: scored again)
        self.release_finished_snapshots()
        self.ledger.prune_events()

    # ---- when to stop ----------------------------------------------------------------------------------
    def busy(self) -> bool:
        return (self.executor.busy() or self.outbox.busy() or self.insight.alerts_out.busy() or self.keeper.busy()
                or bool(self.dirty) or bool(self.insight.comparing)
                or any(st.settle_at is not None for st in self.state.values()))

    def idle(self) -> bool:
        """--once: nothing running, nothing runnable, no retry, no settling checkpoint, no result to deliver."""
        if self.busy():
            return False  # the counts below are SQL: not asked while work is in flight
        # waiting for their checkpoint to become readable, or for room on a full disk (dispatch): not now; --once
        # says so (once_outcome)
        runnable = 0 if self.disk_was_full else self.startable_now()
        undelivered = self.ledger.undelivered(self.outbox.names, give_up_after=self.cfg.executor.max_attempts)
        # alerts a channel refused that often stay pending in the ledger: the next start delivers them
        undelivered += self.ledger.alerts_undelivered(self.insight.alerts_out.names, self.cfg.executor.max_attempts)
        return P.idle(P.Backlog(runnable=runnable, undelivered=undelivered))

    def startable_now(self) -> int:
        """Wanted rows of benchmarks not held that are ready to start or due to be retried, less those waiting for
        their checkpoint to become readable (unpinnable)."""
        return sum(n for run, bench, n in self.ledger.runnable()
                   if bench not in self.held and P.wanted(self.runs, self.benchmarks, run, bench)) - len(
            self.unpinnable())

    def unpinnable(self) -> list[L.Job]:
        """Wanted pending rows of checkpoints that cannot be read to pin (SnapshotKeeper.waiting: permissions, a
        dangling link, rewritten in place): nothing of them can start until that changes."""
        return [j for run, iteration in list(self.keeper.waiting)
                for j in self.ledger.jobs([L.PENDING], run=run, iteration=iteration)
                if j.benchmark not in self.held and self.is_wanted(j)]

    def once_outcome(self, ending: str = "--once", in_range=None) -> int:
        """--once is done: 0 when every wanted job ended well, else 1 with what did not (failed jobs, held
        benchmarks with work waiting, results a sink would not take). in_range(iteration): --end-iteration's
        selection; only its failed jobs count, and set-up hints do not."""
        failed = [j for j in self.ledger.jobs([L.FAILED]) if P.job_final(j) and self.is_wanted(j)
                  and (in_range is None or in_range(j.iteration))]
        waiting: dict[str, int] = {}
        for run, bench, n in self.ledger.runnable():  # summed over runs
            if bench in self.held and P.wanted(self.runs, self.benchmarks, run, bench):
                waiting[bench] = waiting.get(bench, 0) + n
        problems = []
        if failed:
            problems.append(f"{len(failed)} job(s) failed ({', '.join(str(j.key) for j in failed[:5])}"
                            f"{', ...' if len(failed) > 5 else ''}; `status` shows why)")
        for bench, n in sorted(waiting.items()):
            problems.append(f"benchmark {bench} held with {n} job(s) waiting: {self.held[bench]}")
        blocked: dict[tuple, int] = {}
        for j in self.unpinnable():
            blocked[(j.run, j.iteration)] = blocked.get((j.run, j.iteration), 0) + 1
        for (run, iteration), n in sorted(blocked.items()):
            problems.append(f"{run} iteration {iteration}: {n} job(s) waiting, the checkpoint cannot be pinned: "
                            f"{self.keeper.waiting[(run, iteration)]}")
        waiting_for_room = self.startable_now() if self.disk_was_full else 0  # the reading idle() went by
        if waiting_for_room > 0:
            problems.append(f"{waiting_for_room} job(s) waiting, none can start: {self.disk_was_full}; they run "
                            f"when a daemon starts with room")
        for run, hints in sorted(self.hints.items()) if in_range is None else ():  # a set-up mistake
            problems += [f"run {run}: {h.text}" for h in hints if h.level == "warning"]
        if self.undelivered_given_up():
            problems.append("scored result(s) could not be recorded (a sink is down, see status); they stay queued "
                            "and are recorded by the next run")
        for p in problems:
            log.warning("%s: %s", ending, p)
        log.info("%s: every job that can run now is done%s", ending, "" if not problems else " (exit 1: see above)")
        return 1 if problems else 0

    def undelivered_given_up(self) -> int:
        """--once: results a sink refused executor.max_attempts times in a row: not waited for."""
        return self.ledger.given_up_deliveries(self.cfg.executor.max_attempts)

    def range_finished(self) -> bool:
        expected = self.selection.expected()
        now = time.monotonic()
        # asked after a change, at most once a second: at 200k rows the look costs a few hundred ms
        if expected is None or not self.changed or now - self.last_range_check < 1.0:
            return False
        self.changed = False
        self.last_range_check = now
        # not before every run was scanned and reconciled once, nor while a checkpoint settles: an iteration on disk
        # that has no row yet must not be taken for one that was never saved
        if self.executor.busy() or any((not st.reconciled and not st.unavailable) or st.settle_at is not None
                                       for st in self.state.values()):
            self.changed = True  # look again at the next pass
            return False
        rows = {run: {k: P.is_final(*v) for k, v in found.items()}
                for run, found in self.ledger.finality_between(self.selection.begin, self.selection.end).items()}
        return P.range_finished(expected, list(self.runs.values()), list(self.benchmarks), rows,
                                self.ledger.newest_iterations(), {run: st.on_disk for run, st in self.state.items()})

    def sleep_seconds(self) -> float:
        now = time.monotonic()
        if self.dirty:  # an event came within MIN_SCAN_GAP of the last scan: scan as soon as the gap ends
            return MIN_SCAN_GAP
        waits = [MAX_IDLE_SLEEP, self.last_rescan + self.cfg.watch.poll_seconds - now]
        if self.executor.busy():
            waits.append(0.5)  # SIGCHLD wakes us sooner; this bounds timeout enforcement and Slurm polling
        for st in self.state.values():
            waits += [t - now for t in (st.settle_at, st.recheck_at) if t is not None]
        for deadline in (self.outbox.next_deadline(), self.insight.alerts_out.next_deadline()):
            if deadline is not None:
                waits.append(deadline - now)
        for t in (self.ledger.next_retry(), self.ledger.next_delivery(), self.ledger.next_alert_delivery()):
            if t is not None:
                waits.append(t - time.time())
        return max(MIN_SCAN_GAP, min(waits))

    def write_state(self, stopped: bool = False) -> None:
        """<cache_dir>/daemon.json for `status`: alive (a recent beat from a live pid), what is held, hints."""
        self.last_state_write = time.monotonic()
        now = time.time()
        try:
            heartbeat.write_state(self.cfg.cache_dir, {
                "schema_version": heartbeat.SCHEMA_VERSION, "pid": os.getpid(), "host": socket.gethostname(),
                "started_at": self.started_wall, "beat_at": now, "beat_every_s": STATE_SECONDS,
                "stopped_at": now if stopped else None, "stop_reason": self.stop_reason if stopped else None,
                "paused": self.paused,
                "unavailable": [{"benchmark": b, "run": None, "reason": why} for b, why in sorted(self.held.items())]
                + [{"benchmark": None, "run": r, "reason": f"{self.runs[r].root} {st.unavailable}"}
                   for r, st in sorted(self.state.items()) if st.unavailable],
                "settings_changed": [v for _, v in sorted(self.settings_changed.items())], "hints": {run: [h.text for h in hs] for run, hs in self.hints.items() if hs},
                "fingerprints": dict(self.fingerprints),
                "runs": {r.name: {"root": r.root, "layout": r.layout} for r in self.runs.values()}})
        except OSError as e:  # a full disk must not end the daemon; status then says the beat is old
            log.warning("could not write %s: %s", heartbeat.state_path(self.cfg.cache_dir), e)

    def heartbeat(self) -> None:
        gone = self.ledger.replaced()
        if gone:  # going on would evaluate and record into a file no restart reads: everything again after it
            error = EvaluatorError(f"{gone}: stopping; a restart begins with the ledger file found then (the "
                                   f"sinks skip results they already hold)")
            self.stop_reason = f"exited {error.exit_code}: {error}"
            raise error
        if time.monotonic() - self.last_state_write >= STATE_SECONDS:
            self.write_state()
        now = time.monotonic()
        if now - self.last_heartbeat < HEARTBEAT_SECONDS:
            return
        self.last_heartbeat = now
        counts = self.ledger.counts()
        running = ", ".join(f"{stage} {L.JobKey(*key)}" for key, stage in self.executor.running()) or "nothing"
        log.info("status: %s; running: %s", ", ".join(f"{s}={counts[s]}" for s in L.STATES if counts.get(s))
                 or "no jobs yet", running)

    def shutdown(self) -> None:
        """Stop stages (their rows go back to the queue), pins, watchers and sinks; release the lock."""
        try:
            for key, stage in self.executor.stop():
                back = P.STAGE_STATES[stage][0]
                try:
                    self.ledger.transition(key, back, "daemon stopped mid-stage", pid=None, pid_start=None)
                    log.info("%s %s: stopped, back to %s", stage, L.JobKey(*key), back)
                except (L.LedgerConflict, L.LedgerUnavailable) as e:
                    log.warning("%s %s: stopped; the ledger keeps it running (recovered at the next start): %s",
                                stage, L.JobKey(*key), e)
            self.write_state(stopped=True)
            self.keeper.shutdown()
            self.insight.stop_comparisons()  # one not written is redone at the next start
            try:
                self.keeper.collect()
            except L.LedgerUnavailable:
                pass  # interrupted pins are redone at the next start
            if self.watcher and self.watching:
                self.watcher.stop()
            # a signal asks for a prompt stop (systemd waits 20 s); --once and --end-iteration may finish the views
            self.outbox.close(wait_s=2.0 if self.stopping else 60.0)
            self.insight.close_alerts()  # an alert not delivered yet stays pending in the ledger
            try:
                counts = self.ledger.counts()
                log.info("stopped; jobs: %s", ", ".join(f"{s}={counts[s]}" for s in L.STATES if counts.get(s))
                         or "none")
            except Exception:
                pass
        finally:
            self.ledger.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            if self.lock is not None:
                self.lock.release()

    # ---- helpers ----------------------------------------------------------------------------------------
    def tokens_b(self, iteration: int) -> Optional[float]:
        tpi = self.cfg.token_per_iteration
        return iteration * tpi if tpi else None

    def outdir(self, job: L.Job) -> str:
        return result_dir(self.cfg.cache_dir, job.run, job.iteration, job.benchmark)


def clear_outputs(stage: str, out: str) -> None:
    """Delete a stage's output files (OUTPUT_FILES) in `out`."""
    for name in OUTPUT_FILES[stage]:
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


def _describe(executor) -> str:
    describe = getattr(executor, "describe", None)
    return describe() if describe else type(executor).__name__
