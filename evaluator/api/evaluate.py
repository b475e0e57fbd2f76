"""Run a Python function over a benchmark and score it: `evaluate`, `quick_eval`, `benchmark`, `compare_models`,
`EvaluationResult`, `configure`, `load_config` (HRET's names, doing what they say; docs/python_api.md).

How a run goes (`run_function`):
1. the dataset is loaded by the benchmark registry (a registered name, a canonical dataset directory, or any path
   with `benchmark_type=`), the first `sample_size` samples if given;
2. the function is called on every sample (one input, or a list of `batch_size` inputs; `max_workers` threads);
   an exception is that sample's `status: error` row (type + message), never a crash of the run; more than
   `max_error_rate` failed samples raise `TooManyErrors` (the inference stage's rule, evaluator/common/records.py);
3. the answers are written as predictions.jsonl (RunResult rows) into a work folder, and scored by the evaluation
   stage's own `score()`: in this process for the metrics the registry does not mark `evaluation_venv`, in the
   evaluation venv (`python -m evaluator.stages.evaluation --job eval.job.json`) for the others, so the numbers
   are the ones `tools/bench.py eval` gives on the same predictions;
4. the work folder then holds predictions.jsonl, scores.jsonl and metrics.json, a result folder like the daemon's.

What the function takes (`input=`): "text" (the prompt: the one user turn's text) or "messages" (the canonical
message list, multi-turn history included, audio parts as {"type": "audio", "path": absolute path}). Left at None,
it is "messages" when the function's first parameter is named `messages` (or `batch_messages`) or annotated as a
list of dicts (`list[dict]`), else "text". A sample that a text function cannot take whole (a system message, more
than one turn, an audio part) is refused before any call, naming the sample and `input="messages"`.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import os
import subprocess
import tempfile
import threading
import time
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from evaluator.common.atomic import write_json_atomic, write_text_atomic
from evaluator.common.checks import MAX_SEED, number_problem
from evaluator.common.contracts import EVALUATION, JOB_FILE, LOG_FILE, METRICS, PREDICTIONS, SCORES, StageJob
from evaluator.common.errors import EvaluatorError, did_you_mean
from evaluator.common.records import (DEFAULT_MAX_ERROR_RATE, ERROR, OK, RunError, RunResult, too_many_errors,
                                      write_results)

__all__ = ["evaluate", "EvaluationResult", "ComparisonResult", "quick_eval", "benchmark", "compare_models",
           "configure", "load_config", "run_function", "TooManyErrors"]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BACKEND = "python-function"  # predictions.jsonl's `backend` for answers made by a user's function
INPUTS = ("text", "messages")
MAX_ERRORS_LISTED = 20
NO_METRIC_LINE = "[evaluation] error: no metric could be computed: "  # evaluation/stage.py NoMetricError, logged


class TooManyErrors(EvaluatorError):
    """More samples failed than max_error_rate allows; `.result` holds the (unscored) samples for inspection."""

    def __init__(self, message: str, result: "EvaluationResult"):
        super().__init__(message)
        self.result = result


# ---- settings (configure / load_config) ---------------------------------------------------------------------
@dataclass
class Settings:
    """What `configure` sets: defaults for every run of this process."""

    cache_dir: str = ""  # work folders go to <cache_dir>/api/; "" -> a fresh temporary folder per run
    evaluation_python: str = ""  # a venv folder or its python; "" -> $EVALUATOR_EVALUATION_PYTHON, .venvs/evaluation
    seed: int = 0  # the evaluation job's seed and the paired bootstrap's
    max_workers: int = 1
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE
    default_dataset: Optional[str] = None
    config: Any = None  # the AutoEvalConfig load_config read (its benchmarks are quick_eval's `benchmark=` names)


_SETTINGS = Settings()
_SETTINGS_LOCK = threading.Lock()


def configure(**settings) -> dict:
    """Set process-wide defaults (cache_dir, evaluation_python, seed, max_workers, max_error_rate,
    default_dataset); an unknown name raises EvaluatorError. Returns the settings now in force."""
    known = [f for f in Settings.__dataclass_fields__ if f != "config"]
    with _SETTINGS_LOCK:
        new = {}
        for key, value in settings.items():  # every check first: a refused call changes nothing
            if key not in known:
                raise EvaluatorError(f"configure: {key}: not a setting{did_you_mean(key, known)} "
                                     f"(known: {', '.join(known)})")
            if key in ("cache_dir", "evaluation_python", "default_dataset") and value:
                if not isinstance(value, (str, os.PathLike)):
                    raise EvaluatorError(f"configure: {key}: expected a path, got {value!r}")
                value = os.path.abspath(os.path.expanduser(os.fspath(value))) if key != "default_dataset" \
                    else os.fspath(value)
            new[key] = value
        candidate = dataclasses.replace(_SETTINGS, **new)
        candidate.max_workers, _, candidate.max_error_rate, _ = _check_run_numbers(
            "configure", candidate.max_workers, None, candidate.max_error_rate)
        problem = number_problem(candidate.seed, 0, MAX_SEED, integer=True)
        if problem:
            raise EvaluatorError(f"configure: seed: {problem}")
        candidate.seed = int(candidate.seed)
        for key in known:
            setattr(_SETTINGS, key, getattr(candidate, key))
        return {k: getattr(_SETTINGS, k) for k in known}


def load_config(path: str):
    """Read the daemon's config file (`auto_eval:`), validated as the daemon validates it (errors name the key and
    file:line), and make it this process's defaults: cache_dir, the evaluation venv (`envs.evaluation`), seed,
    and its `benchmarks:` as the names `quick_eval(fn, benchmark=...)` takes. Returns the config."""
    from evaluator.daemon.config import load_config as load_daemon_config  # pydantic: only when a config is read
    if not isinstance(path, (str, os.PathLike)):
        raise EvaluatorError(f"load_config: path: expected the config file's path, got {path!r}")
    if not os.path.isfile(path):  # checked here: the daemon's own check names its --config flag
        raise EvaluatorError(f"load_config: path: no such file: {os.fspath(path)}")
    cfg = load_daemon_config(os.fspath(path))
    with _SETTINGS_LOCK:
        _SETTINGS.cache_dir = cfg.cache_dir
        _SETTINGS.evaluation_python = cfg.envs.evaluation
        _SETTINGS.seed = cfg.seed
        _SETTINGS.config = cfg
    return cfg


def evaluation_python() -> str:
    """The evaluation venv's python: configure(evaluation_python=) / the config's envs.evaluation, else what
    tools/bench.py runs ($EVALUATOR_EVALUATION_PYTHON, else .venvs/evaluation)."""
    chosen = _SETTINGS.evaluation_python
    if chosen:
        python = os.path.join(chosen, "bin", "python") if os.path.isdir(chosen) else chosen  # as the daemon's build
        if not os.access(python, os.X_OK):
            raise EvaluatorError(f"evaluation_python: no python at {python} (configure(evaluation_python=...) or "
                                 f"the config's auto_eval.envs.evaluation)")
        return python
    from evaluator.bench import venv_python  # standard library only
    try:
        return venv_python(EVALUATION)
    except EvaluatorError as e:
        raise EvaluatorError(f"{e} (or point the API at one: configure(evaluation_python=VENV) or the config's "
                             f"auto_eval.envs.evaluation)") from None


# ---- the result ---------------------------------------------------------------------------------------------
@dataclass
class EvaluationResult:
    """One function's result on one benchmark: HRET's (metrics, samples, info), plus stderr and per_category.

    samples: one dict per sample, in dataset order: sample_id, input (what the function got), reference (target,
    else references), choices, category, prediction, scores {metric: value | None}, status ("ok" | "error"),
    error ({type, message} | None), latency_ms. info: name, dataset_id, benchmark, benchmark_type, dataset, n,
    n_error, errors (the first ones), timings, versions, methods, unavailable, per_sample kinds, work_dir."""

    metrics: dict
    samples: list
    info: dict
    stderr: dict = field(default_factory=dict)
    per_category: dict = field(default_factory=dict)

    FIELDS = ("metrics", "stderr", "per_category", "info", "samples")

    def __getitem__(self, key: str):
        """result["metrics"], as HRET's EvaluationResult allows (its fields only)."""
        if key not in self.FIELDS:
            raise KeyError(f"{key!r}: not a field of EvaluationResult (fields: {', '.join(self.FIELDS)})")
        return getattr(self, key)

    def __contains__(self, key: str) -> bool:
        return key in self.FIELDS

    def get(self, key: str, default=None):
        return getattr(self, key) if key in self.FIELDS else default

    def to_dict(self) -> dict:
        return {"metrics": self.metrics, "stderr": self.stderr, "per_category": self.per_category,
                "info": self.info, "samples": self.samples}

    def save_json(self, path: str) -> str:
        """Write the whole result as one JSON file (atomically); returns the path."""
        try:
            write_json_atomic(path, self.to_dict())
        except OSError as e:
            raise EvaluatorError(f"save_json: path: {path}: cannot be written ({write_problem(e)})") from None
        return path

    def to_dataframe(self):
        """The samples as a pandas DataFrame, one row per sample, one `score_<metric>` column per metric."""
        import pandas as pd  # only here: importing the API never imports pandas
        rows = []
        for s in self.samples:
            row = {k: v for k, v in s.items() if k != "scores"}
            row.update({f"score_{k}": v for k, v in (s.get("scores") or {}).items()})
            rows.append(row)
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in self.metrics.items())
        return (f"EvaluationResult({self.info.get('name')!r} on {self.info.get('dataset_id')!r}, "
                f"n={self.info.get('n')}, errors={self.info.get('n_error')}: {shown})")


