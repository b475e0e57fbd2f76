"""Metric history, evaluation contexts and results as data (issue 17 items 1 and 4; see evaluator/api/__init__.py).

One store for the daemon and the API: a result is a folder of the results tree
(`<cache_dir>/results/<run>/iter_<%07d>/<benchmark>/metrics.json`, plus `scores.jsonl` when it has per-sample
scores) and one line of the run's `<cache_dir>/results/<run>/history.jsonl`, written by the daemon's own
`recorder.sinks.LocalHistorySink`. So a notebook sees what the daemon recorded, the daemon's summary.md and
curves.png show what a notebook recorded, and the history outlives the process. What the API adds to a result
(the caller's metadata, when it was recorded) lives in its metrics.json (`metadata`, `recorded_at`,
`recorded_by`); a daemon result's time is its metrics.json's modification time.

Recording the same (run, iteration, benchmark) again is a new revision of it (as the daemon's `rerun`): the history
line is replaced, the W&B and MLflow sinks add the revision beside the first one (docs/recording.md).

pandas, wandb and mlflow are imported only inside the functions that need them.
"""
from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Callable, Iterable, Optional

from evaluator.common.atomic import write_json_atomic, write_text_atomic
from evaluator.common.checks import iteration_problem
from evaluator.common.contracts import (COMPARE, METRICS, PREDICTIONS, SCORES, SCORES_SCHEMA_VERSION,
                                        is_finite_number, read_metrics, result_dir, validate_metrics)
from evaluator.common.errors import EvaluatorError, did_you_mean
from recorder.sinks import (LocalHistorySink, RecorderSettings, ResultRecord, WandbSettings, mlflow_settings,
                            row_revision, versions)

__all__ = ["evaluation_context", "EvaluationContext", "MetricsTracker", "track_metrics", "get_metrics_history",
           "compare_metric", "load_results", "load_samples", "IntegrationFailed"]

DEFAULT_BENCHMARK = "metrics"  # the benchmark name of metrics logged without one (track_metrics, log_metrics)
RECORDED_BY = "evaluator.api"


class IntegrationFailed(EvaluatorError):
    """One or more integrations of an evaluation context (W&B, MLflow, add_mlops_integration) raised: the message
    names each and its error; the local history was written before any of them ran."""

    exit_code = 1

    def __init__(self, failures: list[tuple[str, BaseException]]):
        self.failures = failures
        super().__init__("; ".join(f"{name}: {type(e).__name__}: {e}" for name, e in failures))


# ---- where the store is ---------------------------------------------------------------------------------------
def store_dir(cache_dir: Optional[str] = None) -> str:
    """The cache_dir results are recorded in: the argument, else `configure(cache_dir=...)`'s."""
    if cache_dir is None:
        from evaluator.api.evaluate import configure  # configure() with no settings returns those in force

        cache_dir = configure().get("cache_dir")
    if not cache_dir:
        raise EvaluatorError("cache_dir: not set; pass cache_dir=... or call evaluator.api.configure(cache_dir=...)")
    return os.path.abspath(os.path.expanduser(str(cache_dir)))


def _check_name(kind: str, name: Any) -> str:
    """A run or benchmark name becomes a folder of the results tree: one non-empty path segment."""
    if not isinstance(name, str) or not name.strip() or name in (".", "..") or "/" in name or "\\" in name \
            or "\0" in name:
        raise EvaluatorError(f"{kind}: expected a non-empty name without '/' (it names a folder of the results "
                             f"tree), got {name!r}")
    return name


def _check_iteration(iteration: Any) -> int:
    """An iteration as the daemon's ledger holds it: a whole number from 0 to MAX_ITERATION (2**63-1)."""
    problem = iteration_problem(iteration)
    if problem:
        raise EvaluatorError(f"iteration: {problem}")
    return iteration


def _check_tokens(tokens_b: Any) -> Optional[float]:
    """Tokens seen, in billions: a finite number >= 0, or None (unknown)."""
    if tokens_b is not None and (not is_finite_number(tokens_b) or tokens_b < 0):
        raise EvaluatorError(f"tokens_b: expected a finite number >= 0 (billions of tokens) or None, got {tokens_b!r}")
    return tokens_b


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _runs(cache_dir: str) -> list[str]:
    root = os.path.join(cache_dir, "results")
    if not os.path.isdir(root):
        return []
    return sorted(r for r in os.listdir(root) if os.path.isfile(os.path.join(root, r, "history.jsonl")))


# ---- writing one result ------------------------------------------------------------------------------------------
def _numbers(metrics: Any, where: str) -> dict:
    """Metric name -> number, checked as metrics.json is (a finite number; no reserved name): a value that is not a
    number is an error naming it, never dropped."""
    if not isinstance(metrics, dict) or not metrics:
        raise EvaluatorError(f"{where}: expected a non-empty dict of metric name -> number, got {metrics!r}")
    try:
        validate_metrics({"metrics": metrics}, where)
    except ValueError as e:
        raise EvaluatorError(str(e)) from None
    for name, value in metrics.items():  # the API's results are read back as floats (load_results, the plots)
        if not is_finite_number(value):
            raise EvaluatorError(f"{where}: metrics.{name}: expected a finite number, got {value!r}")
    return {str(k): v for k, v in metrics.items()}


