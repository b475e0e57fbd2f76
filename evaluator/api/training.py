"""Checkpoints from a training script: `evaluate_checkpoint`, `notify_checkpoint`, the Hugging Face `EvaluatorCallback`.

A checkpoint is evaluated by the daemon's own machinery, so the ledger, the results tree, the sinks and the recovery
rules are the daemon's:
- a daemon holds the cache_dir lock (it runs): the checkpoint is handed to it by a *completion notice*
  (`<cache_dir>/notices/<run>/iter_%07d.json`, evaluator/daemon/checkpoints.py), which it reads at its next scan
  (at most `watch.poll_seconds` later) and takes as the checkpoint's final marker: no settle wait; a path outside
  the run folder is part of the run all the same;
- no daemon runs: the notice is written all the same, and the daemon's `--once` machinery runs here (in a child
  process: `build()` + `Daemon.run()` with the run restricted to this checkpoint's and the selection to this
  iteration), then the rows are read back from the ledger.

transformers is imported only when the callback is made (`EvaluatorCallback(...)`), torch only when its quick
evaluation generates; importing evaluator.api needs neither.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from evaluator.common.errors import EvaluatorError

__all__ = ["CheckpointEvaluation", "EvaluatorCallback", "evaluate_checkpoint", "notify_checkpoint"]

log = logging.getLogger("evaluator.api")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHECKOUT_DAEMON_PYTHON = os.path.join(ROOT, ".venvs", "daemon", "bin", "python")


# ---- config and run -------------------------------------------------------------------------------------------
def _config(config):
    """A daemon config: a YAML path, a loaded AutoEvalConfig, or None for the one `load_config` read."""
    from evaluator.daemon.config import AutoEvalConfig, load_config
    if config is None:
        from evaluator.api.evaluate import _SETTINGS
        if _SETTINGS.config is None:
            raise EvaluatorError("config=: give the daemon's config file (auto_eval: ...), or call "
                                 "load_config(PATH) first")
        return _SETTINGS.config
    if isinstance(config, AutoEvalConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        return load_config(os.fspath(config), require_datasets=False)
    raise EvaluatorError(f"config=: expected the path of a config file or a loaded config, got {type(config).__name__}")


def _config_file(cfg) -> str:
    if not cfg.config_path:
        raise EvaluatorError("config=: evaluate_checkpoint needs a config read from a file (its child process reads "
                             "it again); give the file's path")
    return os.path.abspath(cfg.config_path)


def resolve_run(cfg, path: str, run: Optional[str] = None):
    """The configured run (evaluator.daemon.runs.resolve_runs) a checkpoint belongs to: the one named `run`, else
    the one whose folder holds `path`, else the only one."""
    from evaluator.daemon.runs import resolve_runs
    runs = resolve_runs(cfg)
    names = ", ".join(r.name for r in runs)
    where = cfg.config_path or "the config"
    if run is not None:
        for r in runs:
            if r.name == run:
                return r
        raise EvaluatorError(f"run={run!r}: {where} has no such run (auto_eval.watch.paths runs: {names})")
    parent = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    inside = [r for r in runs if os.path.realpath(r.root) == parent]
    if len(inside) == 1:
        return inside[0]
    if len(runs) == 1:
        return runs[0]
    raise EvaluatorError(f"{path}: not in the folder of one of the runs of {where} ({names}); say which with run=")


def _checked(path: str, iteration: int) -> str:
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise EvaluatorError(f"iteration: expected an integer >= 0, got {iteration!r}")
    if not os.path.exists(path):
        raise EvaluatorError(f"{path}: no such checkpoint")
    return os.path.abspath(path)


def notify_checkpoint(path: str, iteration: int, config=None, run: Optional[str] = None,
                      by: str = "notify_checkpoint") -> str:
    """Tell the daemon the checkpoint at `path` is finished (no settle wait); returns the notice's path."""
    from evaluator.daemon.checkpoints import write_notice
    path = _checked(path, iteration)
    cfg = _config(config)
    spec = resolve_run(cfg, path, run)
    return write_notice(cfg.cache_dir, spec.name, iteration, path, by)