class ComparisonResult(dict):
    """compare_models' answer: {model name: EvaluationResult} (HRET's dict) plus `.comparisons`, the paired
    comparison (evaluator/common/compare.py) of each model against the baseline (the first one) on the samples
    both scored, and `.table()`, the rows of it."""

    def __init__(self, results: dict, baseline: str, comparisons: dict):
        super().__init__(results)
        self.baseline = baseline
        self.comparisons = comparisons  # {model: compare_results document (delta = model - baseline)}

    def table(self) -> list[dict]:
        """One row per (model, metric): baseline, model, metric, old, new, delta, ci, p, method, significant, n."""
        rows = []
        for model, doc in self.comparisons.items():
            for metric, e in doc["metrics"].items():
                rows.append({"baseline": self.baseline, "model": model, "metric": metric, "old": e["old"],
                             "new": e["new"], "delta": e["delta"], "ci": e["ci"], "p": e["p"], "method": e["method"],
                             "significant": e["significant"], "n": e["n"]})
        return rows


# ---- running a function over a dataset ---------------------------------------------------------------------
@dataclass(frozen=True)
class BenchmarkRef:
    """The benchmark mapping the evaluation stage gets (a config `benchmarks:` entry's dataset part)."""

    name: str
    kind: str
    source: Optional[str]
    options: dict

    def spec(self, metrics: Optional[list], metric_options: dict, sample_size: Optional[int]) -> dict:
        spec = {"name": self.name, "type": self.kind, "dataset": self.source, "options": dict(self.options),
                "metric_options": dict(metric_options)}
        if metrics:
            spec["metrics"] = list(metrics)
        if sample_size is not None:
            spec["sample_size"] = sample_size
        return spec


