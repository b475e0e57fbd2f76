"""The composition root: what the daemon needs is checked and made here, then handed to `Daemon`.

`build(cfg, selection)` resolves the runs and layouts, checks the stage venvs, takes the filelock on
cache_dir, and makes the ledger, the executor (`executors.EXECUTORS[executor.type]`), the sinks, the
snapshot keeper and the inotify watcher (the torchtitan `Trainer` shape: parts built in one place, a loop
that only calls them).
"""
from __future__ import annotations

import errno
import os
import subprocess
from typing import Optional

from filelock import FileLock, Timeout

from evaluator.common.contracts import EVALUATION, INFERENCE
from evaluator.common.errors import EvaluatorError, UnavailableError
from evaluator.daemon import heartbeat
from evaluator.daemon import ledger as L
from evaluator.daemon.checkpoints import LAYOUTS, CheckpointLayout, Selection, notices_dir
from evaluator.daemon.config import AutoEvalConfig
from evaluator.daemon.daemon import Daemon
from evaluator.daemon.executors import EXECUTORS
from evaluator.daemon.notify import make_channels, webhook_url
from evaluator.daemon.policy import RunSpec
from evaluator.daemon.runs import resolve_runs
from evaluator.daemon.sink_setup import make_sinks
from evaluator.daemon.snapshots import SnapshotKeeper, resolve_mode
from evaluator.daemon.watch import CheckpointWatcher, choose_mode


# storage errors that pass by themselves (space freed, a disk back): exit 3, retried by a service
PASSING_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO)


def make_layouts(cfg: AutoEvalConfig, runs: list[RunSpec]) -> dict[str, CheckpointLayout]:
    w = cfg.watch
    return {r.name: LAYOUTS[r.layout](r.name, r.root, w.settle_seconds, w.pattern, w.done_marker,
                                      notices=notices_dir(cfg.cache_dir, r.name)) for r in runs}


def venv_python(path: str) -> str:
    """A venv folder or a python executable -> the python executable."""
    return os.path.join(path, "bin", "python") if os.path.isdir(path) else path


def check_envs(cfg: AutoEvalConfig) -> dict[str, str]:
    pythons = {}
    for stage, key in ((INFERENCE, "inference"), (EVALUATION, "evaluation")):
        py = venv_python(getattr(cfg.envs, key))
        if not os.access(py, os.X_OK):
            raise EvaluatorError(f"auto_eval.envs.{key}: no python at {py} (run `make setup`, or point it at a venv)")
        probe = subprocess.run([py, "-c", "import evaluator.stages"], capture_output=True, text=True)
        if probe.returncode != 0:
            raise EvaluatorError(f"auto_eval.envs.{key}: {py} cannot import the evaluator package "
                                 f"(run `make setup`): {probe.stderr.strip().splitlines()[-1:]}")
        pythons[stage] = py
    return pythons


def check_cache_dir(cfg: AutoEvalConfig) -> None:
    """cache_dir is a folder, or not there yet (the daemon makes it; --dry-run only reads it)."""
    if os.path.exists(cfg.cache_dir) and not os.path.isdir(cfg.cache_dir):
        raise EvaluatorError(f"auto_eval.cache_dir: {cfg.cache_dir} is a file, not a folder")


# a daemon's lock is held for its whole life; another process holds it only for a moment (evaluate_checkpoint's
# daemon_running asks by taking it): a daemon starting in that moment waits it out instead of exiting 2
LOCK_WAIT_SECONDS = 2.0


def take_lock(cache_dir: str) -> FileLock:
    """<cache_dir>/daemon.lock, held: one daemon per cache_dir."""
    lock = FileLock(os.path.join(cache_dir, heartbeat.LOCK_FILE))
    try:
        lock.acquire(timeout=LOCK_WAIT_SECONDS)
    except Timeout:
        raise EvaluatorError(f"another daemon is already running on cache_dir {cache_dir} "
                             f"(it holds {lock.lock_file}); stop it first") from None
    except OSError as e:  # read-only, full, or not ours: the daemon could keep no state there
        error = UnavailableError if e.errno in PASSING_ERRNOS else EvaluatorError
        raise error(f"auto_eval.cache_dir: cannot write {lock.lock_file}: {e.strerror or e}") from None
    return lock


def build(cfg: AutoEvalConfig, selection: Selection, model_type: Optional[str] = None, once: bool = False) -> "Daemon":
    """The composition root: check what the daemon needs, take the cache_dir lock, make the parts."""
    runs = resolve_runs(cfg, model_type)
    if not cfg.benchmarks:
        raise EvaluatorError("auto_eval.benchmarks: no benchmarks configured; nothing to run "
                             "(--dry-run shows which checkpoints would be evaluated)")
    pythons = check_envs(cfg)
    webhook_url(cfg.alerts)  # an alert webhook whose variable is not set: exit 2 before anything starts
    check_cache_dir(cfg)
    try:
        os.makedirs(cfg.cache_dir, exist_ok=True)
    except OSError as e:
        raise EvaluatorError(f"auto_eval.cache_dir: cannot create {cfg.cache_dir}: {e.strerror}") from None
    if cfg.watch.snapshot == "hardlink":
        for r in runs:
            if resolve_mode("auto", cfg.cache_dir, r.root) != "hardlink":
                raise EvaluatorError(f"auto_eval.watch.snapshot: hardlink needs cache_dir ({cfg.cache_dir}) on the "
                                     f"same filesystem as {r.root}; use 'copy' (or 'auto')")
    lock = take_lock(cfg.cache_dir)
    try:
        ledger = L.Ledger(cfg.cache_dir)
    except L.LedgerUnavailable as e:
        lock.release()
        # a damaged file is for a person to look at (exit 2); a full or failing disk may pass: exit 3, so a
        # service retries (the README: a full cache_dir pauses the daemon until it can write again)
        # (a read-only ledger or one that cannot be opened at all: someone else's file, a permission: exit 2 too)
        lasting = any(word in str(e) for word in ("not a database", "malformed", "readonly", "unable to open"))
        raise (EvaluatorError if lasting else UnavailableError)(f"auto_eval.cache_dir: {e}") from None
    ex = cfg.executor
    timeouts = {INFERENCE: 60 * ex.inference_timeout_minutes, EVALUATION: 60 * ex.evaluation_timeout_minutes}
    executor = EXECUTORS[ex.type](ex, timeouts, ex.kill_grace_seconds, cfg.cache_dir)
    layouts = make_layouts(cfg, runs)
    w = cfg.watch
    keeper = SnapshotKeeper(ledger, cfg.cache_dir, layouts, w.snapshot, w.snapshot_max_gb, w.snapshot_exclude,
                            lambda: None)
    mode = choose_mode(w.mode, [r.root for r in runs])
    watcher = CheckpointWatcher({r.name: r.root for r in runs}, lambda run: None) if mode == "inotify" else None
    sinks = make_sinks(cfg)
    daemon = Daemon(cfg, selection, runs, layouts, ledger, executor, sinks, keeper, watcher, pythons,
                    timeouts, once=once, alert_channels=make_channels(cfg.alerts, sinks))
    daemon.lock = lock
    return daemon
