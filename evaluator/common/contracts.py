"""File contracts between the daemon and the stages (see docs/architecture.md).

Results tree: <cache_dir>/results/<model_name>/iter_<%07d>/<benchmark>/ holding the job specs,
the stage outputs and the stage logs. Stages report through these files and their exit code.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import string
from dataclasses import dataclass, field
from typing import Any, Optional

from .atomic import read_json, write_json_atomic

INFERENCE = "inference"
EVALUATION = "evaluation"
STAGES = (INFERENCE, EVALUATION)

EXIT_OK = 0
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: the stage asks to be retried later

# placeholders a `command` benchmark template may use (rendered by evaluator.stages.command)
COMMAND_PLACEHOLDERS = ("checkpoint", "iteration", "output_dir", "run", "benchmark", "tokens_b", "seed", "python",
                        "config_dir")



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
RUN_METADATA = "run_metadata.json"
METRICS = "metrics.json"

# Per stage: the job spec the daemon writes, the log it captures, and the file whose presence
# means the stage finished (written last, atomically, by the stage).
JOB_FILE = {INFERENCE: "infer.job.json", EVALUATION: "eval.job.json"}
LOG_FILE = {INFERENCE: "infer.stderr.log", EVALUATION: "eval.stderr.log"}
DONE_FILE = {INFERENCE: RUN_METADATA, EVALUATION: METRICS}
# Files a fresh attempt of the stage must not inherit from an earlier one.
OUTPUT_FILES = {INFERENCE: (PREDICTIONS, RUN_METADATA), EVALUATION: (METRICS,)}


def result_dir(cache_dir: str, model_name: str, iteration: int, benchmark: str) -> str:
    return os.path.join(cache_dir, "results", model_name, f"iter_{iteration:07d}", benchmark)


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


def validate_metrics(data: Any, where: str) -> dict:
    """Check a metrics.json document; returns it or raises ValueError naming what is wrong."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    metrics = data.get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        raise ValueError(f"{where}: expected a non-empty 'metrics' object of name -> number")
    for name, value in metrics.items():
        # bool is an int subclass; a True accuracy is a bug, not a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: metrics.{name}: expected a number, got {value!r}")
    return data


def read_metrics(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    return validate_metrics(data, path)