def resolve_benchmark(dataset: Optional[str], benchmark_type: Optional[str], options: Optional[dict],
                      name: Optional[str] = None) -> BenchmarkRef:
    """`dataset` as the user gave it -> the benchmark mapping: with benchmark_type, the loader of that type on
    that path; else a registered benchmark name (its default data) or a canonical dataset directory."""
    from evaluator.benchmarks import registry
    if benchmark_type is not None:
        try:
            registry.get(benchmark_type)
        except EvaluatorError as e:
            raise EvaluatorError(f"benchmark_type: {e}") from None
        if dataset is not None and (not isinstance(dataset, str) or not dataset):
            raise EvaluatorError(f"dataset: expected a path, got {dataset!r}")
        spec_source = registry.get(benchmark_type).default_source
        source = os.path.abspath(os.path.expanduser(dataset)) if dataset else \
            os.path.join(ROOT, spec_source) if spec_source else None  # None: load_benchmark says what is missing
        kind = benchmark_type
    elif not isinstance(dataset, str) or not dataset:
        raise EvaluatorError(f"dataset: expected a benchmark name or a path, got {dataset!r}")
    else:
        target = dataset if dataset in registry.BENCHMARKS else os.path.abspath(os.path.expanduser(dataset))
        try:
            kind, source = registry.kind_for(target)
        except EvaluatorError:
            if not os.path.exists(target):  # no such folder, nor a benchmark name: kind_for said so
                raise
            raise EvaluatorError(f"dataset: {target}: not a canonical dataset directory (test.jsonl + "
                                 f"metadata.json); for another layout pass benchmark_type= (one of: "
                                 f"{', '.join(registry.BENCHMARKS)})") from None
        if source is None and registry.get(kind).default_source:
            source = os.path.join(ROOT, registry.get(kind).default_source)
    default_name = os.path.basename(source.rstrip("/")) if kind == "dataset" and source else kind
    return BenchmarkRef(name or default_name, kind, source, dict(options or {}))


def input_mode(fn: Callable, batched: bool, explicit: Optional[str]) -> str:
    """"text" or "messages" (the module docstring's rule)."""
    if explicit is not None:
        if explicit not in INPUTS:
            raise EvaluatorError(f"input: expected 'text' or 'messages', got {explicit!r}")
        return explicit
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    except (TypeError, ValueError):  # a builtin without a signature: the default
        return "text"
    if not params:
        raise EvaluatorError(f"{_fn_name(fn)}: takes no positional argument; the function is called with each "
                             f"sample's input (the prompt text or its message list)")
    first = params[0]
    if first.name in ("messages", "batch_messages"):
        return "messages"
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations (a forward reference): they say nothing then
        hints = {}
    hint = hints.get(first.name, first.annotation)
    if batched:  # list[X]: the batch; X says what each item is
        args = typing.get_args(hint)
        hint = args[0] if typing.get_origin(hint) in (list, typing.List) and args else None
    if typing.get_origin(hint) in (list, typing.List):
        args = typing.get_args(hint)
        if args and (args[0] is dict or typing.get_origin(args[0]) is dict):
            return "messages"
    return "text"


def sample_input(sample, mode: str):
    """What the function gets for one sample; a text function cannot take a sample it would see only in part."""
    if mode == "messages":
        return copy.deepcopy(sample.messages)
    messages = sample.messages
    if len(messages) != 1 or messages[0]["role"] != "user":
        roles = ", ".join(m["role"] for m in messages)
        raise EvaluatorError(f"sample {sample.id!r} has the turns [{roles}]; a text function would lose all but the "
                             f"last: take the message list (input=\"messages\")")
    if sample.audio_paths():
        raise EvaluatorError(f"sample {sample.id!r} has an audio part; a text function cannot get it: take the "
                             f"message list (input=\"messages\"), whose audio parts carry the file path")
    return sample.prompt_text()


def _fn_name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def _check_run_numbers(where: str, max_workers, batch_size, max_error_rate, sample_size=None) -> tuple:
    """(max_workers, batch_size, max_error_rate, sample_size) checked, the counts as int (2.0 -> 2: range() and
    slicing need one); None stays None for batch_size and sample_size."""
    out = []
    for key, value, low, high, integer in (("max_workers", max_workers, 1, None, True),
                                           ("batch_size", batch_size, 1, None, True),
                                           ("max_error_rate", max_error_rate, 0, 1, False),
                                           ("sample_size", sample_size, 1, None, True)):
        if value is None and key in ("batch_size", "sample_size"):
            out.append(None)
            continue
        problem = number_problem(value, low, high, integer)
        if problem:
            raise EvaluatorError(f"{where}: {key}: {problem}")
        out.append(int(value) if integer else float(value))
    return tuple(out)