def daemon_running(cache_dir: str) -> bool:
    """Whether a daemon holds the cache_dir lock (evaluator/daemon/build.py takes it for its whole life). Asked by
    taking it for a moment: a daemon starting in that moment waits it out (build.LOCK_WAIT_SECONDS)."""
    from evaluator.daemon.heartbeat import LOCK_FILE
    lock_path = os.path.join(cache_dir, LOCK_FILE)
    if not os.path.exists(lock_path):
        return False
    from filelock import FileLock, Timeout
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


# ---- evaluate_checkpoint --------------------------------------------------------------------------------------
@dataclass
class CheckpointEvaluation:
    """What evaluate_checkpoint did with one checkpoint. `states`/`metrics`/`errors` are per benchmark, read from the
    ledger and the results tree (`refresh()` reads them again; `wait()` until each row is final)."""

    run: str
    iteration: int
    path: str
    cache_dir: str
    handed_to_daemon: bool  # a running daemon takes it (from the notice); else it ran here
    notice: str  # the completion notice written
    exit_code: Optional[int] = None  # the --once run's (0: every job ended well; 128 + 15 when `timeout` stopped it), None when handed off
    python: Optional[str] = None  # the interpreter that ran the daemon's machinery here
    states: dict = field(default_factory=dict)  # benchmark -> ledger state
    metrics: dict = field(default_factory=dict)  # benchmark -> metrics.json's metrics (once scored)
    errors: dict = field(default_factory=dict)  # benchmark -> last_error of a failed row
    final: bool = False  # every row was final at the last refresh() (the same ledger read as `states`)

    @property
    def done(self) -> bool:
        """Every row of this checkpoint is final (recorded, failed for good, ...): read again now, with `states`
        from the same ledger read, so `done` never holds beside a state that is not final."""
        return self.refresh().final

    def refresh(self) -> "CheckpointEvaluation":
        from evaluator.common.contracts import DONE_FILE, EVALUATION, read_metrics, result_dir
        from evaluator.daemon import ledger as L
        from evaluator.daemon import policy as P
        if not os.path.exists(os.path.join(self.cache_dir, "ledger.sqlite3")):
            return self
        led = L.Ledger(self.cache_dir, readonly=True)
        try:
            jobs = led.jobs(run=self.run, iteration=self.iteration)
        finally:
            led.close()
        self.states = {j.benchmark: j.state for j in jobs}
        self.final = bool(jobs) and all(P.job_final(j) for j in jobs)
        self.errors = {j.benchmark: j.last_error for j in jobs if j.state == L.FAILED and j.last_error}
        self.metrics = {}  # of this read's rows only: a row restarted at a new revision has none yet
        for j in jobs:
            if j.state not in (L.SCORED, L.RECORDED):
                continue
            done = os.path.join(result_dir(self.cache_dir, self.run, self.iteration, j.benchmark), DONE_FILE[EVALUATION])
            try:
                self.metrics[j.benchmark] = read_metrics(done).get("metrics", {})
            except FileNotFoundError:
                pass  # a rerun moved the folder aside since the ledger read: the next refresh() sees its row
        return self

    def wait(self, timeout: Optional[float] = None, interval: float = 1.0) -> "CheckpointEvaluation":
        """Until every row of this checkpoint is final (a handed-off checkpoint: the daemon's work); raises
        TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.done:  # refreshes
                return self
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{self.run} iteration {self.iteration}: not final after {timeout}s "
                                   f"(states: {self.states or 'no rows yet'})")
            time.sleep(interval)


def daemon_python(python: Optional[str] = None) -> str:
    """The interpreter that runs the daemon's machinery: `python`, else this one when it has the daemon's packages
    (watchdog: pip install 'ckpt-evaluator[daemon]'), else the checkout's .venvs/daemon."""
    if python:
        chosen = os.path.join(python, "bin", "python") if os.path.isdir(python) else python
        if not os.access(chosen, os.X_OK):
            raise EvaluatorError(f"python=: no python at {chosen}")
        return chosen
    if importlib.util.find_spec("watchdog") is not None:
        return sys.executable
    if os.access(CHECKOUT_DAEMON_PYTHON, os.X_OK):
        return CHECKOUT_DAEMON_PYTHON
    raise EvaluatorError("evaluate_checkpoint runs the daemon's --once machinery, which needs the daemon's packages "
                         "(watchdog): pip install 'ckpt-evaluator[daemon]' here, or pass python=<the daemon venv>")


