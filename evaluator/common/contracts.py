"""File contracts between the daemon and the stages (see docs/architecture.md).

Results tree: <cache_dir>/results/<model_name>/iter_<%07d>/<benchmark>/ holding the job specs,
the stage outputs and the stage logs. Stages report through these files and their exit code.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import string
from dataclasses import dataclass, field
from typing import Any, Optional

from .atomic import read_json, write_json_atomic

INFERENCE = "inference"
EVALUATION = "evaluation"
STAGES = (INFERENCE, EVALUATION)

# Every local stage's environment carries "<token>:<stage>" (evaluator/daemon/executors.py: the intent the ledger
# made durable before the start), and a warm worker "<cache_dir>" (evaluator/stages/worker.py), so a daemon
# restarted after a kill -9 finds what its predecessor left running.
TOKEN_ENV = "CKPT_EVAL_TOKEN"
WORKER_ENV = "CKPT_EVAL_WORKER"
# stage modules a warm worker can run in-process (module -> the module whose main(argv) runs one job)
WARM_STAGE_MODULES = {"evaluator.stages.inference": "evaluator.stages.inference.stage",
                      "evaluator.stages.evaluation": "evaluator.stages.evaluation.stage"}

EXIT_OK = 0
EXIT_BAD_SPEC = 2  # the stage's verdict: its job spec or data is wrong; running it again cannot help
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: the stage asks to be retried later

# placeholders a `command` benchmark template may use (rendered by evaluator.stages.command; docs/benchmarks.md)
COMMAND_PLACEHOLDERS = ("checkpoint", "iteration", "output_dir", "run", "benchmark", "tokens_b", "seed", "python",
                        "config_dir", "scratch_dir")


def render_template(template: str, values: dict) -> str:
    """str.format with each formatted value shell-quoted (so '{iteration:07d}' works and paths with
    spaces stay one argument). Raises KeyError/ValueError on unknown fields or bad format specs."""
    out = []
    for literal, name, spec, conversion in string.Formatter().parse(template):
        out.append(literal)
        if name is None:
            continue
        value = values[name]
        if conversion:
            value = {"r": repr, "s": str, "a": ascii}[conversion](value)
        out.append(shlex.quote(format(value, spec or "")))
    return "".join(out)


PREDICTIONS = "predictions.jsonl"
PROGRESS = "progress.json"  # {done, total, updated_at}: written by a stage while it works, read by `status`
RUN_METADATA = "run_metadata.json"
METRICS = "metrics.json"
# per-sample scores (evaluation -> comparison), written by the evaluation stage before metrics.json:
# one row per sample, see docs/insight.md
SCORES = "scores.jsonl"
SCORES_SCHEMA_VERSION = 1
# the daemon's paired comparison of a result with the run's previous and best checkpoints (docs/insight.md)
COMPARE = "compare.json"
COMPARE_SCHEMA_VERSION = 1

# Per stage: the job spec the daemon writes, the log it captures, and the file whose presence
# means the stage finished (written last, atomically, by the stage).
JOB_FILE = {INFERENCE: "infer.job.json", EVALUATION: "eval.job.json"}
LOG_FILE = {INFERENCE: "infer.stderr.log", EVALUATION: "eval.stderr.log"}
DONE_FILE = {INFERENCE: RUN_METADATA, EVALUATION: METRICS}
# Files a fresh attempt of the stage must not inherit from an earlier one.
OUTPUT_FILES = {INFERENCE: (PREDICTIONS, RUN_METADATA), EVALUATION: (SCORES, METRICS, COMPARE)}


def result_dir(cache_dir: str, model_name: str, iteration: int, benchmark: str) -> str:
    return os.path.join(cache_dir, "results", model_name, f"iter_{iteration:07d}", benchmark)


def scratch_dir(cache_dir: str, run: str, iteration: int, benchmark: str) -> str:
    """A command benchmark's {scratch_dir}: large intermediates (a converted model) that are no result, kept
    out of the results tree and deleted by the daemon once the job is final."""
    return os.path.join(cache_dir, "scratch", run, f"iter_{iteration:07d}", benchmark)


@dataclass
class StageJob:
    """The job spec: everything one stage run needs, written as JSON next to its outputs."""

    stage: str
    run: str
    iteration: int
    checkpoint: str
    benchmark: dict
    output_dir: str
    seed: int = 0
    attempt: int = 1
    tokens_b: Optional[float] = None
    extra: dict = field(default_factory=dict)

    def write(self, path: str) -> None:
        write_json_atomic(path, dataclasses.asdict(self))

    @classmethod
    def read(cls, path: str) -> "StageJob":
        data = read_json(path)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# metrics.json's top-level keys besides `metrics` that mean something to the daemon, the sinks or `status`. In a
# flat {"name": number} file (command benchmarks) these are never metrics: `n` is the sample count.
METRICS_FIELDS = ("n", "n_error", "stderr", "per_category", "unavailable", "versions",
                  "benchmark", "benchmark_type", "run", "iteration", "tokens_b", "checkpoint",
                  "fingerprint", "revision")
# names the W&B and MLflow sinks log beside a benchmark's metrics (`<benchmark>/revision`, ...): no metric may
# take them, or it would share their series (delta_vs_prev, p_vs_prev: the comparison with the previous checkpoint;
# flips, comparison: W&B tables)
RESERVED_METRIC_NAMES = ("revision", "fingerprint", "delta_vs_prev", "p_vs_prev", "flips", "comparison")


def is_number(value: Any) -> bool:
    # bool is an int subclass; a True accuracy is a bug, not a number
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A number every sink, plot and reader can take as a float: not NaN or Infinity, and an int that fits."""
    if not is_number(value):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int beyond float's range (10**400)
        return False