def _answer_error(e: BaseException) -> RunError:
    return RunError(type=type(e).__name__, message=str(e)[:2000], retryable=False)


def call_function(fn: Callable, inputs: list, batch_size: Optional[int], max_workers: int) -> list[tuple]:
    """Call fn on every input; [(text | None, RunError | None, latency_ms)] in input order. An exception, or an
    answer that is not a string, is that input's error (a batch's: each of its inputs')."""
    if batch_size:
        chunks = [list(range(i, min(i + batch_size, len(inputs)))) for i in range(0, len(inputs), batch_size)]
    else:
        chunks = [[i] for i in range(len(inputs))]
    out: list = [None] * len(inputs)

    def run_chunk(indexes: list) -> None:
        t0 = time.perf_counter()
        try:
            if batch_size:
                answers = fn([inputs[i] for i in indexes])
                if not isinstance(answers, (list, tuple)) or len(answers) != len(indexes):
                    got = f"{len(answers)} answers" if isinstance(answers, (list, tuple)) else type(answers).__name__
                    raise TypeError(f"a batched function returns one answer per input: {len(indexes)} inputs, "
                                    f"got {got}")
            else:
                answers = [fn(inputs[indexes[0]])]
        except Exception as e:  # the user's code failed on these inputs: their error rows, not a crash
            error = _answer_error(e)
            latency = (time.perf_counter() - t0) * 1000 / len(indexes)
            for i in indexes:
                out[i] = (None, error, latency)
            return
        latency = (time.perf_counter() - t0) * 1000 / len(indexes)
        for i, answer in zip(indexes, answers):
            if isinstance(answer, str):
                out[i] = (answer, None, latency)
            else:
                out[i] = (None, RunError("TypeError", f"the function returned {type(answer).__name__}, expected "
                                                      f"str: {answer!r:.200}"), latency)

    if max_workers == 1:
        for chunk in chunks:
            run_chunk(chunk)
    else:
        with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="evaluate") as pool:
            list(pool.map(run_chunk, chunks))
    return out


def work_folder(name: str, work_dir: Optional[str]) -> str:
    """The run's work folder, made now: `work_dir`, else a new one under configure(cache_dir=)'s api/ or the
    temporary folder. One that cannot be made or written is an error naming where it was asked for."""
    if work_dir and not isinstance(work_dir, (str, os.PathLike)):
        raise EvaluatorError(f"work_dir: expected a folder path, got {work_dir!r}")
    where = "work_dir" if work_dir else "configure(cache_dir=...)" if _SETTINGS.cache_dir else "the temporary folder"
    try:
        if work_dir:
            path = os.path.abspath(os.path.expanduser(work_dir))
            if os.path.exists(path) and not os.path.isdir(path):
                raise EvaluatorError(f"work_dir: {path}: expected a folder, found a file")
            os.makedirs(path, exist_ok=True)
            if not os.access(path, os.W_OK):
                raise EvaluatorError(f"work_dir: {path}: not writable")
            return path
        if _SETTINGS.cache_dir:
            base = os.path.join(_SETTINGS.cache_dir, "api")
            os.makedirs(base, exist_ok=True)
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "run"
            return tempfile.mkdtemp(prefix=f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}-", dir=base)
        return tempfile.mkdtemp(prefix="evaluator-api-")
    except OSError as e:  # a file on the way, no permission
        raise EvaluatorError(f"{where}: {e.filename}: cannot hold the run's files ({write_problem(e)})") from None


def write_problem(e: OSError) -> str:
    """Why a path could not be written, in words: a file on the way reads "File exists" or "Not a directory"."""
    if isinstance(e, (FileExistsError, NotADirectoryError)):
        return "a file is where a folder of the path should be"
    return e.strerror or str(e)