def evaluate_checkpoint(path: str, iteration: int, config=None, run: Optional[str] = None, *,
                        python: Optional[str] = None, timeout: Optional[float] = None) -> CheckpointEvaluation:
    """Run the configured benchmarks on one checkpoint (the daemon's stages, ledger and sinks), or hand it to the
    daemon that runs on this cache_dir (module docstring).

    config: the daemon's config file (or the config `load_config` read); run: its run the checkpoint belongs to
    (default: the one whose folder holds it, else the only one); python: the daemon's interpreter (daemon_python);
    timeout: seconds the local run may take (then it is stopped like a daemon: stages go back to the queue)."""
    from evaluator.daemon.checkpoints import write_notice
    path = _checked(path, iteration)
    cfg = _config(config)
    spec = resolve_run(cfg, path, run)
    notice = write_notice(cfg.cache_dir, spec.name, iteration, path, "evaluate_checkpoint")
    result = CheckpointEvaluation(spec.name, iteration, path, cfg.cache_dir, handed_to_daemon=False, notice=notice)
    if daemon_running(cfg.cache_dir):
        result.handed_to_daemon = True
        log.info("%s iteration %d: a daemon runs on %s; handed to it (%s)", spec.name, iteration, cfg.cache_dir, notice)
        return result.refresh()
    result.python = daemon_python(python)
    args = {"config": _config_file(cfg), "run": spec.name, "iteration": iteration, "path": path}
    proc = subprocess.Popen([result.python, "-c", "import sys; from evaluator.api.training import main; "
                                                  "sys.exit(main(sys.argv[1:]))", json.dumps(args)])
    try:
        result.exit_code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the daemon stops its stages and puts them back in the queue
        result.exit_code = proc.wait()
    except BaseException:  # Ctrl-C in the training script: stop the daemon cleanly, then let it propagate
        proc.terminate()
        proc.wait()
        raise
    if result.exit_code == 2 and daemon_running(cfg.cache_dir):  # a daemon started meanwhile: it has the notice
        result.handed_to_daemon, result.exit_code = True, None
    elif result.exit_code == 2:
        raise EvaluatorError(f"evaluate_checkpoint {path}: the daemon's --once run refused to start (its message "
                             f"is above)")
    return result.refresh()


def _run_once(args: dict) -> int:
    """The child of evaluate_checkpoint: the daemon's --once run, restricted to one run and one iteration."""
    from evaluator.daemon.build import build
    from evaluator.daemon.checkpoints import Selection
    from evaluator.daemon.config import WatchPath, load_config
    cfg = load_config(args["config"], require_datasets=False)
    spec = resolve_run(cfg, args["path"], args["run"])
    entry = next((p for p in cfg.watch.paths if os.path.normpath(p.path) == os.path.normpath(spec.root)
                  and (p.name is None or p.name == spec.name)), None)
    # the run alone, named and laid out as it resolved among all of them
    cfg.watch.paths = [WatchPath(path=spec.root, name=spec.name, layout=spec.layout,
                                 benchmarks=list(spec.benchmarks) if spec.benchmarks is not None else None,
                                 best=entry.best if entry is not None else None)]
    iteration = args["iteration"]
    daemon = build(cfg, Selection(iteration, iteration, 1), once=True)
    return daemon.run()


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)-7s %(message)s")
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("watchdog").setLevel(logging.WARNING)
    try:
        code = _run_once(json.loads(argv[0]))
    except EvaluatorError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if threading.active_count() > 1:  # a sink call still hung: end without waiting for it (as cli.run)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