def validate_metrics(data: Any, where: str) -> dict:
    """Check a metrics.json document; returns it or raises ValueError naming the key and what was expected.

    A metric is a finite number: NaN or Infinity is refused, never plotted as if it were a result (a stage that
    cannot compute a metric leaves it out and says why in `unavailable`)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    metrics = data.get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        raise ValueError(f"{where}: expected a non-empty 'metrics' object of name -> number")
    for name, value in metrics.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}: metrics: expected metric names that are non-empty strings, got {name!r}")
        if name in RESERVED_METRIC_NAMES:
            raise ValueError(f"{where}: metrics.{name}: a reserved name (the sinks log the result's {name} under "
                             f"it); rename the metric")
        if not is_number(value):
            raise ValueError(f"{where}: metrics.{name}: expected a number, got {value!r}")
        if not is_finite_number(value):  # NaN, Infinity, or an integer no float holds: no sink or plot can take it
            raise ValueError(f"{where}: metrics.{name}: expected a finite number, got {_shown(value)}")
    for key in ("n", "n_error"):
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{where}: {key}: expected a count (a whole number >= 0), got {value!r}")
    revision = data.get("revision")
    if revision is not None and (isinstance(revision, bool) or not isinstance(revision, int) or revision < 0):
        raise ValueError(f"{where}: revision: expected a whole number >= 0 (0: first evaluation), got {revision!r}")
    if data.get("fingerprint") is not None and not isinstance(data["fingerprint"], str):
        raise ValueError(f"{where}: fingerprint: expected a string (the settings hash), got {data['fingerprint']!r}")
    for key in ("stderr", "per_category", "unavailable", "versions"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise ValueError(f"{where}: {key}: expected an object, got {type(data[key]).__name__}")
    for name, value in (data.get("stderr") or {}).items():
        if value is not None and not is_finite_number(value):
            raise ValueError(f"{where}: stderr.{name}: expected a finite number or null, got {_shown(value)}")
    tokens_b = data.get("tokens_b")
    if tokens_b is not None and (not is_finite_number(tokens_b) or tokens_b < 0):
        raise ValueError(f"{where}: tokens_b: expected a finite number >= 0 (billions of tokens) or null, "
                         f"got {tokens_b!r}")
    for category, values in (data.get("per_category") or {}).items():
        if not isinstance(values, dict):
            raise ValueError(f"{where}: per_category.{category}: expected an object of name -> number, "
                             f"got {type(values).__name__}")
        for name, value in values.items():  # NaN or inf is kept: a harness may report one for a category
            if value is not None and (not is_number(value) or isinstance(value, int) and not is_finite_number(value)):
                raise ValueError(f"{where}: per_category.{category}.{name}: expected a number or null, "
                                 f"got {_shown(value)}")
    return data


def _shown(value: Any) -> str:
    """A value for an error message: an integer of hundreds of digits by its size, not in full."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10 ** 30:
        return f"an integer of {len(str(abs(value)))} digits (more than a float holds)"
    return repr(value)[:80]


# what read_metrics raises for a metrics.json that is gone or not valid; any other OSError (EIO, EACCES, ESTALE) means
# a file that is there but cannot be read now: storage trouble to retry, not a result to compute again
METRICS_LOST = (FileNotFoundError, NotADirectoryError, ValueError)


def read_metrics(path: str) -> dict:
    try:
        data = read_json(path)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    return validate_metrics(data, path)