def run_function(fn: Callable, dataset: Optional[str], *, benchmark_type: Optional[str] = None,
                 metrics: Optional[list] = None, sample_size: Optional[int] = None, batch_size: Optional[int] = None,
                 max_workers: Optional[int] = None, max_error_rate: Optional[float] = None, name: Optional[str] = None,
                 options: Optional[dict] = None, metric_options: Optional[dict] = None, input: Optional[str] = None,
                 work_dir: Optional[str] = None, benchmark_name: Optional[str] = None) -> EvaluationResult:
    """Run `fn` on every sample of `dataset`, score the answers, and return an EvaluationResult (module docstring).

    name: the function's name in the result (default: its __qualname__); benchmark_name: the benchmark's (default:
    the type, or the dataset folder's name); options: the loader's options; work_dir: where the result files go."""
    from evaluator.benchmarks.registry import load_benchmark
    from evaluator.stages.evaluation.metrics import expand
    started = time.time()
    max_workers = _SETTINGS.max_workers if max_workers is None else max_workers
    max_error_rate = _SETTINGS.max_error_rate if max_error_rate is None else max_error_rate
    max_workers, batch_size, max_error_rate, sample_size = _check_run_numbers(
        "evaluate", max_workers, batch_size, max_error_rate, sample_size)
    if not callable(fn):
        raise EvaluatorError(f"evaluate: expected a function to evaluate, got {type(fn).__name__}")
    if isinstance(metrics, str):
        metrics = [metrics]
    if metrics is not None:
        if not isinstance(metrics, (list, tuple)) or not all(isinstance(m, str) for m in metrics):
            raise EvaluatorError(f"evaluate: metrics: expected a metric name or a list of them, got {metrics!r}")
        expand(list(metrics))  # an unknown name fails before the function runs
    for key, value in (("options", options), ("metric_options", metric_options)):
        if value is not None and not isinstance(value, dict):
            raise EvaluatorError(f"evaluate: {key}: expected a dict, got {value!r}")
    if metric_options:  # as the daemon's config check does (an option no metric reads is an error, not ignored)
        from evaluator.stages.evaluation.metrics import option_problems
        problems = option_problems(metric_options, list(metrics) if metrics else None)
        if problems:
            raise EvaluatorError("evaluate: " + "; ".join(f"metric_options.{'.'.join(map(str, path))}: {text}"
                                                          for path, text in problems))
    ref = resolve_benchmark(dataset, benchmark_type, options, benchmark_name)
    data = load_benchmark(ref.kind, ref.source, ref.options, sample_size)
    if not data.samples:
        raise EvaluatorError(f"dataset {ref.source}: no samples")
    name = name or _fn_name(fn)
    mode = input_mode(fn, bool(batch_size), input)
    inputs = [sample_input(s, mode) for s in data.samples]
    folder = work_folder(name, work_dir)  # before the function runs: a work_dir that cannot be one fails first
    t0 = time.perf_counter()
    answers = call_function(fn, inputs, batch_size, max_workers)
    run_s = time.perf_counter() - t0
    run_config = {"function": name, "input": mode, "batch_size": batch_size, "max_workers": max_workers}
    results = [RunResult(sample_id=s.id, dataset_id=data.dataset_id, backend=BACKEND, run_config=run_config,
                         request_messages=s.messages, response={"text": text or "", "usage": {}},
                         status=OK if error is None else ERROR, latency_ms=round(latency, 3), error=error)
               for s, (text, error, latency) in zip(data.samples, answers)]
    write_results(os.path.join(folder, PREDICTIONS), results)
    errors = [r for r in results if not r.ok]
    info = {"name": name, "dataset_id": data.dataset_id, "benchmark": ref.name, "benchmark_type": ref.kind,
            "dataset": ref.source, "n": len(results), "n_error": len(errors),
            "error_rate": len(errors) / len(results), "max_error_rate": max_error_rate,
            "errors": [{"sample_id": r.sample_id, "type": r.error.type, "message": r.error.message}
                       for r in errors[:MAX_ERRORS_LISTED]],
            "run_config": run_config, "work_dir": folder}
    if too_many_errors(len(errors), len(results), max_error_rate):
        kinds = list(dict.fromkeys(f"{r.error.type}: {r.error.message[:200]}" for r in errors))
        info["timings"] = {"run_s": round(run_s, 3), "total_s": round(time.time() - started, 3)}
        unscored = EvaluationResult({}, _sample_rows(data.samples, inputs, results, {}), info)
        raise TooManyErrors(f"{name}: {len(errors)}/{len(results)} samples failed ({len(errors) / len(results):.1%}),"
                            f" above max_error_rate {max_error_rate:.1%}; first: {' | '.join(kinds[:3])}; "
                            f"predictions kept in {os.path.join(folder, PREDICTIONS)}", unscored)
    spec = ref.spec(metrics, metric_options or {}, sample_size)
    t1 = time.perf_counter()
    doc, rows = score_folder(folder, spec, name)
    info["timings"] = {"run_s": round(run_s, 3), "score_s": round(time.perf_counter() - t1, 3),
                       "total_s": round(time.time() - started, 3)}
    for key in ("versions", "methods", "unavailable", "per_sample", "notes", "warnings", "subset", "n_full"):
        if doc.get(key) is not None:
            info[key] = doc[key]
    by_id = {row["sample_id"]: row for row in rows}
    return EvaluationResult(metrics=dict(doc["metrics"]), samples=_sample_rows(data.samples, inputs, results, by_id),
                            info=info, stderr=dict(doc.get("stderr") or {}),
                            per_category=dict(doc.get("per_category") or {}))


def _sample_rows(samples: list, inputs: list, results: list, scores: dict) -> list[dict]:
    rows = []
    for s, given, r in zip(samples, inputs, results):
        rows.append({"sample_id": s.id, "input": given,
                     "reference": s.target if s.target is not None else s.references,
                     "choices": s.choices, "category": s.category, "prediction": r.text if r.ok else None,
                     "scores": dict((scores.get(s.id) or {}).get("scores") or {}), "status": r.status,
                     "error": {"type": r.error.type, "message": r.error.message} if r.error else None,
                     "latency_ms": r.latency_ms})
    return rows


# ---- scoring: the evaluation stage's score(), here or in the evaluation venv ---------------------------------
def split_metrics(names: list) -> tuple[list, list]:
    """(metrics computed in this process, metrics needing the evaluation venv), by the registry's declared
    `evaluation_venv` property, in the given order."""
    from evaluator.stages.evaluation.metrics import METRICS, expand
    here, there = [], []
    for metric in expand(list(names)):
        (there if METRICS[metric].evaluation_venv else here).append(metric)
    return here, there