# ---- the Hugging Face Trainer callback ------------------------------------------------------------------------
def EvaluatorCallback(config=None, run: Optional[str] = None, *, quick_eval: Optional[dict] = None,
                      evaluate: bool = False):
    """A transformers `TrainerCallback`: at each `on_save` it writes the checkpoint's completion notice (the daemon
    takes it at once, no settle wait), and optionally

    quick_eval: runs evaluator.api.quick_eval on the model in this process, e.g. {"dataset": DIR, "metrics":
        ["exact_match"], "sample_size": 16, "max_new_tokens": 8} (`max_new_tokens` and `batch_size` go to the
        generation; the rest to quick_eval); the results are `callback.quick_results[step]`;
    evaluate: also calls evaluate_checkpoint (hands off to the daemon, else runs the benchmarks here, blocking).

    config=None with quick_eval only: no notice (nothing to tell a daemon about)."""
    if evaluate and config is None and quick_eval:
        raise EvaluatorError("EvaluatorCallback: evaluate=True runs the config's benchmarks on each checkpoint: "
                             "pass config= too")
    if quick_eval is not None:
        check_quick_eval_spec(quick_eval)
    return _callback_class()(config=config, run=run, quick_eval=quick_eval, evaluate=evaluate)


def check_quick_eval_spec(spec: Any) -> None:
    """The callback's quick_eval mapping, checked at construction (a typo must not wait for the first save)."""
    from evaluator.api.evaluate import _check_keywords
    from evaluator.common.checks import number_problem
    if not isinstance(spec, dict):
        raise EvaluatorError(f"EvaluatorCallback: quick_eval: expected a dict of quick_eval arguments, got {spec!r}")
    rest = {k: v for k, v in spec.items() if k not in ("dataset", "benchmark", "config", "max_new_tokens")}
    _check_keywords("EvaluatorCallback quick_eval", rest)
    if "max_new_tokens" in spec:
        problem = number_problem(spec["max_new_tokens"], 1, integer=True)
        if problem:
            raise EvaluatorError(f"EvaluatorCallback quick_eval: max_new_tokens: {problem}")


@functools.lru_cache(maxsize=None)
def _callback_class():
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class EvaluatorCallback(TrainerCallback):
        def __init__(self, config=None, run=None, quick_eval=None, evaluate=False):
            self.cfg = _config(config) if (config is not None or not quick_eval) else None
            self.run = run
            self.quick_eval = dict(quick_eval) if quick_eval else None
            self.evaluate = evaluate
            self.notices: list[str] = []
            self.evaluations: dict[int, CheckpointEvaluation] = {}
            self.quick_results: dict[int, Any] = {}

        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return control
            step = state.global_step
            path = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
            if self.cfg is not None and not os.path.isdir(path):
                # e.g. a hyperparameter search saves under output_dir/run-<trial>/: say so, the daemon then waits
                # for the layout's own completeness rule (settle time) instead of this notice
                log.warning("EvaluatorCallback: step %d: no checkpoint folder at %s; no completion notice written",
                            step, path)
            elif self.cfg is not None:
                self.notices.append(notify_checkpoint(path, step, self.cfg, self.run, by="EvaluatorCallback"))
                if self.evaluate:
                    self.evaluations[step] = evaluate_checkpoint(path, step, self.cfg, self.run)
            if self.quick_eval:
                tokenizer = kwargs.get("processing_class") or kwargs.get("tokenizer")
                self.quick_results[step] = quick_eval_model(kwargs["model"], tokenizer, self.quick_eval)
                log.info("step %d: quick eval %s", step, self.quick_results[step].metrics)
            return control

    return EvaluatorCallback


def quick_eval_model(model, tokenizer, spec: dict):
    """evaluator.api.quick_eval of a model in training: greedy batched generate of the prompts' continuations
    (`max_new_tokens`, `batch_size` from spec); the model is put back in training mode afterwards."""
    import torch

    from evaluator.api.evaluate import quick_eval
    if tokenizer is None:
        raise EvaluatorError("EvaluatorCallback quick_eval: the Trainer has no tokenizer (processing_class) to "
                             "generate with")
    spec = dict(spec)
    max_new_tokens = spec.pop("max_new_tokens", 16)
    batch_size = spec.pop("batch_size", 8)

    def generate(prompts: list) -> list:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    was_training = model.training
    model.eval()
    side = getattr(tokenizer, "padding_side", None)
    tokenizer.padding_side = "left"  # batched generate continues each prompt from its last real token
    try:
        return quick_eval(generate, batch_size=batch_size, input="text", **spec)
    finally:
        if side is not None:
            tokenizer.padding_side = side
        if was_training:
            model.train()