def _parts(result: Any) -> dict:
    """What the store keeps of an EvaluationResult (evaluator.api.evaluate) or a plain dict of metrics."""
    if isinstance(result, dict):
        return {"metrics": result}
    if not hasattr(result, "metrics"):
        raise EvaluatorError(f"expected a dict of metrics or an EvaluationResult, got {type(result).__name__}")
    info = dict(getattr(result, "info", None) or {})
    return {"metrics": dict(result.metrics), "stderr": dict(getattr(result, "stderr", None) or {}),
            "per_category": dict(getattr(result, "per_category", None) or {}),
            "samples": list(getattr(result, "samples", None) or []), "n": info.get("n"),
            "benchmark": info.get("benchmark") or info.get("dataset_id"), "dataset_id": info.get("dataset_id"),
            "per_sample": info.get("per_sample"), "versions": info.get("versions") or {},
            "work_dir": info.get("work_dir")}


def _score_row(sample: dict, where: str) -> dict:
    """One scores.jsonl row (docs/insight.md) of a sample of an EvaluationResult."""
    if not isinstance(sample, dict):
        raise EvaluatorError(f"{where}: expected a dict, got {type(sample).__name__}")
    missing = [k for k in ("sample_id", "status", "scores") if k not in sample]
    if missing:
        raise EvaluatorError(f"{where}: missing {', '.join(missing)} (a sample needs sample_id, status and scores "
                             f"to be compared)")
    row = {"schema_version": SCORES_SCHEMA_VERSION, "sample_id": str(sample["sample_id"]),
           "status": sample["status"], "category": sample.get("category"),
           "prediction": "" if sample.get("prediction") is None else sample["prediction"],
           "scores": sample["scores"]}
    reference = sample.get("reference")  # EvaluationResult's: the target, else the references
    if reference is not None:
        row["references" if isinstance(reference, list) else "target"] = reference
    for key in ("target", "references", "choices", "compared"):
        if sample.get(key) is not None:
            row[key] = sample[key]
    from evaluator.common.compare import check_score_row

    check_score_row(row, where)
    return row


def _scores_of(parts: dict, where: str) -> list[dict]:
    """The scores.jsonl rows of a result: the evaluation's own file when its work folder holds one (it keeps what
    each metric compared), else rows made from its samples; [] for a dict of metrics."""
    if _own_work_dir(parts):
        from evaluator.common.compare import read_scores

        return list(read_scores(os.path.join(parts["work_dir"], SCORES)).values())
    return [_score_row(s, f"{where}: samples[{i}]") for i, s in enumerate(parts.get("samples") or [])]


def _own_work_dir(parts: dict) -> bool:
    """Whether the result's work folder still holds its own scores.jsonl: a later run given the same work_dir
    overwrites it, and that run's per-sample scores (and prompts) must not be recorded as this result's."""
    work_dir = parts.get("work_dir")
    if not work_dir or not os.path.exists(os.path.join(work_dir, SCORES)):
        return False
    from evaluator.common.compare import read_scores

    held = {sid: row.get("prediction", "") for sid, row in read_scores(os.path.join(work_dir, SCORES)).items()}
    mine = {str(s.get("sample_id")): "" if s.get("prediction") is None else s.get("prediction")
            for s in parts.get("samples") or [] if isinstance(s, dict)}
    return not mine or held == mine


def record_result(run: str, iteration: int, benchmark: str, result: Any, *, cache_dir: Optional[str] = None,
                  metadata: Optional[dict] = None, tokens_b: Optional[float] = None) -> ResultRecord:
    """Write one result into the store (results tree + history line) and return its ResultRecord.

    `result`: a dict of metric -> number, or an EvaluationResult (its stderr, n, per-category values and, when its
    samples carry scores, a scores.jsonl that paired comparisons read)."""
    return _checked_result(run, iteration, benchmark, result, cache_dir=cache_dir, metadata=metadata,
                          tokens_b=tokens_b)()