def score_folder(folder: str, spec: dict, run: str) -> tuple[dict, list]:
    """Score <folder>/predictions.jsonl for the benchmark `spec`; writes scores.jsonl and metrics.json there and
    returns (metrics.json document, scores.jsonl rows)."""
    from evaluator.benchmarks.registry import default_metrics, load_benchmark
    names = spec.get("metrics")
    if not names:
        names = default_metrics(spec["type"], load_benchmark(spec["type"], spec["dataset"], spec["options"]))
    if not names:
        raise EvaluatorError(f"dataset {spec['dataset']}: its metadata.json names no metrics and the benchmark type "
                             f"{spec['type']!r} has none by default: pass metrics=[...]")
    here, there = split_metrics(names)
    parts = []
    if here:
        parts.append(_score_here(folder, {**spec, "metrics": here}, run))
    if there:
        parts.append(_score_in_evaluation_venv(folder, {**spec, "metrics": there}, run, others_scored=bool(here)))
    doc, rows = merge_scored(parts, [m for m in dict.fromkeys(here + there)])
    text = "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in rows)
    write_text_atomic(os.path.join(folder, SCORES), text)  # before metrics.json, as the stage writes them
    write_json_atomic(os.path.join(folder, METRICS), doc)
    return doc, rows


def _job(folder: str, spec: dict, run: str, output_dir: str) -> StageJob:
    return StageJob(stage=EVALUATION, run=run, iteration=0, checkpoint="", benchmark=spec, output_dir=output_dir,
                    seed=_SETTINGS.seed, extra={"predictions": os.path.join(folder, PREDICTIONS)})


def _score_here(folder: str, spec: dict, run: str) -> tuple[dict, list]:
    from evaluator.stages.evaluation.stage import score  # pure Python for these metrics (split_metrics)
    return score(_job(folder, spec, run, folder))


def _score_in_evaluation_venv(folder: str, spec: dict, run: str, others_scored: bool = False) -> tuple[dict, list]:
    """The venv's part of the scoring. `others_scored`: metrics were computed in this process, so a venv part where
    none of its metrics could be computed (exit 1) is their `unavailable` reasons, as `bench.py eval` reports them
    when it scores all of them in one stage, not a failure of the whole result."""
    from evaluator.common.compare import read_scores
    from evaluator.common.contracts import read_metrics
    out = os.path.join(folder, "evaluation_venv")
    os.makedirs(out, exist_ok=True)
    job = _job(folder, spec, run, out)
    job_path = os.path.join(out, JOB_FILE[EVALUATION])
    job.write(job_path)
    log_path = os.path.join(out, LOG_FILE[EVALUATION])
    python = evaluation_python()
    with open(log_path, "w", encoding="utf-8") as log:
        code = subprocess.run([python, "-m", "evaluator.stages.evaluation", "--job", job_path], cwd=out,
                              env=stage_pythonpath(out), stdout=log, stderr=subprocess.STDOUT).returncode
    with open(log_path, encoding="utf-8", errors="replace") as f:
        lines = [line.strip() for line in f]
    # exit 1 is also any crash: only the stage's own NoMetricError line makes it "none of these could be computed"
    if code == 1 and others_scored and any(line.startswith(NO_METRIC_LINE) for line in lines):
        why = {}
        for metric in spec["metrics"]:  # the stage logs "[evaluation] <metric>: <why>" for each one it cannot compute
            said = [line.split(": ", 1)[1] for line in lines if line.startswith(f"[evaluation] {metric}: ")]
            why[metric] = said[-1] if said else f"not computed in the evaluation venv (log {log_path})"
        return {"metrics": {}, "unavailable": why}, []
    if code != 0:
        tail = "\n".join(lines[-8:])
        raise EvaluatorError(f"the evaluation stage ({python}) exited {code} scoring {', '.join(spec['metrics'])}; "
                             f"log {log_path}:\n{tail}")
    try:
        doc = read_metrics(os.path.join(out, METRICS))
    except ValueError as e:
        raise EvaluatorError(str(e)) from None
    rows = list(read_scores(os.path.join(out, SCORES)).values())
    return doc, rows


def stage_pythonpath(out: str) -> dict:
    """The evaluation stage's environment: this process's evaluator package on PYTHONPATH and nothing else of this
    environment, so the venv's own pins (transformers 4.42, aac-metrics) are what it imports. From a checkout (or an
    editable install) that is the checkout, as tools/bench.py runs the stages; from a pip install the package's
    parent is the caller's site-packages, full of other pins, so a folder holding only a link to the package."""
    if os.path.basename(ROOT) not in ("site-packages", "dist-packages"):
        return dict(os.environ, PYTHONPATH=ROOT)
    package = os.path.join(ROOT, "evaluator")
    path_dir = os.path.join(out, "pythonpath")
    os.makedirs(path_dir, exist_ok=True)
    link = os.path.join(path_dir, "evaluator")
    if not os.path.islink(link):
        os.symlink(package, link)
    return dict(os.environ, PYTHONPATH=path_dir)


