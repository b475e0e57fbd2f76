"""What every stage module shares: its entry point, its log line, the library versions it reports.

A stage module is run as `python -m <module> --job <job.json>` (evaluator/daemon/stages.py); a module that
serves both lanes (an external harness) gets both runners and picks by the job's stage. Standard library only.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from importlib import metadata as importlib_metadata
from typing import Callable, Optional

from evaluator.common.atomic import write_json_atomic
from evaluator.common.contracts import EVALUATION, INFERENCE, METRICS, StageJob, validate_metrics
from evaluator.common.errors import EvaluatorError

Runner = Callable[[StageJob], int]
# True inside a warm worker (evaluator/stages/worker.py): a stage may keep what it loaded for the next job
WARM = False
# what a stage keeps in a warm worker and must release when the worker ends (a served model's server)
WORKER_EXIT: list[Callable[[], None]] = []


SWITCHES = ("chat_template", "shared_prefix", "weight_reload")  # backend options that are on/off switches
_SWITCH_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def switch_value(value: object) -> Optional[bool]:
    """A switch's value from YAML (true/false, 1/0) or a `--backend-opt k=v` string (true/false, yes/no, on/off,
    1/0, any case); None for anything else (a typo must not silently mean "on")."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    return _SWITCH_WORDS.get(value.strip().lower()) if isinstance(value, str) else None


def option_on(options: dict, key: str) -> bool:
    """A switch of backend_options that is on unless set off; EvaluatorError for a value that is neither."""
    value = switch_value(options.get(key, True))
    if value is None:
        raise EvaluatorError(f"backend_options.{key}: expected true or false, got {options.get(key)!r}")
    return value


def close_warm() -> None:
    """The worker is ending: release what stages kept (each closer runs once; one failing does not stop the rest)."""
    while WORKER_EXIT:
        closer = WORKER_EXIT.pop()
        try:
            closer()
        except Exception as e:  # the worker is going away; say what could not be released
            print(f"warm worker: releasing {closer!r} failed: {type(e).__name__}: {e}", file=sys.stderr)


def stage_log(prefix: str) -> Callable[[str], None]:
    """A `log(msg)` writing `[prefix] msg` to stderr (the daemon keeps it as infer|eval.stderr.log)."""
    def log(msg: str) -> None:
        print(f"[{prefix}] {msg}", file=sys.stderr, flush=True)
    return log


def library_versions(names: tuple) -> dict:
    """{python, <distribution>: version} for the named distributions installed in this venv."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            pass
    return out


def metrics_header(job: StageJob, kind: str) -> dict:
    """The metrics.json fields that say which job a result belongs to."""
    # fingerprint/revision: the settings the numbers were made with, and which re-run this is (the daemon's)
    return {"benchmark": job.benchmark.get("name"), "benchmark_type": kind, "run": job.run,
            "iteration": job.iteration, "tokens_b": job.tokens_b, "checkpoint": job.checkpoint,
            "fingerprint": job.extra.get("fingerprint"), "revision": job.extra.get("revision", 0)}


def write_metrics(job: StageJob, doc: dict, log: Callable[[str], None]) -> int:
    """Check a metrics.json document against the contract, write it atomically (the evaluation stage's done
    marker, so last) and log the numbers; returns exit code 0."""
    validate_metrics(doc, METRICS)
    write_json_atomic(os.path.join(job.output_dir, METRICS), doc)
    log("done: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(doc["metrics"].items())))
    return 0


def stage_main(description: str, inference: Optional[Runner] = None, evaluation: Optional[Runner] = None,
               argv=None) -> int:
    """Parse `--job`, read the job spec and run the runner of its stage (exit 2 for a stage it has none for)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--job", required=True, help="job spec JSON (written by the daemon or tools/bench.py)")
    job = StageJob.read(parser.parse_args(argv).job)
    runner = {INFERENCE: inference, EVALUATION: evaluation}.get(job.stage)
    if runner is None:
        print(f"error: this module has no {job.stage!r} stage", file=sys.stderr)
        return 2
    return runner(job)