def _checked_result(run: str, iteration: int, benchmark: str, result: Any, *, cache_dir: Optional[str] = None,
                   metadata: Optional[dict] = None, tokens_b: Optional[float] = None) -> Callable[[], ResultRecord]:
    """Every check of record_result, nothing written yet: returns the call that writes the result, so that several
    results are all checked before the first is written (end_run, a context's close)."""
    cache_dir = store_dir(cache_dir)
    run, benchmark, iteration = _check_name("run", run), _check_name("benchmark", benchmark), _check_iteration(iteration)
    tokens_b = _check_tokens(tokens_b)
    parts = _parts(result)
    where = f"{run}@{iteration}/{benchmark}"
    metrics = _numbers(parts["metrics"], f"{where}: metrics")
    rows = _scores_of(parts, where)
    history = LocalHistorySink(cache_dir, plots=False)  # curves.png: the daemon's sink redraws a run it finds newer
    rows_held = history.rows(run)
    theirs = [e for e in map(lambda r: _entry(cache_dir, r), rows_held) if e["recorded_by"] != RECORDED_BY]
    if theirs:  # the daemon's ledger does not know our lines: its sink would take its own result for a re-offer
        raise EvaluatorError(f"run {run!r}: {os.path.join(cache_dir, 'results', run)} holds results the daemon "
                             f"recorded (e.g. iteration {theirs[0]['iteration']}/{theirs[0]['benchmark']}); record "
                             f"API results under a run name of your own")
    daemon_rows = _ledger_rows(cache_dir, run)
    if daemon_rows:  # the daemon evaluates this run (nothing recorded yet): our line would hide its result
        raise EvaluatorError(f"run {run!r}: the daemon's ledger {os.path.join(cache_dir, 'ledger.sqlite3')} has "
                             f"{daemon_rows} job(s) of this run, so the daemon records it; record API results under "
                             f"a run name of your own")
    held = {(r["iteration"], r["benchmark"]): row_revision(r) for r in rows_held}
    revision = 0 if (iteration, benchmark) not in held else held[(iteration, benchmark)] + 1
    out = result_dir(cache_dir, run, iteration, benchmark)
    n = parts.get("n")
    if n is None and rows:
        n = len(rows)
    doc = {"run": run, "iteration": iteration, "benchmark": benchmark, "metrics": metrics,
           "stderr": parts.get("stderr") or {}, "per_category": parts.get("per_category") or {}, "n": n,
           "tokens_b": tokens_b, "revision": revision, "versions": dict(versions(), **(parts.get("versions") or {})),
           "metadata": dict(metadata or {}), "recorded_at": _now(), "recorded_by": RECORDED_BY}
    if parts.get("dataset_id") is not None:
        doc["dataset_id"] = parts["dataset_id"]
    if parts.get("per_sample"):
        doc["per_sample"] = parts["per_sample"]
    try:
        validate_metrics(doc, os.path.join(out, METRICS))
    except ValueError as e:
        raise EvaluatorError(str(e)) from None
    doc = _jsonable(doc, where)
    predictions = os.path.join(parts.get("work_dir") or "", PREDICTIONS)
    with_predictions = bool(rows) and _own_work_dir(parts) and os.path.exists(predictions)

    def write() -> ResultRecord:
        # checked: only now may an earlier revision's files go (they must not pair with this one's)
        os.makedirs(out, exist_ok=True)
        for name in (COMPARE, SCORES, METRICS, PREDICTIONS):
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
        if rows:  # before metrics.json, which stays the done file
            write_text_atomic(os.path.join(out, SCORES), "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        if with_predictions:  # the prompts a comparison's flips show
            shutil.copyfile(predictions, os.path.join(out, PREDICTIONS) + ".tmp")
            os.replace(os.path.join(out, PREDICTIONS) + ".tmp", os.path.join(out, PREDICTIONS))
        write_json_atomic(os.path.join(out, METRICS), doc)
        record = ResultRecord(run=run, iteration=iteration, benchmark=benchmark, metrics=metrics, tokens_b=tokens_b,
                              n=n, stderr=doc["stderr"], per_category=doc["per_category"],
                              metrics_path=os.path.join(out, METRICS), versions=doc["versions"], revision=revision)
        history.record(record)
        return record

    return write


def _ledger_rows(cache_dir: str, run: str) -> int:
    """How many jobs of `run` the daemon's ledger in cache_dir holds (0 without a ledger)."""
    if not os.path.exists(os.path.join(cache_dir, "ledger.sqlite3")):
        return 0
    from evaluator.daemon.ledger import Ledger  # sqlite3 only

    led = Ledger(cache_dir, readonly=True)
    try:
        return sum(led.counts(run).values())
    finally:
        led.close()


def _jsonable(doc: dict, where: str) -> dict:
    try:
        json.dumps(doc)
    except (TypeError, ValueError) as e:
        raise EvaluatorError(f"{where}: metadata: expected JSON values (str, number, bool, list, dict): {e}") from None
    return doc


# ---- reading the store -------------------------------------------------------------------------------------------
def _entry(cache_dir: str, row: dict) -> dict:
    """A history row as get_metrics_history shows it, with the metadata and time its metrics.json holds."""
    path = row.get("metrics_path") or os.path.join(
        result_dir(cache_dir, row["run"], row["iteration"], row["benchmark"]), METRICS)
    doc: dict = {}
    modified = None
    try:  # one read, no exists() first: a rerun may move the folder aside in between
        doc = read_metrics(path)  # the rules it was written by; a damaged file is named, never half-read
        modified = os.path.getmtime(path)
    except FileNotFoundError:
        pass  # the folder was cleaned up (or moved aside): the history line is all there is
    except ValueError as e:
        raise EvaluatorError(f"{e}; repair or remove that result folder") from None
    except OSError as e:  # e.g. a folder where the file should be
        raise EvaluatorError(f"{path}: cannot be read ({e.strerror}); repair or remove that result folder") \
            from None
    recorded_at = doc.get("recorded_at") or (None if modified is None else _dt.datetime.fromtimestamp(
        modified, _dt.timezone.utc).isoformat(timespec="milliseconds"))
    return {"run": row["run"], "iteration": row["iteration"], "benchmark": row["benchmark"],
            "metrics": dict(row["metrics"]), "stderr": dict(row.get("stderr") or {}), "n": row.get("n"),
            "tokens_b": row.get("tokens_b"), "revision": row_revision(row), "fingerprint": row.get("fingerprint", ""),
            "metadata": doc.get("metadata") or {}, "recorded_at": recorded_at,
            "recorded_by": doc.get("recorded_by", "daemon"), "result_dir": os.path.dirname(path)}


def get_metrics_history(run: Optional[str] = None, *, cache_dir: Optional[str] = None) -> list[dict]:
    """Every recorded result (the daemon's and the API's) of every run or of `run`, oldest first: one dict per
    (run, iteration, benchmark) with metrics, stderr, n, tokens_b, revision, metadata and recorded_at."""
    cache_dir = store_dir(cache_dir)
    history = LocalHistorySink(cache_dir, plots=False)
    runs = [_check_name("run", run)] if run is not None else _runs(cache_dir)
    out = [_entry(cache_dir, row) for r in runs for row in history.rows(r)]
    return sorted(out, key=lambda e: (e["recorded_at"] or "", e["run"], e["iteration"], e["benchmark"]))


def _pick_benchmark(entries: list[dict], metric: str, benchmark: Optional[str]) -> str:
    having = sorted({e["benchmark"] for e in entries if metric in e["metrics"]})
    if benchmark is not None:
        if benchmark not in having:
            raise EvaluatorError(f"benchmark {benchmark!r}: no recorded result has metric {metric!r} in it "
                                 f"(benchmarks with it: {', '.join(having) or 'none'})"
                                 f"{did_you_mean(benchmark, having)}")
        return benchmark
    if not having:
        known = sorted({m for e in entries for m in e["metrics"]})
        raise EvaluatorError(f"metric {metric!r}: no recorded result has it (recorded metrics: "
                             f"{', '.join(known) or 'none'}){did_you_mean(metric, known)}")
    if len(having) > 1:
        raise EvaluatorError(f"metric {metric!r} is recorded for benchmarks {', '.join(having)}: pass "
                             f"benchmark=... to say which to compare")
    return having[0]


def compare_entries(entries: list[dict], metric: str, *, benchmark: Optional[str] = None,
                    higher_is_better: bool = True, alpha: float = 0.05, seed: int = 0) -> dict:
    """The comparison compare_metric and MetricsTracker.compare_runs return, over history entries."""
    from evaluator.common.paired import alpha_problem
    if alpha_problem(alpha):
        raise EvaluatorError(f"alpha: {alpha_problem(alpha)}")
    benchmark = _pick_benchmark(entries, metric, benchmark)
    latest: dict[str, dict] = {}
    for e in entries:  # each run's latest iteration of the benchmark
        if e["benchmark"] == benchmark and metric in e["metrics"]:
            if e["run"] not in latest or e["iteration"] >= latest[e["run"]]["iteration"]:
                latest[e["run"]] = e
    runs = {r: {"iteration": e["iteration"], "value": e["metrics"][metric], "stderr": e["stderr"].get(metric),
                "n": e["n"], "recorded_at": e["recorded_at"]} for r, e in sorted(latest.items())}
    values = {r: v["value"] for r, v in runs.items()}
    pick = max if higher_is_better else min
    best_run = pick(values, key=lambda r: values[r])
    worst_run = (min if higher_is_better else max)(values, key=lambda r: values[r])
    stats = {"best": values[best_run], "best_run": best_run, "worst": values[worst_run], "worst_run": worst_run,
             "average": math.fsum(values.values()) / len(values), "runs": len(values)}
    paired, not_paired = {}, {}
    from evaluator.common.compare import compare_dirs

    for r, e in sorted(latest.items()):
        if r == best_run:
            continue
        try:
            c = compare_dirs(e["result_dir"], latest[best_run]["result_dir"], main_metric=metric, seed=seed,
                             alpha=alpha, max_flips=0)
        except EvaluatorError as err:  # no per-sample scores on one side, or no sample in common: said, not guessed
            not_paired[r] = str(err)
            continue
        line = c["metrics"][metric]
        paired[r] = {"against": best_run, "n_common": c["n_common"], "only_run": c["only_new"],
                     "only_against": c["only_old"], **line}
    what = (f"{benchmark}/{metric}: the latest iteration of each of {len(runs)} run(s); "
            f"{'higher' if higher_is_better else 'lower'} is better; each run against the best ({best_run}) by a "
            f"paired test on the samples both scored (delta = run - best)")
    return {"metric": metric, "benchmark": benchmark, "compared": what, "runs": runs, "_stats": stats,
            "paired": paired, "not_paired": not_paired}


def compare_metric(metric: str, *, benchmark: Optional[str] = None, runs: Optional[Iterable[str]] = None,
                   higher_is_better: bool = True, alpha: float = 0.05, cache_dir: Optional[str] = None) -> dict:
    """Compare one metric across runs of the store: each run's latest value, `_stats` (best, worst, average) and,
    where per-sample scores exist, a paired test of each run against the best (`paired`; `not_paired` says why
    a run has none). `compared` says in words what was compared."""
    entries = get_metrics_history(cache_dir=cache_dir)
    if runs is not None:
        if isinstance(runs, str):  # one name, not its letters
            runs = [runs]
        wanted = set(runs)
        unknown = sorted(wanted - {e["run"] for e in entries})
        if unknown:
            raise EvaluatorError(f"runs: {unknown} have no recorded result in {store_dir(cache_dir)}")
        entries = [e for e in entries if e["run"] in wanted]
    return compare_entries(entries, metric, benchmark=benchmark, higher_is_better=higher_is_better, alpha=alpha)


# ---- tracking ----------------------------------------------------------------------------------------------------
class MetricsTracker:
    """Runs recorded into the store: start_run -> log_metrics (any number of times) -> end_run."""

    def __init__(self, cache_dir: Optional[str] = None):
        self.cache_dir = cache_dir
        self.run_metadata: dict = {}
        self.current_run_metrics: dict[str, dict] = {}  # benchmark -> metrics logged in the current run
        self._results: dict[str, Any] = {}  # benchmark -> the EvaluationResult logged for it (samples, stderr)
        self._iteration = 0
        self._tokens_b: Optional[float] = None
        self.ended: list[str] = []  # run names this tracker ended, in order (compare_runs compares these)

    def start_run(self, run_name: Optional[str] = None, *, iteration: int = 0, tokens_b: Optional[float] = None,
                  **metadata) -> None:
        """Begin a run; `metadata` (JSON values) is stored with each of its results."""
        name = run_name or f"run_{time.strftime('%Y%m%d-%H%M%S')}"
        if self.current_run_metrics:  # starting another would drop what was logged
            raise EvaluatorError(f"start_run: run {self.run_metadata['run_name']!r} is still open with metrics "
                                 f"logged; call end_run() first")
        # every check before any state changes: a refused start leaves the tracker as it was
        meta = {"run_name": _check_name("run_name", name), "start_time": time.time(), **metadata}
        iteration, tokens_b = _check_iteration(iteration), _check_tokens(tokens_b)
        _jsonable(meta, f"start_run({name!r})")
        self.run_metadata, self._iteration, self._tokens_b = meta, iteration, tokens_b
        self.current_run_metrics, self._results = {}, {}

    def log_metrics(self, metrics: Any, *, benchmark: Optional[str] = None) -> None:
        """Add metrics to the current run: a dict of name -> number, or an EvaluationResult (then its stderr, n and
        per-sample scores are kept too, and `benchmark` defaults to its dataset id)."""
        if not self.run_metadata:
            raise EvaluatorError("log_metrics: no run started; call start_run(run_name) first")
        parts = _parts(metrics)
        bench = benchmark or (None if isinstance(metrics, dict) else parts.get("benchmark")) or DEFAULT_BENCHMARK
        bench = _check_name("benchmark", bench)
        values = _numbers(parts["metrics"], f"{self.run_metadata['run_name']}/{bench}: metrics")
        if not isinstance(metrics, dict):
            if bench in self._results or bench in self.current_run_metrics:
                raise EvaluatorError(f"log_metrics: benchmark {bench!r} already has metrics in this run; an "
                                     f"EvaluationResult is one benchmark's whole result (pass benchmark=...)")
            self._results[bench] = metrics
        elif bench in self._results:
            raise EvaluatorError(f"log_metrics: benchmark {bench!r} holds an EvaluationResult in this run; log "
                                 f"other metrics under another benchmark=...")
        self.current_run_metrics.setdefault(bench, {}).update(values)

    def end_run(self) -> dict:
        """Record every benchmark logged in the run, or none when one is refused (the run stays open); returns
        {"metadata", "metrics", "records"}."""
        meta, writes = self._checked_end()
        return self._ended(meta, [write() for write in writes])

    def _checked_end(self) -> tuple[dict, list[Callable[[], ResultRecord]]]:
        """(the run's metadata, the writes of its results), every result checked and nothing written."""
        if not self.run_metadata:
            raise EvaluatorError("end_run: no run started")
        end_time = time.time()
        meta = dict(self.run_metadata, end_time=end_time, duration=end_time - self.run_metadata["start_time"])
        stored = {k: v for k, v in meta.items() if k not in ("run_name",)}
        writes = [_checked_result(meta["run_name"], self._iteration, bench, self._results.get(bench, values),
                                  cache_dir=self.cache_dir, metadata=stored, tokens_b=self._tokens_b)
                  for bench, values in self.current_run_metrics.items()]
        return meta, writes

    def _ended(self, meta: dict, records: list[ResultRecord]) -> dict:
        """Close the run whose results were recorded; its end_run answer."""
        self.ended.append(meta["run_name"])
        out = {"metadata": meta, "metrics": {b: dict(v) for b, v in self.current_run_metrics.items()},
               "records": records}
        self.run_metadata, self.current_run_metrics, self._results = {}, {}, {}
        return out

    def get_history(self) -> list[dict]:
        """Every result in the store (get_metrics_history), not only this tracker's."""
        return get_metrics_history(cache_dir=self.cache_dir)

    def compare_runs(self, metric: str, *, benchmark: Optional[str] = None, higher_is_better: bool = True,
                     alpha: float = 0.05) -> dict:
        """compare_metric over the runs this tracker ended."""
        if not self.ended:
            raise EvaluatorError("compare_runs: this tracker has ended no run yet")
        return compare_metric(metric, benchmark=benchmark, runs=self.ended, higher_is_better=higher_is_better,
                              alpha=alpha, cache_dir=self.cache_dir)


def track_metrics(metrics: list[str], *, run_name: Optional[str] = None, benchmark: str = DEFAULT_BENCHMARK,
                  iteration: Optional[int] = None, cache_dir: Optional[str] = None) -> Callable:
    """Decorator: record the named metrics of the dict the function returns (it still returns it unchanged).

    Each call is one result of run `run_name` (default: the function's name) at `iteration`, or, when None, at the
    next iteration after the run's last one (0 first), so calls from a loop draw a curve. A named metric the
    function did not return, or that is not a number, raises EvaluatorError; the others are not recorded."""
    if isinstance(metrics, str) or not metrics:
        raise EvaluatorError(f"track_metrics: expected a non-empty list of metric names, got {metrics!r}")
    names = list(metrics)

    def decorator(fn: Callable) -> Callable:
        run = _check_name("run_name", run_name or fn.__name__)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            values = out if isinstance(out, dict) else getattr(out, "metrics", None)
            if not isinstance(values, dict):
                raise EvaluatorError(f"track_metrics: {fn.__name__} returned {type(out).__name__}; expected a dict "
                                     f"of metrics or an EvaluationResult")
            missing = [m for m in names if m not in values]
            if missing:
                raise EvaluatorError(f"track_metrics: {fn.__name__} returned no {', '.join(map(repr, missing))} "
                                     f"(it returned {', '.join(map(repr, values)) or 'nothing'})")
            step = iteration
            if step is None:
                done = [e["iteration"] for e in get_metrics_history(run, cache_dir=cache_dir)
                        if e["benchmark"] == benchmark]
                step = max(done) + 1 if done else 0
            record_result(run, step, benchmark, {m: values[m] for m in names}, cache_dir=cache_dir,
                          metadata={"function": f"{fn.__module__}.{fn.__qualname__}"})
            return out

        return wrapper

    return decorator


# ---- evaluation contexts ---------------------------------------------------------------------------------------
class EvaluationContext:
    """`with evaluation_context(...) as ctx:` one run at one iteration; see evaluation_context."""

    def __init__(self, dataset: Any = None, run_name: Optional[str] = None, iteration: int = 0, *,
                 benchmark: Optional[str] = None, tokens_b: Optional[float] = None, cache_dir: Optional[str] = None,
                 metadata: Optional[dict] = None, **options):
        self.dataset = dataset
        self.run_name = run_name
        self.iteration = _check_iteration(iteration)
        self.benchmark_name = benchmark
        self.tokens_b = _check_tokens(tokens_b)
        self.cache_dir = cache_dir
        from evaluator.api.evaluate import _check_keywords  # run_function's options, and HRET's that it replaces

        _check_keywords("evaluation_context", options)
        if metadata is not None and not isinstance(metadata, dict):
            raise EvaluatorError(f"evaluation_context: metadata: expected a dict of name -> JSON value, got "
                                 f"{metadata!r:.80}")
        self.options = options  # run_function's keyword arguments (metrics=, sample_size=, batch_size=, ...)
        self.metrics_tracker = MetricsTracker(cache_dir)
        self._metadata = _jsonable(dict(metadata or {}), "evaluation_context")
        self.results: list = []
        self.records: list[ResultRecord] = []
        self.run_result: Optional[dict] = None
        self._integrations: list[tuple[str, Callable]] = []
        self._other_runs: list[tuple[str, Any]] = []  # ctx.benchmark: (run name, result) of each function

    def __enter__(self) -> "EvaluationContext":
        meta = dict(self._metadata)
        if self.dataset is not None:
            meta["dataset"] = str(self.dataset)
        self.metrics_tracker.start_run(self.run_name, iteration=self.iteration, tokens_b=self.tokens_b, **meta)
        self.run_name = self.metrics_tracker.run_metadata["run_name"]
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.metrics_tracker.run_metadata = {}
            return  # the body failed: nothing is recorded, its exception goes on
        self.close()

    # -- running functions
    def _run(self, fn: Callable, name: Optional[str], kw: dict):
        from evaluator.api.evaluate import run_function  # A1's; evaluate.py imports this module's package

        from evaluator.api.evaluate import _check_keywords

        _check_keywords("evaluation_context", kw)
        if self.dataset is None:
            raise EvaluatorError("evaluation_context: dataset: not set; pass dataset=... to evaluate a function")
        return run_function(fn, self.dataset, **{**self.options, **kw, "name": name})

    def evaluate(self, fn: Callable, **kw):
        """Run `fn` over the context's dataset (evaluator.api.evaluate.run_function) and log its result."""
        result = self._run(fn, getattr(fn, "__name__", None), kw)
        self._refuse_second_result(self.run_name, self._benchmark_of(result), self._recorded_keys())
        self.results.append(result)
        self.metrics_tracker.log_metrics(result, benchmark=self.benchmark_name)
        return result

    def benchmark(self, fns: dict, **kw) -> dict:
        """Run each function over the dataset; each result is recorded as the run named by its key (at the
        context's iteration), so compare_metric(..., runs=fns) pairs them."""
        from evaluator.api.evaluate import model_folders

        if not isinstance(fns, dict) or not fns:
            raise EvaluatorError(f"ctx.benchmark: expected a dict of run name -> function, got {fns!r:.80}")
        for name, fn in fns.items():  # before any function runs
            _check_name("run", name)
            if not callable(fn):
                raise EvaluatorError(f"ctx.benchmark: {name}: expected a function, got {type(fn).__name__}")
        out = {}
        folders = model_folders({**self.options, **kw}.get("work_dir"), list(fns))
        for name, fn in fns.items():
            result = self._run(fn, name, {**kw, "work_dir": folders[name]} if folders[name] else kw)
            self._refuse_second_result(name, self._benchmark_of(result), self._recorded_keys())
            out[name] = result
            self.results.append(result)
            self._other_runs.append((name, result))
        return out

    def _benchmark_of(self, result: Any) -> str:
        """The benchmark a result of this context is recorded under."""
        return self.benchmark_name or _parts(result).get("benchmark") or DEFAULT_BENCHMARK

    def _recorded_keys(self) -> list[tuple[str, str]]:
        """(run, benchmark) of each result close() records: the context's own run's, then ctx.benchmark's."""
        return [(self.run_name, b) for b in self.metrics_tracker.current_run_metrics] + [
            (name, self._benchmark_of(result)) for name, result in self._other_runs]

    def _refuse_second_result(self, run: str, benchmark: str, taken: list[tuple[str, str]]) -> None:
        """One result per (run, benchmark) in a context: a second would be recorded as a new revision of the
        first, replacing it."""
        if (run, benchmark) in taken:
            raise EvaluatorError(f"evaluation_context: run {run!r} already has a {benchmark!r} result in this "
                                 f"context (its run_name={self.run_name!r}, or a ctx.benchmark key); a second one "
                                 f"would replace it: name the function's run differently")

    # -- integrations
    def add_mlops_integration(self, fn: Callable) -> None:
        """Call fn(run_result, results) when the context ends; an exception it raises is raised (IntegrationFailed)."""
        self._integrations.append((getattr(fn, "__name__", repr(fn)), lambda: fn(self.run_result, self.results)))

    def log_to_mlflow(self, experiment_name: Optional[str] = None, *, tracking_uri: Optional[str] = None) -> None:
        """Record the context's results with our MLflow sink (metrics `<benchmark>/<metric>` at step=iteration);
        default store: <cache_dir>/mlflow.db, or MLFLOW_TRACKING_URI."""
        def deliver():
            from recorder.mlflow_sink import MlflowSink

            sink = MlflowSink(self._settings(experiment_name or "evaluator-api", tracking_uri=tracking_uri))
            for record in self.records:
                sink.record(record)

        self._integrations.append(("mlflow", deliver))

    def log_to_wandb(self, project_name: Optional[str] = None, *, mode: str = "auto", dir: Optional[str] = None,
                     step_metric: str = "iteration") -> None:
        """Record the context's results to W&B. A run already active in this process (a trainer's `wandb.run`) gets
        them as rows with `step_metric` = iteration (define_metric(..., step_metric=...)) and is never finished;
        otherwise our W&B sink logs them to the run named after the context's run (offline without an API key)."""
        def deliver():
            active = getattr(sys.modules.get("wandb"), "run", None)  # a trainer that uses W&B imported it already
            if active is not None:
                _log_into_active_run(active, self.records, step_metric)
                return
            from recorder.wandb_sink import WandbSink

            settings = self._settings(project_name or "evaluator-api", wandb_mode=mode, wandb_dir=dir)
            WandbSink(settings).record_batch(self.records)

        self._integrations.append(("wandb", deliver))

    def _settings(self, project: str, *, tracking_uri: Optional[str] = None, wandb_mode: str = "auto",
                  wandb_dir: Optional[str] = None) -> RecorderSettings:
        cache_dir = store_dir(self.cache_dir)
        config = {"run_name": self.run_name, "dataset": None if self.dataset is None else str(self.dataset),
                  **self._metadata, "versions": versions()}
        return RecorderSettings(
            cache_dir=cache_dir, project=project,
            wandb=WandbSettings(project=project, mode=wandb_mode, dir=wandb_dir or os.path.join(cache_dir, "wandb")),
            mlflow=mlflow_settings(cache_dir, tracking_uri, project), run_config=config, plots=False)

    def close(self) -> dict:
        """End the run: record its results in the store, then run every integration; returns the run result.
        Called by `with`; raises IntegrationFailed naming each integration that failed (the others still ran)."""
        if self.run_result is not None:
            return self.run_result
        keys = self._recorded_keys()  # ctx.metrics_tracker.log_metrics may have added one after a ctx.benchmark
        for i, (run, benchmark) in enumerate(keys):
            self._refuse_second_result(run, benchmark, keys[:i])
        meta, writes = self.metrics_tracker._checked_end()  # every result checked before the first is written
        stored = {k: v for k, v in meta.items() if k != "run_name"}
        writes += [_checked_result(name, self.iteration, self._benchmark_of(result), result, cache_dir=self.cache_dir,
                                   metadata=stored, tokens_b=self.tokens_b) for name, result in self._other_runs]
        records = [write() for write in writes]
        own = len(self.metrics_tracker.current_run_metrics)
        self.run_result = self.metrics_tracker._ended(meta, records[:own])
        self.records = records
        failures = []
        for name, deliver in self._integrations:
            try:
                deliver()
            except Exception as e:  # every integration runs; each failure is raised below, none is swallowed
                failures.append((name, e))
        if failures:
            raise IntegrationFailed(failures) from failures[0][1]
        return self.run_result

    def save_results(self, path: Optional[str] = None) -> str:
        """Write the run's metadata, metrics and results as JSON; returns the path (default:
        <cache_dir>/api/<run>/iter_<%07d>.json)."""
        if path is None:
            path = os.path.join(store_dir(self.cache_dir), "api", self.run_name or "run", f"iter_{self.iteration:07d}.json")
        meta = self.run_result["metadata"] if self.run_result else self.metrics_tracker.run_metadata
        metrics = self.run_result["metrics"] if self.run_result else self.metrics_tracker.current_run_metrics
        doc = {"run_metadata": meta, "iteration": self.iteration, "metrics": metrics,
               "results": [_result_dict(r) for r in self.results]}
        try:
            write_json_atomic(path, _jsonable(doc, f"save_results({path})"))
        except OSError as e:
            from evaluator.api.evaluate import write_problem

            raise EvaluatorError(f"save_results: path: {path}: cannot be written ({write_problem(e)})") from None
        return path


def _result_dict(result: Any) -> dict:
    to_dict = getattr(result, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    parts = _parts(result)
    return {k: v for k, v in parts.items() if v not in (None, {}, [])}


def _log_into_active_run(run, records: list[ResultRecord], step_metric: str) -> None:
    """Log results into a W&B run we did not start (a trainer's): one row per result with `step_metric` set to the
    iteration, every `<benchmark>/*` series on that x axis; the run is left open."""
    run.define_metric(step_metric)
    for record in records:
        run.define_metric(f"{record.benchmark}/*", step_metric=step_metric)
        row = {step_metric: record.iteration, **{f"{record.benchmark}/{k}": v for k, v in record.metrics.items()}}
        if record.revision:
            row[f"{record.benchmark}/revision"] = record.revision
        run.log(row)


def evaluation_context(dataset: Any = None, run_name: Optional[str] = None, iteration: int = 0, **kwargs
                       ) -> EvaluationContext:
    """A context for one run at one iteration: ctx.evaluate(fn) / ctx.benchmark(fns) run functions over `dataset`,
    log_to_mlflow / log_to_wandb / add_mlops_integration deliver the results when it ends, save_results(path).

    kwargs: benchmark (the result's benchmark name; default the dataset id), tokens_b, cache_dir, metadata, and
    run_function's options (metrics, sample_size, batch_size, max_workers, max_error_rate, benchmark_type, options)."""
    return EvaluationContext(dataset, run_name, iteration, **kwargs)


# ---- results as data ---------------------------------------------------------------------------------------------
RESULT_COLUMNS = ["run", "iteration", "benchmark", "metric", "value", "stderr", "n", "tokens_b", "revision",
                  "fingerprint", "recorded_at", "recorded_by", "result_dir"]
SAMPLE_COLUMNS = ["run", "iteration", "benchmark", "sample_id", "status", "category", "prediction", "target",
                  "references"]


def load_results(cache_dir: Optional[str] = None, run: Optional[str] = None):
    """pandas DataFrame of every recorded result: one row per run x iteration x benchmark x metric (the latest
    revision of each result, as the history holds it), with stderr, n, tokens_b and where the result lives."""
    import pandas as pd

    rows = []
    for e in get_metrics_history(run, cache_dir=cache_dir):
        for metric, value in e["metrics"].items():
            rows.append({"run": e["run"], "iteration": e["iteration"], "benchmark": e["benchmark"], "metric": metric,
                         "value": value, "stderr": e["stderr"].get(metric), "n": e["n"], "tokens_b": e["tokens_b"],
                         "revision": e["revision"], "fingerprint": e["fingerprint"], "recorded_at": e["recorded_at"],
                         "recorded_by": e["recorded_by"], "result_dir": e["result_dir"]})
    frame = pd.DataFrame(rows, columns=RESULT_COLUMNS).astype(
        {"iteration": "int64", "n": "Int64", "value": "float64", "stderr": "float64", "tokens_b": "float64",
         "revision": "int64"})  # a missing n stays <NA>, not a float
    return frame.sort_values(["run", "iteration", "benchmark", "metric"], kind="stable").reset_index(drop=True)


def load_samples(cache_dir: Optional[str] = None, run: Optional[str] = None, *, iteration: Optional[int] = None,
                 benchmark: Optional[str] = None):
    """pandas DataFrame of the per-sample rows (scores.jsonl) of every recorded result (or those of `run`,
    `iteration`, `benchmark`): one row per sample, one column per metric. Results without per-sample scores add no
    rows; `frame.attrs["without_scores"]` lists their folders."""
    import pandas as pd

    from evaluator.common.compare import read_scores

    rows, metric_names, without = [], [], []
    for e in get_metrics_history(run, cache_dir=cache_dir):
        if (iteration is not None and e["iteration"] != iteration) or (benchmark is not None and
                                                                          e["benchmark"] != benchmark):
            continue
        path = os.path.join(e["result_dir"], SCORES)
        if not os.path.exists(path):
            without.append(e["result_dir"])
            continue
        for sid, r in read_scores(path).items():
            row = {"run": e["run"], "iteration": e["iteration"], "benchmark": e["benchmark"], "sample_id": sid,
                   "status": r["status"], "category": r.get("category"), "prediction": r.get("prediction", ""),
                   "target": r.get("target"), "references": r.get("references")}
            for name, value in r["scores"].items():
                if name in SAMPLE_COLUMNS:
                    raise EvaluatorError(f"{path}: metric {name!r} has the name of a sample column; rename it")
                if name not in metric_names:
                    metric_names.append(name)
                row[name] = value
            rows.append(row)
    frame = pd.DataFrame(rows, columns=SAMPLE_COLUMNS + metric_names).astype(
        {"iteration": "int64", **{name: "float64" for name in metric_names}})  # a null score is NaN
    frame.attrs["without_scores"] = without
    return frame