def merge_scored(parts: list, order: list) -> tuple[dict, list]:
    """One metrics.json document and one scores.jsonl row list from the parts scored apart (same predictions):
    metrics, stderr, per_category, methods, per-sample scores and `compared` joined; versions kept per part."""
    doc = copy.deepcopy(parts[0][0])
    rows = [copy.deepcopy(row) for row in parts[0][1]]
    if len(parts) > 1:
        doc["versions"] = {"in_process": parts[0][0].get("versions"), "evaluation_venv": parts[1][0].get("versions")}
        by_id = {row["sample_id"]: row for row in rows}
        for other, other_rows in parts[1:]:
            for key in ("metrics", "stderr", "unavailable", "per_sample", "methods", "notes"):
                doc.setdefault(key, {}).update(other.get(key) or {})
            for category, values in (other.get("per_category") or {}).items():
                doc.setdefault("per_category", {}).setdefault(category, {}).update(values)
            for key in ("warnings",):
                if other.get(key):
                    doc[key] = list(doc.get(key) or []) + list(other[key])
            doc["timings"] = {"score_s": sum((p[0].get("timings") or {}).get("score_s", 0) for p in parts)}
            for row in other_rows:
                mine = by_id[row["sample_id"]]
                mine["scores"].update(row["scores"])
                mine.setdefault("compared", {}).update(row.get("compared") or {})
        ranked = {m: i for i, m in enumerate(order)}
        doc["metrics"] = dict(sorted(doc["metrics"].items(), key=lambda kv: ranked.get(kv[0], len(ranked))))
    return doc, rows


# ---- comparing functions -------------------------------------------------------------------------------------
def paired_comparisons(results: dict, *, alpha: float = 0.05) -> dict:
    """{model: compare_results(model vs the first model)} on the samples both scored (evaluator/common/compare.py)."""
    from evaluator.common.compare import ScoredResult, compare_results, read_scores
    from evaluator.common.contracts import read_metrics
    names = list(results)
    scored = {}
    for model, result in results.items():
        folder = result.info["work_dir"]
        scored[model] = ScoredResult(folder, read_scores(os.path.join(folder, SCORES)),
                                     read_metrics(os.path.join(folder, METRICS)), {})
    return {model: compare_results(scored[model], scored[names[0]], seed=_SETTINGS.seed, alpha=alpha)
            for model in names[1:]}


def compare_models(models: dict, dataset: Optional[str] = None, *, alpha: float = 0.05, **kwargs) -> ComparisonResult:
    """Run every function of `models` ({name: fn}) on the same samples (run_function's keyword arguments apply to
    all) and compare each with the first by the paired tests of evaluator/common/paired.py (McNemar for 0/1
    scores, a paired bootstrap otherwise), never an unpaired test."""
    _check_comparison("compare_models", alpha, kwargs)
    if not isinstance(models, dict) or len(models) < 2:
        raise EvaluatorError(f"models: expected a mapping of at least two names to functions, got {models!r:.120}")
    bad = [k for k, fn in models.items() if not callable(fn)]
    if bad:
        raise EvaluatorError(f"models.{bad[0]}: expected a function, got {type(models[bad[0]]).__name__}")
    dataset = _dataset_or_default(dataset)
    work_dir = kwargs.pop("work_dir", None)
    folders = model_folders(work_dir, list(models))
    results = {model: run_function(fn, dataset, name=model, work_dir=folders[model], **kwargs)
               for model, fn in models.items()}
    return ComparisonResult(results, next(iter(models)), paired_comparisons(results, alpha=alpha))


def _check_comparison(where: str, alpha: Any, kwargs: dict) -> None:
    """compare_models' and @benchmark's arguments, before any model runs: run_function's keywords except `name`
    (each model is named by its key in `models`), and a significance level in (0, 1)."""
    if "name" in kwargs:
        raise EvaluatorError(f"{where}: name=: each model is named by its key in the models mapping")
    _check_keywords(where, kwargs)
    from evaluator.common.paired import alpha_problem
    if alpha_problem(alpha):
        raise EvaluatorError(f"{where}: alpha: {alpha_problem(alpha)}")


def model_folders(work_dir: Optional[str], names: list) -> dict:
    """{name: its own work folder under `work_dir`} (None each without one): functions run side by side must not
    share one, where each would overwrite the others' predictions and per-sample scores (the paired comparison
    and the recorded results read them back)."""
    if not work_dir:
        return {name: None for name in names}
    if not isinstance(work_dir, (str, os.PathLike)):
        raise EvaluatorError(f"work_dir: expected a folder path, got {work_dir!r}")
    out, used = {}, set()
    for i, name in enumerate(names):
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)).strip(".") or "model"
        folder = safe if safe not in used else f"{safe}-{i}"
        used.add(folder)
        out[name] = os.path.join(work_dir, folder)
    return out


# ---- the decorators and quick_eval -------------------------------------------------------------------------
# HRET keywords that name something this API does differently, with what to do instead
HRET_KEYWORDS = {
    "model": "the decorated function is the model here: leave `model=` out",
    "evaluation_method": "name the metrics of our registry with `metrics=[...]` (docs/metrics.md)",
}
RUN_KEYWORDS = tuple(p for p in inspect.signature(run_function).parameters if p not in ("fn", "dataset"))


def _check_keywords(where: str, kwargs: dict) -> None:
    for key in kwargs:
        if key in HRET_KEYWORDS:
            raise EvaluatorError(f"{where}: {key}=: {HRET_KEYWORDS[key]}")
        if key not in RUN_KEYWORDS:
            raise EvaluatorError(f"{where}: {key}=: not an option{did_you_mean(key, list(RUN_KEYWORDS))} "
                                 f"(known: dataset, {', '.join(RUN_KEYWORDS)})")


def _dataset_or_default(dataset: Optional[str]) -> str:
    dataset = dataset or _SETTINGS.default_dataset
    if not dataset:
        raise EvaluatorError("dataset: none given (pass dataset=..., or configure(default_dataset=...))")
    return dataset


class EvaluatedFunction:
    """A function decorated with @evaluate: calling it with no arguments runs it over the dataset; keyword
    arguments override the decorator's for that call. `.fn` is the function itself."""

    def __init__(self, fn: Callable, dataset: Optional[str], kwargs: dict):
        self.fn = fn
        self.dataset = dataset
        self.kwargs = kwargs
        self.__wrapped__ = fn
        self.__name__ = getattr(fn, "__name__", "function")
        self.__doc__ = fn.__doc__

    def __call__(self, *args, **overrides) -> EvaluationResult:
        if args:
            raise EvaluatorError(f"@evaluate {self.__name__}: called with positional arguments; call it with none to "
                                 f"evaluate it, or call {self.__name__}.fn(...) for the function itself")
        dataset = overrides.pop("dataset", None) or self.dataset
        _check_keywords(f"@evaluate {self.__name__}", overrides)
        return run_function(self.fn, _dataset_or_default(dataset), **{**self.kwargs, **overrides})


def evaluate(dataset: Optional[str] = None, metrics: Optional[list] = None, **kwargs) -> Callable:
    """Decorator: `@evaluate(dataset=..., metrics=...)`; calling the decorated function evaluates it (run_function's
    keyword arguments: benchmark_type, sample_size, batch_size, max_workers, max_error_rate, input, options...)."""
    _check_keywords("@evaluate", kwargs)
    if callable(dataset):  # @evaluate without parentheses: no dataset to run on
        raise EvaluatorError("@evaluate: needs arguments, at least the dataset: @evaluate(dataset=...)")
    options = dict(kwargs, metrics=metrics) if metrics is not None else dict(kwargs)

    def wrap(fn: Callable) -> EvaluatedFunction:
        return EvaluatedFunction(fn, dataset, options)
    return wrap


def benchmark(dataset: Optional[str] = None, **kwargs) -> Callable:
    """Decorator on a function returning {name: fn}: calling it runs compare_models on them (HRET's @benchmark)."""
    alpha = kwargs.pop("alpha", 0.05)
    _check_comparison("@benchmark", alpha, kwargs)

    def wrap(make_models: Callable) -> Callable:
        def run(*args, **call_kwargs) -> ComparisonResult:
            return compare_models(make_models(*args, **call_kwargs), dataset, alpha=alpha, **kwargs)
        run.__wrapped__ = make_models
        run.__name__ = getattr(make_models, "__name__", "benchmark")
        return run
    return wrap


def quick_eval(fn: Callable, dataset: Optional[str] = None, *, benchmark: Optional[str] = None,
               config: Optional[str] = None, **kwargs) -> EvaluationResult:
    """Evaluate `fn` on `dataset`, or on the benchmark named `benchmark` of a config file (`config=` path, else the
    one load_config read): its dataset, type, options, sample_size, metrics, metric_options and max_error_rate."""
    _check_keywords("quick_eval", kwargs)
    if benchmark is None:
        if config is not None:
            raise EvaluatorError("quick_eval: config= names the file whose `benchmark=` to run; give benchmark= too")
        return run_function(fn, _dataset_or_default(dataset), **kwargs)
    if dataset is not None:
        raise EvaluatorError("quick_eval: give dataset= or benchmark= (a config's benchmark), not both")
    cfg = load_config(config) if config is not None else _SETTINGS.config
    if cfg is None:
        raise EvaluatorError(f"quick_eval: benchmark={benchmark!r} names a config benchmark, but no config is loaded "
                             f"(pass config=PATH or call load_config(PATH) first)")
    names = [b.name for b in cfg.benchmarks]
    bench = next((b for b in cfg.benchmarks if b.name == benchmark), None)
    if bench is None:
        raise EvaluatorError(f"quick_eval: benchmark={benchmark!r}: not in {cfg.config_path or 'the config'} "
                             f"(auto_eval.benchmarks: {', '.join(names) or 'none'}){did_you_mean(benchmark, names)}")
    from evaluator.benchmarks.registry import BENCHMARKS
    if bench.type not in BENCHMARKS:
        raise EvaluatorError(f"quick_eval: benchmark {benchmark!r} is of type {bench.type!r}, which runs a model "
                             f"checkpoint, not a function (function types: {', '.join(BENCHMARKS)})")
    settings = {"benchmark_type": bench.type, "options": dict(bench.options), "sample_size": bench.sample_size,
                "metrics": bench.metrics, "metric_options": dict(bench.metric_options),
                "max_error_rate": bench.max_error_rate, "benchmark_name": bench.name}
    return run_function(fn, bench.dataset, **{**settings, **kwargs})
